"""Score drop per aggregator when 1 of 8 training sites sends bad updates.

    python experiments/attacks_table.py --out runs/attacks [--sites shared|mixed] [--quick]

Sites: `shared` (default): 8 general hospitals train, so every parameter group has 8
trainers, the usual Byzantine setting; two general hospitals are held out. `mixed`: 4 imaging
centres and 4 general hospitals train, so some groups have only 4 trainers, where a
coordinate-wise median of 3 honest values and 1 bad one is pulled half-way to the bad side
every round; an eye clinic and a general hospital are held out. site_00 attacks every round:
a sign-flipped x10 update, a x1000 scaled update, NaN, or a 1000x inflated example count.
Rounds with too few valid updates are skipped, not fatal, so every run finishes. Only ID
scores are reported (the held-out sites do not change them). Writes results.csv and table.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid import run_grid

AGGREGATORS = {
    "fedavg": ["strategy=fedavg"],
    "modality_fedavg": ["strategy=modality_fedavg"],
    "median": ["strategy=median"],
    "trimmed_mean": ["strategy=trimmed_mean", "strategy.trim_fraction=0.25"],
    "krum": ["strategy=krum"],
    # multi-Krum: average the n - f - 1 = 6 best-scored updates of the 8
    "multikrum": ["strategy=krum", "strategy.krum_selected=6"],
}
ATTACKS = ["none", "sign_flip", "scale", "nan", "inflate_count"]
SITES = {
    "shared": [
        "sites.train=[" + ",".join(["general_hospital"] * 8) + "]",
        "sites.held_out=[general_hospital,general_hospital]",
    ],
    "mixed": [
        "sites.train=[" + ",".join(["imaging_centre"] * 4 + ["general_hospital"] * 4) + "]",
        "sites.held_out=[eye_clinic,general_hospital]",
    ],
}
# The relative norm bound (on by default) off: the table measures each aggregator alone.
BASE = [
    "corpus.samples_per_task_site=150",
    "rounds=12",
    "attack.sites=[site_00]",
    "strategy.on_too_few_valid=skip",
    "strategy.max_update_norm_ratio=0",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sites", choices=sorted(SITES), default="shared")
    ap.add_argument("--quick", action="store_true", help="smoke scale, fedavg and median only")
    args = ap.parse_args()
    aggregators, base = AGGREGATORS, [*SITES[args.sites], *BASE]
    if args.quick:
        aggregators, base = {a: AGGREGATORS[a] for a in ("fedavg", "median")}, [*base, "scale=smoke"]
    jobs = [
        (f"{a}-{k}", [*base, *aggregators[a], f"attack.kind={k}", f"seed={args.seed}"])
        for a in aggregators
        for k in ATTACKS
    ]
    results = run_grid(jobs, args.out)
    rows = []
    for name, (summary, error) in sorted(results.items()):
        agg, kind = name.split("-", 1)
        row = {"aggregator": agg, "attack": kind, "error": error.splitlines()[0] if error else ""}
        if summary:
            row.update(
                id=summary["final"]["id"]["score"],
                ood=summary["final"]["ood"]["score"],
                rejected=len(summary["rejections"]),
                skipped=len(summary["skipped_rounds"]),
            )
        rows.append(row)
    df = pd.DataFrame(rows)
    df.to_csv(args.out / "results.csv", index=False)
    lines = [
        "ID score (x100) and drop from the same aggregator's clean run, in points; "
        "[r] = updates rejected by validation over all rounds",
        "",
        "| aggregator | clean | " + " | ".join(a for a in ATTACKS if a != "none") + " |",
        "|---|---|" + "---|" * (len(ATTACKS) - 1),
    ]
    for agg in aggregators:
        sub = df[df.aggregator == agg].set_index("attack")
        clean = sub.loc["none", "id"] if "none" in sub.index else math.nan
        cells = []
        for kind in ATTACKS[1:]:
            if kind not in sub.index or pd.isna(sub.loc[kind].get("id")):
                cells.append(f"failed: {sub.loc[kind, 'error'] if kind in sub.index else 'missing'}")
                continue
            r = sub.loc[kind]
            cells.append(f"{100 * r['id']:.1f} ({100 * (r['id'] - clean):+.1f}) [{int(r['rejected'])}]")
        lines.append(f"| {agg} | {100 * clean:.1f} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
