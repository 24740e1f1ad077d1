"""Tiny seeded conv nets and images shared by the attack and analysis tests."""

from __future__ import annotations

import torch
from torch import nn

from calib.models import Normalize


def seeded_conv(seed: int = 0) -> nn.Module:
    """A tiny conv net on 1x8x8 images with seeded N(0, 1) weights and spread-out confidences."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(16, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model.eval()


def centred_conv(seed: int, channels: int = 1, num_classes: int = 4) -> nn.Module:
    """A tiny conv net with seeded random weights (no batch norm: eval == train); the input
    is centred first so that the predictions vary across images."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(Normalize([0.5] * channels, [0.25] * channels),
                          nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, num_classes))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()


def images(seed: int, n: int, channels: int = 1, size: int = 8) -> torch.Tensor:
    """Uniform images (n, channels, size, size) in [0, 1], seeded."""
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def labelled_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform 1x8x8 images and labels in 0..3, seeded (one generator for both)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=gen), torch.randint(0, 4, (n,), generator=gen)
