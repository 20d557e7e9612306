"""One epoch of training or validation for V and M alike (`data_pass`), and what an epoch ends with:
checkpoints, resuming, finite losses, logged metrics."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import mlflow
import torch
from torch import nn

from worldmodel import tracking
from worldmodel.errors import WorldModelError
from worldmodel.models.checkpoints import save_checkpoint
from worldmodel.tracking.lineage import CHECKPOINTS

log = logging.getLogger(__name__)


@contextlib.contextmanager
def reading(path: Path, hint: str) -> Iterator[None]:
    """Turn a read error of an input file (a damaged chunk fails its checksum or decompression, in this
    process or in a DataLoader worker) into one line naming the file and what to do."""
    try:
        yield
    except OSError as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise WorldModelError(f"{path}: cannot be read ({lines[-1] if lines else err!r}); {hint}") from err


class Tally:
    """Weighted means of named values, summed in the order they come."""

    def __init__(self, names: Iterable[str]) -> None:
        self.sums: dict[str, float] = dict.fromkeys(names, 0.0)  # a pass with no batch still has them
        self.weights: dict[str, float] = dict.fromkeys(names, 0)

    def add(self, parts: dict[str, tuple[float, float]]) -> None:
        for name, (value, weight) in parts.items():
            self.sums[name] += value * weight
            self.weights[name] += weight

    def means(self) -> dict[str, float]:
        return {name: total / max(self.weights[name], 1) for name, total in self.sums.items()}


class Optimiser:
    """One update: zero the gradients, back-propagate, clip (when `grad_clip` is set), step."""

    def __init__(self, model: nn.Module, lr: float, grad_clip: float | None = None) -> None:
        self.model, self.grad_clip = model, grad_clip
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()


# A batch's loss, and the values to average: {name: (value, weight)}.
LossOf = Callable[[object], tuple[torch.Tensor, dict[str, tuple[float, float]]]]


def data_pass(
    batches: Iterable[object],
    loss_of: LossOf,
    optimiser: Optimiser | None,
    names: Iterable[str],
    what: str,
    stage: str,
) -> dict[str, float]:
    """One pass over `batches`: training when an `optimiser` is given (a non-finite loss stops the
    run before the update), validation otherwise (the caller holds torch.no_grad and eval mode).
    Returns the weighted means of what `loss_of` reports, by `names` (0 for a pass with no batch)."""
    tally = Tally(names)
    for i, batch in enumerate(batches):
        loss, parts = loss_of(batch)
        if optimiser is not None:
            require_finite(loss.item(), f"the loss of {what}, batch {i}", stage)
            optimiser.step(loss)
        tally.add(parts)
    return tally.means()


def restore(run_id: str | None, model: nn.Module, optimiser: Optimiser) -> tuple[int, float]:
    """Continue an interrupted run (`inputs.resume`) from its last checkpoint: weights, optimizer, torch's
    random state. Returns the first epoch still to train and the best validation score so far."""
    if not run_id:
        return 0, float("inf")
    if f"{CHECKPOINTS}/last.pt" not in tracking.list_artifacts(run_id, CHECKPOINTS):
        log.info("run %s has no checkpoint yet: starting from epoch 0", run_id)
        return 0, float("inf")
    ckpt = tracking.checkpoint_of(run_id, "last")
    model.load_state_dict(ckpt["state_dict"])
    optimiser.optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    log.info("resuming run %s after epoch %d", run_id, ckpt["epoch"])
    return int(ckpt["epoch"]) + 1, float(ckpt["best_val"])


def require_finite(value: float, what: str, stage: str) -> None:
    """Stop a training run whose loss became NaN or inf (its inputs are checked finite as they are
    read, so the model diverged), before a NaN checkpoint or metric is written."""
    if not math.isfinite(value):
        raise WorldModelError(
            f"{stage}: {what} is {value}: training diverged; lower {stage}.lr (or clip gradients harder)"
        )


class Checkpoints:
    """A training run's `checkpoints/best.pt` (the best validation score so far, lower is better) and
    `checkpoints/last.pt` (with what resuming needs)."""

    def __init__(self) -> None:
        self.out = tracking.OutputDir(CHECKPOINTS)

    @property
    def best_path(self) -> Path:
        return self.out / "best.pt"

    def save(self, model: nn.Module, optimiser: Optimiser, epoch: int, score: float, best: float) -> float:
        """End of an epoch: `best.pt` when `score` beats `best`, and always `last.pt`. Returns the best."""
        if score < best:
            best = score
            save_checkpoint(self.best_path, model, epoch=epoch, best_val=best)
            self.out.publish(self.best_path)
        save_checkpoint(
            self.out / "last.pt",
            model,
            epoch=epoch,
            best_val=best,
            optimizer=optimiser.optimizer.state_dict(),
            rng=torch.get_rng_state(),
        )
        self.out.publish(self.out / "last.pt")
        return best


def log_epoch(metrics: dict[str, float], epoch: int) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=epoch)
