"""Modality-aware sums under secure aggregation: what a site masks, and how the server reads the sum.

SecAgg+ reveals only the sum over sites of one vector per site. To keep modality-aware averaging
(each parameter group averaged over the sites that trained it, weighted by that group's examples),
a site's vector holds, for every group g of a layout both sides derive from the global model's keys,

    [ a_g * clip(delta_g, -c, c) ,  a_g ]        a_g = min(1, w_g / W)

delta_g = trained - global (the group's float parameters, flattened in key order), w_g the examples
the site trained g on (0 for a group it does not hold: the whole segment is zeros), W the server's
cap on one site's weight. The sum over sites is, per group, sum(a * delta) and sum(a): the server
adds their ratio to the group, which is `groupwise_weighted_mean` exactly, and a group nobody
trained keeps its value. `fedavg` is the one-group layout (w = the site's examples). Differences,
not weights, cross the wire because they are small: a small clip c and a fine quantisation step
2c / T then lose nothing. The weights a <= 1 travel in the same clipped range, hence c >= 1.

Each site also declares its weights a_g in the clear; after unmasking, the server checks what the
sum of honest vectors must satisfy (`sum_problems`) and refuses a round that fails, since a
dishonest site can put anything in [-c, c] in its vector and the sum cannot say which site did.

Written here because no library computes it: Flower's SecAgg+ workflow divides one weighted sum by
one total weight, for the whole model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np

from federated.core.models import group_of

GROUPED = "grouped"  # one segment per parameter group (modality-aware)
SINGLE = "single"  # one segment for the whole model (plain FedAvg)
WHOLE_MODEL = "model"  # the single layout's group name


@dataclass(frozen=True)
class Segment:
    """One group's place in the vector: its keys, their shapes, and where its weight entry sits."""

    group: str
    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    start: int  # first entry of the group's parameters
    size: int  # number of parameters; the weight entry is at start + size

    @property
    def weight_index(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class Layout:
    """The vector's segments, in the global model's key order (both sides build the same one)."""

    kind: str
    segments: tuple[Segment, ...]
    length: int

    KINDS: ClassVar[tuple[str, ...]] = (GROUPED, SINGLE)

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray], kind: str) -> Layout:
        """Groups in order of first appearance of `group_of(key)` (or one group); only floating
        arrays take part (an integer buffer is not averaged, it keeps the global value)."""
        if kind not in cls.KINDS:
            raise ValueError(f"unknown secure-sum layout {kind!r}; valid: {', '.join(cls.KINDS)}")
        members: dict[str, list[str]] = {}
        for key, value in arrays.items():
            if np.issubdtype(np.asarray(value).dtype, np.floating):
                members.setdefault(group_of(key) if kind == GROUPED else WHOLE_MODEL, []).append(key)
        segments, start = [], 0
        for group, keys in members.items():
            shapes = tuple(tuple(np.shape(arrays[k])) for k in keys)
            size = int(sum(int(np.prod(s)) for s in shapes))
            segments.append(Segment(group, tuple(keys), shapes, start, size))
            start += size + 1
        return cls(kind, tuple(segments), start)


class SiteVector(NamedTuple):
    """What a site masks, how many entries the clip changed, and the weights its weight entries hold
    (what it declares in the clear: `vector_weights`)."""

    vector: np.ndarray  # float64, layout.length entries
    clipped: int
    weights: dict[str, float]  # group -> a_g, the groups it weighs above 0 only


def site_vector(
    layout: Layout,
    global_arrays: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    group_weights: Mapping[str, float],
    max_weight: float,
    clip: float,
    clip_norm: float | None = None,
) -> SiteVector:
    """A site's vector (float64), how many entries the clip at `clip` changed, and its declared weights.

    `group_weights`: the site's examples per group (for the single layout, {WHOLE_MODEL: n}); a
    group missing from it counts 0. `clip_norm` (site-level DP): the whole difference is first
    scaled to L2 norm <= clip_norm, as a DP server would clip it, but here at the site."""
    if max_weight <= 0:
        raise ValueError(f"max_weight must be > 0, got {max_weight}")
    deltas = {
        k: np.asarray(trained[k], np.float64) - np.asarray(global_arrays[k], np.float64)
        for s in layout.segments
        for k in s.keys
    }
    if clip_norm is not None:
        norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in deltas.values())))
        if norm > clip_norm:
            deltas = {k: d * (clip_norm / norm) for k, d in deltas.items()}
    vector = np.zeros(layout.length, np.float64)
    clipped = 0
    declared = vector_weights(layout, group_weights, max_weight)
    for s in layout.segments:
        a = declared.get(s.group, 0.0)
        if a <= 0:
            continue
        flat = np.concatenate([deltas[k].ravel() for k in s.keys]) if s.keys else np.zeros(0)
        clipped += int(np.count_nonzero(np.abs(flat) > clip))
        vector[s.start : s.weight_index] = a * np.clip(flat, -clip, clip)
        vector[s.weight_index] = a
    return SiteVector(vector, clipped, declared)


def vector_weights(layout: Layout, group_weights: Mapping[str, float], max_weight: float) -> dict[str, float]:
    """a_g = min(1, w_g / W) for every group of the layout the site weighs above 0: what its vector
    carries in each weight entry, and what it declares in the clear for the server to check."""
    weights = {s.group: min(1.0, float(group_weights.get(s.group, 0.0)) / max_weight) for s in layout.segments}
    return {g: a for g, a in weights.items() if a > 0}


def apply_sums(
    layout: Layout, current: Mapping[str, np.ndarray], summed: np.ndarray, min_weight: float
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The new model from the sum of the sites' vectors: each group moves by sum(a*delta)/sum(a)
    where sum(a) >= min_weight (below it, quantisation noise of a group nobody trained: it keeps its
    value); arrays outside the layout keep theirs. Also each group's total weight sum(a)."""
    if summed.shape != (layout.length,):
        raise ValueError(f"the summed vector has shape {summed.shape}, the layout needs ({layout.length},)")
    new = {k: np.array(v, copy=True) for k, v in current.items()}
    totals: dict[str, float] = {}
    for s in layout.segments:
        total = float(summed[s.weight_index])
        totals[s.group] = total
        if total < min_weight:
            continue
        step = summed[s.start : s.weight_index] / total
        offset = 0
        for key, shape in zip(s.keys, s.shapes, strict=True):
            n = int(np.prod(shape))
            base = np.asarray(current[key])
            new[key] = (base.astype(np.float64) + step[offset : offset + n].reshape(shape)).astype(base.dtype)
            offset += n
    return new, totals


def site_weights(
    group_examples: Mapping[str, float],
    num_examples: float,
    layout_kind: str,
    uniform: bool,
    withheld: frozenset[str] = frozenset(),
) -> dict[str, float]:
    """What a site weighs each segment by: its examples per group (grouped) or in all (single);
    1 for every group it trained under `strategy.weighting=uniform`; nothing for a withheld group."""
    if layout_kind == SINGLE:
        trained = num_examples > 0 and WHOLE_MODEL not in withheld
        return {WHOLE_MODEL: 1.0 if uniform else float(num_examples)} if trained else {}
    return {g: (1.0 if uniform else float(x)) for g, x in group_examples.items() if x > 0 and g not in withheld}


@dataclass(frozen=True)
class SecureSupport:
    """Whether a strategy's aggregation works on masked sums, declared on its class (`SECURE`):
    under secure aggregation the server sees only the sum of the sites' vectors, so a strategy
    either needs no more than a sum of one of the layouts above, or says what more it needs."""

    layout: str | None  # the vector whose sums its aggregation needs (GROUPED, SINGLE); None: a sum is not enough
    why_not: str = ""  # with layout None: what it needs that a sum does not give (completes "it ...")

    def __post_init__(self) -> None:
        if self.layout is None and not self.why_not:
            raise ValueError("a strategy that cannot aggregate masked sums must say why (SecureSupport.why_not)")
        if self.layout is not None and self.layout not in Layout.KINDS:
            raise ValueError(f"unknown secure-sum layout {self.layout!r}; valid: {', '.join(Layout.KINDS)}")

    @classmethod
    def sums(cls, layout: str) -> SecureSupport:
        """The strategy aggregates the sums of `layout`'s vectors (GROUPED or SINGLE)."""
        return cls(layout)

    @classmethod
    def refused(cls, why: str) -> SecureSupport:
        """The strategy needs more than a sum: `why` completes "it ..." in the refusal."""
        return cls(None, why)


def quantization_levels(n_sites: int, quantization_range: int, modulus_range: int) -> int:
    """T: the configured one, or (0) the finest the field allows: the largest power of 2 with
    n_sites x T < modulus_range, at most 2**30 (Flower's stochastic rounding casts to int32)."""
    if quantization_range:
        return quantization_range
    levels = 2**30
    while levels > 1 and n_sites * levels >= modulus_range:
        levels //= 2
    return levels


def sites_capacity(n_sites: int, quantization_range: int, modulus_range: int) -> str | None:
    """Why `n_sites` quantised vectors could overflow the field (each entry is in [0, T], their sum
    must stay below M), or None."""
    if n_sites * quantization_range >= modulus_range:
        return (
            f"{n_sites} sites x quantization_range {quantization_range} >= modulus_range {modulus_range}: "
            "the sum of their vectors would wrap around; lower secure_aggregation.quantization_range "
            "(0 picks the finest that fits)"
        )
    return None


def weight_resolution(n_sites: int, clip: float, levels: int, max_weight: float) -> str | None:
    """Why the least weight a training site can have (1 example of W) could not be told from the
    rounding error of a sum of n sites' weights, or None."""
    if n_sites * 2.0 * clip / levels >= 0.25 / max_weight:
        return (
            f"a site's least weight 1/{max_weight:g} is within the rounding error of {n_sites} sites at "
            f"{levels} levels: raise secure_aggregation.quantization_range (or modulus_range)"
        )
    return None


def withheld_groups(groups: list[str], holders: list[frozenset[str] | None], min_sites: int) -> list[str]:
    """The groups fewer than `min_sites` of the round's sites declared (a site that declared
    nothing counts for every group): their sum would be one site's update, so no site sends them."""
    counts = {g: sum(1 for h in holders if h is None or g in h) for g in groups}
    return [g for g in groups if counts[g] < min_sites]


def lone_contributions(contributed: Mapping[str, list[str]], min_sites: int) -> dict[str, list[str]]:
    """group -> the sites that contributed to it, for every group with contributions from fewer than
    `min_sites` sites (`contributed`: site -> the groups it sent a non-zero weight for)."""
    by_group: dict[str, list[str]] = {}
    for site, groups in contributed.items():
        for g in groups:
            by_group.setdefault(g, []).append(site)
    return {g: sorted(sites) for g, sites in by_group.items() if len(sites) < min_sites}


def quantisation_bound(n_sites: int, clip: float, quantization_range: int) -> float:
    """The most the secure sum of n sites' entries can differ from the exact sum: stochastic
    rounding moves each site's entry by less than one step 2c/T. A group's mean divides that sum
    by the group's total weight, so its entries are off by up to about this over sum(a)."""
    return n_sites * 2.0 * clip / quantization_range


# --- checks on what a site declares and on the unmasked sum ------------------------------------
# SecAgg+ hides each site's vector, so the server cannot tell one dishonest vector from an honest
# one. What it can check is what the sum must satisfy when every site built its vector as
# `site_vector` does from the weights it declared in the clear (`vector_weights`); a sum that
# fails is refused as a whole, and no check can name the site that sent the offending vector.


def zero_level(clip: float, levels: int) -> int | None:
    """The level Flower's quantisation (flwr.common.secure_aggregation.quantization.quantize:
    (x + c) x T / 2c, then stochastic rounding) gives an entry 0, when that is an integer: rounding
    then leaves it alone, and n sites' zeros sum to exactly n times it. None when it is not (T odd,
    or c x (T / 2c) != T / 2 in floating point, e.g. c = 1.9)."""
    pre = float((np.zeros(1, np.float64) + clip)[0] * (levels / (2 * clip)))
    return int(pre) if pre.is_integer() else None


def declaration_problem(
    declared: Mapping[str, float],
    groups: frozenset[str],
    cap: float,
    allowed: frozenset[str] | None,
    withheld: frozenset[str],
) -> str | None:
    """Why one site's declared weights (group -> a, in the clear) cannot be those of an honest
    vector, or None: a weight must be finite and in (0, cap] (cap: its handshake's examples x
    strategy.max_examples_factor over W, at most 1), for a group of the model that the site declared
    at the handshake (`allowed`, None: not checked) and that the round does not withhold."""
    for group, a in sorted(declared.items()):
        if group not in groups:
            return f"declares a weight for {group!r}, which is not a parameter group of the model"
        if group in withheld:
            return f"declares a weight for group {group}, which this round withholds"
        if allowed is not None and group not in allowed:
            return f"declares a weight for group {group}, which it did not declare at the handshake"
        if not (np.isfinite(a) and 0 < a <= cap * (1 + 1e-12)):
            return (
                f"declares weight {a!r} for group {group}, outside (0, {cap:.6g}] (its handshake's examples "
                "x strategy.max_examples_factor over W)"
            )
    return None


def sum_problems(
    layout: Layout,
    summed: np.ndarray,
    quantised: np.ndarray,
    declared: Mapping[str, float],
    n_sites: int,
    clip: float,
    levels: int,
    norm_bound: float | None = None,
    withheld: frozenset[str] = frozenset(),
) -> list[str]:
    """What the unmasked sum of `n_sites` vectors breaks of what honest vectors must sum to, one
    line per group and check (empty: it passes). `declared`: group -> the sum of the sites' declared
    weights; `quantised`: the integer sum before dequantisation, where a zero sum is exact.

    - a group no site declared (a withheld one included): every entry, its weight too, exactly zero;
    - otherwise its total weight equals the declared sum, within the quantisation bound n x 2c/T;
    - each entry of its weighted sum is within c x that sum (each site's entry a x clip(delta));
    - with a norm bound B (strategy.max_update_norm, or privacy.clipping_norm with site-level DP,
      which every site applies itself), the weighted sum's L2 norm is within B x that sum.
    The exact zero check needs T and c for which 0 quantises exactly (zero_level); others raise.
    """
    zero = zero_level(clip, levels)
    if zero is None:  # check_secure_strategy (strategies/secure_support.py) refuses such a clip and T before the run
        raise ValueError(
            f"clip {clip:g} with {levels} levels: 0 does not quantise to an exact level, so a group's zero "
            "sum cannot be checked exactly (check_secure_strategy refuses this configuration)"
        )
    slack = quantisation_bound(n_sites, clip, levels)
    fp = 16 * float(np.finfo(np.float64).eps) * n_sites * clip  # dequantisation's float rounding
    problems: list[str] = []
    for s in layout.segments:
        total = float(declared.get(s.group, 0.0))
        entries = slice(s.start, s.weight_index + 1)
        name = f"group {s.group}" + (" (withheld this round)" if s.group in withheld else "")
        if total <= 0:
            off = int(np.count_nonzero(quantised[entries] != n_sites * zero))
            if off:
                problems.append(
                    f"{name}: no site declared a weight for it, yet {off} of its {s.size + 1} entries do not "
                    "sum to zero"
                )
            continue
        weight = float(summed[s.weight_index])
        if abs(weight - total) > slack + fp:
            problems.append(
                f"{name}: total weight {weight:.6g} where the sites declared {total:.6g} "
                f"(quantisation allows +-{slack:.2g})"
            )
        values = summed[s.start : s.weight_index]
        peak = float(np.max(np.abs(values))) if s.size else 0.0
        if peak > clip * total + slack + fp:
            problems.append(
                f"{name}: an entry of its weighted sum is {peak:.6g}, above c x the declared weight = "
                f"{clip * total:.6g} (secure_aggregation.clipping_range={clip:g})"
            )
        if norm_bound is not None and norm_bound > 0:
            norm = float(np.linalg.norm(values))
            limit = norm_bound * total * (1 + 1e-9) + slack * float(np.sqrt(s.size)) + fp
            if norm > limit:
                problems.append(
                    f"{name}: the L2 norm of its weighted sum is {norm:.6g}, above the norm bound "
                    f"{norm_bound:g} x the declared weight = {norm_bound * total:.6g}"
                )
    return problems
