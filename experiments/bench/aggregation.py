"""Aggregation speed against numpy's own floor: 100 clients x 1M float32 parameters.

The server aggregates every round, so its cost should be close to what it fundamentally
needs: reading every client's parameters once. The reference is numpy doing just that (sum
all client arrays into one result, float32, no weights); each aggregator is reported as
seconds and as a ratio to that floor, all measured in the same run and interleaved, so
machine load hits every row alike. Target: weighted_mean (FedAvg) within 3x the reference.

    python experiments/bench/aggregation.py [--quick] [--out results.json] [--repeats 5]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np

from federated.app.bench import write_result
from strategies.aggregation import coordinate_median, groupwise_weighted_mean, trimmed_mean, weighted_mean

TARGET_RATIO = 3.0
REFERENCE = "numpy_add_reference"


def make_updates(n_clients: int, n_params: int, n_keys: int, seed: int) -> list[dict[str, np.ndarray]]:
    """n_clients maps of n_keys float32 arrays ('g<j>.w') holding n_params values in all."""
    rng = np.random.default_rng(seed)
    sizes = [n_params // n_keys] * n_keys
    sizes[-1] += n_params - sum(sizes)
    return [
        {f"g{j}.w": rng.standard_normal(size, dtype=np.float32) for j, size in enumerate(sizes)}
        for _ in range(n_clients)
    ]


def numpy_reference(updates: Sequence[dict[str, np.ndarray]]) -> None:
    """Read every client array once, write one float32 result per key.

    Fairer than np.sum(stacked, axis=0): it reads the same separate per-client arrays the
    aggregators are given, with one call per client and key as they make, and needs no
    stacked 400 MB copy that no aggregator gets (and that would double peak memory). The
    per-key float32 accumulator (1 MB) stays cached, so this is the input-read floor.
    """
    for key in updates[0]:
        out = np.zeros_like(updates[0][key])
        for update in updates:
            np.add(out, update[key], out=out)


def _group(key: str) -> str:
    return key.partition(".")[0]


def group_weights_for(n_clients: int, keys: Sequence[str], seed: int) -> list[dict[str, float]]:
    """Client i trains group j unless (i + j) % 4 == 3: each group is missing a quarter of the sites."""
    examples = np.random.default_rng(seed + 1).integers(50, 500, size=n_clients)
    groups = [_group(k) for k in keys]
    return [{g: float(examples[i]) for j, g in enumerate(groups) if (i + j) % 4 != 3} for i in range(n_clients)]


def measure(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall-clock seconds per case, interleaved round by round so drift in load is shared."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--params", type=int, default=1_000_000, help="float32 parameters per client")
    p.add_argument("--keys", type=int, default=4, help="arrays the parameters are split into")
    p.add_argument("--repeats", type=int, default=5, help="runs per measurement; the median is reported")
    p.add_argument("--trim-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true", help="10 clients x 100k parameters, 2 repeats: a smoke run for tests"
    )
    p.add_argument("--out", default=None, help="also write the results as JSON to this path")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.params, args.repeats = 10, 100_000, 2
    if args.clients < 1 or args.params < args.keys or args.keys < 1 or args.repeats < 1:
        p.error("need clients >= 1, keys >= 1, params >= keys and repeats >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rss_before_data = _peak_rss_mb()  # imports (Flower, torch) alone; the rest is data + aggregation
    updates = make_updates(args.clients, args.params, args.keys, args.seed)
    weights = [float(w) for w in np.random.default_rng(args.seed + 2).integers(50, 500, size=args.clients)]
    keys = list(updates[0])
    group_weights = group_weights_for(args.clients, keys, args.seed)
    current = {k: np.zeros_like(v) for k, v in updates[0].items()}

    cases: dict[str, Callable[[], object]] = {
        REFERENCE: partial(numpy_reference, updates),
        "weighted_mean": partial(weighted_mean, updates, weights),
        "groupwise_weighted_mean": partial(groupwise_weighted_mean, current, updates, group_weights, _group),
        "coordinate_median": partial(coordinate_median, updates, weights),
        "trimmed_mean": partial(trimmed_mean, updates, weights, args.trim_fraction),
    }
    times = measure(cases, args.repeats)
    ref = statistics.median(times[REFERENCE])
    results = {
        name: {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "times_s": ts,
            "ratio_to_reference": statistics.median(ts) / ref,
        }
        for name, ts in times.items()
    }
    wm_ratio = results["weighted_mean"]["ratio_to_reference"]
    report = {
        "config": {
            "clients": args.clients,
            "params": args.params,
            "keys": args.keys,
            "dtype": "float32",
            "repeats": args.repeats,
            "trim_fraction": args.trim_fraction,
            "seed": args.seed,
            "quick": args.quick,
        },
        "reference": REFERENCE,
        "results": results,
        "target": {
            "case": "weighted_mean",
            "max_ratio": TARGET_RATIO,
            "ratio": wm_ratio,
            "met": wm_ratio <= TARGET_RATIO,
        },
        "peak_rss_mb": _peak_rss_mb(),
        "peak_rss_before_data_mb": rss_before_data,
    }

    print(
        f"{args.clients} clients x {args.params:,} float32 parameters in {args.keys} keys, "
        f"median of {args.repeats} runs"
    )
    print(f"{'case':<26}{'median s':>10}{'min s':>10}{'x reference':>13}")
    for name, r in results.items():
        print(f"{name:<26}{r['median_s']:>10.4f}{r['min_s']:>10.4f}{r['ratio_to_reference']:>13.2f}")
    verdict = "met" if report["target"]["met"] else "NOT met"
    print(
        f"target weighted_mean <= {TARGET_RATIO:g}x reference: {verdict} ({wm_ratio:.2f}x); "
        f"peak RSS {report['peak_rss_mb']:.0f} MB ({rss_before_data:.0f} MB before the data)"
    )
    write_result(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
