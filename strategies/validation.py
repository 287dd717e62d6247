"""Update validation: the guard every reply passes before any aggregation maths sees it.

The aggregators in strategies.aggregation (like Flower's own) trust their inputs: one NaN
poisons a mean, one missing key or a float16 copy breaks a round, and an inflated example
count lets one site outweigh all others. `validate_update` names the first such problem in
one line, so a strategy can drop the reply and log why instead of corrupting the model.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
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
