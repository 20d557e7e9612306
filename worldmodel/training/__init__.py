"""What training V and M shares: the device, one epoch pass, checkpoints and resuming."""

from worldmodel.training.device import pick_device
from worldmodel.training.epochs import (
    Checkpoints,
    Optimiser,
    data_pass,
    log_epoch,
    reading,
    require_finite,
    restore,
)

__all__ = [
    "Checkpoints",
    "Optimiser",
    "data_pass",
    "log_epoch",
    "pick_device",
    "reading",
    "require_finite",
    "restore",
]
