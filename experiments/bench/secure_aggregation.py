"""Secure aggregation's cost: a SecAgg+ training round against a plain one, 3, 10 and 50 sites.

Workload: the default model, N sites of the random_mix planner (every site every task, so that no
parameter group is left out for having one holder; none held out), in-process, R rounds of
`train.max_steps_per_round=2` local steps (short, so that the protocol's own cost is not hidden
behind training). Measured side by side in one run, interleaved (plain, secure, plain, secure ...)
on the same corpus and plan:
  training round = (train + aggregate seconds) / rounds, from each run's summary.json timing
  (evaluation is the same in both and left out)
  secure round / plain round, and the seconds the protocol adds per round
and, per site, what its update weighs on the wire: a plain reply carries float32 parameters, a
masked one an int64 vector (parameters + one weight per group + Flower's weight factor).
Where the time goes at many sites (profiled, 50 sites): Shamir sharing. Each site splits its two
secrets into one share per neighbour with `threshold` coefficients (pycryptodome's Shamir, in pure
Python: 0.29 s per secret at 50 shares, threshold 30) and the server recombines one secret per
site (0.35 s each). With secure_aggregation.num_shares=1.0 (Flower's default: every site is every
site's neighbour) that grows as N^2; SecAgg+ proper gives each site a ring of k neighbours, so the
"50 sites, k neighbours" row sets num_shares=k. In-process every site's share of that work runs
on this machine's 2 cores one after another; in a deployment each hospital does its own at once.
Also timed, on its own (`--checks-only` adds it to an existing --out file): the server's checks on
the unmasked sum (strategies/secure_sums.py, sum_problems) for the default model's layout, the
sum of 3 sites' vectors quantised as Flower's mod does, with the norm bound on; median of repeats.

    python experiments/bench/secure_aggregation.py [--quick] [--rounds R] [--sites 3,10,50] [--out results.json]
    python experiments/bench/secure_aggregation.py --checks-only [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from federated.app.bench import environment, write_result
from federated.core.io import atomic_write_text


def overrides(n_sites: int, rounds: int, quick: bool) -> list[str]:
    return [
        "sites.planner=random_mix",
        f"sites.n_sites={n_sites}",
        "sites.tasks_per_site=11",
        "sites.holdout=listed",
        "sites.held_out=[]",
        "sites.min_samples=2",
        f"rounds={rounds}",
        "train.max_steps_per_round=2",
        f"strategy.min_train_sites={n_sites}",
        *(["scale=smoke"] if quick else []),
    ]


def round_seconds(summary: dict[str, Any]) -> float:
    t = summary["timing"]
    return (t["train_s"] + t["aggregate_s"]) / int(summary["rounds_completed"])


def one_run(out: Path, settings: list[str]) -> dict[str, Any]:
    from federated.app.runner import run_experiment
    from federated.core.config import load_config

    run_experiment(load_config(settings), out, progress=False)
    return json.loads((out / "summary.json").read_text())


def update_bytes(settings: list[str]) -> dict[str, int]:
    """Bytes of one site's update: plain (float32 parameters) and masked (the int64 vector)."""
    import numpy as np

    from federated.core.config import load_config
    from federated.core.models import build_model
    from federated.data.cache import prepare_corpus
    from federated.data.format import Corpus
    from strategies.secure_sums import GROUPED, Layout

    cfg = load_config(settings)
    model = build_model(cfg.model, Corpus.open(prepare_corpus(cfg.corpus)).schema, cfg.seed)
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = sum(int(np.prod(v.shape)) for v in arrays.values())
    vector = Layout.of(arrays, GROUPED).length + 1  # + Flower's weight factor
    return {"parameters": params, "plain_bytes": 4 * params, "masked_bytes": 8 * vector}


def check_seconds(settings: list[str], n_sites: int = 3, repeats: int = 21) -> dict[str, Any]:
    """Seconds sum_problems takes on the unmasked sum of `n_sites` honest vectors over the model of
    `settings` (every group declared, the norm bound on): the server's added work per secure round."""
    import time

    import numpy as np
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from federated.core.config import load_config
    from federated.core.models import build_model
    from federated.data.cache import prepare_corpus
    from federated.data.format import Corpus
    from strategies.secure_sums import GROUPED, Layout, quantization_levels, site_vector, sum_problems

    cfg = load_config(settings)
    model = build_model(cfg.model, Corpus.open(prepare_corpus(cfg.corpus)).schema, cfg.seed)
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    layout = Layout.of(arrays, GROUPED)
    clip = cfg.secure_aggregation.clipping_range or 1.0
    levels = quantization_levels(n_sites, 0, 2**32)
    rng = np.random.default_rng(0)
    quantised = np.zeros(layout.length, np.int64)
    declared: dict[str, float] = {}
    for _ in range(n_sites):
        trained = {
            k: v + rng.normal(0, 0.01, v.shape).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in arrays.items()
        }
        site = site_vector(layout, arrays, trained, {s.group: 100.0 for s in layout.segments}, 200.0, clip)
        quantised += quantize([site.vector], clip, levels)[0].astype(np.int64)
        for group, a in site.weights.items():
            declared[group] = declared.get(group, 0.0) + a
    summed = dequantize([quantised], clip, levels)[0] - (n_sites - 1) * clip
    bound = float(cfg.strategy.max_update_norm)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        problems = sum_problems(layout, summed, quantised, declared, n_sites, clip, levels, norm_bound=bound)
        times.append(time.perf_counter() - t0)
    if problems:
        raise SystemExit(f"the honest sum failed the checks: {problems}")
    return {
        "entries": layout.length,
        "groups": len(layout.segments),
        "sites": n_sites,
        "repeats": repeats,
        "median_s": statistics.median(times),
        "max_s": max(times),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke-size model, 3 and 10 sites, 1 repeat")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="plain/secure pairs per site count")
    p.add_argument("--sites", default="3,10,50")
    p.add_argument("--neighbours", type=int, default=11, help="num_shares of the extra SecAgg+ row at the most sites")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--checks-only", action="store_true", help="time the checks on the sum only (kept in --out)")
    args = p.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    checks = check_seconds(overrides(3, 1, args.quick))
    print(
        f"checks on the unmasked sum ({checks['entries']:,} entries, {checks['groups']} groups, "
        f"{checks['sites']} sites): {1e3 * checks['median_s']:.1f} ms (median of {checks['repeats']}, "
        f"max {1e3 * checks['max_s']:.1f} ms)",
        flush=True,
    )
    if args.checks_only:
        if args.out:
            kept = json.loads(args.out.read_text()) if args.out.exists() else {}
            kept["checks"] = {**checks, "environment": environment()}  # the rounds' own environment stays
            atomic_write_text(args.out, json.dumps(kept, indent=2))
        return 0
    counts = [3, 10] if args.quick else [int(n) for n in args.sites.split(",")]
    repeats = 1 if args.quick else args.repeats
    report: dict[str, Any] = {"rounds": args.rounds, "max_steps_per_round": 2, "sites": {}, "checks": checks}
    with tempfile.TemporaryDirectory(prefix="bench-secagg-") as tmp:
        # warm-up, not counted: the first run in a process pays for imports, the corpus and torch's start
        one_run(Path(tmp) / "warm-up", [*overrides(counts[0], 1, args.quick), "secure_aggregation=secaggplus"])
        cases = [(str(n), n, []) for n in counts]  # every site every site's neighbour (Flower's default)
        if not args.quick:
            k, n = args.neighbours, counts[-1]
            cases.append((f"{n} sites, {k} neighbours", n, [f"secure_aggregation.num_shares={k}"]))
        for name, n, extra in cases:
            base = overrides(n, args.rounds, args.quick)
            plain, secure = [], []
            for r in range(repeats):
                slug = name.replace(" ", "_").replace(",", "")
                plain.append(round_seconds(one_run(Path(tmp) / f"{slug}-plain-{r}", base)))
                summary = one_run(Path(tmp) / f"{slug}-secure-{r}", [*base, "secure_aggregation=secaggplus", *extra])
                if summary.get("failures"):
                    raise SystemExit(f"{name} sites: the secure run had failures: {summary['failures']}")
                secure.append(round_seconds(summary))
            ps, ss = statistics.median(plain), statistics.median(secure)
            entry = {
                "sites": n,
                "num_shares": extra[0].split("=")[1] if extra else "1.0 (every site)",
                "plain_round_s": plain,
                "secure_round_s": secure,
                "ratio": ss / ps,
                "added_s_per_round": ss - ps,
                **update_bytes(base),
            }
            report["sites"][name] = entry
            print(
                f"{name}: plain round {ps:.2f} s, secure round {ss:.2f} s, ratio {ss / ps:.2f} "
                f"(+{ss - ps:.2f} s per round); a site's update {entry['plain_bytes'] / 2**20:.2f} MB plain, "
                f"{entry['masked_bytes'] / 2**20:.2f} MB masked ({entry['parameters']:,} parameters)",
                flush=True,
            )
    write_result(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
