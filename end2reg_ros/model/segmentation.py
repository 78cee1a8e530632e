"""Segmentation module: which scene points the registration uses (per-point logits).

Trained by End2Reg from the registration loss only, through a straight-through
Gumbel-Softmax (2-class) estimator: the forward pass uses the hard 0/1 choice, the backward
pass the gradient of the relaxed (tempered) probability.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from end2reg_ros.model.layers import PointEncoder

#: Scene input channels: xyz (initial spine frame / coord scale), normal, rgb.
SCENE_CHANNELS = 9


class SegmentationModule(nn.Module):
    """Per-point logit of "use this point for the registration" (B, N, 9) -> (B, N)."""

    def __init__(self, width: int = 48) -> None:
        super().__init__()
        self.encoder = PointEncoder(SCENE_CHANNELS, width, 1)

    def forward(self, scene_features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.encoder(scene_features, idx).squeeze(-1)


def straight_through_gumbel_mask(
    logits: torch.Tensor, tau: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Hard 0/1 mask in the forward pass, relaxed Gumbel-Softmax gradient in the backward.

    For two classes (use, skip) with logits (l, 0) the Gumbel-Softmax probability of "use"
    is sigmoid((l + g1 - g0) / tau), and g1 - g0 is Logistic(0, 1) distributed.
    """
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    u = u.clamp(1e-6, 1.0 - 1e-6)
    logistic = torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid((logits + logistic) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


def temperature(step: int, total_steps: int, tau_start: float, tau_end: float) -> float:
    """Exponential schedule tau(step) = tau_start * (tau_end / tau_start) ** (step / total)."""
    frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return float(tau_start * math.exp(frac * math.log(tau_end / tau_start)))
