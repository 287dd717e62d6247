"""Attention over the tokens of the modalities a sample has; missing ones are masked out.

Attention is written with Linear layers (not nn.MultiheadAttention) so Opacus computes
per-sample gradients with its stock Linear/LayerNorm/Embedding samplers.
"""

from __future__ import annotations

import torch
from torch import nn


class MaskedSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5  # [B, H, T, T]
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        attn = self.drop(torch.softmax(scores, dim=-1))
        return self.out((attn @ v).transpose(1, 2).reshape(b, t, d))


class FusionBlock(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MaskedSelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), valid)
        return x + self.mlp(self.norm2(x))


class Fusion(nn.Module):
    """Adds a learned slot embedding per (modality, token), attends, and mean-pools valid tokens."""

    def __init__(self, n_modalities: int, k: int, dim: int, heads: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.k = k
        self.slot = nn.Embedding(n_modalities * k, dim)
        self.blocks = nn.ModuleList(FusionBlock(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: list[torch.Tensor], modality_ids: list[int], present: list[torch.Tensor]) -> torch.Tensor:
        """tokens[i]: [B, k, dim] of modality modality_ids[i]; present[i]: [B] bool."""
        x = torch.cat(tokens, dim=1)
        b = x.shape[0]
        slots = torch.cat([torch.arange(m * self.k, (m + 1) * self.k) for m in modality_ids])
        x = x + self.slot(slots.to(x.device).expand(b, -1))
        valid = torch.cat([p[:, None].expand(-1, self.k) for p in present], dim=1)
        # A sample with nothing present attends to nothing: keep its rows finite, pool to zero.
        any_valid = valid.any(dim=1, keepdim=True)
        attend = valid | ~any_valid
        for block in self.blocks:
            x = block(x, attend)
        weights = (valid.float() / valid.float().sum(1, keepdim=True).clamp(min=1.0))[..., None]
        return self.norm((x * weights).sum(1))
