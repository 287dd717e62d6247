"""A study's summary (mean +- sd over seeds per condition), paired comparisons, its plots and report.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from federated.app.studies import statistics
from federated.app.studies.spec import Study
from federated.core.io import atomic_write, atomic_write_text

METRICS = ["id", "ood", "ood_adapted", "gap", "worst_site_score", "id_personal", "max_epsilon"]
NAMES = {
    "id": "ID score",
    "ood": "OOD score",
    "ood_adapted": "OOD, adapted (ood.adapt)",
    "gap": "ID-OOD gap",
    "worst_site_score": "worst site",
    "id_personal": "ID, personalised",
    "max_epsilon": "epsilon spent",
}


def summarize(df: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """One row per condition: mean, sd (population, over seeds) and n of each metric."""
    ok = df[df["id"].notna()] if "id" in df else df.iloc[0:0]
    metrics = [m for m in METRICS if m in ok and ok[m].notna().any()]
    if not axes:
        ok = ok.assign(condition="all")
        axes = ["condition"]
    g = ok.groupby(axes, sort=False)[metrics]
    out = g.mean().add_suffix("_mean").join(g.std(ddof=0).add_suffix("_sd")).join(g.size().rename("n"))
    return out.reset_index()


def markdown_table(summary: pd.DataFrame, axes: list[str]) -> str:
    axes = axes or ["condition"]
    metrics = [m for m in METRICS if f"{m}_mean" in summary]
    head = "| " + " | ".join([*axes, *(NAMES[m] for m in metrics), "runs"]) + " |"
    lines = [head, "|" + "---|" * (len(axes) + len(metrics) + 1)]
    for _, r in summary.iterrows():
        cells = [str(r[a]) for a in axes]
        for m in metrics:
            mean, sd = r[f"{m}_mean"], r[f"{m}_sd"]
            single = int(r["n"]) == 1  # one run: no spread to show
            cells.append("-" if pd.isna(mean) else f"{mean:.3f}" if single else f"{mean:.3f} ± {sd:.3f}")
        lines.append("| " + " | ".join([*cells, str(int(r["n"]))]) + " |")
    return "\n".join(lines)


def plot_scores(summary: pd.DataFrame, axes: list[str], path: Path, title: str) -> None:
    """ID and OOD per condition, sd error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = axes or ["condition"]
    labels = [" / ".join(str(r[a]) for a in axes) for _, r in summary.iterrows()]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(labels) + 2.5), 4.0))
    for i, (m, color) in enumerate((("id", "tab:blue"), ("ood", "tab:orange"))):
        if f"{m}_mean" not in summary:
            continue
        ax.bar(
            x + (i - 0.5) * 0.38,
            summary[f"{m}_mean"],
            0.38,
            yerr=summary[f"{m}_sd"].fillna(0),
            capsize=3,
            label=NAMES[m],
            color=color,
        )
    ax.set_xticks(
        x, labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center", fontsize=8
    )
    ax.set_ylabel("score (0-1, mean over tasks)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def plot_per_site(df: pd.DataFrame, path: Path, title: str) -> bool:
    """OOD score of each held-out site (leave-one-site-out), sd over seeds."""
    cols = [c for c in df if c.startswith("ood_site/")]
    if not cols:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    long = df.melt(value_vars=cols, var_name="site", value_name="score").dropna()
    long["site"] = long["site"].str.removeprefix("ood_site/")
    g = long.groupby("site")["score"]
    mean, sd = g.mean(), g.std(ddof=0).fillna(0)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(mean) + 2), 3.8))
    ax.bar(mean.index, mean.values, yerr=sd.values, capsize=3, color="tab:orange")
    ax.axhline(mean.mean(), color="black", linewidth=1, linestyle="--", label=f"mean {mean.mean():.3f}")
    ax.set_ylabel("OOD score when held out")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", rotation=45, labelsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return True


def per_task_arms(df: pd.DataFrame, axis: str) -> pd.DataFrame:
    """ID score per task (rows) and arm (columns), mean over seeds; an arm's "arm:task" runs
    each contribute their own task."""
    ok = df[df["id"].notna()].copy()
    ok["arm"] = ok[axis].astype(str).str.split(":").str[0]
    cols = [c for c in ok if c.startswith("id/")]
    table = ok.groupby("arm", sort=False)[cols].mean().T
    table.index = [c.removeprefix("id/") for c in table.index]
    return table


def _mean_sd(mean: float, sd: float) -> str:
    if pd.isna(mean):
        return "-"
    return f"{mean:.3f}" if pd.isna(sd) else f"{mean:.3f} ± {sd:.3f}"  # NaN sd: a single run


def per_task_scores(df: pd.DataFrame, axis: str, group: str) -> pd.DataFrame:
    """`group` (id or ood) score per task (rows) and condition of `axis` (columns), as
    "mean ± sd" over seeds; "-" where a condition has no score for the task."""
    ok = df[df[group].notna()]
    cols = [c for c in ok if c.startswith(f"{group}/")]
    g = ok.groupby(axis, sort=False)[cols]
    means, sds, counts = g.mean(), g.std(ddof=0), g.count()  # population sd, as in summarize()
    table = pd.DataFrame(index=[c.removeprefix(f"{group}/") for c in cols])
    for cond in means.index:
        table[cond] = [
            _mean_sd(means.loc[cond, c], sds.loc[cond, c] if counts.loc[cond, c] > 1 else np.nan) for c in cols
        ]
    return table


def _write_csv(path: Path, table: pd.DataFrame, index_label: str) -> None:
    atomic_write(path, lambda tmp: table.to_csv(tmp, index_label=index_label))


def per_task_section(df: pd.DataFrame, axis: str, out: Path) -> list[str]:
    """Per-task OOD and ID tables (per_task_ood.csv, per_task_id.csv) and their lines in report.md."""
    lines = []
    for group, name in (("ood", "OOD (held-out sites)"), ("id", "ID (training sites' test splits)")):
        table = per_task_scores(df, axis, group)
        _write_csv(out / f"per_task_{group}.csv", table, "task")
        lines += [
            f"## {name} score per task (mean ± sd over seeds)",
            "",
            "| task | " + " | ".join(table.columns) + " |",
            "|" + "---|" * (len(table.columns) + 1),
        ]
        lines += [f"| {t} | " + " | ".join(r) + " |" for t, r in table.iterrows()] + [""]
    return lines


def _plots(study: Study, summary: pd.DataFrame, df: pd.DataFrame, axes: list[str], out: Path) -> list[tuple[str, str]]:
    """The study's PNG plots, as (file name, caption)."""
    plots = []
    if len(summary):
        plot_scores(summary, axes, out / "scores.png", study.title)
        plots.append(("scores.png", "ID and OOD score per condition (mean ± sd over seeds)"))
    if "held_out" in axes and plot_per_site(df, out / "ood_per_site.png", f"{study.title}: each site held out"):
        plots.append(("ood_per_site.png", "OOD score of each site when it is held out"))
    return plots


def _arms_section(df: pd.DataFrame, axis: str, out: Path) -> list[str]:
    """The task x arm table (per_task.csv, per_task.md) and its lines in report.md."""
    arms = per_task_arms(df, axis)
    atomic_write(out / "per_task.csv", lambda tmp: arms.to_csv(tmp, index_label="task"))
    complete = arms.dropna()
    head = "| task | " + " | ".join(arms.columns) + " |"
    rows = [head, "|" + "---|" * (len(arms.columns) + 1)]
    rows += [f"| {t} | " + " | ".join("-" if pd.isna(v) else f"{v:.3f}" for v in r) + " |" for t, r in arms.iterrows()]
    rows.append(
        f"| mean over the {len(complete)} tasks every arm scored | "
        + " | ".join(f"{complete[c].mean():.3f}" for c in arms.columns)
        + " |"
    )
    atomic_write_text(out / "per_task.md", "\n".join(rows) + "\n")
    return ["## ID score per task and arm (mean over seeds)", "", *rows, ""]


def _extra_tables(study: Study, df: pd.DataFrame, axes: list[str], out: Path) -> list[str]:
    """The per-task tables a study asks for (per_task_arms, per_task_table), over its first axis."""
    if not axes or not len(df) or "id" not in df or not df["id"].notna().any():
        return []
    lines = _arms_section(df, axes[0], out) if study.per_task_arms else []
    return lines + (per_task_section(df, axes[0], out) if study.per_task_table else [])


def _number(x: float, signed: bool = False) -> str:
    return "-" if pd.isna(x) else f"{x:+.3f}" if signed else f"{x:.3f}"


def _p(p: float) -> str:
    return "-" if pd.isna(p) else f"{p:.3g}"


def comparisons_table(comparisons: pd.DataFrame) -> list[str]:
    """Markdown rows of comparisons.csv; a distinguishable difference's mean carries a `*`."""
    lines = [
        "| condition | metric | pairs | mean difference | 95% CI | p (sign-flip) | distinguishable |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in comparisons.itertuples():
        ci = f"[{_number(r.ci_low, True)}, {_number(r.ci_high, True)}]" if not pd.isna(r.ci_low) else "-"
        ci += f" ({r.note})" if r.note and ci == "-" else ""
        mean = _number(r.mean_diff, True) + (" *" if r.distinguishable else "")
        metric = NAMES[str(r.metric)] + (", per held-out site" if r.per_site else "")
        lines.append(
            f"| {r.condition} | {metric} | {r.n} | {mean} | {ci} | {_p(r.p_value)} | "
            f"{'yes' if r.distinguishable else 'no'} |"
        )
    return lines


def spread_table(spread: pd.DataFrame) -> list[str]:
    """Markdown rows of the OOD score across held-out sites per condition."""
    lines = [
        "| condition | OOD score | mean over sites | held-out sites | worst site | its OOD score | sd across sites |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.condition} | {_number(r.ood_mean)} | {_number(r.site_mean)} | {r.n_sites} | {r.worst_site} "
        f"| {_number(r.worst_site_ood)} | {_number(r.site_sd)} |"
        for r in spread.itertuples()
    ]
    return lines


def _pairing(axes: list[str], ref: str) -> str:
    """What the two runs of a pair share, in words, for the section's note."""
    shared = ", ".join(["seed", *(f"{a} label" for a in axes[1:])])
    if axes[0] == statistics.HELD_OUT_AXIS:  # the conditions are the sites: no site is shared
        return f"Each held-out site minus {ref}, in pairs of runs with the same {shared}."
    return (
        f"Each {axes[0]} condition minus {ref}, in pairs of runs with the same {shared}; "
        "rows marked per held-out site pair each held-out site's OOD score, each site weighing equally."
    )


def comparison_section(study: Study, df: pd.DataFrame, axes: list[str], out: Path) -> list[str]:
    """comparisons.csv and the "Paired differences" lines of report.md and summary.md: each
    condition of the first axis against the study's reference, paired over seeds, the other axes
    and held-out sites; then how evenly each condition scores the held-out sites."""
    if not axes or not len(df) or axes[0] not in df:
        return []
    comparisons = statistics.compare(df, axes, study.reference)
    atomic_write(out / "comparisons.csv", lambda tmp: comparisons.to_csv(tmp, index=False))
    ref = statistics.resolve_reference(list(dict.fromkeys(df[axes[0]].astype(str))), study.reference)
    lines = [f"## Paired differences vs {ref}", ""]
    if study.reference is not None and ref != study.reference:
        lines += [f"The study's reference {study.reference} did not run; the first condition stands in.", ""]
    if len(comparisons):
        lines += [
            f"{_pairing(axes, ref)} 95% CI: percentile bootstrap of the mean difference "
            f"({statistics.N_RESAMPLES} resamples, seed {statistics.SEED}); p: two-sided sign-flip permutation "
            "test of the mean (exact up to 13 pairs); `*`: distinguishable from zero (CI excludes 0 and "
            f"p < {statistics.ALPHA}). comparisons.csv also has the Wilcoxon signed-rank p-value.",
            "",
            *comparisons_table(comparisons),
            "",
        ]
    else:
        lines += [f"No other {axes[0]} condition has scores to compare with {ref}.", ""]
    spread = statistics.ood_spread(df, axes[0])
    if len(spread):
        lines += [
            "OOD score across held-out sites: each site's mean over runs, the worst of them and their sd "
            "(how evenly a condition serves hospitals it never saw).",
            "",
            *spread_table(spread),
            "",
        ]
    return lines


def write_report(study: Study, df: pd.DataFrame, axes: list[str], out: Path, command: str) -> pd.DataFrame:
    """summary.csv, summary.md, comparisons.csv, the plots, the per-task tables and report.md; returns
    the summary."""
    summary = summarize(df, axes)
    atomic_write(out / "summary.csv", lambda tmp: summary.to_csv(tmp, index=False))
    table = markdown_table(summary, axes)
    paired = comparison_section(study, df, axes, out)
    atomic_write_text(out / "summary.md", "\n".join([table, "", *paired]).rstrip("\n") + "\n")
    plots = _plots(study, summary, df, axes, out)
    extra_tables = _extra_tables(study, df, axes, out)
    failed = df[df["error"].astype(bool)] if "error" in df else df.iloc[0:0]
    lines = [
        f"# {study.title}",
        "",
        study.description,
        "",
        f"Command: `{command}`",
        "",
        f"{len(df)} runs ({df['seed'].nunique() if len(df) else 0} seeds per condition), "
        f"{len(failed)} failed. Scores are the mean over tasks of each task's primary metric "
        "mapped to [0, 1]; ± is the standard deviation over seeds.",
        "",
        table,
        "",
        *paired,
        *extra_tables,
    ]
    for name, caption in plots:
        lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    if len(failed):
        lines += ["## Failed runs", ""] + [f"- `{r.run_id}`: {r.error}" for r in failed.itertuples()] + [""]
    lines += [
        "Every run's outputs are under `runs/`; `results.csv` has one row per run; "
        "`tensorboard --logdir tensorboard` compares runs in the HParams view.",
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return summary
