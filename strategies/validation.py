"""Update validation: the guard every reply passes before any aggregation maths sees it.

The aggregators in strategies.aggregation (like Flower's own) trust their inputs: one NaN
poisons a mean, one missing key or a float16 copy breaks a round, and an inflated example
count lets one site outweigh all others. `validate_update` names the first such problem in
one line, so a strategy can drop the reply and log why instead of corrupting the model.

What a reply is checked against is what the server knows, not what the site says in it: the
layout of the global model, the site's handshake (its modalities and tasks give the parameter
groups it may move or claim, `declared_groups`; its training-set size caps its example count),
the declared sizes of all training sites (one site may hold at most a configured share of
them, `over_declared`), and the update norms of the round (`norm_outliers`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

_MAX_NAMED_KEYS = 3


@dataclass(frozen=True)
class Rejection:
    """A reply the server dropped: which node, which site, and the reason to log and report."""

    node_id: int
    site: str
    reason: str


def validate_update(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    num_examples: float,
    max_examples: float | None,
) -> str | None:
    """None when `update` may be aggregated with `reference`'s layout, else a one-line reason.

    Cheap checks come first (keys, array type, shapes, dtypes, the example count), the
    finiteness scan that reads every value last, so a malformed reply costs nothing to refuse.
    `max_examples` is what the site may plausibly claim (e.g. its declared training set size
    times a slack factor); None skips that check.
    """
    return (
        _key_mismatch(update, reference)
        or _layout_mismatch(update, reference)
        or _bad_example_count(num_examples, max_examples)
        or _non_finite(update, reference)
    )


def _key_mismatch(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> str | None:
    """Keys first: every later check reads the update by the reference's keys."""
    missing = [k for k in reference if k not in update]
    if missing:
        return f"missing {len(missing)} key(s): {_name_keys(missing)}"
    unknown = [k for k in update if k not in reference]
    if unknown:
        return f"{len(unknown)} unknown key(s): {_name_keys(unknown)}"
    return None


def _layout_mismatch(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> str | None:
    """The first key whose value is not an array of the reference's shape and dtype: the
    aggregators stack arrays key by key and would fail (or silently upcast) on any of these."""
    for key, expected in reference.items():
        value = update[key]
        if not isinstance(value, np.ndarray):
            return f"key {key!r} is a {type(value).__name__}, not a numpy array"
        if value.shape != np.shape(expected):
            return f"key {key!r} has shape {value.shape}, expected {np.shape(expected)}"
        if value.dtype != np.asarray(expected).dtype:
            return f"key {key!r} has dtype {value.dtype}, expected {np.asarray(expected).dtype}"
    return None


def _bad_example_count(num_examples: float, max_examples: float | None) -> str | None:
    """The count weights the reply in a mean: it must be a real positive number within what the
    site may plausibly claim, or one site could outweigh all the others."""
    if (
        not isinstance(num_examples, numbers.Real)
        or isinstance(num_examples, bool)
        or not math.isfinite(num_examples)
        or num_examples <= 0
    ):
        return f"num_examples must be a positive finite number, got {num_examples!r}"
    if max_examples is not None and num_examples > max_examples:
        return f"implausible example count {_num(num_examples)} > {_num(max_examples)} declared"
    return None


def _non_finite(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> str | None:
    """The first floating-point key holding NaN or infinity (one such value poisons a mean);
    it reads every value, so it runs after the cheap checks."""
    for key in reference:
        value = update[key]
        if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            return f"key {key!r} has {bad} non-finite value(s) of {value.size}"
    return None


def _name_keys(keys: list[str]) -> str:
    """Up to three names, so a reason stays one readable line for a model with 500 keys."""
    named = ", ".join(repr(k) for k in keys[:_MAX_NAMED_KEYS])
    return named + (f" and {len(keys) - _MAX_NAMED_KEYS} more" if len(keys) > _MAX_NAMED_KEYS else "")


def _num(x: float) -> str:
    """1200.0 -> '1200': counts read as counts in the log."""
    return str(int(x)) if float(x).is_integer() else f"{float(x):g}"


# A share check needs others to compare with: with one or two training sites, one of them may
# legitimately hold most of the data.
MIN_SITES_FOR_SHARE = 3


def declared_groups(modalities: Iterable[str], tasks: Iterable[str]) -> frozenset[str]:
    """The parameter groups a site may train: the encoders of its modalities, the heads of its
    tasks, and the fusion block every task runs through (what the site's model unfreezes)."""
    return frozenset({"fusion", *(f"encoder/{m}" for m in modalities), *(f"head/{t}" for t in tasks)})


def undeclared_claims(claimed: Iterable[str], allowed: Collection[str]) -> str | None:
    """A 'trained' record naming a group the site did not declare would weigh its update into
    a group it cannot have trained."""
    extra = sorted(set(claimed) - set(allowed))
    if extra:
        return f"claims to have trained undeclared group(s) {_name_keys(extra)} (declared: {_groups(allowed)})"
    return None


def undeclared_moves(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    allowed: Collection[str],
    group_of: Callable[[str], str],
) -> str | None:
    """A site's model freezes the groups it does not hold, so an honest reply carries them
    exactly as it received them; any change there is a forged update."""
    moved: dict[str, float] = {}
    for key, ref in reference.items():
        group = group_of(key)
        if group in allowed:
            continue
        value = np.asarray(update[key])
        if not np.array_equal(value, ref):
            change = float(np.max(np.abs(value.astype(np.float64) - np.asarray(ref, dtype=np.float64))))
            moved[group] = max(moved.get(group, 0.0), change)
    if moved:
        worst = max(moved, key=lambda g: moved[g])
        return (
            f"moved undeclared group(s) {_name_keys(sorted(moved))} (largest change {moved[worst]:.6g} in "
            f"{worst!r}; declared: {_groups(allowed)})"
        )
    return None


def update_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of update - reference over every floating-point key, in float64 (a float32
    difference of 3e38 values would overflow to inf)."""
    total = 0.0
    for key, ref in reference.items():
        value = np.asarray(update[key])
        if np.issubdtype(value.dtype, np.inexact):
            diff = value.astype(np.float64) - np.asarray(ref, dtype=np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def norm_ratios(norms: Mapping[int, float], examples: Mapping[int, float]) -> dict[int, float | None]:
    """Each update's norm per square root of its training examples, over the round's median of
    that; None with fewer than three updates, where the median need not be one of an honest
    majority.

    Per sqrt(example): with one local epoch, a site's steps and so its update's norm grow with
    its data (about as sqrt(steps)), so the plain ratio grew with quantity skew: 4.87 for a clean
    site holding 16x the median's steps, 0.66 per sqrt(example) (experiments/results/
    update_norm_bound/). Updates clipped to one norm first (privacy=dp_fedavg) pass examples of 1:
    plain norms. The example count is the one the reply is weighted by, which the
    handshake bounds (max_examples_factor, max_site_weight_share); the reply's own step count
    would fit as tightly but nothing bounds it, so a site could claim steps to widen its bound.
    Over the whole update, not per parameter group: per-group ratios reached 12.1 on clean runs."""
    if len(norms) < MIN_SITES_FOR_SHARE:
        return dict.fromkeys(norms)
    per = {i: n / math.sqrt(max(float(examples[i]), 1.0)) for i, n in norms.items()}
    median = float(np.median(list(per.values())))
    return {i: v / median if median > 0 else (0.0 if v == 0 else math.inf) for i, v in per.items()}


def norm_outliers(
    norms: Mapping[int, float], ratios: Mapping[int, float | None], max_norm: float, max_ratio: float
) -> dict[int, str]:
    """Which updates (by index) are too large, and why: above `max_norm` (0 = no absolute
    bound), or with a ratio (`norm_ratios`, None = not compared) above `max_ratio` (0 = no
    relative bound)."""
    out: dict[int, str] = {}
    for i, norm in norms.items():
        ratio = ratios.get(i)
        if max_norm and not norm <= max_norm:
            out[i] = f"update norm {norm:.6g} > strategy.max_update_norm={max_norm:g}"
        elif max_ratio and ratio is not None and not ratio <= max_ratio:
            out[i] = (
                f"update norm {norm:.6g} is {ratio:.4g} x the round's median update norm per sqrt(training "
                f"example), above strategy.max_update_norm_ratio={max_ratio:g}"
            )
    return out


def over_declared(declared: Mapping[int, float], max_share: float) -> dict[int, str]:
    """Which sites declared more training examples at the handshake than `max_share` of all the
    training sites' declared examples (node -> why). A site's example count is capped by what it
    declared, so an unbounded declaration would let it outweigh every other site. Skipped with
    fewer than three declaring sites or `max_share` = 1."""
    positive = {n: float(v) for n, v in declared.items() if v > 0}
    total = sum(positive.values())
    if max_share >= 1.0 or len(positive) < MIN_SITES_FOR_SHARE or total <= 0:
        return {}
    return {
        node: (
            f"declared {_num(v)} training examples at the handshake, {v / total:.1%} of the {_num(total)} declared "
            f"by all {len(positive)} training sites, above strategy.max_site_weight_share={max_share:g}"
        )
        for node, v in positive.items()
        if v / total > max_share
    }


def _groups(groups: Collection[str]) -> str:
    return ", ".join(sorted(groups)) or "none"
