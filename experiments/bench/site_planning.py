"""Site planning at scale: 1,000 sites over a 1,000,000-row manifest, in seconds and bytes.

A planner must be cheap enough that every ClientApp process can rebuild the plan (that is
how sites agree on it without shipping it), and a plan must be index arrays into the
manifest, not copies of data. This builds a manifest-only corpus of N rows over the 11
MultiMed tasks and plans S sites with every planner step on (Dirichlet label skew, quantity
skew, label noise, missing modalities, acquisition shift), for two planners:
  natural     one site per origin site (S origins)
  random_mix  S sites of 3 random tasks over S/10 origins (10 sites share each origin)
It reports the wall time of each (median of --repeats), the bytes the plan holds (its index
arrays), the bytes a copy of the sites' samples would take (the corpus's per-sample array
sizes), the manifest's own bytes, and the peak memory traced while planning.
Target: each plan <= 10 s.

    python experiments/bench/site_planning.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from collections.abc import Sequence

import numpy as np
import pandas as pd

from federated.app.bench import write_result
from federated.core.config import load_config
from federated.core.multimed import MULTIMED, MULTIMED_TASKS
from federated.data.format import Corpus
from partitions import plan_sites
from partitions.site_plan import SitePlan

TARGET_S = 10.0
STEPS_ON = [
    "sites.label_skew_alpha=0.5",
    "sites.quantity_skew_sigma=1.0",
    "sites.label_noise_rate=0.1",
    "sites.missing_sample_rate=0.2",
    "sites.load_shift_severity=1.0",
    "sites.min_samples=1",
]


def make_manifest(n_rows: int, n_origins: int, seed: int) -> pd.DataFrame:
    """Rows spread evenly over origins and tasks, 20% test, class labels per task."""
    rng = np.random.default_rng(seed)
    tasks = np.array(MULTIMED_TASKS)
    task_idx = rng.integers(0, len(tasks), size=n_rows)
    n_classes = np.array([max(len(MULTIMED.task(t).classes), 1) for t in tasks])
    labels = np.floor(rng.random(n_rows) * n_classes[task_idx])
    origins = np.array([f"origin_{i:04d}" for i in range(n_origins)])
    return pd.DataFrame(
        {
            "origin_site": origins[np.arange(n_rows) % n_origins],
            "task": tasks[task_idx],
            "split": np.where(rng.random(n_rows) < 0.2, "test", "train"),
            "label": labels,
        }
    )


def plan_bytes(plans: list[SitePlan]) -> int:
    arrays = [a for p in plans for a in (p.train_rows, p.test_rows, *p.masked.values())]
    arrays += [a for p in plans for pair in p.relabelled.values() for a in pair]
    return int(sum(a.nbytes for a in arrays))


def copy_bytes(manifest: pd.DataFrame, plans: list[SitePlan]) -> int:
    """What the sites' samples would take as copies: each row's task inputs at corpus shape."""
    per_task = {
        t: sum(
            int(np.prod(MULTIMED.modality(m).shape)) * np.dtype(MULTIMED.modality(m).dtype).itemsize
            for m in MULTIMED.task(t).inputs
        )
        for t in MULTIMED_TASKS
    }
    tasks = manifest["task"].to_numpy()
    rows = np.concatenate([np.concatenate([p.train_rows, p.test_rows]) for p in plans])
    return int(pd.Series(tasks[rows]).map(per_task).sum())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--sites", type=int, default=1_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="20,000 rows, 100 sites, 1 repeat")
    p.add_argument("--out", default=None, help="also write the results as JSON to this path")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.sites, args.repeats = 20_000, 100, 1
    if args.sites < 20 or args.rows < args.sites * 11 or args.repeats < 1:
        p.error("need sites >= 20, rows >= 11 x sites and repeats >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cases = {
        "natural": (args.sites, ["sites.planner=natural", "sites.holdout=random", "sites.holdout_k=10"]),
        "random_mix": (
            args.sites // 10,
            [
                "sites.planner=random_mix",
                f"sites.n_sites={args.sites}",
                "sites.tasks_per_site=3",
                "sites.holdout=random",
                "sites.holdout_k=10",
            ],
        ),
    }
    results = {}
    for name, (n_origins, overrides) in cases.items():
        manifest = make_manifest(args.rows, n_origins, args.seed)
        cfg = load_config([*overrides, *STEPS_ON, f"corpus.seed={args.seed}"])
        times, plans = [], []
        for _ in range(args.repeats):
            corpus = Corpus.from_manifest(manifest, MULTIMED_TASKS)  # fresh: index built each time
            t0 = time.perf_counter()
            plans = plan_sites(corpus, cfg)
            times.append(time.perf_counter() - t0)
        tracemalloc.start()
        plan_sites(Corpus.from_manifest(manifest, MULTIMED_TASKS), cfg)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        median = statistics.median(times)
        results[name] = {
            "sites": len(plans),
            "held_out": sum(p.role == "held_out" for p in plans),
            "origins": n_origins,
            "median_s": median,
            "times_s": times,
            "plan_bytes": plan_bytes(plans),
            "copy_bytes": copy_bytes(manifest, plans),
            "manifest_bytes": int(manifest.memory_usage(deep=True).sum()),
            "peak_traced_bytes_while_planning": int(peak),
            "met": median <= TARGET_S,
        }
    report = {
        "config": {
            "rows": args.rows,
            "sites": args.sites,
            "repeats": args.repeats,
            "seed": args.seed,
            "steps_on": STEPS_ON,
            "quick": args.quick,
        },
        "target_s": TARGET_S,
        "results": results,
    }
    mb = 1 / 2**20
    print(f"{args.sites:,} sites over a {args.rows:,}-row manifest, every planner step on; median of {args.repeats}")
    print(f"{'planner':<12}{'sites':>7}{'median s':>10}{'plan MB':>9}{'copy MB':>10}{'manifest MB':>13}{'peak MB':>9}")
    for name, r in results.items():
        print(
            f"{name:<12}{r['sites']:>7}{r['median_s']:>10.2f}{r['plan_bytes'] * mb:>9.1f}"
            f"{r['copy_bytes'] * mb:>10.0f}{r['manifest_bytes'] * mb:>13.1f}"
            f"{r['peak_traced_bytes_while_planning'] * mb:>9.1f}"
        )
    verdict = all(r["met"] for r in results.values())
    print(f"target <= {TARGET_S:g} s per plan: {'met' if verdict else 'NOT met'}")
    write_result(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
