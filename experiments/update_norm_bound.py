"""How many clean updates a relative norm bound would refuse, per k, over four studies' clean runs
and clean plans with few sites or skewed sizes.

    python experiments/update_norm_bound.py [--work runs/update_norm_bound] [--processes 2]
        [--real-mini-corpus DIR] [--read-only] [--studies NAME ...] [--plans NAME ...]

`strategy.max_update_norm_ratio=k` refuses an update whose L2 norm per square root of its
training examples is above k times the round's median of that (strategies/validation.py
norm_ratios). This runs a subset of the strategies, leave_one_site_out, ood_methods and real_mini
studies at their `base` size, seed 0, and the PLANS (quantity skew, a large site, three and four
training sites) at the default size or near it, with the ratio off (so no clean update is refused and the
training is the plans' own), reads every screened update's norm from each run's metrics.parquet
(metric `update_norm`), recomputes each site's local steps and examples from the run's plan (its
replies' STEPS and NUM_EXAMPLES, which metrics.parquet lacks), and counts, per k, the clean updates
the bound would have refused under the defence's ratio and the plain one (norm over the round's
median norm, the rule before), with the alternatives measured (per sqrt(step), per step), and how
many of the clean updates, each multiplied by 10 or 1000 in turn, it refuses. `recorded_ratio` is
what the run recorded: a per-group ratio for the studies' runs, the plain ratio for the plans'
(the code when each was run). Finished runs are read back, not run again (as a study resumes).
It also reports the largest share of declared training examples one training site held (the
handshake's bound, strategy.max_site_weight_share).

Writes experiments/results/update_norm_bound/: norms.csv (one row per screened update),
refusals.csv (per study and k), replayed_attacks.csv and README.md (the tables).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
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
# Clean plans outside the studies, at the default size (corpus.samples_per_task_site=300) unless
# named, 12 rounds: quantity skew over the default sites (a site's update norm grows with its number of
# local steps, i.e. its data), and the fewest training sites a median needs (3) and one more.
# Each run's overrides; eye_clinic is held out (its tasks are held by imaging_centre and
# general_hospital).
FEW = "sites.held_out=[eye_clinic]"
PLANS: dict[str, dict[str, list[str]]] = {
    # the plan's sizes are drawn from the corpus seed
    "quantity_skew": {
        f"sigma=1__seed={s}": ["sites.quantity_skew_sigma=1", f"seed={s}", f"corpus.seed={s}"] for s in (0, 1)
    },
    # a stronger skew: the largest site takes 9.1x the median site's steps (sigma 1: 8x)
    "strong_skew": {"sigma=2__seed=0": ["sites.quantity_skew_sigma=2", "seed=0", "corpus.seed=0"]},
    # the generator caps a site at its origin's data: a larger corpus lets the largest site take
    # 56 steps against the median's 3.5 (16x) while holding 89.6% of the examples, under the
    # handshake's bound of 90% (600 per task and site would pass it)
    "large_site": {
        "sigma=2__n=550__seed=0": ["sites.quantity_skew_sigma=2", "corpus.samples_per_task_site=550", "seed=0"]
    },
    "three_sites": {
        "sigma=0": ["sites.train=[imaging_centre,general_hospital,cancer_centre]", FEW],
        "sigma=1": ["sites.train=[imaging_centre,general_hospital,cancer_centre]", FEW, "sites.quantity_skew_sigma=1"],
    },
    "four_sites": {
        "sigma=0": ["sites.train=[imaging_centre,general_hospital,cancer_centre,genomics_lab]", FEW],
        "sigma=1": [
            "sites.train=[imaging_centre,general_hospital,cancer_centre,genomics_lab]",
            FEW,
            "sites.quantity_skew_sigma=1",
        ],
    },
}
PLAN_BASE = ["rounds=12"]


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


# The ratios compared: an update's norm divided by each of these, over the round's median of
# that. `ratio` is the defence's (strategies/validation.py norm_ratios: per sqrt(example), the
# count its reply is weighted by); the others are the alternatives measured.
RULES = {
    "ratio": lambda f: np.sqrt(f["examples"].clip(lower=1)),
    "plain_ratio": lambda f: 1.0,
    "sqrt_steps_ratio": lambda f: np.sqrt(f["steps"].clip(lower=1)),
    "steps_ratio": lambda f: f["steps"].clip(lower=1),
}
RULE_NAMES = {
    "ratio": "per sqrt(example) (the default)",
    "plain_ratio": "plain norm (before)",
    "sqrt_steps_ratio": "per sqrt(step)",
    "steps_ratio": "per step",
}


def plan_runs(name: str) -> list[Run]:
    """The runs of one of PLANS, seed in the overrides (default 0)."""
    return [Run(rid, {"plan": rid}, 0, [*PLAN_BASE, *ov, *MEASURE]) for rid, ov in PLANS[name].items()]


def site_steps(overrides: list[str]) -> dict[str, tuple[int, int]]:
    """Each training site's (local optimizer steps per round, training examples) under
    `overrides`: steps as clients/trainer.py counts them (one per batch of each task's training
    rows, per epoch, capped by train.max_steps_per_round), what its reply reports as STEPS and
    metrics.parquet lacks; examples as its reply declares them (NUM_EXAMPLES)."""
    from federated.core.protocol import Role
    from federated.data.cache import prepare_corpus
    from federated.data.format import Corpus
    from partitions import plan_sites

    cfg = load_config(overrides)
    corpus = Corpus.open(prepare_corpus(cfg.corpus))
    tasks = corpus.manifest["task"].to_numpy()
    out = {}
    for plan in plan_sites(corpus, cfg):
        if plan.role != Role.TRAIN:
            continue
        counts = pd.Series(tasks[plan.train_rows]).value_counts()
        steps = cfg.train.local_epochs * sum(-(-int(counts.get(t, 0)) // cfg.train.batch_size) for t in plan.tasks)
        cap = cfg.train.max_steps_per_round
        out[plan.site] = (min(steps, cap) if cap else steps, plan.n_train)
    return out


def read_norms(study: str, run: Run, folder: Path) -> pd.DataFrame:
    """One row per screened update of a finished run: its norm, its ratio to the round's median
    (the defence's), and the ratio the run recorded."""
    metrics = pd.read_parquet(folder / "metrics.parquet")
    rows = metrics[metrics["metric"].isin(["update_norm", "update_norm_ratio"])]
    wide = rows.pivot_table(index=["round", "site"], columns="metric", values="value").reset_index()
    if "update_norm_ratio" not in wide:
        wide["update_norm_ratio"] = float("nan")
    sizes = site_steps(run.overrides)
    wide["steps"] = wide["site"].map(lambda site: sizes[site][0])
    wide["examples"] = wide["site"].map(lambda site: sizes[site][1])
    counts = wide.groupby("round")["update_norm"].transform("size")
    for column, per in RULES.items():
        value = wide["update_norm"] / per(wide)
        wide[column] = (value / value.groupby(wide["round"]).transform("median")).where(counts >= 3)
    wide.insert(0, "run", run.run_id)
    wide.insert(0, "study", study)
    return wide.rename(columns={"update_norm": "norm", "update_norm_ratio": "recorded_ratio"})


def weight_share(folder: Path) -> float:
    """The largest share of declared training examples one training site held in the run."""
    summary = json.loads((folder / "summary.json").read_text())
    sizes = [float(s["n_train"]) for s in summary["per_site"] if s["role"] == "train"]
    return max(sizes) / sum(sizes) if sizes else float("nan")


def refusals(norms: pd.DataFrame) -> pd.DataFrame:
    """Per study (and all together) and k: clean updates the defence's ratio would refuse, and the
    plain ratio (the rule before), out of the updates compared (rounds with three or more updates)."""
    out = []
    for study, frame in [*norms.groupby("study", sort=False), ("all", norms)]:
        for k in KS:
            out.append(
                {
                    "study": study,
                    "k": k,
                    "refused": int((frame["ratio"] > k).sum()),
                    "compared": int(frame["ratio"].notna().sum()),
                    "refused_plain": int((frame["plain_ratio"] > k).sum()),
                }
            )
    return pd.DataFrame(out)


ATTACK_FACTORS = (10, 1000)  # sign-flip x10 and scale x1000 send -10x and 1000x a site's own update
DEFAULT_K = 4.0


def replayed_attacks(norms: pd.DataFrame) -> pd.DataFrame:
    """Per study and factor: how many of the clean updates, each in turn multiplied by the factor
    in its own round (the median re-taken), the default k refuses, by the defence's ratio and
    the plain one."""
    out = []
    compared = norms[norms["ratio"].notna()]
    for study, frame in compared.groupby("study", sort=False):
        for factor in ATTACK_FACTORS:
            counts = {"ratio": 0, "plain_ratio": 0}
            for _, rnd in frame.groupby(["run", "round"]):
                for column in counts:
                    per = (rnd["norm"] / RULES[column](rnd)).to_numpy(dtype=float) * np.ones(len(rnd))
                    for i in range(len(per)):
                        scaled = per.copy()
                        scaled[i] *= factor
                        counts[column] += bool(scaled[i] / np.median(scaled) > DEFAULT_K)
            out.append({"study": study, "factor": factor, "updates": len(frame), **counts})
    return pd.DataFrame(out)


def markdown(norms: pd.DataFrame, table: pd.DataFrame, shares: dict[str, float], notes: list[str]) -> str:
    grouped = norms.groupby("study", sort=False)
    lines = [
        "# Clean refusals of a relative update-norm bound",
        "",
        "Written by `python experiments/update_norm_bound.py`. Clean runs (no attack),",
        "`strategy.max_update_norm_ratio=0` while measuring (every update kept and recorded). Studies (seed 0,",
        "their `base` size, 150 samples per task and site): "
        + "; ".join(
            f"{s}: " + " or ".join(", ".join(f"{a} in {v}" for a, v in keep.items()) for keep in keeps)
            for s, keeps in SUBSETS.items()
        )
        + " (every other axis in full). Plans ("
        + ", ".join(PLAN_BASE)
        + ", modality_fedavg, one local epoch, Adam; the default size, 300 per task and site, unless an override"
        + " says otherwise): "
        + "; ".join(
            f"{p}: " + " | ".join(f"{rid}: {' '.join(ov)}" for rid, ov in runs.items()) for p, runs in PLANS.items()
        )
        + ".",
        "",
        "Steps and examples per site are recomputed from each run's plan (what its replies reported as",
        "STEPS and NUM_EXAMPLES). The defence (strategies/validation.py `norm_ratios`) divides each update's",
        "L2 norm by the square root of its training examples and compares that with the round's median of",
        "the same (rounds with 3+ updates). Refused at k: clean updates above k, out of those compared; in",
        "brackets, by the plain ratio (norm over the round's median norm, the rule before).",
        "",
        "| study | " + " | ".join(f"k={k:g}" for k in KS) + " |",
        "|---|" + "---|" * len(KS),
    ]
    for study, frame in table.groupby("study", sort=False):
        cells = [f"{r.refused}/{r.compared} ({r.refused_plain})" for r in frame.itertuples()]
        lines.append(f"| {study} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Largest clean ratio (smallest in brackets) by rule: an update's norm divided by each, over the",
        "round's median of that.",
        "",
        "| study | runs | updates | "
        + " | ".join(RULE_NAMES.values())
        + " | max norm | max steps / median | max site share |",
        "|---|---|---|" + "---|" * len(RULE_NAMES) + "---|---|---|",
    ]
    for study, frame in grouped:
        steps_spread = (frame["steps"] / frame.groupby(["run", "round"])["steps"].transform("median")).max()
        cells = [f"{frame[c].max():.3f} ({frame[c].min():.3f})" for c in RULE_NAMES]
        lines.append(
            f"| {study} | {frame['run'].nunique()} | {len(frame)} | "
            + " | ".join(cells)
            + f" | {frame['norm'].max():.3g} | {steps_spread:.3g} | {shares[study]:.3f} |"
        )
    attacks = replayed_attacks(norms)  # the csv's counts; a few seconds
    lines += [
        "",
        "Each clean update in turn multiplied by 10 (as sign-flip x10 sends, negated) or 1000 (scale x1000) in its",
        f"own round, the median re-taken: refused at k={DEFAULT_K:g} per sqrt(example) (by the plain ratio).",
        "",
        "| study | updates | " + " | ".join(f"x{f}" for f in ATTACK_FACTORS) + " |",
        "|---|---|" + "---|" * len(ATTACK_FACTORS),
    ]
    for study, frame in attacks.groupby("study", sort=False):
        cells = [f"{r.ratio}/{r.updates} ({r.plain_ratio})" for r in frame.itertuples()]
        lines.append(f"| {study} | {frame['updates'].iloc[0]} | " + " | ".join(cells) + " |")
    for column, name in RULE_NAMES.items():
        worst = norms.loc[norms[column].idxmax()]
        lines.append(
            f"\nLargest clean ratio {name}: {worst[column]:.3f} ({worst.study}, {worst.run}, round "
            f"{worst['round']}, {worst.site}: {int(worst.steps)} steps, {int(worst.examples)} examples)."
        )
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "update_norm_bound", help="run folders")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--real-mini-corpus", type=Path, default=None, help="the real_mini corpus (built by its setup)")
    parser.add_argument("--read-only", action="store_true", help="only read back finished runs")
    parser.add_argument("--studies", nargs="*", default=list(SUBSETS))
    parser.add_argument("--plans", nargs="*", default=list(PLANS), help="clean plans outside the studies (PLANS)")
    args = parser.parse_args(argv)
    frames, shares, notes = [], {}, []
    for name in [*args.studies, *args.plans]:
        if name in PLANS:
            runs, out = plan_runs(name), args.work / name
            if not args.read_only:
                outcomes = run_jobs([(r.run_id, r.overrides) for r in runs], out, args.processes)
                for rid, o in outcomes.items():
                    if o.summary is None:
                        print(f"{name}/{rid} FAILED: {o.error}", file=sys.stderr)
            done = [r for r in runs if (out / RUNS_DIR / r.run_id / "summary.json").is_file()]
            if len(done) < len(runs):
                notes.append(f"{name}: {len(runs) - len(done)} of {len(runs)} runs missing")
            if done:
                frames += [read_norms(name, r, out / RUNS_DIR / r.run_id) for r in done]
                shares[name] = max(weight_share(out / RUNS_DIR / r.run_id) for r in done)
            continue
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
    attacks = replayed_attacks(norms)
    atomic_write(RESULTS / "replayed_attacks.csv", lambda tmp: attacks.to_csv(tmp, index=False))
    text = markdown(norms, table, shares, notes)
    atomic_write(RESULTS / "README.md", lambda tmp: tmp.write_text(text))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
