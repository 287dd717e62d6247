"""One bank of smooth spatial patterns that every image modality is drawn from.

Blobs, rings, edges and gratings on the 32x32 grid are the shared low-level vocabulary of
all five image modalities: anatomy, lesions and nuisance texture are all built from them.
A convolutional encoder shared across image tasks can therefore reuse its filters, which
is the structure a multitask or federated model is supposed to exploit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SIZE = 32
CENTER = (SIZE - 1) / 2.0
_AXIS = np.arange(SIZE, dtype=np.float64)
_Y, _X = np.meshgrid(_AXIS, _AXIS, indexing="ij")


def gaussian(cx: float, cy: float, sigma_x: float, sigma_y: float | None = None) -> np.ndarray:
    """An axis-aligned Gaussian bump with peak 1 (organs, lesions, nuclei)."""
    sy = sigma_x if sigma_y is None else sigma_y
    return np.exp(-0.5 * (((_X - cx) / sigma_x) ** 2 + ((_Y - cy) / sy) ** 2))


def ring(cx: float, cy: float, radius: float, width: float) -> np.ndarray:
    """An annulus with peak 1 (skull, body outline, lesion rims)."""
    r = np.hypot(_X - cx, _Y - cy)
    return np.exp(-0.5 * ((r - radius) / width) ** 2)


def edge(theta: float, offset: float, softness: float = 1.5) -> np.ndarray:
    """A soft step from -1 to 1 across a line at angle `theta`, `offset` pixels off centre."""
    d = (_X - CENTER) * np.cos(theta) + (_Y - CENTER) * np.sin(theta) - offset
    return np.tanh(d / softness)


def grating(theta: float, period: float) -> np.ndarray:
    """A cosine grating (layers, fibres, texture)."""
    d = (_X - CENTER) * np.cos(theta) + (_Y - CENTER) * np.sin(theta)
    return np.cos(2.0 * np.pi * d / period)


@dataclass(frozen=True)
class BasisBank:
    """A fixed, named set of patterns, stacked as [K, 32, 32]."""

    names: tuple[str, ...]
    patterns: np.ndarray

    def __len__(self) -> int:
        return len(self.names)

    def indices(self, prefix: str) -> np.ndarray:
        """Indices of the patterns whose name starts with `prefix` (a family or size)."""
        return np.array([i for i, n in enumerate(self.names) if n.startswith(prefix)])

    def texture(self, rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
        """Per-sample random mixtures of the whole bank: nuisance shared by all modalities."""
        weights = rng.normal(0.0, scale, size=(n, len(self)))
        return (weights @ self.patterns.reshape(len(self), -1)).reshape(n, SIZE, SIZE)


@lru_cache(maxsize=1)
def basis_bank() -> BasisBank:
    """The bank is part of the fixed 'physics' of the images, identical for every seed."""
    names: list[str] = []
    pats: list[np.ndarray] = []
    grid = 3.5 + 5.0 * np.arange(6)
    for sigma in (2.0, 4.0):
        for cy in grid:
            for cx in grid:
                names.append(f"blob_s{sigma:g}_{cx:g}_{cy:g}")
                pats.append(gaussian(cx, cy, sigma))
    for radius in (4.0, 8.0, 12.0, 14.0):
        names.append(f"ring_r{radius:g}")
        pats.append(ring(CENTER, CENTER, radius, 1.2))
    for k in range(8):
        for offset in (-8.0, 0.0, 8.0):
            names.append(f"edge_a{k * 22.5:g}_o{offset:g}")
            pats.append(edge(k * np.pi / 8, offset))
    for k in range(4):
        for period in (4.0, 8.0):
            names.append(f"grating_a{k * 45}_p{period:g}")
            pats.append(grating(k * np.pi / 4, period))
    stacked = np.stack(pats)
    stacked /= np.sqrt((stacked**2).mean(axis=(1, 2), keepdims=True))  # unit RMS each
    stacked.flags.writeable = False  # cached and shared: nobody may edit the world
    return BasisBank(tuple(names), stacked)


def render_blobs(cx: np.ndarray, cy: np.ndarray, sigma: np.ndarray, amp: np.ndarray) -> np.ndarray:
    """Sum of round Gaussian blobs at per-sample positions: [n, m] parameters -> [n, 32, 32].

    Separable (x and y profiles, then one einsum), so thousands of blobs cost milliseconds.
    Set `amp` to 0 for blobs a sample does not have.
    """
    gx = np.exp(-0.5 * ((_AXIS[None, None, :] - cx[..., None]) / sigma[..., None]) ** 2)
    gy = np.exp(-0.5 * ((_AXIS[None, None, :] - cy[..., None]) / sigma[..., None]) ** 2)
    return np.einsum("nm,nmy,nmx->nyx", amp, gy, gx, optimize=True)


def render_rings(cx: np.ndarray, cy: np.ndarray, radius: np.ndarray, width: float, amp: np.ndarray) -> np.ndarray:
    """One ring per sample at a per-sample centre: [n] parameters -> [n, 32, 32]."""
    r = np.hypot(_X[None] - cx[:, None, None], _Y[None] - cy[:, None, None])
    return amp[:, None, None] * np.exp(-0.5 * ((r - radius[:, None, None]) / width) ** 2)


def coordinates() -> tuple[np.ndarray, np.ndarray]:
    """The (y, x) pixel-coordinate grids, for renderers that warp space per sample."""
    return _Y, _X
