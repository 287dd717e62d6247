"""Privacy-utility: ID and OOD score against the sample-level DP budget epsilon, over seeds.

    python experiments/privacy_utility.py --out runs/privacy_utility [--seeds 3] [--quick]

epsilon in {1, 3, 8} (privacy=dp_sgd, noise calibrated for the planned rounds, delta 1e-5) and
no DP, same data, same training seeds. Writes results.csv (one row per run), table.md (mean +-
sd over seeds) and privacy_utility.png (score against epsilon with sd error bars), and prints
the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid import run_grid

EPSILONS = [1.0, 3.0, 8.0, None]  # None = no DP
BASE = ["corpus.samples_per_task_site=150", "rounds=12"]


def jobs(seeds: int, base: list[str]) -> list[tuple[str, list[str]]]:
    out = []
    for eps in EPSILONS:
        privacy = ["privacy=none"] if eps is None else ["privacy=dp_sgd", f"privacy.target_epsilon={eps}"]
        for seed in range(seeds):
            out.append((f"eps-{eps if eps is not None else 'none'}-seed{seed}", [*base, *privacy, f"seed={seed}"]))
    return out


def rows_from(results: dict) -> pd.DataFrame:
    rows = []
    for name, (summary, error) in sorted(results.items()):
        _, eps, seed = name.split("-")
        row = {"epsilon": eps, "seed": int(seed.removeprefix("seed")), "error": error.splitlines()[0] if error else ""}
        if summary:
            spent = [p["epsilon"] for p in summary["privacy"].values() if p.get("epsilon") is not None]
            row.update(
                id=summary["final"]["id"]["score"],
                ood=summary["final"]["ood"]["score"],
                gap=summary["final"]["gap"],
                max_spent_epsilon=max(spent) if spent else None,
                sites_stopped=sum(bool(p.get("stopped_by_budget")) for p in summary["privacy"].values()),
                wall_s=summary["timing"]["wall_s"],
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _order(df: pd.DataFrame) -> list[str]:
    return [e for e in ["1.0", "3.0", "8.0", "none"] if e in set(df["epsilon"])]


def table(df: pd.DataFrame) -> str:
    g = df.groupby("epsilon")[["id", "ood", "gap", "max_spent_epsilon"]]
    mean, sd, n = g.mean(), g.std(ddof=0), df.groupby("epsilon")["id"].count()
    lines = [
        "| epsilon (target) | ID score | OOD score | gap | max spent epsilon | runs |",
        "|---|---|---|---|---|---|",
    ]
    for e in _order(df):
        spent = "-" if pd.isna(mean.loc[e, "max_spent_epsilon"]) else f"{mean.loc[e, 'max_spent_epsilon']:.3f}"
        lines.append(
            f"| {'no DP' if e == 'none' else e} | {mean.loc[e, 'id']:.3f} +- {sd.loc[e, 'id']:.3f} | "
            f"{mean.loc[e, 'ood']:.3f} +- {sd.loc[e, 'ood']:.3f} | {mean.loc[e, 'gap']:.3f} | {spent} | {n[e]} |"
        )
    return "\n".join(lines)


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = _order(df)
    g = df.groupby("epsilon")[["id", "ood"]]
    mean, sd = g.mean().loc[order], g.std(ddof=0).loc[order]
    x = range(len(order))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for col, label in (("id", "ID (training sites)"), ("ood", "OOD (held-out sites)")):
        ax.errorbar(x, mean[col], yerr=sd[col], marker="o", capsize=4, label=label)
    ax.set_xticks(list(x), ["no DP" if e == "none" else f"eps={float(e):g}" for e in order])
    ax.set_ylabel("score (mean over tasks, 0-1)")
    ax.set_title("Sample-level DP-SGD: privacy vs utility")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke scale, 1 seed, 2 rounds")
    args = p.parse_args()
    base = ["scale=smoke", "rounds=2"] if args.quick else BASE
    seeds = 1 if args.quick else args.seeds
    out = Path(args.out)
    results = run_grid(jobs(seeds, base), out, args.processes)
    df = rows_from(results)
    df.to_csv(out / "results.csv", index=False)
    text = table(df.dropna(subset=["id"]))
    (out / "table.md").write_text(text + "\n")
    plot(df.dropna(subset=["id"]), out / "privacy_utility.png")
    print(text)
    return 0 if not df["error"].astype(bool).any() else 1


if __name__ == "__main__":
    sys.exit(main())
