"""Env factory and frame preprocessing (seed 000: crop the dashboard, LANCZOS resize)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from omegaconf import DictConfig
from PIL import Image


def make_env(env_cfg: DictConfig) -> gym.Env:
    """The gymnasium env; observations are the 96×96 RGB state pixels. For CarRacing-v3,
    `env.fast_render` (default) picks the faster renderer with identical kept pixels."""
    if env_cfg.get("fast_render", False) and env_cfg.id == "CarRacing-v3":
        from worldmodel.fast_carracing import register_fast_env

        return gym.make(register_fast_env())
    return gym.make(str(env_cfg.id))


def preprocess(obs: np.ndarray, crop_bottom: int, size: int) -> np.ndarray:
    """Crop `crop_bottom` rows (the dashboard) and resize to size×size with LANCZOS; uint8 HWC."""
    if crop_bottom:
        obs = obs[:-crop_bottom]
    image = Image.fromarray(np.ascontiguousarray(obs))
    return np.array(image.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)
