"""A head per task: pooled fused features to the task's output; per-residue heads also read positions."""

from __future__ import annotations

import torch
from torch import nn

from federated.core.corpus_schema import Task
from federated.core.targets import PER_RESIDUE


class PooledHead(nn.Module):
    def __init__(self, dim: int, n_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, n_out))

    def forward(self, fused: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        return self.net(fused)


class PerPositionHead(nn.Module):
    """Classifies every position from its own features plus the sample's fused context."""

    def __init__(self, dim: int, n_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, n_out))

    def forward(self, fused: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        if positions is None:
            raise ValueError("a per-residue head needs per-position features from a token encoder")
        context = fused[:, None, :].expand(-1, positions.shape[1], -1)
        return self.net(torch.cat([positions, context], dim=-1))  # [B, L, n_out]


def build_head(task: Task, dim: int) -> nn.Module:
    if task.target == PER_RESIDUE:
        return PerPositionHead(dim, task.n_outputs)
    return PooledHead(dim, task.n_outputs)
