"""One encoder family per input kind; each turns a batch into `k` tokens of width `dim`.

Only Opacus-compatible layers (Conv, Linear, Embedding, GroupNorm, LayerNorm): per-sample
gradients must exist for every parameter, and BatchNorm would mix samples.
Token-sequence encoders also return per-position features, which per-residue heads read.
"""

from __future__ import annotations

import torch
from torch import nn


def _groups(channels: int) -> int:
    return 8 if channels % 8 == 0 else 1


class ImageEncoder(nn.Module):
    """Three strided conv blocks (32 -> 4 pixels), pooled to k tokens."""

    def __init__(self, channels: int, dim: int, k: int) -> None:
        super().__init__()
        widths = (16, 32, dim)
        layers: list[nn.Module] = []
        c_in = channels
        for w in widths:
            layers += [nn.Conv2d(c_in, w, 3, stride=2, padding=1), nn.GroupNorm(_groups(w), w), nn.GELU()]
            c_in = w
        self.net = nn.Sequential(*layers)
        side = max(1, int(round(k**0.5)))
        if side * side != k:
            raise ValueError(f"image encoders need a square token count, got {k}")
        self.pool = nn.AdaptiveAvgPool2d(side)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        h = self.pool(self.net(x))  # [B, dim, s, s]
        return h.flatten(2).transpose(1, 2), None  # [B, k, dim]


class SignalEncoder(nn.Module):
    """Temporal convolutions over multichannel signals (EEG), pooled to k tokens."""

    def __init__(self, channels: int, dim: int, k: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(channels, 32, 7, stride=2, padding=3),
            nn.GroupNorm(8, 32),
            nn.GELU(),
            nn.Conv1d(32, dim, 5, stride=2, padding=2),
            nn.GroupNorm(_groups(dim), dim),
            nn.GELU(),
            nn.Conv1d(dim, dim, 5, stride=2, padding=2),
            nn.GroupNorm(_groups(dim), dim),
            nn.GELU(),
        )
        self.pool = nn.AdaptiveAvgPool1d(k)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.pool(self.net(x)).transpose(1, 2), None


class TokenEncoder(nn.Module):
    """Embeddings plus two convolutions over token sequences (DNA, protein, text)."""

    def __init__(self, vocab: int, length: int, dim: int, k: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(length, dim)
        self.conv = nn.Sequential(
            nn.Conv1d(dim, dim, 5, padding=2),
            nn.GroupNorm(_groups(dim), dim),
            nn.GELU(),
            nn.Conv1d(dim, dim, 5, padding=2),
            nn.GroupNorm(_groups(dim), dim),
            nn.GELU(),
        )
        self.pool = nn.AdaptiveAvgPool1d(k)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        h = (self.embed(x) + self.position(positions)).transpose(1, 2)  # [B, dim, L]
        h = self.conv(h)
        return self.pool(h).transpose(1, 2), h.transpose(1, 2)  # tokens [B,k,dim], per position [B,L,dim]


class VectorEncoder(nn.Module):
    """An MLP from a feature vector (expression, tabular) to k tokens."""

    def __init__(self, features: int, dim: int, k: int) -> None:
        super().__init__()
        self.k, self.dim = k, dim
        self.net = nn.Sequential(nn.Linear(features, 128), nn.LayerNorm(128), nn.GELU(), nn.Linear(128, k * dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.net(x).view(x.shape[0], self.k, self.dim), None
