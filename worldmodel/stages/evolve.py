"""evolve: CMA-ES on the controller, in the real env or inside the learned world.

- `evolve.mode=real`: every rollout of every candidate runs in the env, spread over worker processes
  that each drive `evolve.envs_per_worker` envs in lockstep with one VAE, MDN-RNN and controller
  forward per step (CPU, one torch thread). A rollout stops once it has gone `evolve.stall_steps`
  steps without a new tile. A worker that dies or hangs is replaced and its rollouts re-run.
- `evolve.mode=dream`: all popsize × rollouts rollouts advance together as one batch inside the
  MDN-RNN, from real initial latents or N(0, I) (`evolve.initial_z`), with variational dropout masks on M per
  rollout (`evolve.dream_dropout`) and the done head thresholded or sampled (`evolve.dream_done`); a
  dreamed done earns what the real env pays for that ending (`evolve.done_reward`, default the env's
  `terminal_reward`). Every `evolve.real_check_every` generations the controller that would be kept
  now (`evolve.select`: CMA-ES's mean, or the best so far) is scored in the real env,
  `real/check_score` beside its dream score `real/check_dream_score`, so exploitation of the dream
  shows as a curve; the generation's top candidate's scores are logged beside them
  (`real/check_top_score`, `real/check_top_dream_score`).

With `evolve.normalize`, the controller standardises its inputs by their mean and std along popsize real
rollouts of random candidates, run before the first generation; the statistics travel in its checkpoint.

All candidates of a generation are scored on the same rollout seeds (common random numbers). CMA-ES is
deterministic given its seed and the fitness it is told, so its state is kept as that history
(`cma/history.npz`: plain arrays, loaded without pickle, so a crafted artifact cannot run code) and an
interrupted run resumes with `inputs.resume=<run id>` by replaying it. At the end the kept controller
(`evolve.select`: the best candidate seen, or CMA-ES's mean) is saved, and with `evolve.eval_episodes`
> 0 scored by the standard evaluation (`evaluate.report`, as `stage=evaluate`) on that many unseen
tracks.
"""

from __future__ import annotations

import copy
import logging
import time

import cma
import mlflow
import numpy as np
import torch
from omegaconf import DictConfig

from worldmodel import tracking, training
from worldmodel.config import check, is_int, settings
from worldmodel.config.sections import Dream, Evolve, Mode, Select
from worldmodel.control import cma as cma_history
from worldmodel.control.agent import controller_for, load_rnn, standardisation
from worldmodel.control.fitness import DreamFitness, Fitness, RealFitness
from worldmodel.control.scorer import RealScorer, eval_seeds, eval_steps, real_scorer
from worldmodel.errors import WorldModelError
from worldmodel.models.checkpoints import save_checkpoint
from worldmodel.models.controller import Controller
from worldmodel.models.mdnrnn import MDNRNN
from worldmodel.progress import progress_bar
from worldmodel.seeds import NORM, TRAIN, seed_of
from worldmodel.stages.evaluate import report
from worldmodel.tracking import lineage

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> None:
    settings(cfg, Evolve)
    check(
        cfg,
        "evolve.clip_actions",
        lambda v: all(is_int(d) and 0 <= d < len(cfg.env.action.get("low", [])) for d in v),
        "a list of box action dimensions (CarRacing's brake: [2])",
    )
    n = int(cfg.env.action.get("n", 0))
    check(
        cfg,
        "evolve.discrete_axis",
        lambda v: v is None or (n > 0 and all(is_int(a) for a in v) and sorted(v) == list(range(n))),
        "null, or an order of the env's discrete actions (the paper's Doom: [1, 0, 2])",
    )


def run(cfg: DictConfig) -> str:
    hp = settings(cfg, Evolve)
    world = tracking.resolve_world(cfg)
    files = {
        "vae": str(tracking.checkpoint_path(world.vae_run.info.run_id)),
        "rnn": str(tracking.checkpoint_path(world.rnn_run.info.run_id)),
    }
    rnn = load_rnn(files["rnn"])
    try:
        controller = controller_for(cfg, rnn)
    except WorldModelError as err:
        raise WorldModelError(f"MDN-RNN run {world.rnn_run.info.run_id}: {err}") from err
    tracking.check_agent_z(cfg, world.rnn_run)
    tags = {
        "latent_size": str(cfg.latent.size),
        "mode": hp.mode.value,
        "controller_params": str(controller.n_params),
    }
    with tracking.stage_run(
        cfg,
        "evolve",
        ["evolve", "latent", "agent"],
        world.upstream,
        tags,
        resume=cfg.inputs.resume,
        may_change=["evolve.generations", "evolve.workers", "evolve.eval_episodes"],
    ) as run:
        if hp.normalize:
            controller = _standardised(controller, cfg, hp, files)
        scorer = real_scorer(cfg, "evolve", files, controller.hparams)
        try:
            chosen = _search(cfg, hp, _fitness(cfg, hp, world, rnn, controller, scorer), controller)
            if hp.eval_episodes:  # the same evaluation as stage=evaluate, on its unseen tracks
                seeds = eval_seeds(cfg, hp.eval_episodes)
                report(scorer, chosen, seeds, eval_steps(cfg), hp.gif_steps, settings(cfg, Dream).fps)
        finally:
            mlflow.log_metric("workers_replaced", scorer.replaced)
            scorer.close()
        return run.info.run_id


def _fitness(
    cfg: DictConfig,
    hp: Evolve,
    world: tracking.World,
    rnn: MDNRNN,
    controller: Controller,
    scorer: RealScorer,
) -> Fitness:
    """The real env's returns, or M's dream (on `device`) from real first frames or z ~ N(0, I)."""
    if hp.mode == Mode.real:
        return RealFitness(scorer, hp)
    starts = world.dream_starts(cfg)
    if starts[0] is not None:  # dreams start from real first frames
        tracking.log_dataset(world.encode_id, lineage.LATENTS, "dream starts")
    return DreamFitness(*_on_device(cfg, rnn, controller), starts, cfg, scorer)


def _search(cfg: DictConfig, hp: Evolve, fitness: Fitness, controller: Controller) -> np.ndarray:
    """CMA-ES on `fitness` for `evolve.generations` (resumed where an interrupted run stopped), its
    history kept after each generation; saves and returns the controller it keeps."""
    es, best, history = _cma_state(cfg, hp, controller)
    for gen in progress_bar(range(es.countiter, hp.generations), desc="evolve", unit="gen"):
        asked = es.ask()  # told back as they are: CMA-ES finds its own (TPA's) samples by value
        solutions = np.asarray(asked, dtype=np.float32)
        seeds = [seed_of(cfg.seed, TRAIN, gen, r) for r in range(hp.rollouts)]
        t0 = time.perf_counter()
        scores, metrics = fitness(solutions, seeds)
        elapsed = time.perf_counter() - t0
        _check_fitness(scores, gen, hp.mode)
        es.tell(asked, list(-scores))  # cma minimises
        best = _keep_best(best, solutions, scores, gen)
        metrics |= {
            "fitness/best": scores.max(),
            "fitness/mean": scores.mean(),
            "fitness/worst": scores.min(),
            "cma/sigma": es.sigma,
            "rollouts_per_s": scores.size * hp.rollouts / elapsed,
        }
        metrics |= fitness.check(gen, _kept(es, best, hp), solutions[int(np.argmax(scores))], seeds)
        training.log_epoch(metrics, gen)
        _save_history(history, scores, solutions)
        real = f" (real {metrics['real/check_score']:.1f})" if "real/check_score" in metrics else ""
        log.info(
            "evolve gen %d: best %.1f mean %.1f sigma %.3f%s",
            gen,
            scores.max(),
            scores.mean(),
            es.sigma,
            real,
        )
    chosen = _kept(es, best, hp)
    controller.set_flat(torch.from_numpy(chosen))
    out = tracking.OutputDir()
    extra = {"fitness": best["fitness"], "generation": best["generation"], "select": hp.select.value}
    save_checkpoint(out / lineage.CONTROLLER, controller, **extra)
    out.publish(out / lineage.CONTROLLER)
    mlflow.log_metric("best_fitness", best["fitness"])
    return chosen


def _save_history(history: dict[str, list], fitness: np.ndarray, solutions: np.ndarray) -> None:
    history["fitness"].append(fitness.astype(np.float64))
    history["digest"].append(cma_history.digest(solutions))
    with tracking.artifact(lineage.HISTORY) as path:
        np.savez(path, fitness=np.stack(history["fitness"]), digest=np.array(history["digest"]))


def _on_device(cfg: DictConfig, rnn: MDNRNN, controller: Controller) -> tuple[MDNRNN, Controller]:
    """Copies of M and C on `device` (cuda, mps or cpu), where the dreams of dream-mode evolve run. The
    controller that is saved stays on the CPU."""
    device = training.pick_device(cfg)
    return copy.deepcopy(rnn).to(device), copy.deepcopy(controller).to(device)


def _check_fitness(fitness: np.ndarray, gen: int, mode: str) -> None:
    """A NaN fitness would steer CMA-ES nowhere and could be saved as the best controller."""
    bad = np.flatnonzero(~np.isfinite(fitness))
    if len(bad):
        source = "M's dream (check the train_rnn run)" if mode == "dream" else "the real env's rewards"
        raise WorldModelError(
            f"evolve: candidate {bad[0]} of generation {gen} has fitness {fitness[bad[0]]}, from {source}; "
            "nothing was saved"
        )


def _kept(es: cma.CMAEvolutionStrategy, best: dict, hp: Evolve) -> np.ndarray:
    """The controller evolve keeps: the candidate with the highest fitness seen (select=best), or CMA-ES's
    mean (select=mean), which averages out the luck of single noisy rollouts."""
    return best["params"] if hp.select == Select.best else np.asarray(es.mean, dtype=np.float32)


def _cma_state(
    cfg: DictConfig, hp: Evolve, controller: Controller
) -> tuple[cma.CMAEvolutionStrategy, dict, dict[str, list]]:
    """A new CMA-ES, or the one of `inputs.resume` rebuilt by replaying its history: the same asks (own
    seeded generator, checked against the stored digests) told the same fitness."""
    n_params = controller.n_params
    es = cma_history.es_for(controller, hp, cfg.seed)
    best = {"fitness": -np.inf, "params": np.zeros(n_params, np.float32), "generation": -1}
    history: dict[str, list] = {"fitness": [], "digest": []}
    if not cfg.inputs.resume or lineage.HISTORY not in tracking.list_artifacts(cfg.inputs.resume, "cma"):
        return es, best, history
    for gen, solutions, fitness, digest in cma_history.replay(es, cfg.inputs.resume, hp.popsize):
        best = _keep_best(best, solutions, fitness, gen)
        history["fitness"].append(fitness)
        history["digest"].append(digest)
    log.info("evolve: resuming after generation %d", es.countiter - 1)
    return es, best, history


def _keep_best(best: dict, solutions: np.ndarray, fitness: np.ndarray, gen: int) -> dict:
    top = int(np.argmax(fitness))
    if fitness[top] <= best["fitness"]:
        return best
    return {"fitness": float(fitness[top]), "params": solutions[top].copy(), "generation": gen}


def _standardised(controller: Controller, cfg: DictConfig, hp: Evolve, files: dict[str, str]) -> Controller:
    """`controller` with its inputs standardised by their mean and std along popsize real rollouts of
    candidates drawn as CMA-ES's first generation is (mean 0, sigma0): the states early candidates
    see. Seeded, so a resumed run computes the same statistics."""
    rng = np.random.default_rng(seed_of(cfg.seed, NORM))
    params = rng.normal(0.0, hp.sigma0, (hp.popsize, controller.n_params))
    params = (params * controller.step_scales(hp.memory_sigma).numpy()).astype(np.float32)
    seeds = [seed_of(cfg.seed, NORM, i) for i in range(len(params))]
    with real_scorer(cfg, "evolve", files, controller.hparams) as scorer:
        rollouts = scorer.run(params, seeds, hp.max_steps, hp.stall_steps)
    tally = np.sum([ro.inputs for ro in rollouts], axis=0)
    mlflow.log_metric("normalize/steps", int(tally[0]))
    mean, std = standardisation(tally)
    return Controller(**controller.hparams | {"input_mean": mean, "input_std": std})
