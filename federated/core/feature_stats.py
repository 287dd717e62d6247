"""Feature statistics as mergeable aggregates, and the load-time transform they parameterise.

A site summarises each feature of a raw vector modality by (n, mean, M2) over its observed
values (M2: the sum of squared deviations from its own mean) and, where a median is asked for,
by a histogram on a grid every site shares. Merging (n, mean, M2) with Chan, Golub & LeVeque's
pairwise update gives the pooled mean and SD exactly (to rounding), with none of the
cancellation that sums of squares suffer on large values; merging histograms is adding them.
Only these aggregates leave a site. Written by hand: no maintained library merges per-feature
moments across parties (NVIDIA FLARE's statistics are a framework, not a function to call).

A site with fewer than `min_count` observed values of a feature sends nothing for it (a cell
that small describes a handful of patients). Optional Laplace noise on (n, sum, sum of squares)
makes a site's release epsilon-DP for features with a declared range [low, high]: one record
changes n by 1, the sum by max(|low|, |high|) and the sum of squares by max(low^2, high^2).
The guarantee is per record (one row of the corpus's array), not per patient: a patient with
several rows at a site is protected by k * epsilon. Clamping the noisy mean (and the fill) to
[low, high] and the SD to (high - low) / 2, the most a [low, high] variable can spread
(Popoviciu), is post-processing and costs no epsilon.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

HIST_BINS = 4096  # the shared grid's bins: a median within 16 SD / 4096 = 0.004 SD of the pooled one
HIST_SPAN = 8.0  # the grid covers mean +- 8 SD; values beyond it fall in the two end bins


@dataclass(frozen=True)
class Moments:
    """(n, mean, M2) per feature, as float64 arrays of one length."""

    n: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray) -> Moments:
        """Of a (rows, features) block; NaN cells are missing and not counted."""
        values = np.asarray(values, dtype=np.float64)
        observed = ~np.isnan(values)
        n = observed.sum(axis=0).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, np.nansum(values, axis=0) / np.maximum(n, 1), 0.0)
            centred = np.where(observed, values - mean, 0.0)
        return cls(n, mean, (centred**2).sum(axis=0))

    @classmethod
    def empty(cls, width: int) -> Moments:
        z = np.zeros(width)
        return cls(z, z.copy(), z.copy())

    def suppressed(self, min_count: int) -> Moments:
        """Cells of fewer than min_count observed values are sent as empty."""
        keep = self.n >= max(min_count, 1)
        return Moments(np.where(keep, self.n, 0.0), np.where(keep, self.mean, 0.0), np.where(keep, self.m2, 0.0))

    def merged(self, other: Moments) -> Moments:
        """The moments of the union of two groups (Chan et al.)."""
        total = self.n + other.n
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = other.mean - self.mean
            share = np.where(total > 0, other.n / np.where(total > 0, total, 1), 0.0)
            mean = self.mean + delta * share
            m2 = self.m2 + other.m2 + delta * delta * self.n * share
        return Moments(total, mean, m2)

    @property
    def std(self) -> np.ndarray:
        """Population SD; 1 where a feature is constant or unobserved (standardising divides by it)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            sd = np.sqrt(np.where(self.n > 0, self.m2 / np.maximum(self.n, 1), 0.0))
        return np.where(sd > 1e-12, sd, 1.0)


def combine(parts: Sequence[Moments]) -> Moments:
    if not parts:
        raise ValueError("no moments to combine")
    out = parts[0]
    for p in parts[1:]:
        out = out.merged(p)
    return out


def laplace_moments(
    values: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    epsilon: float,
    rng: np.random.Generator,
    n_max: float | None = None,
) -> Moments:
    """Moments released under epsilon-DP per record (Laplace mechanism, basic composition): each
    value is clipped to its feature's [low, high]; the three sums of each of the d features get
    epsilon / (3 d). Post-processing (no epsilon): the noisy n is kept in [1, n_max] (n_max: a
    bound already public, the site's training sample count from the handshake), the mean in
    [low, high], and M2 in [0, n (high - low)^2 / 4], so the SD is at most (high - low) / 2."""
    values = np.asarray(values, dtype=np.float64)
    d = values.shape[1]
    clipped = np.clip(values, low, high)
    observed = ~np.isnan(clipped)
    eps_each = epsilon / (3 * max(d, 1))
    bound = np.maximum(np.abs(low), np.abs(high))
    n = observed.sum(axis=0) + rng.laplace(0.0, 1.0 / eps_each, d)
    s = np.nansum(clipped, axis=0) + rng.laplace(0.0, 1.0, d) * bound / eps_each
    q = np.nansum(clipped**2, axis=0) + rng.laplace(0.0, 1.0, d) * bound**2 / eps_each
    n = np.clip(n, 1.0, max(float(n_max), 1.0)) if n_max is not None else np.maximum(n, 1.0)
    mean = np.clip(s / n, low, high)
    spread = np.asarray(high, dtype=np.float64) - np.asarray(low, dtype=np.float64)
    return Moments(n, mean, np.clip(q - n * mean**2, 0.0, n * spread**2 / 4))


def laplace_blocks(counts: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """A (features, HIST_BINS) histogram under Laplace noise of `scale` per BLOCK (the cells
    `coarsened` can release, so no finer noise is needed): each block's count plus noise, clipped
    at 0, spread evenly over its bins. One record moves one block per feature, so the scale is
    (features) / epsilon; noising 64 blocks instead of 4096 bins adds 64 times less noise in all."""
    counts = np.asarray(counts, dtype=np.float64)
    per = counts.shape[1] // BLOCKS
    blocks = counts.reshape(counts.shape[0], BLOCKS, per).sum(axis=2)
    noisy = np.maximum(blocks + rng.laplace(0.0, scale, blocks.shape), 0.0)
    return np.repeat(noisy / per, per, axis=1)


def grid(mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lower edge, bin width) per feature of the histogram grid every site shares."""
    lo = mean - HIST_SPAN * std
    return lo, 2 * HIST_SPAN * std / HIST_BINS


def histogram(values: np.ndarray, lo: np.ndarray, width: np.ndarray) -> np.ndarray:
    """(features, HIST_BINS) counts of the observed values on the shared grid (ends absorb the tails)."""
    values = np.asarray(values, dtype=np.float64)
    out = np.zeros((values.shape[1], HIST_BINS), dtype=np.float64)
    for j in range(values.shape[1]):
        col = values[:, j]
        col = col[~np.isnan(col)]
        if col.size:
            k = np.clip(np.floor((col - lo[j]) / width[j]).astype(np.int64), 0, HIST_BINS - 1)
            out[j] = np.bincount(k, minlength=HIST_BINS)
    return out


BLOCKS = 64  # the cells a site may release: whole blocks of HIST_BINS / BLOCKS bins of the shared grid


def coarsened(counts: np.ndarray, min_count: int) -> np.ndarray:
    """A site's histogram on the shared grid with every released cell holding at least
    `min_count` values. Cells are runs of whole blocks (64 of the grid's 4096 bins each, so
    their edges are the grid's, never a patient's value): adjacent non-empty blocks are joined,
    left to right, until a run holds that many (a short remainder joins the last run), and each
    run's count is spread evenly over its bins. A fine bin holding one patient would place that
    patient's value to 1/4096 of the grid; after this no released cell describes fewer than
    min_count patients, and replies stay on one grid, so they add. A site with fewer than
    min_count values sends zeros. Written by hand: k-anonymous binning of one histogram on a
    shared grid is not something a maintained library offers."""
    counts = np.asarray(counts, dtype=np.float64)
    per = counts.shape[1] // BLOCKS
    blocks = counts.reshape(counts.shape[0], BLOCKS, per).sum(axis=2)
    out = np.zeros_like(counts)
    k = max(int(min_count), 1)
    for j in range(counts.shape[0]):
        if blocks[j].sum() < k:
            continue
        runs: list[list[int]] = []  # [first block, last block + 1) of each released cell
        start, held = -1, 0.0
        for b in np.flatnonzero(blocks[j]):
            start = int(b) if start < 0 else start
            held += blocks[j, b]
            if held >= k:
                runs.append([start, int(b) + 1])
                start, held = -1, 0.0
        if held:  # the remainder joins the last run
            runs[-1][1] = int(np.flatnonzero(blocks[j])[-1]) + 1
        for first, stop in runs:
            out[j, first * per : stop * per] = blocks[j, first:stop].sum() / ((stop - first) * per)
    return out


def coarse_enough(counts: np.ndarray, min_count: int) -> bool:
    """Whether a received histogram could come from `coarsened`: every run of equal, non-zero
    bins holds at least min_count values (checked by the server; a site's reply is untrusted)."""
    counts = np.asarray(counts, dtype=np.float64)
    for row in counts:
        b, n = 0, len(row)
        while b < n:
            if row[b] == 0:
                b += 1
                continue
            e = b
            while e + 1 < n and row[e + 1] == row[b]:
                e += 1
            if row[b] * (e - b + 1) < min_count - 1e-6:
                return False
            b = e + 1
    return True


def quantile(counts: np.ndarray, lo: float, width: float, q: float) -> float:
    """The q-quantile of a merged histogram, linearly interpolated within its bin; NaN if empty."""
    total = counts.sum()
    if total <= 0:
        return math.nan
    cum = np.cumsum(counts)
    target = q * total
    k = int(np.searchsorted(cum, target, side="left"))
    k = min(k, len(counts) - 1)
    before = cum[k - 1] if k else 0.0
    inside = (target - before) / counts[k] if counts[k] > 0 else 0.5
    return float(lo + (k + inside) * width)


@dataclass(frozen=True)
class Standardiser:
    """The load-time transform of a raw vector modality: a missing value becomes `fill`, then
    every feature is (x - mean) / std. Columns past the features (zero padding) stay zero."""

    mean: np.ndarray
    std: np.ndarray
    fill: np.ndarray  # the imputed value per feature (the mean or the median), NaN: none

    def apply(self, values: np.ndarray) -> np.ndarray:
        out = np.array(values, dtype=np.float64, copy=True)
        d = len(self.mean)
        block = out[..., :d]
        missing = np.isnan(block)
        if missing.any():
            block = np.where(missing, self.fill, block)
        out[..., :d] = (block - self.mean) / self.std
        return out.astype(np.float32)

    @classmethod
    def of(
        cls, moments: Moments, impute: str, median: np.ndarray | None = None, indicators: Sequence[bool] | None = None
    ) -> Standardiser:
        """The transform a modality's statistics give: a missing value becomes the mean, the median
        (the mean where no median is known: a feature nobody observed), or stays NaN (impute "").
        An indicator (`indicators`, a mask) is filled with its mean, the level's share, under either
        method: its median (0 or 1) would assign every missing cell to one level.
        One definition for the server (federated, pooled) and the sites (per_site)."""
        mean = np.asarray(moments.mean, dtype=np.float64)
        if impute == "median":
            med = np.full_like(mean, np.nan) if median is None else np.asarray(median, dtype=np.float64)
            if indicators is not None:
                med = np.where(np.asarray(indicators, dtype=bool), np.nan, med)
            fill = np.where(np.isnan(med), mean, med)
        elif impute == "mean":
            fill = mean.copy()
        else:
            fill = np.full_like(mean, np.nan)
        return cls(mean, np.asarray(moments.std, dtype=np.float64), fill)

    def clamped(self, low: np.ndarray, high: np.ndarray) -> Standardiser:
        """Noisy statistics held to what [low, high] allows (post-processing, no epsilon): mean and
        fill in [low, high], std at most (high - low) / 2 (Popoviciu's bound); NaN bounds: none."""
        low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
        lo, hi = np.where(np.isnan(low), -np.inf, low), np.where(np.isnan(high), np.inf, high)
        widest = np.where(hi > lo, (hi - lo) / 2, np.inf)
        return Standardiser(np.clip(self.mean, lo, hi), np.minimum(self.std, widest), np.clip(self.fill, lo, hi))

    def same_as(self, other: Standardiser) -> bool:
        """Equal values (NaN fills equal): whether a site must apply `other` again."""
        return all(np.array_equal(getattr(self, k), getattr(other, k), equal_nan=True) for k in ("mean", "std", "fill"))

    def to_lists(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "fill": self.fill.tolist()}

    @classmethod
    def from_lists(
        cls, raw: object, width: int, where: str, names: Sequence[str] = (), impute: str = ""
    ) -> Standardiser:
        """From JSON (a checkpoint, a server message): three lists of `width` finite numbers (fill
        NaN only where the modality does not impute: `impute` mean or median needs a fill for
        every feature). A std under 1e-12 max(1, |mean|) is refused, as is a fill that would not
        standardise to a finite float32: either would turn a site's values into inf or noise.
        Errors name the feature (`names`, else its position)."""
        if not isinstance(raw, dict) or set(raw) != {"mean", "std", "fill"}:
            raise ValueError(f"{where}: statistics must be {{mean, std, fill}} lists")
        arrays = {}
        for key in ("mean", "std", "fill"):
            v = raw[key]
            if (
                not isinstance(v, list)
                or len(v) != width
                or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
            ):
                raise ValueError(f"{where}: {key} must be a list of {width} numbers")
            arrays[key] = np.asarray(v, dtype=np.float64)
        mean, std, fill = arrays["mean"], arrays["std"], arrays["fill"]

        def feature(bad: np.ndarray) -> str:
            j = int(np.flatnonzero(bad)[0])
            return repr(names[j]) if j < len(names) else f"{j + 1}"

        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            bad = ~(np.isfinite(mean) & np.isfinite(std) & (std > 0))
            raise ValueError(f"{where}: mean and std must be finite, std positive (feature {feature(bad)})")
        tiny = std < 1e-12 * np.maximum(1.0, np.abs(mean))
        if tiny.any():
            raise ValueError(
                f"{where}: the std of feature {feature(tiny)} is under 1e-12 x max(1, |mean|): standardising "
                "by it would overflow"
            )
        if np.isinf(fill).any():
            which = feature(np.isinf(fill))
            raise ValueError(f"{where}: fill must be finite (or NaN: no imputation) (feature {which})")
        if impute in ("mean", "median") and np.isnan(fill).any():
            raise ValueError(
                f"{where}: no fill for feature {feature(np.isnan(fill))}, and the modality imputes by {impute}"
            )
        with np.errstate(over="ignore", invalid="ignore"):
            filled = np.abs((fill - mean) / std)
        huge = ~np.isnan(fill) & ~(filled < np.finfo(np.float32).max)
        if huge.any():
            raise ValueError(f"{where}: the fill of feature {feature(huge)} standardises beyond a float32")
        return cls(mean, std, fill)
