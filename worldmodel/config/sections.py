"""The stage sections of the config as typed settings: one dataclass per section, its keys' types and
ranges. conf/config.yaml holds the defaults and documents each key; `settings(cfg, Evolve)` reads a
section into its dataclass, so a stage gets ints, floats, bools and enums by construction, and a wrong
value fails in one line naming its key before any work starts (`__post_init__`)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

from worldmodel.config import at_least_zero, null_or_positive, positive, require

POSITIVE_INT, POSITIVE = "a positive integer", "a positive number"


@dataclass
class Collect:
    SECTION: ClassVar[str] = "collect"
    episodes: int
    max_steps: int
    workers: int | None  # null: every core (or the Ray cluster's CPUs)
    episodes_per_shard: int
    episode_timeout: float
    reset_on_done: bool
    mosaic_frames: int

    def __post_init__(self) -> None:
        require(self, positive, POSITIVE_INT, "episodes", "max_steps", "episodes_per_shard")
        require(self, positive, POSITIVE, "episode_timeout")
        require(self, null_or_positive, "null (all cores) or a positive integer", "workers")
        require(self, at_least_zero, "an integer ≥ 0", "mosaic_frames")


@dataclass
class Merge:
    SECTION: ClassVar[str] = "merge"
    val_fraction: float
    chunk_frames: int
    compression_level: int

    def __post_init__(self) -> None:
        require(self, lambda v: 0 <= v < 1, "a number in [0, 1)", "val_fraction")
        require(self, positive, POSITIVE_INT, "chunk_frames")
        require(self, lambda v: 0 <= v <= 9, "an integer in [0, 9]", "compression_level")


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"  # autocast of the forward pass


@dataclass
class TrainVAE:
    SECTION: ClassVar[str] = "train_vae"
    epochs: int
    batch_size: int
    lr: float
    kl_tolerance: float
    num_workers: int
    buffer_frames: int
    val_frames: int
    grid_frames: int
    precision: Precision
    channels_last: bool

    def __post_init__(self) -> None:
        require(self, positive, POSITIVE_INT, "epochs", "batch_size", "buffer_frames", "val_frames")
        require(self, positive, POSITIVE_INT, "grid_frames")
        require(self, positive, POSITIVE, "lr")
        require(self, at_least_zero, "a number ≥ 0", "kl_tolerance")
        require(self, at_least_zero, "an integer ≥ 0", "num_workers")


@dataclass
class Encode:
    SECTION: ClassVar[str] = "encode"
    batch_size: int

    def __post_init__(self) -> None:
        require(self, positive, POSITIVE_INT, "batch_size")


@dataclass
class TrainRNN:
    SECTION: ClassVar[str] = "train_rnn"
    epochs: int
    batch_size: int
    seq_len: int
    hidden: int
    mixtures: int
    lr: float
    reward_weight: float
    done_weight: float
    done_pos_weight: float
    dropout: float
    grad_clip: float
    buffer_episodes: int
    reset_on_done: bool

    def __post_init__(self) -> None:
        require(self, positive, POSITIVE_INT, "epochs", "batch_size", "seq_len", "hidden", "mixtures")
        require(self, positive, POSITIVE_INT, "buffer_episodes")
        require(self, positive, POSITIVE, "lr", "grad_clip", "done_pos_weight")
        require(self, at_least_zero, "a number ≥ 0", "reward_weight", "done_weight")
        require(self, lambda v: 0 <= v < 1, "a number in [0, 1)", "dropout")


class Mode(StrEnum):
    real = "real"  # candidates scored in the env
    dream = "dream"  # inside M


class Inputs(StrEnum):
    z = "z"
    zh = "zh"
    zhc = "zhc"


class Select(StrEnum):
    best = "best"
    mean = "mean"


class DreamDone(StrEnum):
    threshold = "threshold"
    sample = "sample"


class InitialZ(StrEnum):
    real = "real"
    normal = "normal"


@dataclass
class Evolve:
    SECTION: ClassVar[str] = "evolve"
    mode: Mode
    popsize: int
    rollouts: int
    generations: int
    sigma0: float
    memory_sigma: float
    mirrored: bool
    inputs: Inputs
    hidden: int
    normalize: bool
    max_steps: int
    stall_steps: int
    envs_per_worker: int
    select: Select
    clip_actions: list[int]
    discrete_axis: list[int] | None
    bias: bool
    workers: int | None
    rollout_timeout: float
    temperature: float
    dream_dropout: float
    dream_done: DreamDone
    done_threshold: float
    done_reward: float | None  # null: the env's terminal_reward
    initial_z: InitialZ
    real_check_every: int
    real_check_rollouts: int
    eval_episodes: int
    gif_steps: int

    def __post_init__(self) -> None:
        require(self, positive, POSITIVE_INT, "rollouts", "generations", "max_steps", "real_check_rollouts")
        require(self, positive, POSITIVE_INT, "gif_steps", "envs_per_worker")
        require(self, lambda v: v >= 2, "an integer ≥ 2", "popsize")
        require(self, positive, POSITIVE, "sigma0", "memory_sigma", "rollout_timeout")
        require(self, at_least_zero, "an integer ≥ 0", "hidden", "real_check_every", "eval_episodes")
        require(self, at_least_zero, "an integer ≥ 0", "stall_steps")
        require(self, at_least_zero, "a number ≥ 0", "temperature")
        require(self, lambda v: 0 <= v < 1, "a number in [0, 1)", "dream_dropout")
        require(self, lambda v: 0 < v < 1, "a probability in (0, 1)", "done_threshold")
        require(self, null_or_positive, "null (all cores) or a positive integer", "workers")
        if self.mirrored:  # antithetic pairs
            require(self, lambda v: v % 2 == 0, "even with evolve.mirrored=true", "popsize")


@dataclass
class Evaluate:
    SECTION: ClassVar[str] = "evaluate"
    episodes: int
    max_steps: int | None  # null: the env's full episode
    workers: int | None
    envs_per_worker: int
    rollout_timeout: float
    gif_steps: int
    register: bool

    def __post_init__(self) -> None:
        require(self, positive, POSITIVE_INT, "episodes", "envs_per_worker")
        require(self, positive, POSITIVE, "rollout_timeout")
        require(self, at_least_zero, "an integer ≥ 0", "gif_steps")
        require(self, null_or_positive, "null or a positive integer", "max_steps", "workers")


@dataclass
class Play:
    SECTION: ClassVar[str] = "play"
    agent: str | None  # an alias of the registered agent-<env>, e.g. champion
    seed: int
    max_steps: int | None
    gif_steps: int
    window: bool

    def __post_init__(self) -> None:
        require(self, at_least_zero, "an integer ≥ 0", "seed")
        require(self, positive, POSITIVE_INT, "gif_steps")
        require(self, null_or_positive, "null or a positive integer", "max_steps")


class DreamMode(StrEnum):
    replay = "replay"
    free = "free"
    fidelity = "fidelity"


@dataclass
class Dream:
    SECTION: ClassVar[str] = "dream"
    mode: DreamMode
    temperature: float
    steps: int
    episodes: int
    fps: int
    use_controller: bool
    fidelity_random: int
    fidelity_history: int
    fidelity_dreams: int
    fidelity_tracks: int
    fidelity_block: int

    def __post_init__(self) -> None:
        require(self, positive, POSITIVE_INT, "steps", "episodes", "fps")
        require(self, positive, POSITIVE_INT, "fidelity_dreams", "fidelity_tracks", "fidelity_block")
        require(self, at_least_zero, "an integer ≥ 0", "fidelity_random", "fidelity_history")
        require(self, at_least_zero, "a number ≥ 0", "temperature")
