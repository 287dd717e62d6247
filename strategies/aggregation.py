"""Aggregation maths as pure functions on arrays (tested against hand-computed numbers).

Every aggregator takes `(updates, weights)`: a sequence of {parameter name: array} maps that
must share keys and shapes, and one weight per update (unweighted rules check only the
count). Results keep each key's dtype (that of the first update) and are accumulated in
float64. None of them checks finiteness: `strategies.validation.validate_update` is the
guard that runs before them; what each does with a NaN is stated in its docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Update = Mapping[str, np.ndarray]
Aggregator = Callable[[Sequence[Update], Sequence[float]], dict[str, np.ndarray]]

# Elements per float64 working buffer of the weighted sum: an accumulator and a scratch
# chunk of 512 KiB each stay in a core's L2 cache however large a parameter is.
_CHUNK = 1 << 16
# Elements of the [n_updates, width] float64 block the coordinate-wise rules sort (8 MiB):
# the median of 100 clients x 1M parameters never materialises an 800 MB float64 stack.
_BLOCK = 1 << 20


def same_layout(
    updates: Sequence[Update], who: str, reference: Update | None = None, names: Sequence[str] | None = None
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each key's shape and dtype, after checking that all updates share keys and shapes.

    The keys, shapes and dtypes come from `reference` when given (e.g. the current model),
    else from the first update; `names` label the maps in errors ("update i" by default).
    This is the one place every aggregator refuses input that would silently corrupt its
    result.
    """
    if not updates:
        raise ValueError(f"{who} needs at least one update")
    base = updates[0] if reference is None else reference
    layout = {k: (np.shape(v), np.asarray(v).dtype) for k, v in base.items()}
    for i, update in enumerate(updates):
        label = names[i] if names is not None else f"update {i}"
        for key, (shape, _) in layout.items():
            if key not in update:
                raise ValueError(f"{label} lacks key {key!r}")
            if np.shape(update[key]) != shape:
                raise ValueError(f"{label} key {key!r} has shape {np.shape(update[key])}, expected {shape}")
        if len(update) != len(layout):
            raise ValueError(f"{label} has unexpected keys {sorted(set(update) - set(layout))}")
    return layout


def normalised_weights(weights: Sequence[float], n: int) -> np.ndarray:
    """Weights summing to one; zero, negative or non-finite weights are refused, not dropped."""
    if len(weights) != n:
        raise ValueError(f"{n} updates but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must be positive and finite, got {list(weights)}")
    return w / w.sum()


def _check_count(weights: Sequence[float], n: int) -> None:
    """Unweighted rules ignore the values but not a count that betrays a caller's bug."""
    if len(weights) != n:
        raise ValueError(f"{n} updates but {len(weights)} weights")


def _flat(value: np.ndarray) -> np.ndarray:
    return np.asarray(value).reshape(-1)


def _weighted_sum_into(flats: Sequence[np.ndarray], w: np.ndarray, out: np.ndarray) -> None:
    """out[:] = sum_i w[i] * flats[i], summed in update order in float64, cast on the write.

    Chunked in place: per chunk, one float64 accumulator and one scratch buffer, no
    temporary per update. Each update costs a cast, a multiply and an add over a cached
    chunk, which is what makes this about three reads of the input, not a stack of float64
    copies. The results are bit-identical to `acc += w_i * x_i` over whole arrays.
    """
    size = out.size
    width = max(1, min(size, _CHUNK))
    acc = np.empty(width)
    scratch = np.empty(width)
    for start in range(0, size, width):
        stop = min(start + width, size)
        a, s = acc[: stop - start], scratch[: stop - start]
        a.fill(0.0)
        for x, wi in zip(flats, w, strict=True):
            s[...] = x[start:stop]
            s *= wi
            a += s
        out[start:stop] = a


def _column_blocks(updates: Sequence[Update], key: str) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, stop, block) with block[i] = update i's flattened key[start:stop] in float64.

    The block is a reused buffer that callers may overwrite (sort, centre) but must not keep.
    """
    flats = [_flat(u[key]) for u in updates]
    n, size = len(flats), flats[0].size
    width = max(1, min(size, _BLOCK // n))
    buf = np.empty((n, width))
    for start in range(0, size, width):
        stop = min(start + width, size)
        block = buf if stop - start == width else np.empty((n, stop - start))
        np.stack([f[start:stop] for f in flats], out=block, casting="same_kind")
        yield start, stop, block


def _coordinatewise(
    updates: Sequence[Update],
    layout: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    reduce: Callable[[np.ndarray], np.ndarray],
) -> dict[str, np.ndarray]:
    """Apply `reduce` ([n, width] float64 -> [width]) to every coordinate, key by key."""
    out: dict[str, np.ndarray] = {}
    for key, (shape, dtype) in layout.items():
        result = np.empty(math.prod(shape), dtype=dtype)
        for start, stop, block in _column_blocks(updates, key):
            result[start:stop] = reduce(block)
        out[key] = result.reshape(shape)
    return out


def weighted_mean(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """sum_i w_i * x_i / sum_i w_i for every key; float64 accumulation, each key's dtype kept.

    Refuses what would silently corrupt the result: no updates, weights that are not
    positive and finite, and updates whose keys or shapes disagree. A NaN in any update
    makes that coordinate NaN.
    """
    if not updates:
        raise ValueError("weighted_mean needs at least one update")
    w = normalised_weights(weights, len(updates))
    layout = same_layout(updates, "weighted_mean")
    out: dict[str, np.ndarray] = {}
    for key, (shape, dtype) in layout.items():
        result = np.empty(math.prod(shape), dtype=dtype)
        _weighted_sum_into([_flat(u[key]) for u in updates], w, result)
        out[key] = result.reshape(shape)
    return out


def coordinate_median(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Element-wise median (Yin et al. 2018), unweighted; numpy's mean of the middle two for even n.

    Robust to any minority of arbitrary updates per coordinate. A NaN in any update makes
    that coordinate NaN (numpy's median propagates NaN).
    """
    layout = same_layout(updates, "coordinate_median")
    _check_count(weights, len(updates))
    return _coordinatewise(updates, layout, lambda block: np.median(block, axis=0, overwrite_input=True))


def trimmed_mean(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], trim_fraction: float
) -> dict[str, np.ndarray]:
    """Element-wise mean after dropping the floor(trim_fraction * n) smallest and largest values.

    Unweighted, as in Yin et al. 2018 (and Flower's FedTrimmedAvg): an example count is
    exactly what an attacker would inflate. NaN sorts above every number, so at a coordinate
    with at most k NaNs they are trimmed as the "largest" values (the result stays finite,
    but the NaNs use up trimming slots, so fewer genuine high outliers are cut there); with
    more than k NaNs, or k = 0, the coordinate is NaN.
    """
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    layout = same_layout(updates, "trimmed_mean")
    n = len(updates)
    _check_count(weights, n)
    k = math.floor(trim_fraction * n)
    if n - 2 * k < 1:  # floor(t * n) < n / 2 for t < 0.5; never average an empty slice
        raise ValueError(f"trimming {k} from each end of {n} updates leaves nothing to average")

    def reduce(block: np.ndarray) -> np.ndarray:
        if k:
            block.partition([k, n - k - 1], axis=0)
        return block[k : n - k].mean(axis=0)

    return _coordinatewise(updates, layout, reduce)


def krum_select(updates: Sequence[Mapping[str, np.ndarray]], n_byzantine: int, n_selected: int = 1) -> list[int]:
    """Indices of the n_selected updates with the lowest Krum scores, best first.

    Krum (Blanchard et al. 2017): update i's score is the sum of squared L2 distances (all
    keys flattened) to its n - f - 2 nearest other updates; multi-Krum keeps the n_selected
    best, ties broken by index. Distances come from a Gram matrix accumulated block by block
    over centred float64 coordinates (centring removes the cancellation of |x|^2 + |y|^2 -
    2<x, y> between nearby models). An update with a NaN or infinite value is treated as
    infinitely far from every other: its score is inf, so it is picked only when n_selected
    exceeds the number of finite-score updates.
    """
    layout = same_layout(updates, "krum_select")
    n, f = len(updates), int(n_byzantine)
    if f < 0:
        raise ValueError(f"n_byzantine must be >= 0, got {n_byzantine}")
    if n <= 2 * f + 2:
        raise ValueError(f"Krum needs n > 2f + 2 updates: got n={n} with f={f} (needs n >= {2 * f + 3})")
    if not 1 <= n_selected <= n:
        raise ValueError(f"n_selected must be in [1, {n}], got {n_selected}")
    gram = np.zeros((n, n))
    broken = np.zeros(n, dtype=bool)
    for key in layout:
        for _, _, block in _column_blocks(updates, key):
            if not np.isfinite(block.sum()):
                bad = ~np.isfinite(block)
                broken |= bad.any(axis=1)
                block[bad] = 0.0
            block -= block.mean(axis=0)
            gram += block @ block.T
    sq = np.diag(gram)
    dist = sq[:, None] + sq[None, :] - 2.0 * gram
    np.maximum(dist, 0.0, out=dist)
    dist[broken, :] = np.inf
    dist[:, broken] = np.inf
    np.fill_diagonal(dist, np.inf)
    scores = np.sort(dist, axis=1)[:, : n - f - 2].sum(axis=1)
    scores[np.isnan(scores)] = np.inf
    return [int(i) for i in np.argsort(scores, kind="stable")[:n_selected]]


def krum(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], n_byzantine: int, n_selected: int = 1
) -> dict[str, np.ndarray]:
    """Weighted mean of the (multi-)Krum selection; with n_selected=1 that is the chosen update."""
    w = normalised_weights(weights, len(updates))
    chosen = krum_select(updates, n_byzantine, n_selected)
    return weighted_mean([updates[i] for i in chosen], [float(w[i]) for i in chosen])


def groupwise_aggregate(
    current: Mapping[str, np.ndarray],
    updates: Sequence[Mapping[str, np.ndarray]],
    group_weights: Sequence[Mapping[str, float]],
    group_of: Callable[[str], str],
    aggregate: Aggregator,
) -> dict[str, np.ndarray]:
    """Aggregate each parameter group only over the updates that trained it.

    For group g, `aggregate` sees the g-keys of the updates i with w_ig > 0 and those
    weights; a group no update trained keeps its current value (the same array). Updates
    must carry every key of `current` with its shape. Rules with a minimum count (Krum's
    n > 2f + 2) apply it per group, to that group's trainers.
    """
    if len(updates) != len(group_weights):
        raise ValueError(f"{len(updates)} updates but {len(group_weights)} group weight maps")
    if updates:
        same_layout(updates, "groupwise_aggregate", reference=current)
    by_group: dict[str, list[str]] = {}
    for key in current:
        by_group.setdefault(group_of(key), []).append(key)
    out: dict[str, np.ndarray] = {}
    for group, keys in by_group.items():
        trainers = [(i, w) for i, w in enumerate(float(gw.get(group, 0.0)) for gw in group_weights) if w > 0]
        if not trainers:
            out.update({k: np.asarray(current[k]) for k in keys})
            continue
        out.update(aggregate([{k: updates[i][k] for k in keys} for i, _ in trainers], [w for _, w in trainers]))
    return out


def groupwise_weighted_mean(
    current: Mapping[str, np.ndarray],
    updates: Sequence[Mapping[str, np.ndarray]],
    group_weights: Sequence[Mapping[str, float]],
    group_of: Callable[[str], str],
) -> dict[str, np.ndarray]:
    """Average each parameter group only over the updates that trained it.

    Key k of group g becomes sum_i w_ig * x_ik / sum_i w_ig over the updates i with
    w_ig > 0; a group no update trained keeps its current value. This is FedAvg when every
    update trains every group with the same weight.
    """
    return groupwise_aggregate(current, updates, group_weights, group_of, weighted_mean)


# --- server optimisers (Reddi et al. 2021, "Adaptive Federated Optimization") -----------

SERVER_OPT_VARIANTS = ("adagrad", "adam", "yogi")


@dataclass(frozen=True)
class ServerOptState:
    """First and second moments (float64) after `step` server steps; checkpoint it to resume."""

    m: dict[str, np.ndarray]
    v: dict[str, np.ndarray]
    step: int


def server_opt_step(
    current: Mapping[str, np.ndarray],
    aggregated: Mapping[str, np.ndarray],
    state: ServerOptState | None,
    variant: str,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> tuple[dict[str, np.ndarray], ServerOptState]:
    """One FedAdagrad / FedAdam / FedYogi step on the pseudo-gradient d = aggregated - current.

    m = beta1 m + (1 - beta1) d; v = v + d^2 (adagrad), beta2 v + (1 - beta2) d^2 (adam) or
    v - (1 - beta2) d^2 sign(v - d^2) (yogi); new = current + lr m / (sqrt(v) + tau).
    State None starts from m = 0, v = tau^2 (the paper's Algorithm 2, v_{-1} >= tau^2).
    Flower 1.42's FedOpt differs: it starts v at 0, FedAdam adds Adam's bias correction to
    lr, and FedAdagrad fixes beta1 = 0 (pass beta1=0.0 for that). Returns the new model in
    `current`'s dtypes and a new state; the inputs are not modified.
    """
    if variant not in SERVER_OPT_VARIANTS:
        raise ValueError(f"unknown server optimiser {variant!r}; choose one of {', '.join(SERVER_OPT_VARIANTS)}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be positive and finite, got {lr}")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"beta1 and beta2 must be in [0, 1), got {beta1}, {beta2}")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be positive and finite, got {tau}")
    layout = same_layout([aggregated], "server_opt_step", reference=current)
    if state is None:
        state = ServerOptState(
            m={k: np.zeros(s) for k, (s, _) in layout.items()},
            v={k: np.full(s, tau * tau) for k, (s, _) in layout.items()},
            step=0,
        )
    else:
        same_layout([state.m, state.v], "server_opt_step", reference=current, names=["state.m", "state.v"])
    new: dict[str, np.ndarray] = {}
    m_new: dict[str, np.ndarray] = {}
    v_new: dict[str, np.ndarray] = {}
    for key, (_, dtype) in layout.items():
        x = np.asarray(current[key], dtype=np.float64)
        d = np.asarray(aggregated[key], dtype=np.float64) - x
        d2 = d * d
        m = beta1 * state.m[key] + (1.0 - beta1) * d
        v_old = state.v[key]
        if variant == "adagrad":
            v = v_old + d2
        elif variant == "adam":
            v = beta2 * v_old + (1.0 - beta2) * d2
        else:
            v = v_old - (1.0 - beta2) * d2 * np.sign(v_old - d2)
        new[key] = (x + lr * m / (np.sqrt(v) + tau)).astype(dtype, copy=False)
        m_new[key], v_new[key] = m, v
    return new, ServerOptState(m=m_new, v=v_new, step=state.step + 1)


def scaffold_server_step(
    current: Mapping[str, np.ndarray],
    updates: Sequence[Mapping[str, np.ndarray]],
    control: Mapping[str, np.ndarray],
    control_deltas: Sequence[Mapping[str, np.ndarray]],
    n_total_clients: int,
    global_lr: float = 1.0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """SCAFFOLD's server step (Karimireddy et al. 2020, Algorithm 1).

    x_new = x + global_lr * mean_i(y_i - x); c_new = c + (|S| / N) * mean_i(delta_c_i), with
    unweighted means over the |S| sampled clients as in the paper. The means are accumulated
    in float64 and rounded to each key's dtype, as every aggregator here does; the step itself
    is taken in that dtype, as a model's own optimiser step would be (so the Scaffold strategy,
    which calls this per parameter group, gives the numbers its recorded runs had). Returns
    (x_new in `current`'s dtypes, c_new in `control`'s dtypes).
    """
    layout = same_layout(updates, "scaffold_server_step", reference=current)
    n = len(updates)
    if len(control_deltas) != n:
        raise ValueError(f"{n} updates but {len(control_deltas)} control deltas")
    same_layout([control], "scaffold_server_step", reference=current, names=["control"])
    control_layout = same_layout(
        control_deltas, "scaffold_server_step", reference=control, names=[f"control delta {i}" for i in range(n)]
    )
    if not n <= n_total_clients:
        raise ValueError(f"{n} sampled clients but n_total_clients={n_total_clients}")
    if not (math.isfinite(global_lr) and global_lr > 0):
        raise ValueError(f"global_lr must be positive and finite, got {global_lr}")
    uniform = np.full(n, 1.0 / n)
    x_new: dict[str, np.ndarray] = {}
    c_new: dict[str, np.ndarray] = {}
    for key, (shape, dtype) in layout.items():
        mean_y = np.empty(math.prod(shape), dtype=dtype)
        _weighted_sum_into([_flat(u[key]) for u in updates], uniform, mean_y)
        x = np.asarray(current[key])
        x_new[key] = (x + global_lr * (mean_y.reshape(shape) - x)).astype(dtype, copy=False)
        c_dtype = control_layout[key][1]
        mean_dc = np.empty(math.prod(shape), dtype=c_dtype)
        _weighted_sum_into([_flat(d[key]) for d in control_deltas], uniform, mean_dc)
        c = np.asarray(control[key])
        c_new[key] = (c + (n / n_total_clients) * mean_dc.reshape(shape)).astype(c_dtype, copy=False)
    return x_new, c_new
