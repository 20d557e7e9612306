"""V and M: shapes, losses, numerical stability, learning on real frames."""

import h5py
import numpy as np
import pytest
import torch
from torch import distributions as D

from worldmodel.models.mdnrnn import MDNRNN, Mixture, mdn_loss, mixture_log_prob, sample
from worldmodel.models.vae import VAE, to_input, vae_loss


@pytest.mark.parametrize("size", [64, 96])
@pytest.mark.parametrize("latent", [16, 32, 64])
def test_vae_shapes_and_dtypes(size, latent):
    model = VAE(latent, size)
    x = torch.rand(3, 3, size, size)
    recon, mu, logvar = model(x)
    assert recon.shape == x.shape and recon.dtype == torch.float32
    assert 0 <= recon.min() and recon.max() <= 1
    assert mu.shape == logvar.shape == (3, latent)
    assert model.decode(torch.zeros(2, latent)).shape == (2, 3, size, size)


def test_vae_rejects_other_sizes():
    with pytest.raises(ValueError, match="64, 96"):
        VAE(32, 80)


def test_vae_loss_terms_and_free_bits():
    x = torch.rand(4, 3, 64, 64)
    mu, logvar = torch.zeros(4, 8), torch.zeros(4, 8)
    out = vae_loss(x, x.clone(), mu, logvar, kl_tolerance=0.5)
    assert out.recon.item() == 0 and out.kl.item() == 0
    assert out.loss.item() == pytest.approx(0.5 * 8), "KL floored at kl_tolerance per dimension"
    far = vae_loss(x, torch.zeros_like(x), torch.full((4, 8), 3.0), logvar, 0.5)
    assert far.recon.item() == pytest.approx(x.pow(2).flatten(1).sum(1).mean().item(), rel=1e-5)
    assert far.kl.item() == pytest.approx(0.5 * 9 * 8)


def test_vae_loss_decreases_on_real_frames(dataset_path):
    with h5py.File(dataset_path, "r") as f:
        frames = torch.from_numpy(f["images"][:2].reshape(-1, 64, 64, 3))
    torch.manual_seed(0)
    model = VAE(32, 64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = to_input(frames[:32])
    losses = []
    for _ in range(25):
        out = vae_loss(x, *model(x), 0.5)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


@pytest.mark.parametrize("latent, mixtures", [(16, 5), (32, 3)])
def test_mdnrnn_shapes_sequence_and_step(latent, mixtures):
    model = MDNRNN(latent, 3, hidden=64, mixtures=mixtures)
    z, a = torch.randn(2, 7, latent), torch.rand(2, 7, 3)
    out, h, state = model(z, a)
    assert out.mixture.mu.shape == out.mixture.log_pi.shape == (2, 7, latent, mixtures)
    assert out.reward.shape == out.done_logit.shape == (2, 7) and h.shape == (2, 7, 64)
    assert torch.allclose(out.mixture.log_pi.exp().sum(-1), torch.ones(2, 7, latent))
    # The one-step interface walks the same computation.
    s = model.initial_state(2)
    for t in range(7):
        step, s = model.step(z[:, t], a[:, t], s)
    assert torch.allclose(step.mixture.mu, out.mixture.mu[:, -1], atol=1e-5)
    assert torch.allclose(s[0][0], h[:, -1], atol=1e-5)
    draw = sample(step.mixture, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert draw.shape == (2, latent)


def test_mixture_nll_matches_torch_distributions():
    torch.manual_seed(0)
    logits, mu, log_sigma = torch.randn(4, 6, 5), torch.randn(4, 6, 5), torch.randn(4, 6, 5) * 0.5
    target = torch.randn(4, 6)
    m = Mixture(torch.log_softmax(logits, -1), mu, log_sigma)
    ours = mixture_log_prob(m, target)
    ref = D.MixtureSameFamily(D.Categorical(logits=logits), D.Normal(mu, log_sigma.exp())).log_prob(target)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_mixture_nll_is_finite_for_extreme_inputs():
    model = MDNRNN(8, 3, hidden=16, mixtures=5)
    with torch.no_grad():
        model.head.weight.mul_(1e4)  # saturating logits and sigmas
    z = torch.randn(2, 5, 8) * 1e3
    out, _, _ = model(z, torch.rand(2, 5, 3))
    loss = mdn_loss(out, z * 1e3, torch.full((2, 5), 1e3), torch.ones(2, 5, dtype=torch.bool))
    assert torch.isfinite(loss.loss) and torch.isfinite(loss.nll)
    loss.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # A target far from every component, with the narrowest sigma the head allows: large, finite.
    far = Mixture(
        torch.log_softmax(torch.tensor([[0.0, -1e4]]), -1), torch.zeros(1, 2), torch.full((1, 2), -7.0)
    )
    log_p = mixture_log_prob(far, torch.tensor([1e3]))
    assert torch.isfinite(log_p).all() and log_p.item() < -1e6


def test_sampling_temperature():
    m = Mixture(
        torch.log_softmax(torch.tensor([[[2.0, 0.0]]]), -1),
        torch.tensor([[[1.0, -1.0]]]),
        torch.full((1, 1, 2), -3.0),
    )
    g = torch.Generator().manual_seed(0)
    cold = torch.stack([sample(m, 0.0, g) for _ in range(10)])
    assert torch.all(cold == 1.0), "τ = 0: the most likely component's mean"
    warm = torch.stack([sample(m, 1.0, g) for _ in range(2000)]).flatten()
    share = (warm > 0).float().mean().item()
    assert share == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item(), abs=0.04)
    hot = torch.stack([sample(m, 5.0, g) for _ in range(2000)]).flatten()
    assert (hot > 0).float().mean().item() < share, "a higher temperature flattens the weights"


def test_mdn_loss_decreases_on_real_latents(encode_run, smoke):
    from worldmodel import tracking
    from worldmodel.data import latents
    from worldmodel.stages.train_rnn import batch_tensors, gather, windows

    tracking.setup(smoke())
    data = latents.read(tracking.artifact_path(encode_run, "latents.h5"), np.arange(4))
    w = gather(data, windows(data, 8), 9)
    torch.manual_seed(0)
    model = MDNRNN(32, 3, hidden=64, mixtures=3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        b = batch_tensors(w, g, torch.device("cpu"))
        out, _, _ = model(b["z"], b["actions"])
        loss = mdn_loss(out, b["next_z"], b["rewards"], b["dones"], mask=b["mask"])
        opt.zero_grad()
        loss.loss.backward()
        opt.step()
        losses.append(loss.loss.item())
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_models_train_and_dream_on_cuda():
    from worldmodel.control.dream import dream_rollouts
    from worldmodel.models.controller import Controller

    vae = VAE(32, 64).cuda()
    x = torch.rand(8, 3, 64, 64, device="cuda")
    loss = vae_loss(x, *vae(x), 0.5).loss
    loss.backward()
    assert torch.isfinite(loss)
    rnn = MDNRNN(32, 3, 64, 5).cuda()
    out, _, _ = rnn(torch.randn(2, 5, 32, device="cuda"), torch.rand(2, 5, 3, device="cuda"))
    assert out.mixture.mu.is_cuda
    controller = Controller(32, 64)
    returns, _ = dream_rollouts(
        rnn.cpu(), controller, torch.zeros(4, controller.n_params), torch.zeros(4, 32), [1, 2, 3, 4], 10, 1.0
    )
    assert returns.shape == (4,)
