"""Envs seen through pixels, built from the env config alone (`conf/env/<name>.yaml`).

What differs between envs lives in that config, not in code branches: where frames come from
(`frames: observation`, CarRacing's 96×96 state pixels, or `render`, `env.render()` in rgb_array mode),
the crop (`crop`: rows and columns removed from each side), the frame size, and the actions. Actions are
stored and fed to the MDN-RNN as float vectors of `action_dim`: the env's own box actions, or for a
discrete env a one-hot vector, turned back into the action's index when stepping the env. CarRacing's
`fast_render` picks worldmodel's faster renderer with identical kept pixels. An env from another package
names the module that registers it (`register`: VizDoom's `vizdoom.gymnasium_wrapper`, an optional extra
whose absence is a one-line error, `requires`), and a dict observation names its frame (`obs_key`).

Frames are cropped and resized to image_size × image_size (`resample`: LANCZOS as seed 000, or the
darkest pixel of each block), optionally with thin dark strokes widened (`widen`); uint8 HWC.
"""

from __future__ import annotations

import atexit
import importlib
import os
import weakref

import gymnasium as gym
import numpy as np
from omegaconf import DictConfig
from PIL import Image

from worldmodel.errors import WorldModelError


class ActionSpace:
    """The actions as worldmodel stores them: `box` (continuous, within [low, high]) or `discrete`
    (one-hot vectors of `dim`). A plain class: Hydra's instantiate passes it to policies untouched."""

    def __init__(self, kind: str, dim: int, low: np.ndarray, high: np.ndarray) -> None:
        self.kind, self.dim, self.low, self.high = kind, dim, low, high


def action_space(env_cfg: DictConfig) -> ActionSpace:
    """The actions the env config declares (`env.action`), known without building the env."""
    a = env_cfg.action
    if a.kind == "discrete":
        return ActionSpace(
            "discrete", int(a.n), np.zeros(int(a.n), np.float32), np.ones(int(a.n), np.float32)
        )
    low, high = np.asarray(a.low, np.float32), np.asarray(a.high, np.float32)
    return ActionSpace("box", len(low), low, high)


def register(env_cfg: DictConfig) -> None:
    """Import the module that registers the env (`env.register`), or say how to install it."""
    module = env_cfg.get("register")
    if not module:
        return
    try:
        importlib.import_module(str(module))
    except ImportError as err:
        raise WorldModelError(
            f"env={env_cfg.name} needs {module} ({err.name} is not installed): "
            f"{env_cfg.get('requires') or 'install the package that provides it'}"
        ) from None


def _check_space(declared: ActionSpace, space: gym.Space, env_id: str) -> None:
    if isinstance(space, gym.spaces.Discrete):
        ok = declared.kind == "discrete" and declared.dim == int(space.n)
    else:
        ok = (
            declared.kind == "box"
            and np.array_equal(declared.low, space.low)
            and np.array_equal(declared.high, space.high)
        )
    if not ok:
        raise WorldModelError(f"config key 'env.action' does not describe {env_id}'s action space {space}")


def preprocess(
    frame: np.ndarray, crop: DictConfig | dict, size: int, resample: str = "lanczos"
) -> np.ndarray:
    """Remove `crop` rows/columns (top, bottom, left, right) and resize to size×size: with LANCZOS, or
    (`min`) by the darkest value of each block of pixels, which keeps thin dark strokes (CartPole's
    10-pixel pole in a 600-pixel-wide frame) at full contrast instead of averaging them away."""
    h, w = frame.shape[:2]
    frame = frame[crop["top"] : h - crop["bottom"], crop["left"] : w - crop["right"]]
    if resample == "min":
        h, w = frame.shape[:2]
        bh, bw = -(-h // size), -(-w // size)
        if (bh * size, bw * size) != (h, w):  # pad with white to whole blocks
            padded = np.full((bh * size, bw * size, 3), 255, np.uint8)
            padded[:h, :w] = frame
            frame = padded
        # elementwise minima of strided views: ~12× faster than a reduction over the block axes
        rows = np.minimum.reduce([frame[i::bh] for i in range(bh)])
        return np.minimum.reduce([rows[:, j::bw] for j in range(bw)])
    image = Image.fromarray(np.ascontiguousarray(frame))
    return np.array(image.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def widen(frame: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Each pixel becomes the darkest of the rows × cols window centred on it: thin dark strokes grow
    by cols - 1 columns (and rows - 1 rows)."""
    if rows == cols == 1:
        return frame
    padded = np.pad(
        frame, ((rows // 2, (rows - 1) // 2), (cols // 2, (cols - 1) // 2), (0, 0)), constant_values=255
    )
    h, w = frame.shape[:2]  # minima of shifted views, one axis at a time (separable)
    wide = np.minimum.reduce([padded[:, j : j + w] for j in range(cols)])
    return np.minimum.reduce([wide[i : i + h] for i in range(rows)])


_OPEN: weakref.WeakSet = weakref.WeakSet()  # envs not closed yet: closed at exit (VizDoom's engine
# is a process of its own, which outlives an unclosed env)


@atexit.register
def close_all() -> None:
    for env in list(_OPEN):
        env.close()


class PixelObservation(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """The env's frames as worldmodel sees them, as a gymnasium wrapper (so RecordVideo, frame stacking
    or a vector env wrap it like any env): cropped and resized to `image_size`, widened and rescaled
    where the env config says; from the observation, or from `render()` (`frames: render`)."""

    def __init__(self, env: gym.Env, cfg: DictConfig) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, cfg=cfg)
        gym.ObservationWrapper.__init__(self, env)
        self.from_render = cfg.frames == "render"
        self.obs_key = cfg.get("obs_key")  # a dict observation's frame (VizDoom: screen)
        self.crop, self.size, self.resample = dict(cfg.crop), int(cfg.image_size), str(cfg.resample)
        # `pixel_range: [lo, hi]` maps 0..255 linearly onto lo..hi: a frame of pure white and black would
        # drive the VAE's sigmoid output into saturation, where it stops learning (measured on CartPole:
        # stuck at the mean frame for 4 epochs at [0, 255], learning within 200 batches at [24, 232]).
        # `widen: [rows, cols]`: a VAE averages a 2-pixel pole over its angles into a blurred cone and never
        # encodes the angle (linear probe R² ≈ 0 after 1,000 batches); 8 columns wide it does (R² 0.68-0.75).
        self.widen_by = tuple(cfg.get("widen") or (1, 1))
        lo, hi = cfg.get("pixel_range") or (0, 255)
        self.levels = None if (lo, hi) == (0, 255) else np.round(np.linspace(lo, hi, 256)).astype(np.uint8)
        self.observation_space = gym.spaces.Box(0, 255, (self.size, self.size, 3), np.uint8)

    def observation(self, observation: np.ndarray | dict) -> np.ndarray:
        if self.obs_key:
            observation = observation[self.obs_key]
        frame = preprocess(
            self.env.render() if self.from_render else observation, self.crop, self.size, self.resample
        )
        frame = widen(frame, *self.widen_by)
        return frame if self.levels is None else self.levels[frame]


def gym_env(cfg: DictConfig) -> PixelObservation:
    """The env of an env config as a gymnasium env of worldmodel's frames."""
    if cfg.get("fast_render", False):
        from worldmodel.envs.fast_carracing import register_fast_env

        return PixelObservation(gym.make(register_fast_env()), cfg)
    register(cfg)
    render = cfg.frames == "render"
    if render:  # pygame draws off-screen; without this SDL looks for a display
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    return PixelObservation(gym.make(str(cfg.id), render_mode="rgb_array" if render else None), cfg)


class PixelEnv:
    """The pixel env the stages use: `reset` and `step` return frames and take stored actions."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.env = gym_env(cfg)
        self.space = action_space(cfg)
        _check_space(self.space, self.env.action_space, str(cfg.id))
        _OPEN.add(self)

    @property
    def unwrapped(self) -> gym.Env:
        return self.env.unwrapped

    def reset(self, seed: int | None = None, state: np.ndarray | None = None) -> np.ndarray:
        """A new episode (from `state` when given, for envs whose state can be set, e.g. CartPole)."""
        frame, _ = self.env.reset(seed=seed)
        if state is not None:
            self.env.unwrapped.state = np.asarray(state, dtype=np.float64)
            frame = self.env.observation(np.asarray(state, dtype=np.float32))
        return frame

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool]:
        """A stored action (a box action, or a one-hot vector) → frame, reward, terminated, truncated."""
        env_action = int(np.argmax(action)) if self.space.kind == "discrete" else action
        frame, reward, terminated, truncated, _ = self.env.step(env_action)
        return frame, float(reward), bool(terminated), bool(truncated)

    def close(self) -> None:
        if self in _OPEN:
            _OPEN.discard(self)
            self.env.close()


def make_env(env_cfg: DictConfig) -> PixelEnv:
    return PixelEnv(env_cfg)
