"""Point-cloud building blocks (torch): kNN graphs and EdgeConv-lite.

Tensors are batched ``(B, N, C)``; coordinates are already divided by the config's
``coord_scale_mm`` (unitless) when they reach these layers.
"""

from __future__ import annotations

import torch
from torch import nn


def knn_indices(xyz: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, N, k) of the k nearest neighbours of each point (itself excluded)."""
    dist = torch.cdist(xyz, xyz)
    return dist.topk(k + 1, dim=-1, largest=False).indices[..., 1:]


def gather_neighbours(features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Features (B, N, C) of the neighbours idx (B, N, k) -> (B, N, k, C)."""
    b, n, c = features.shape
    k = idx.shape[-1]
    flat = idx.reshape(b, n * k, 1).expand(-1, -1, c)
    return features.gather(1, flat).reshape(b, n, k, c)


class EdgeConv(nn.Module):
    """EdgeConv on a fixed graph: max_j act(W [x_i, x_j - x_i]) (DGCNN, one linear layer).

    Computed as ``act(A x_i + B x_j)`` with ``A = W_1 - W_2``, ``B = W_2``: the linear maps
    run on N points instead of N * k edges (same function, far less memory traffic).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.centre = nn.Linear(in_channels, out_channels)
        self.neighbour = nn.Linear(in_channels, out_channels, bias=False)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        neigh = gather_neighbours(self.neighbour(x), idx)
        return self.act(neigh.amax(dim=2) + self.centre(x))


class PointEncoder(nn.Module):
    """Per-point features with local (two EdgeConvs) and global (max-pooled) context.

    Input (B, N, in_channels) and a kNN graph (B, N, k); output (B, N, out_channels).
    """

    def __init__(self, in_channels: int, width: int, out_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(in_channels, 32), nn.LeakyReLU(0.2))
        self.edge1 = EdgeConv(32, width)
        self.edge2 = EdgeConv(width, width)
        self.glob = nn.Sequential(nn.Linear(2 * width, width), nn.LeakyReLU(0.2))
        self.head = nn.Sequential(
            nn.Linear(3 * width, width), nn.LeakyReLU(0.2), nn.Linear(width, out_channels)
        )

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        h0 = self.stem(x)
        h1 = self.edge1(h0, idx)
        h2 = self.edge2(h1, idx)
        local = torch.cat([h1, h2], dim=-1)
        g = self.glob(local).amax(dim=1, keepdim=True).expand(-1, x.shape[1], -1)
        return self.head(torch.cat([local, g], dim=-1))
