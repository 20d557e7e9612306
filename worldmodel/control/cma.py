"""CMA-ES's state as its fitness history: CMA-ES is deterministic given its seed and the fitness it is
told, so a run keeps only what it was told (`cma/history.npz`: plain arrays, loaded without pickle, so a
crafted artifact cannot run code) and anyone can rebuild every generation by replaying it: to resume
the run, or to see the controllers it went through (the dream-fidelity check)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import cma
import numpy as np

from worldmodel import tracking
from worldmodel.config.sections import Evolve
from worldmodel.errors import WorldModelError
from worldmodel.models.controller import Controller
from worldmodel.tracking.lineage import HISTORY


def new_es(
    n_params: int,
    popsize: int,
    sigma0: float,
    seed: int,
    scales: np.ndarray | None = None,
    mirrored: bool = False,
) -> cma.CMAEvolutionStrategy:
    """CMA-ES from zero with its own seeded generator (nothing else in the process can shift it);
    `scales`: each coordinate's initial step size as a multiple of sigma0 (cma's CMA_stds); `mirrored`:
    the asks come in antithetic pairs, mean ± the same step (cma's unconditional mirrors), so that both
    halves of a pair meet the same track and their difference is the step's worth, not the track's luck."""
    options = {"popsize": popsize, "seed": seed, "verbose": -9}
    options["randn"] = np.random.RandomState(seed).randn
    if scales is not None and not np.all(scales == 1):  # all ones: the same asks as no option
        options["CMA_stds"] = np.asarray(scales, np.float64)
    if mirrored:
        options |= {"CMA_mirrors": popsize // 2, "CMA_mirrormethod": 0}
    return cma.CMAEvolutionStrategy(np.zeros(n_params), sigma0, options)


def es_for(controller: Controller, hp: Evolve, seed: int) -> cma.CMAEvolutionStrategy:
    """The CMA-ES an evolve run with settings `hp` and seed `seed` starts with, for `controller`."""
    scales = controller.step_scales(hp.memory_sigma).numpy()
    return new_es(controller.n_params, hp.popsize, hp.sigma0, seed + 1, scales, hp.mirrored)


def digest(solutions: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(solutions, dtype=np.float32).tobytes()).hexdigest()


def load(run_id: str, popsize: int) -> tuple[np.ndarray, np.ndarray]:
    """The fitness (generations, popsize) and the digests of the asks of an evolve run."""
    path = tracking.artifact_path(run_id, HISTORY)
    try:
        with np.load(path, allow_pickle=False) as f:
            fitness, digests = f["fitness"], f["digest"]
    except (OSError, ValueError, KeyError) as err:
        raise WorldModelError(
            f"evolve run {run_id}: {HISTORY} is not a CMA-ES history ({err.__class__.__name__}); "
            "start a new run"
        ) from err
    if fitness.ndim != 2 or fitness.shape[1] != popsize or digests.shape != fitness.shape[:1]:
        raise WorldModelError(
            f"evolve run {run_id}: {HISTORY} holds fitness of shape {fitness.shape}, expected "
            f"(generations, {popsize}); start a new run"
        )
    return fitness.astype(np.float64), digests


def replay(
    es: cma.CMAEvolutionStrategy, run_id: str, popsize: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray, str]]:
    """Ask and tell `es` as the run did, generation after generation: (generation, its candidates, their
    fitness, the digest), each after the tell. The asks must match the stored digests."""
    fitnesses, digests = load(run_id, popsize)
    for gen, (fitness, stored) in enumerate(zip(fitnesses, digests)):
        asked = es.ask()
        solutions = np.asarray(asked, dtype=np.float32)
        if digest(solutions) != str(stored):
            raise WorldModelError(
                f"evolve run {run_id}: {HISTORY} does not replay at generation {gen} "
                "(written with other settings or another version); start a new run"
            )
        es.tell(asked, list(-fitness))
        yield gen, solutions, fitness, str(stored)
