"""Checkpoints: a torch state dict plus the hyperparameters that rebuild the module, written whole or
not at all, and read with `weights_only=True` (no pickled code runs on load)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from worldmodel.errors import WorldModelError, one_line
from worldmodel.files import atomic


def save_checkpoint(path: Path, model: nn.Module, **extra: Any) -> None:
    # Plain Python numbers only: numpy scalars would not load under weights_only=True.
    extra = {k: v.item() if isinstance(v, np.generic) else v for k, v in extra.items()}
    with atomic(path) as partial:
        torch.save({"state_dict": model.state_dict(), "hparams": model.hparams, **extra}, partial)


def load_checkpoint(path: Path | str, what: str = "checkpoint") -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a bad file
        raise WorldModelError(
            f"{what}: cannot load checkpoint {path} ({err.__class__.__name__}); re-run the stage that made it"
        ) from err


def load_module(cls: type[nn.Module], path: Path | str) -> nn.Module:
    """Rebuild `cls` from a checkpoint's hyperparameters and weights, in eval mode."""
    ckpt = load_checkpoint(path, cls.__name__)
    try:
        model = cls(**ckpt["hparams"])
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # another model, or an older layout
        raise WorldModelError(
            f"{path}: not a {cls.__name__} checkpoint this version can rebuild ({one_line(err, 240)}); "
            "re-run the stage that made it"
        ) from err
    return model.eval()
