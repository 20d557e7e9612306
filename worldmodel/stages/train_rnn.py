"""train_rnn: the MDN-RNN on sequences of latents.

Trains on windows of `train_rnn.seq_len` steps, with z re-sampled from `mu`/`logvar` in every batch (as
in the paper), drawn from seed 002's ring buffer of episodes (`EpisodeBuffer`, capacity
`train_rnn.buffer_episodes`). When every training episode fits, the buffer is filled once and each epoch
tiles every episode from a random offset, in a shuffled order, so an epoch sees every window once (as
before the buffer; drawing windows with replacement leaves about a third of them out of an epoch, and
over 4 seeds scored no better or worse: README). A dataset larger than the buffer streams through it in a
shuffled order, and each batch is sampled from what it holds, so memory is bounded by the capacity, not
by the dataset. Validation streams the held-out episodes in order. Next to the model's validation NLL it
logs that of a simple baseline on the same data, a diagonal Gaussian centred on the current z with the
best fixed variance, so anyone can see whether the model learned anything.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm import tqdm

from worldmodel import tracking, training
from worldmodel.config import settings
from worldmodel.config.sections import TrainRNN
from worldmodel.data import latents
from worldmodel.data.buffer import EpisodeBuffer
from worldmodel.data.datasets import episodes_in
from worldmodel.errors import WorldModelError
from worldmodel.models.checkpoints import load_module
from worldmodel.models.mdnrnn import MDNRNN, MDNLoss, MDNRNNStep, mdn_loss
from worldmodel.progress import progress_bar
from worldmodel.tracking import lineage

log = logging.getLogger(__name__)
STAGE = "train_rnn"


def validate(cfg: DictConfig) -> None:
    settings(cfg, TrainRNN)


@dataclass(frozen=True)
class LossTerms:
    """What M's loss reads: train_rnn's weights, how z is read (agent.z), the env's terminal reward, and
    whether a done starts M's memory afresh (train_rnn.reset_on_done)."""

    reward_weight: float
    done_weight: float
    z_kind: str
    terminal_reward: float | None
    reset_on_done: bool

    @classmethod
    def of(cls, cfg: DictConfig, hp: TrainRNN) -> LossTerms:
        terminal = cfg.env.get("terminal_reward")
        return cls(hp.reward_weight, hp.done_weight, str(cfg.agent.z), terminal, hp.reset_on_done)


def windows(data: dict[str, np.ndarray], seq_len: int) -> np.ndarray:
    """(episode, start) of the non-overlapping windows of seq_len + 1 steps, from each episode's start."""
    span = seq_len + 1
    out = [(e, s) for e, length in enumerate(data["lengths"]) for s in range(0, length - span + 1, span)]
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def gather(data: dict[str, np.ndarray], index: np.ndarray, span: int) -> dict[str, np.ndarray]:
    """The windows (episode, start) of `index`, `span` steps each, as arrays (B, span, ...)."""
    e, s = index[:, :1], index[:, 1:] + np.arange(span)
    return {k: data[k][e, s] for k in latents.PER_STEP}


def batch_tensors(
    w: dict[str, np.ndarray], generator: torch.Generator, device: torch.device, z_kind: str = "sample"
) -> dict[str, torch.Tensor]:
    """Inputs and targets from windows of seq_len + 1 steps; z is sampled from mu/logvar afresh, or is
    mu (`agent.z=mean`: what the agent reads in the real env)."""
    mu, logvar = torch.from_numpy(w["mu"]), torch.from_numpy(w["logvar"])
    z = mu
    if z_kind == "sample":
        z = mu + torch.randn(mu.shape, generator=generator) * torch.exp(0.5 * logvar)
    dones = torch.from_numpy(w["dones"][:, :-1])
    out = {
        "z": z[:, :-1],
        "next_z": z[:, 1:],
        "actions": torch.from_numpy(w["actions"][:, :-1]),
        "rewards": torch.from_numpy(w["rewards"][:, :-1]),
        "dones": dones,
        "mask": (~dones).float(),
    }
    return {k: v.to(device) for k, v in out.items()}


def batch_loss(
    model: MDNRNN,
    w: dict[str, np.ndarray],
    terms: LossTerms,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], MDNLoss]:
    """The batch of windows `w` and the model's loss on it; in training with dropout, one mask pair per
    window, drawn from `generator`."""
    b = batch_tensors(w, generator, device, terms.z_kind)
    masks = None
    if model.training and model.dropout > 0:
        masks = tuple(m.to(device) for m in model.dropout_masks(len(b["z"]), model.dropout, generator))
    fresh = resets(b["dones"]) if terms.reset_on_done else None
    out, _, _ = model(b["z"], b["actions"], masks=masks, resets=fresh)
    loss = mdn_loss(
        out,
        b["next_z"],
        b["rewards"],
        b["dones"],
        terms.reward_weight,
        terms.done_weight,
        b["mask"],
        model.done_pos_weight,
        failures(b, terms.terminal_reward),
    )
    return b, loss


def resets(dones: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the steps right after a done, where a record with resets (collect.reset_on_done)
    starts a new life, so M's memory starts afresh there as in every dream and every real episode."""
    return F.pad(dones[:, :-1], (1, 0), value=False)


def failures(b: dict[str, torch.Tensor], terminal_reward: float | None) -> torch.Tensor | None:
    """The reward mask: 0 on the done steps that paid the env's `terminal_reward` (CarRacing: −100 for
    leaving the playfield), which a dreamed done earns instead, so the reward head learns the other
    steps (a finished lap keeps its reward); None when the env declares no terminal reward."""
    if not terminal_reward:
        return None
    return (~(b["dones"] & (b["rewards"] <= float(terminal_reward)))).float()


def _episodes(path: Path, order: np.ndarray) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Episodes of `order` one at a time, read 16 at a time: (their step arrays, length)."""
    for data in latents.stream(path, order, per_read=16):
        for i, length in enumerate(data["lengths"]):
            yield {k: data[k][i] for k in latents.PER_STEP}, int(length)


def training_batches(
    buffer: EpisodeBuffer,
    path: Path,
    train: np.ndarray,
    lengths: np.ndarray,
    hp: TrainRNN,
    rng: np.random.Generator,
) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of batches. When every training episode fits in the buffer, it is filled once, in
    file order (so an epoch depends on its own seed alone, and a resumed run samples what an
    uninterrupted one would), and the epoch tiles it without overlap. A smaller buffer takes the
    episodes as they stream in (shuffled) and samples as many windows as they hold: sampling starts
    once it is full and keeps pace with the stream after that (a resumed run refills it, so it samples
    differently from an uninterrupted one)."""
    span, size = hp.seq_len + 1, hp.batch_size
    if buffer.capacity >= len(train):
        if buffer.size < len(train):
            for episode, length in _episodes(path, train):
                buffer.add(episode, length)
        yield from buffer.epoch(size, span, rng)
        return
    owed, due = int((lengths[train] // span).sum()), 0
    for episode, length in _episodes(path, train[rng.permutation(len(train))]):
        buffer.add(episode, length)
        due += length // span
        while due >= size and buffer.size == buffer.capacity:
            yield buffer.sample(size, span, rng)
            due, owed = due - size, owed - size
    while owed > 0:  # what the stream still owes
        yield buffer.sample(min(size, owed), span, rng)
        owed -= size


class _Baseline:
    """The baseline's statistics over validation pairs: Σ (next_z − z)² per dimension, and the steps."""

    def __init__(self, latent: int) -> None:
        self.sq, self.steps = torch.zeros(latent), 0.0

    def add(self, b: dict[str, torch.Tensor]) -> None:
        m = b["mask"].bool().cpu()
        self.sq += (b["next_z"] - b["z"]).cpu()[m].pow(2).sum(0)
        self.steps += float(b["mask"].sum())

    def nll(self) -> float:
        var = (self.sq / self.steps).clamp(min=1e-8)  # per-dimension σ² of next_z ~ N(z, σ²), fitted here
        return float((0.5 * torch.log(2 * math.pi * var) + 0.5).mean())


def _validation_windows(path: Path, episodes: np.ndarray, hp: TrainRNN) -> Iterator[dict[str, np.ndarray]]:
    """The held-out episodes' windows in order, `buffer_episodes` episodes read at a time."""
    span, size = hp.seq_len + 1, hp.batch_size
    for data in latents.stream(path, episodes, hp.buffer_episodes):
        index = windows(data, hp.seq_len)
        for i in range(0, len(index), size):
            yield gather(data, index[i : i + size], span)


@torch.no_grad()
def validation(
    model: MDNRNN,
    path: Path,
    episodes: np.ndarray,
    hp: TrainRNN,
    terms: LossTerms,
    seed: int,
    latent: int,
    device: torch.device,
) -> dict[str, float]:
    """Validation losses, the NLL per unmasked step (the reward and done losses per window), and the
    baseline's NLL on the same pairs."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    baseline = _Baseline(latent)

    def loss_of(w: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, tuple[float, float]]]:
        b, loss = batch_loss(model, w, terms, generator, device)
        baseline.add(b)
        k = len(b["z"])
        parts = {"nll": (loss.nll.item(), float(b["mask"].sum())), "reward_loss": (loss.reward.item(), k)}
        return loss.loss, parts | {"done_loss": (loss.done.item(), k)}

    names = ("nll", "reward_loss", "done_loss")
    val = training.data_pass(
        _validation_windows(path, episodes, hp), loss_of, None, names, "validation", STAGE
    )
    if baseline.steps == 0:
        raise WorldModelError(
            f"train_rnn: no validation episode is longer than train_rnn.seq_len={hp.seq_len} steps; lower it"
        )
    return {f"val/{k}": v for k, v in val.items()} | {"val/baseline_nll": baseline.nll()}


def run(cfg: DictConfig) -> str:
    compat = tracking.compat(cfg, "latent_size")
    encode = tracking.resolve_run(cfg, "encode", cfg.inputs.encode, compat)
    path = tracking.artifact_path(encode.info.run_id, lineage.LATENTS)
    hp = settings(cfg, TrainRNN)
    info, train, val = _episodes_of(path, cfg.latent.size, hp.seq_len)
    device = training.pick_device(cfg)
    upstream = {"encode": encode.info.run_id, "train_vae": tracking.upstream(encode, "train_vae")}
    with tracking.stage_run(
        cfg,
        STAGE,
        [STAGE, "latent", "agent"],
        upstream,
        compat,
        resume=cfg.inputs.resume,
        may_change=["train_rnn.epochs"],
    ) as run:
        tracking.log_dataset(encode.info.run_id, lineage.LATENTS, "training")
        torch.manual_seed(cfg.seed)
        model = _model(hp, cfg.latent.size, info.action_dim, device)
        optimiser = training.Optimiser(model, hp.lr, hp.grad_clip)
        start_epoch, best = training.restore(cfg.inputs.resume, model, optimiser)
        epochs = Epochs(cfg, hp, model, optimiser, device, path, info, train, val)
        checkpoints = training.Checkpoints()
        for epoch in range(start_epoch, hp.epochs):
            best = checkpoints.save(model, optimiser, epoch, epochs.run(epoch), best)
        training.log_epoch({"best_val_nll": best}, hp.epochs - 1)
        rnn = load_module(MDNRNN, checkpoints.best_path)
        h, c = rnn.initial_state(2)  # a batch of 1 would be exported as a fixed size
        examples = (torch.zeros(2, rnn.latent), torch.zeros(2, rnn.action_dim), h[0], c[0])
        tracking.log_model(MDNRNNStep(rnn), examples)
        return run.info.run_id


def _episodes_of(path: Path, latent: int, seq_len: int) -> tuple[latents.LatentsInfo, np.ndarray, np.ndarray]:
    """The latents file's layout, and its training and validation episodes (checked against seq_len)."""
    info = latents.inspect(path, latent)
    train, val = episodes_in(path, "train"), episodes_in(path, "val")
    if len(val) == 0:
        val = train  # a dataset without a validation split: report on the training episodes
    longest = int(info.lengths[train].max())
    if longest <= seq_len:
        raise WorldModelError(
            f"train_rnn.seq_len={seq_len} is not shorter than the episodes ({longest} steps); lower it"
        )
    return info, train, val


def _model(hp: TrainRNN, latent: int, action_dim: int, device: torch.device) -> MDNRNN:
    return MDNRNN(latent, action_dim, hp.hidden, hp.mixtures, hp.dropout, hp.done_pos_weight).to(device)


class Epochs:
    """One epoch of M: a training pass over the buffer's windows, a validation pass, the metrics."""

    def __init__(
        self,
        cfg: DictConfig,
        hp: TrainRNN,
        model: MDNRNN,
        optimiser: training.Optimiser,
        device: torch.device,
        path: Path,
        info: latents.LatentsInfo,
        train: np.ndarray,
        val: np.ndarray,
    ) -> None:
        self.hp, self.model, self.optimiser, self.device = hp, model, optimiser, device
        self.terms = LossTerms.of(cfg, hp)
        self.seed, self.latent = cfg.seed, cfg.latent.size
        self.path, self.info, self.train, self.val = path, info, train, val
        self.total_windows = int((info.lengths[train] // (hp.seq_len + 1)).sum())
        self.buffer = EpisodeBuffer(hp.buffer_episodes)

    def run(self, epoch: int) -> float:
        """Train and validate once; log the epoch. Returns the validation NLL."""
        hp = self.hp
        self.model.train()
        rng = np.random.default_rng([self.seed, epoch])
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        batches = training_batches(self.buffer, self.path, self.train, self.info.lengths, hp, rng)
        t0, self.windows = time.perf_counter(), 0
        with progress_bar(
            total=self.total_windows, desc=f"train_rnn {epoch + 1}/{hp.epochs}", unit="seq", leave=False
        ) as bar:
            loss_of = self._train_loss(generator, bar)
            names = ("loss", "nll", "reward_loss", "done_loss")
            train = training.data_pass(batches, loss_of, self.optimiser, names, f"epoch {epoch}", STAGE)
        elapsed = time.perf_counter() - t0
        metrics = {f"train/{k}": v for k, v in train.items()}
        metrics |= validation(
            self.model, self.path, self.val, hp, self.terms, self.seed, self.latent, self.device
        )
        metrics["val/nll_gain_over_baseline"] = metrics["val/baseline_nll"] - metrics["val/nll"]
        metrics["train/steps_per_s"] = self.windows * hp.seq_len / elapsed
        training.require_finite(metrics["val/nll"], f"the validation NLL of epoch {epoch}", STAGE)
        training.log_epoch(metrics, epoch)
        log.info(
            "train_rnn epoch %d: train nll %.3f, val nll %.3f (baseline %.3f), reward %.4f, done %.4f",
            *(epoch, metrics["train/nll"], metrics["val/nll"], metrics["val/baseline_nll"]),
            *(metrics["val/reward_loss"], metrics["val/done_loss"]),
        )
        return float(metrics["val/nll"])

    def _train_loss(self, generator: torch.Generator, bar: tqdm) -> training.epochs.LossOf:
        def loss_of(w: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, tuple[float, float]]]:
            b, loss = batch_loss(self.model, w, self.terms, generator, self.device)
            k = len(b["z"])
            self.windows += k
            bar.update(k)
            values = {"loss": loss.loss, "nll": loss.nll, "reward_loss": loss.reward, "done_loss": loss.done}
            return loss.loss, {name: (v.item(), k) for name, v in values.items()}

        return loss_of
