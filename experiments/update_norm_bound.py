"""How many clean updates a relative norm bound would refuse, per k, over four studies' clean runs.

    python experiments/update_norm_bound.py [--work runs/update_norm_bound] [--processes 2]
        [--real-mini-corpus DIR] [--read-only]

`strategy.max_update_norm_ratio=k` refuses an update whose L2 norm is above k times the round's
median update norm (strategies/validation.py). Before making it a default, this runs a subset of
the strategies, leave_one_site_out, ood_methods and real_mini studies at their `base` size, seed 0,
with the ratio off (so no clean update is refused and the training is the studies' own), reads
every screened update's norm from each run's metrics.parquet (metric `update_norm`), and counts,
per k, the clean updates the bound would have refused (ratios recomputed from the norms: the
median over the round's screened updates, three or more). It also counts what the run recorded as
`update_norm_ratio`, which equals that ratio; the runs in experiments/results/update_norm_bound/
were made while the screening recorded a per-group ratio instead (an update's largest, over the
groups it moved, of its group norm over the round's median for that group), the alternative
measured there and not kept. Finished runs are read back, not run again (as a study resumes).
It also reports the largest share of declared training examples one training site held (the
handshake's bound, strategy.max_site_weight_share).

Writes experiments/results/update_norm_bound/: norms.csv (one row per screened update),
refusals.csv (per study and k) and README.md (the tables).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from federated.app.studies.runner import RUNS_DIR, run_jobs
from federated.app.studies.spec import Run, load_study
from federated.app.studies.study import generated_axes
from federated.core.config import load_config
from federated.core.io import atomic_write

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "update_norm_bound"
KS = (1.5, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0)
# The grid subset each study runs: the union of the listed selections (axis -> labels kept; an
# axis not named keeps all its labels). Sized to the CPU time at hand (about 40 CPU-minutes on 2
# shared cores): every strategy at alpha 0.1 (the strongest label skew), three at alpha 100; two
# held-out sites of other archetypes than the strategies study's (a neuro clinic, a cancer
# centre); every OOD method but the reference, held out site_00. real_mini: only the federated
# arm has three or more training sites, the fewest a median needs.
SUBSETS: dict[str, list[dict[str, list[str]]]] = {
    "strategies": [{"alpha": ["0.1"]}, {"alpha": ["100"], "strategy": ["fedavg", "modality_fedavg", "fedprox"]}],
    "leave_one_site_out": [{"held_out": ["site_02", "site_07"]}],
    "ood_methods": [
        {"held_out": ["site_00"], "strategy": ["feddg_ga", "fedgma", "fedsr", "fedrex", "groupdro", "qffl"]}
    ],
    "real_mini": [{"training": ["federated"]}],
}
MEASURE = ["strategy.max_update_norm_ratio=0"]  # off: every clean update is kept and measured


def study_runs(name: str, extra: list[str]) -> list[Run]:
    """The study's seed-0 runs of its SUBSETS grid at its base size, with `extra` overrides added."""
    study = load_study(name)
    cfg = load_config([*study.base, *extra])
    runs = [
        r
        for r in study.runs(False, generated_axes(study, cfg))
        if r.seed == 0
        and any(all(r.labels.get(axis) in labels for axis, labels in keep.items()) for keep in SUBSETS[name])
    ]
    return [Run(r.run_id, r.labels, r.seed, [*r.overrides, *extra, *MEASURE]) for r in runs]


def read_norms(study: str, run: Run, folder: Path) -> pd.DataFrame:
    """One row per screened update of a finished run: its norm, its ratio to the round's median
    (the defence's), and the ratio the run recorded."""
    metrics = pd.read_parquet(folder / "metrics.parquet")
    rows = metrics[metrics["metric"].isin(["update_norm", "update_norm_ratio"])]
    wide = rows.pivot_table(index=["round", "site"], columns="metric", values="value").reset_index()
    if "update_norm_ratio" not in wide:
        wide["update_norm_ratio"] = float("nan")
    counts = wide.groupby("round")["update_norm"].transform("size")
    median = wide.groupby("round")["update_norm"].transform("median")
    wide["ratio"] = (wide["update_norm"] / median).where(counts >= 3)
    wide.insert(0, "run", run.run_id)
    wide.insert(0, "study", study)
    return wide.rename(columns={"update_norm": "norm", "update_norm_ratio": "recorded_ratio"})


def weight_share(folder: Path) -> float:
    """The largest share of declared training examples one training site held in the run."""
    summary = json.loads((folder / "summary.json").read_text())
    sizes = [float(s["n_train"]) for s in summary["per_site"] if s["role"] == "train"]
    return max(sizes) / sum(sizes) if sizes else float("nan")


def refusals(norms: pd.DataFrame) -> pd.DataFrame:
    """Per study (and all together) and k: clean updates the ratio would refuse (and the
    recorded ratio), out of the updates compared (rounds with three or more updates)."""
    out = []
    for study, frame in [*norms.groupby("study", sort=False), ("all", norms)]:
        for k in KS:
            out.append(
                {
                    "study": study,
                    "k": k,
                    "refused": int((frame["ratio"] > k).sum()),
                    "compared": int(frame["ratio"].notna().sum()),
                    "refused_recorded": int((frame["recorded_ratio"] > k).sum()),
                }
            )
    return pd.DataFrame(out)


def markdown(norms: pd.DataFrame, table: pd.DataFrame, shares: dict[str, float], notes: list[str]) -> str:
    maxima = norms.groupby("study", sort=False).agg(
        runs=("run", "nunique"),
        updates=("norm", "size"),
        max_ratio=("ratio", "max"),
        p99_ratio=("ratio", lambda s: s.quantile(0.99)),
        max_recorded_ratio=("recorded_ratio", "max"),
        min_ratio=("ratio", "min"),
        max_norm=("norm", "max"),
    )
    maxima["max_site_share"] = [shares[s] for s in maxima.index]
    lines = [
        "# Clean refusals of a relative update-norm bound",
        "",
        "Written by `python experiments/update_norm_bound.py`. Clean runs (no attack), seed 0, the studies'",
        "`base` size, `strategy.max_update_norm_ratio=0` while measuring. Subsets: "
        + "; ".join(
            f"{s}: " + " or ".join(", ".join(f"{a} in {v}" for a, v in keep.items()) for keep in keeps)
            for s, keeps in SUBSETS.items()
        )
        + " (every other axis in full).",
        "",
        "Refused at k: updates whose L2 norm is above k x the round's median update norm, out of the",
        "updates compared (rounds with 3+ updates); in brackets, by the ratio the runs recorded"
        + (
            " (the same ratio)."
            if (norms["recorded_ratio"] - norms["ratio"]).abs().max() < 1e-6
            else ", which differs: these runs were made while the screening recorded a per-group ratio (an"
            " update's largest, over the groups it moved, of its group norm over that group's median), the"
            " alternative measured and not kept."
        ),
        "",
        "| study | " + " | ".join(f"k={k:g}" for k in KS) + " |",
        "|---|" + "---|" * len(KS),
    ]
    for study, frame in table.groupby("study", sort=False):
        cells = [f"{r.refused}/{r.compared} ({r.refused_recorded})" for r in frame.itertuples()]
        lines.append(f"| {study} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| study | runs | updates | max ratio | 99th pct | min ratio | max recorded | max norm | max site share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for study, r in maxima.iterrows():
        lines.append(
            f"| {study} | {int(r.runs)} | {int(r.updates)} | {r.max_ratio:.3f} | {r.p99_ratio:.3f} | "
            f"{r.min_ratio:.3f} | {r.max_recorded_ratio:.3f} | {r.max_norm:.3g} | {r.max_site_share:.3f} |"
        )
    worst = norms.loc[norms["ratio"].idxmax()]
    lines += [
        "",
        f"Largest clean ratio: {worst.ratio:.3f} ({worst.study}, {worst.run}, round {worst['round']}, {worst.site}).",
    ]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "update_norm_bound", help="run folders")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--real-mini-corpus", type=Path, default=None, help="the real_mini corpus (built by its setup)")
    parser.add_argument("--read-only", action="store_true", help="only read back finished runs")
    parser.add_argument("--studies", nargs="*", default=list(SUBSETS))
    args = parser.parse_args(argv)
    frames, shares, notes = [], {}, []
    for name in args.studies:
        extra = []
        if name == "real_mini":
            corpus = args.real_mini_corpus or ROOT / "experiments" / "real_mini" / "corpus"
            if not corpus.is_dir():
                notes.append(
                    f"real_mini not measured: no corpus at {corpus} (experiments/real_mini/setup.sh builds it)"
                )
                continue
            extra = [f"corpus.path={corpus.resolve()}"]
        runs = study_runs(name, extra)
        out = args.work / name
        if not args.read_only:
            outcomes = run_jobs([(r.run_id, r.overrides) for r in runs], out, args.processes)
            failed = {rid: o.error for rid, o in outcomes.items() if o.summary is None}
            for rid, error in failed.items():
                print(f"{name}/{rid} FAILED: {error}", file=sys.stderr)
        done = [r for r in runs if (out / RUNS_DIR / r.run_id / "summary.json").is_file()]
        if len(done) < len(runs):
            notes.append(f"{name}: {len(runs) - len(done)} of {len(runs)} runs missing")
        if not done:
            continue
        frames += [read_norms(name, r, out / RUNS_DIR / r.run_id) for r in done]
        shares[name] = max(weight_share(out / RUNS_DIR / r.run_id) for r in done)
    norms = pd.concat(frames, ignore_index=True)
    table = refusals(norms)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write(RESULTS / "norms.csv", lambda tmp: norms.round(5).to_csv(tmp, index=False))
    atomic_write(RESULTS / "refusals.csv", lambda tmp: table.to_csv(tmp, index=False))
    text = markdown(norms, table, shares, notes)
    atomic_write(RESULTS / "README.md", lambda tmp: tmp.write_text(text))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
