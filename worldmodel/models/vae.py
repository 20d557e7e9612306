"""The convolutional VAE (V): frames ↔ latent z. Pure torch, no I/O.

Two architectures, chosen by frame size:
- 64×64, the paper's: 4 stride-2 convs 32/64/128/256 (kernel 4), a 1024-d code, 4 transposed convs
  128/64/32/3 (kernels 5/5/6/6) from a 1×1×1024 map.
- 96×96, seed 004's: 4 stride-2 'same' convs 32/64/64/128 (kernel 4) to 6×6×128, and back with
  transposed convs 64/64/32/3 (kernels 5/5/6/6).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

SIZES = (64, 96)


@dataclass
class VAELoss:
    loss: torch.Tensor
    recon: torch.Tensor  # summed squared error per image, batch mean
    kl: torch.Tensor  # KL(q(z|x) || N(0, I)) per image before the free-bits floor, batch mean


def _encoder(size: int) -> tuple[nn.Sequential, int]:
    if size == 64:
        chans, pad = (32, 64, 128, 256), 0
    elif size == 96:
        chans, pad = (32, 64, 64, 128), 1
    else:
        raise ValueError(f"image size must be one of {SIZES}, got {size}")
    layers, c_in = [], 3
    for c in chans:
        layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=pad), nn.ReLU()]
        c_in = c
    features = 2 * 2 * 256 if size == 64 else 6 * 6 * 128
    return nn.Sequential(*layers, nn.Flatten()), features


class _Decoder(nn.Module):
    def __init__(self, size: int, latent: int) -> None:
        super().__init__()
        if size == 64:
            self.shape = (1024, 1, 1)
            spec = [(1024, 128, 5, 0, 0), (128, 64, 5, 0, 0), (64, 32, 6, 0, 0), (32, 3, 6, 0, 0)]
        else:  # 'same' padding doubles the size at each layer: 6 → 12 → 24 → 48 → 96
            self.shape = (128, 6, 6)
            spec = [(128, 64, 5, 2, 1), (64, 64, 5, 2, 1), (64, 32, 6, 2, 0), (32, 3, 6, 2, 0)]
        self.fc = nn.Linear(latent, self.shape[0] * self.shape[1] * self.shape[2])
        layers: list[nn.Module] = []
        for i, (c_in, c_out, k, p, op) in enumerate(spec):
            layers.append(nn.ConvTranspose2d(c_in, c_out, k, stride=2, padding=p, output_padding=op))
            layers.append(nn.ReLU() if i < len(spec) - 1 else nn.Sigmoid())
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).view(-1, *self.shape))


class VAE(nn.Module):
    """`forward(x)` takes float frames (B, 3, H, W) in [0, 1] and returns (reconstruction, mu, logvar)."""

    def __init__(self, latent: int, image_size: int = 64) -> None:
        super().__init__()
        self.latent, self.image_size = latent, image_size
        self.encoder, features = _encoder(image_size)
        self.mu = nn.Linear(features, latent)
        self.logvar = nn.Linear(features, latent)
        self.decoder = _Decoder(image_size, latent)

    @property
    def hparams(self) -> dict[str, int]:
        return {"latent": self.latent, "image_size": self.image_size}

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.mu(h), self.logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar


def vae_loss(
    x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, kl_tolerance: float
) -> VAELoss:
    """Summed squared error per image + KL with the paper's free-bits floor of
    `kl_tolerance` nats per latent dimension (the KL is not pushed below it)."""
    rec = (recon - x).pow(2).flatten(1).sum(1)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
    floored = torch.clamp(kl, min=kl_tolerance * mu.shape[1])
    return VAELoss((rec + floored).mean(), rec.mean(), kl.mean())


def to_frames(decoded: torch.Tensor) -> np.ndarray:
    """The decoder's output (B, 3, H, W) in [0, 1] → uint8 frames (B, H, W, 3)."""
    return (decoded.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def to_input(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames (B, H, W, 3) → float (B, 3, H, W) in [0, 1]."""
    return frames.permute(0, 3, 1, 2).float().div_(255)
