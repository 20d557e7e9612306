"""The agent's real-mode step with V's encoder frozen by TorchScript (oneDNN convolutions with prepacked
weights) against the eager encoder that the agent uses, in the lockstep loop of `make bench`'s
real-mode rows: 1 and 4 fast CarRacing envs, one thread, 300 steps, best of 3, repeats interleaved.

    python benchmarks/frozen_encoder.py --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402

from worldmodel.control.agent import worker_inference  # noqa: E402
from worldmodel.envs.pixels import make_env  # noqa: E402
from worldmodel.models.controller import Controller  # noqa: E402
from worldmodel.models.mdnrnn import MDNRNN  # noqa: E402
from worldmodel.models.vae import VAE  # noqa: E402


class _Encoder(torch.nn.Module):
    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.encoder, self.mu, self.logvar = vae.encoder, vae.mu, vae.logvar

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.mu(h), self.logvar(h)


def frozen_copy(vae: VAE) -> VAE:
    """A copy of `vae` whose encode is the frozen, oneDNN-prepacked graph (built with oneDNN on, as
    optimize_for_inference needs; it runs whatever the flag says afterwards)."""
    flag, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, True
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript's freeze: still in torch 2.x
        graph = torch.jit.optimize_for_inference(torch.jit.script(_Encoder(copy.deepcopy(vae)).eval()))
    torch.backends.mkldnn.enabled = flag
    fast = copy.deepcopy(vae)
    fast.encode = lambda x: graph(x.contiguous())
    return fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env_cfg = bench.cfg_for(Path(tempfile.mkdtemp(prefix="frozen"))).env
    worker_inference()  # as the evolve workers do
    rnn, controller, vae = MDNRNN(32, 3, 256, 5).eval(), Controller(32, 256), VAE(32, 64).eval()
    params = np.random.default_rng(0).standard_normal((4, controller.n_params)).astype(np.float32) * 0.1
    envs = [make_env(env_cfg) for _ in range(4)]
    agents = {"eager": vae, "frozen": frozen_copy(vae)}

    for repeat in range(args.repeats):
        raw = bench.best_of(lambda: bench.steps_per_s(envs[0].env, 300))
        for name, v in agents.items():
            for slots in (1, 4):
                steps = bench.best_of(
                    lambda v=v, k=slots: bench.lockstep_rate(envs, v, rnn, controller, params, k)
                )
                print(f"repeat {repeat} {name:6s} {slots} envs: {steps:6.1f} steps/s, raw env {raw:6.1f}")


if __name__ == "__main__":
    main()
