"""Where torch computes: `device.type`."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from worldmodel.errors import WorldModelError


def pick_device(cfg: DictConfig) -> torch.device:
    """`device.type`: auto picks cuda, then mps, then cpu; an explicit choice must be available."""
    kind = str(cfg.device.type)
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise WorldModelError("device=cuda but torch sees no CUDA device; use device=auto or device=cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise WorldModelError("device=mps but torch sees no MPS device; use device=auto or device=cpu")
    return torch.device(kind)
