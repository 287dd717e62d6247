"""A profile's outputs: stats.json, report.md and plots/, with every small cell suppressed.

Suppression. A count below preprocess.min_count (k) is a handful of patients: it is reported as
"<k", never its value (primary suppression). A count hidden among published totals could be
recovered by subtraction (a site's class counts and its task total; the sites' counts and the
pooled one), so every table is a matrix with its totals as a last row (pooled) and column
(total), and while a row or column that sums to a total has exactly one hidden cell, its
smallest other positive cell is hidden too, marked "suppressed" (secondary suppression: the
usual single-table rule, as statistical agencies apply it; it hides exact values, not the bounds a
linear programme over several tables could derive). Totals that a table shares with another (a
site's task total in the label mix) keep the state the first table gave them. Pooled feature
values are over the sites that released the feature (a site below k sends nothing); where a site
holding values did not release, the pooled count of observed values is hidden too, or it
minus the pooled histogram's total would be that site's count.

Histograms and quantiles. A site releases its histogram only in cells of at least k values
(feature_stats.coarsened: whole 1/64ths of the grid, a cell's count spread evenly over them), so
no bin is under k and none needs hiding: the report shows every histogram on those 64 blocks
(the pooled one is the sum of the sites', a cell's spread included), and its plots show shares.
(The earlier report grid, the finest with at most 10% of values in hidden bins, has nothing left
to choose.) A site's or the pooled histogram's counts are "suppressed" where their total is not
shown, exact: the total would give that count away. A quantile q of n values is shown only where
q * n >= k and (1 - q) * n >= k: the 5% of 28 values would be the second smallest, one patient's.

Zero is shown as 0: an empty cell describes nobody. With DP (preprocess.epsilon > 0) every count
is a noisy one and the report says so, with the epsilon.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from federated.core.config import ExperimentConfig, config_to_yaml
from federated.core.feature_stats import BLOCKS, HIST_BINS, Moments, quantile
from federated.core.io import atomic_write, atomic_write_text, temp_writer, write_json
from federated.core.protocol import PROFILE_COARSE_BINS
from federated.core.targets import CLASS_TARGETS, MULTILABEL
from federated.server.profile import Profile, SiteAggregates, feature_names
from federated.server.run_folder import LOCK_FILE, RunFolderError

SHOWN, PRIMARY, SECONDARY = 0, 1, 2
POOLED = "pooled"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
STATS_FILE, REPORT_FILE, CONFIG_FILE, PLOTS_DIR = "stats.json", "report.md", "config.yaml", "plots"
OUTPUTS = (STATS_FILE, REPORT_FILE, CONFIG_FILE, PLOTS_DIR)
_PLOT_NAME = re.compile(r"(hist|labels|missing)_[a-z0-9_]+\.png")
PLOTTED_FEATURES = 24  # per modality in hist_<m>.png (every feature is in stats.json)
TABLE_FEATURES = 64  # per modality in report.md's tables and the missingness heat table
FORMAT = "multimed-fl stats"
VERSION = 1


# ------------------------------------------------------------------------------ suppression --


def protect(
    cells: np.ndarray,
    min_count: int,
    state: np.ndarray | None = None,
    fixed: np.ndarray | None = None,
    rows: bool = True,
    cols: bool = True,
) -> np.ndarray:
    """The state (SHOWN, PRIMARY, SECONDARY) of each cell of a table whose rows (rows=True) and
    columns (cols=True) each sum to a cell of it. `state` gives cells a state decided elsewhere;
    `fixed` cells keep theirs and are never chosen to hide. Written by hand: no maintained Python
    library does cell suppression (sdcMicro and tau-Argus are R and Java)."""
    cells = np.asarray(cells, dtype=np.float64)
    st = np.zeros(cells.shape, dtype=np.int8) if state is None else np.array(state, dtype=np.int8)
    fixed = np.zeros(cells.shape, dtype=bool) if fixed is None else np.asarray(fixed, dtype=bool)
    st[(st == SHOWN) & ~fixed & (cells > 0) & (cells < min_count)] = PRIMARY
    views = [(st, cells, fixed)] if rows else []
    if cols:
        views.append((st.T, cells.T, fixed.T))  # views: writes reach `st`
    changed = True
    while changed:
        changed = False
        for s, c, f in views:
            for i in range(s.shape[0]):
                if (s[i] != SHOWN).sum() != 1:
                    continue
                candidates = np.flatnonzero((s[i] == SHOWN) & ~f[i] & (c[i] > 0))
                if candidates.size:
                    s[i, candidates[np.argmin(c[i][candidates])]] = SECONDARY
                    changed = True
    return st


def shown(value: float, state: int, min_count: int) -> int | str:
    """A count as reported: its value, "<k" (too small) or "suppressed" (hidden so a small one stays hidden)."""
    if state == PRIMARY:
        return f"<{min_count}"
    if state == SECONDARY:
        return "suppressed"
    return int(round(value))


def _column(names: Sequence[str], values: np.ndarray, states: np.ndarray, k: int) -> dict[str, int | str]:
    """{site: value, ..., pooled: value} of one column of a table whose last row is the pooled one."""
    return {n: shown(v, s, k) for n, v, s in zip([*names, POOLED], values, states, strict=True)}


def _with_pooled(block: np.ndarray) -> np.ndarray:
    block = np.asarray(block, dtype=np.float64).reshape(len(block), -1)
    return np.vstack([block, block.sum(axis=0, keepdims=True)])


# ------------------------------------------------------------------------------- stats.json --


def _task_totals(profile: Profile, k: int) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
    """Samples per task and split; and task -> site (and pooled) -> the state of its total."""
    out: dict[str, Any] = {}
    states: dict[str, dict[str, int]] = {}
    for t in profile.schema.tasks:
        holders = [s for s in profile.sites if t in s.tasks]
        if not holders:
            continue
        names = [s.site for s in holders]
        full = _with_pooled(
            np.array(
                [[s.tasks[t]["train"], s.tasks[t]["test"], s.tasks[t]["train"] + s.tasks[t]["test"]] for s in holders]
            )
        )
        st = protect(full, k)
        out[t] = {split: _column(names, full[:, j], st[:, j], k) for j, split in enumerate(("train", "test", "total"))}
        states[t] = dict(zip([*names, POOLED], (int(x) for x in st[:, 2]), strict=True))
    return out, states


def _label_mix(profile: Profile, k: int, totals: dict[str, dict[str, int]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t, spec in profile.schema.tasks.items():
        holders = [s for s in profile.sites if t in s.labels]
        if not holders or spec.target not in (*CLASS_TARGETS, MULTILABEL):
            continue
        names = [s.site for s in holders]
        counts = np.array([s.labels[t] for s in holders], dtype=np.float64)
        if spec.target == MULTILABEL:  # positives per label: a row does not sum to the task's total
            full = _with_pooled(counts)
            st = protect(full, k, rows=False)
            kind = "positives per label"
        else:
            total = np.array([[sum(s.tasks[t].values())] for s in holders], dtype=np.float64)
            full = _with_pooled(np.hstack([counts, total]))
            state = np.zeros(full.shape, dtype=np.int8)
            state[:, -1] = [totals[t][n] for n in [*names, POOLED]]
            fixed = np.zeros(full.shape, dtype=bool)
            fixed[:, -1] = True
            st = protect(full, k, state, fixed)
            kind = "classes"
        out[t] = {
            "kind": kind,
            "classes": list(spec.classes),
            "counts": {
                n: {c: shown(full[i, j], st[i, j], k) for j, c in enumerate(spec.classes)}
                for i, n in enumerate([*names, POOLED])
            },
        }
    return out


def _samples_of(site: SiteAggregates, profile: Profile, modality: str) -> int:
    return sum(sum(n.values()) for t, n in site.tasks.items() if modality in profile.schema.task(t).inputs)


def _lacking(profile: Profile, m: str, holders: list[SiteAggregates], k: int) -> dict[str, Any]:
    """Samples of the tasks that take the modality that hold it, and that lack it (their sum,
    the samples of those tasks, is a known total: used, not repeated)."""
    samples = np.array([_samples_of(s, profile, m) for s in holders], dtype=np.float64)
    lacking = np.array([s.lacking[m] for s in holders], dtype=np.float64)
    full = _with_pooled(np.stack([np.maximum(samples - lacking, 0), lacking, samples], axis=1))
    fixed = np.zeros(full.shape, dtype=bool)
    fixed[:, 2] = True
    st = protect(full, k, fixed=fixed)
    names = [s.site for s in holders]
    return {"holding": _column(names, full[:, 0], st[:, 0], k), "lacking": _column(names, full[:, 1], st[:, 1], k)}


def _stat(x: float) -> float | None:
    return float(f"{x:.6g}") if np.isfinite(x) else None


def quantile_shown(q: float, n: float, min_count: int) -> bool:
    """Whether the q-quantile of n values may be published: at least min_count values on each
    side of it (else it is within a handful of one patient's value: the 5% of 28 values is the
    second smallest)."""
    return q * n >= min_count and (1 - q) * n >= min_count


def _quantiles(
    counts: np.ndarray, lo: float, width: float, constant: float | None, min_count: int
) -> dict[str, float | str | None]:
    """From a histogram on the shared grid, interpolated within a bin and so rounded to the bin
    width's decimal (a zero-inflated feature's 5% is 0, not -8e-05); a feature whose values are
    all one (M2 = 0) has that value as every quantile. "suppressed" where quantile_shown says no
    (n: the histogram's total, the values it describes)."""
    n = float(counts.sum())
    digits = -math.floor(math.log10(width))
    out: dict[str, float | str | None] = {}
    for q in QUANTILES:
        if not quantile_shown(q, n, min_count):
            out[f"q{round(q * 100):02d}"] = "suppressed"
        elif constant is not None:
            out[f"q{round(q * 100):02d}"] = _stat(constant)
        else:
            out[f"q{round(q * 100):02d}"] = _stat(round(quantile(counts, lo, width, q), digits) + 0.0)
    return out


def _constant(moments: Moments | None, j: int) -> float | None:
    return float(moments.mean[j]) if moments is not None and moments.n[j] > 0 and moments.m2[j] == 0 else None


def _block_counts(values: np.ndarray, state: int) -> list[float] | str:
    """A histogram's counts per block as reported: to 2 decimals (a cell's count spread over its
    blocks is no whole number), or "suppressed" where its total is not shown exactly."""
    if state != SHOWN:
        return "suppressed"
    return [round(float(v), 2) + 0.0 for v in values]


def _feature(
    profile: Profile, m: str, j: int, holders: list[SiteAggregates], k: int
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """One feature's entry; and its pooled report-grid histogram and the bins' states (for plots)."""
    names = [s.site for s in holders]
    observed = np.array([s.observed[m][j] for s in holders])
    rows = np.array([s.rows[m] for s in holders], dtype=np.float64)
    full = _with_pooled(np.stack([observed, np.maximum(rows - observed, 0), rows], axis=1))
    released = [s for s in holders if s.moments[m].n[j] > 0]
    partial = any(s.observed[m][j] > 0 and s not in released for s in holders)
    state = np.zeros(full.shape, dtype=np.int8)
    fixed = np.zeros(full.shape, dtype=bool)
    fixed[:, 2] = True
    if partial:  # pooled observed minus the pooled histogram's total would be the silent site's count
        state[-1, 0] = SECONDARY
    st = protect(full, k, state, fixed)
    entry: dict[str, Any] = {
        "observed": _column(names, full[:, 0], st[:, 0], k),
        "missing": _column(names, full[:, 1], st[:, 1], k),
        "pooled_over": [s.site for s in released],
    }
    pooled = profile.pooled.get(m)
    entry["mean"] = {s.site: _stat(s.moments[m].mean[j]) for s in released}
    entry["sd"] = {s.site: _stat(float(np.sqrt(s.moments[m].m2[j] / s.moments[m].n[j]))) for s in released}
    if pooled is not None and pooled.n[j] > 0:
        entry["mean"][POOLED] = _stat(pooled.mean[j])
        entry["sd"][POOLED] = _stat(float(np.sqrt(pooled.m2[j] / pooled.n[j])))
    sent = [s for s in holders if j in s.sent.get(m, [])]
    if not sent or m not in profile.grids:
        return entry, np.zeros(0), np.zeros(0)
    lo, width = profile.grids[m][0][j], profile.grids[m][1][j] * HIST_BINS / profile.bins
    hists = np.array([s.hist[m][j] for s in sent])
    entry["quantiles"] = {
        s.site: _quantiles(h, lo, width, _constant(s.moments[m], j), k) for s, h in zip(sent, hists, strict=True)
    }
    entry["quantiles"][POOLED] = _quantiles(hists.sum(axis=0), lo, width, _constant(pooled, j), k)
    blocks = _with_pooled(hists.reshape(len(sent), BLOCKS, -1).sum(axis=2))
    # A histogram's total is its group's released count: shown only where that count is (the
    # pooled one's: the sum of the sites', or the pooled observed count where every site holding
    # values sent). Under DP the histograms' noise is their own (their totals are not the noisy
    # counts), so all are shown.
    index = {s.site: i for i, s in enumerate(holders)}
    states = [SHOWN if profile.epsilon > 0 else int(st[index[s.site], 0]) for s in sent]
    every = all(s in sent for s in holders if s.observed[m][j] > 0)
    public = profile.epsilon > 0 or all(x == SHOWN for x in states) or (every and st[-1, 0] == SHOWN)
    states.append(SHOWN if public else SECONDARY)
    nonzero = np.flatnonzero(blocks[-1] > 0)
    first, last = (int(nonzero[0]), int(nonzero[-1])) if nonzero.size else (0, BLOCKS - 1)
    step = profile.grids[m][1][j] * HIST_BINS / BLOCKS
    entry["histogram"] = {
        "bin_sd": _stat(16.0 / BLOCKS),  # the grid is the pooled mean +- 8 SD in BLOCKS bins
        "edges": [_stat(lo + step * b) for b in range(first, last + 2)],
        "open_ends": [first == 0, last == BLOCKS - 1],  # an end bin also holds the tail beyond it
        "counts": {
            n: _block_counts(blocks[i, first : last + 1], states[i])
            for i, n in enumerate([*(s.site for s in sent), POOLED])
        },
    }
    pooled_hist = blocks[-1, first : last + 1]
    return entry, pooled_hist, pooled_hist / max(float(pooled_hist.sum()), 1e-12)


def _modalities(profile: Profile, k: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """stats.json's modalities; and, for the plots, per modality the pooled histograms' shares."""
    out: dict[str, Any] = {}
    plots: dict[str, Any] = {}
    for m in profile.vector_modalities():
        spec = profile.schema.modality(m)
        holders = [s for s in profile.sites if m in s.observed]
        names = feature_names(spec)
        features: dict[str, Any] = {}
        plots[m] = {}
        for j, name in enumerate(names):
            features[name], hist, shares = _feature(profile, m, j, holders, k)
            if hist.size:
                plots[m][name] = (features[name]["histogram"]["edges"], shares)
        out[m] = {
            "raw": spec.raw_features,
            "features": names,
            "samples": _lacking(profile, m, holders, k),
            "per_feature": features,
        }
    return out, plots


def privacy_note(profile: Profile) -> str:
    k = profile.min_count
    text = (
        f"Counts below preprocess.min_count={k} are shown as <{k} (a site's or the pooled); counts that "
        f"would give one of them away by subtraction from a total as 'suppressed'. A site with fewer than {k} "
        f"observed values of a feature sent nothing for it. Each site's histogram came in cells of at least {k} "
        f"values (whole 1/{BLOCKS}ths of the grid, a cell's count spread evenly over them): a histogram's counts "
        "are 'suppressed' where its total is not shown; plots show shares. A quantile q of n values is shown "
        f"only where q*n and (1-q)*n are both at least {k}."
    )
    if profile.epsilon > 0:
        text += (
            f" Differential privacy: each site's profile is epsilon={profile.epsilon:g}-DP per sample (Laplace "
            "noise; a third of the budget each for counts, moments and histograms): every count, mean, SD, "
            f"quantile and histogram here is noisy; histograms are on {PROFILE_COARSE_BINS} bins, noisy, then "
            f"coarsened into cells of at least {k} (post-processing: no extra cost); features without a declared "
            "range (the data dictionary's low/high) are not released. Which features a site released (at least "
            f"{k} observed values) was decided on exact counts, as NVIDIA FLARE does: that choice is outside the "
            "epsilon."
        )
    else:
        text += " No noise (preprocess.epsilon=0): the counts are exact."
    return text


def build_stats(profile: Profile, cfg: ExperimentConfig, engine: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """stats.json's content (every count suppressed as the module docstring says), and what the plots need."""
    k = profile.min_count
    samples, totals = _task_totals(profile, k)
    modalities, plots = _modalities(profile, k)
    stats = {
        "format": FORMAT,
        "version": VERSION,
        "engine": engine,
        "corpus": cfg.corpus.site_corpora or cfg.corpus.path or "synthetic",
        "planner": cfg.sites.planner,
        "min_count": k,
        "epsilon": profile.epsilon,
        "privacy": privacy_note(profile),
        "sites": [{"site": s.site, "role": s.role} for s in profile.sites],
        "excluded_sites": dict(profile.excluded),
        "samples": samples,
        "label_mix": _label_mix(profile, k, totals),
        "modalities": modalities,
        "histogram_bins": {"sent": profile.bins, "reported": BLOCKS, "span_sd": 8},
        "wall_s": round(profile.wall_s, 3),
    }
    return stats, plots


# ---------------------------------------------------------------------------------- plots --


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    _pyplot().close(fig)


def _number(v: int | str) -> float:
    return float(v) if isinstance(v, int) else 0.0


def plot_label_mix(task: str, mix: dict[str, Any], path: Path) -> None:
    """Per site (and pooled) its class counts side by side; a suppressed cell is a hatched stub."""
    plt = _pyplot()
    groups = list(mix["counts"])
    classes = mix["classes"]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(groups) * max(1, len(classes)) / 3 + 2), 3.6))
    width = 0.8 / max(len(classes), 1)
    x = np.arange(len(groups))
    for c_i, c in enumerate(classes):
        values = [mix["counts"][g][c] for g in groups]
        pos = x + (c_i - (len(classes) - 1) / 2) * width
        ax.bar(pos, [_number(v) for v in values], width, label=c)
        hidden = [p for p, v in zip(pos, values, strict=True) if isinstance(v, str)]
        if hidden:
            ax.scatter(hidden, [0] * len(hidden), marker="x", color="black", zorder=3)
    ax.set_xticks(x, groups, rotation=30 if len(groups) > 5 else 0, fontsize=8)
    ax.set_ylabel(f"samples ({mix['kind']})")
    ax.set_title(f"{task}: label mix per site (x = suppressed)", fontsize=10)
    ax.legend(fontsize=7, ncol=min(len(classes), 5))
    fig.tight_layout()
    _save(fig, path)


def plot_missingness(modality: str, entry: dict[str, Any], sites: list[str], path: Path) -> None:
    """Sites (and pooled) x features: the share of samples holding the modality that miss a value;
    a suppressed cell is grey."""
    plt = _pyplot()
    names = entry["features"][:TABLE_FEATURES]
    rows = [*sites, POOLED]
    share = np.full((len(rows), len(names)), np.nan)
    for j, f in enumerate(names):
        per = entry["per_feature"][f]
        for i, r in enumerate(rows):
            obs, miss = per["observed"].get(r), per["missing"].get(r)
            if isinstance(obs, int) and isinstance(miss, int) and obs + miss > 0:
                share[i, j] = miss / (obs + miss)
    fig, ax = plt.subplots(figsize=(min(2 + 0.3 * len(names), 20), 1.2 + 0.35 * len(rows)))
    ax.set_facecolor("0.8")
    im = ax.imshow(np.ma.masked_invalid(share), cmap="Reds", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title(f"{modality}: share missing (grey: suppressed or not held)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    _save(fig, path)


def plot_histograms(modality: str, hists: dict[str, Any], path: Path) -> None:
    """The pooled histogram of each feature on the 64 blocks, as shares of its values (a count
    would give away a total the tables hide; every site's cells hold at least min_count values)."""
    plt = _pyplot()
    items = list(hists.items())[:PLOTTED_FEATURES]
    cols = min(4, len(items))
    n_rows = -(-len(items) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.2 * cols, 2.4 * n_rows), squeeze=False)
    for ax, (name, (edges, shares)) in zip(axes.flat, items, strict=False):
        left = np.asarray(edges[:-1], dtype=float)
        width = np.diff(np.asarray(edges, dtype=float))
        ax.bar(left, shares, width, align="edge", color="tab:blue")
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(items) :]:
        ax.axis("off")
    fig.suptitle(f"{modality}: pooled histograms (share of values per bin)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


# ----------------------------------------------------------------------------- report.md --


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return "-" if v is None else str(v)

    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(cell(v) for v in r) + " |" for r in rows),
        "",
    ]


def report_lines(stats: dict[str, Any], plots: list[str]) -> list[str]:
    sites = [s["site"] for s in stats["sites"]]
    lines = [
        "# Federated pre-flight profile (`multimed-fl stats`)",
        "",
        f"Engine: {stats['engine']}; corpus: {stats['corpus']}; planner: {stats['planner']}; "
        f"{len(sites)} sites. No row left a site: each sent counts, per-feature moments and histograms only.",
        "",
        stats["privacy"],
        "",
    ]
    if stats["excluded_sites"]:
        lines += ["Left out (handshake):", *(f"- {s}: {why}" for s, why in stats["excluded_sites"].items()), ""]
    lines += ["## Sites", "", *_md_table(["site", "role"], [[s["site"], s["role"]] for s in stats["sites"]])]
    lines += ["## Samples per task and split", ""]
    for t, per in stats["samples"].items():
        rows = [[n, per["train"][n], per["test"][n], per["total"][n]] for n in per["total"]]
        lines += [f"### {t}", "", *_md_table(["site", "train", "test", "total"], rows)]
    if stats["label_mix"]:
        lines += ["## Label mix", ""]
    for t, mix in stats["label_mix"].items():
        rows = [[n, *counts.values()] for n, counts in mix["counts"].items()]
        lines += [f"### {t} ({mix['kind']})", "", *_md_table(["site", *mix["classes"]], rows)]
        if f"labels_{t}.png" in plots:
            lines += [f"![label mix of {t}]({PLOTS_DIR}/labels_{t}.png)", ""]
    for m, entry in stats["modalities"].items():
        lines += _modality_lines(m, entry, plots)
    return lines


def _modality_lines(m: str, entry: dict[str, Any], plots: list[str]) -> list[str]:
    kind = "raw values (imputed and standardised at load time)" if entry["raw"] else "values as stored"
    lines = [f"## Modality {m} ({len(entry['features'])} features, {kind})", ""]
    samples = entry["samples"]
    lines += _md_table(
        ["site", "samples holding it", "samples lacking it"],
        [[n, samples["holding"][n], samples["lacking"][n]] for n in samples["lacking"]],
    )
    if f"missing_{m}.png" in plots:
        lines += [f"![missingness of {m}]({PLOTS_DIR}/missing_{m}.png)", ""]
    names = entry["features"][:TABLE_FEATURES]
    rows = []
    for f in names:
        per = entry["per_feature"][f]
        q = per.get("quantiles", {}).get(POOLED, {})
        rows.append(
            [
                f,
                per["observed"][POOLED],
                per["missing"][POOLED],
                per["mean"].get(POOLED),
                per["sd"].get(POOLED),
                *(q.get(f"q{round(x * 100):02d}") for x in QUANTILES),
            ]
        )
    lines += ["Pooled over the sites that released each feature (per site: stats.json):", ""]
    lines += _md_table(["feature", "observed", "missing", "mean", "SD", "5%", "25%", "50%", "75%", "95%"], rows)
    if len(entry["features"]) > TABLE_FEATURES:
        lines += [f"(the first {TABLE_FEATURES} of {len(entry['features'])} features; all are in stats.json)", ""]
    if f"hist_{m}.png" in plots:
        lines += [f"![pooled histograms of {m}]({PLOTS_DIR}/hist_{m}.png)", ""]
    return lines


# ------------------------------------------------------------------------------ the folder --


def check_profile_dir(out_dir: Path, overwrite: bool) -> None:
    """A profile goes into a new or empty folder; with overwrite, into one holding an earlier profile
    (its stats.json, report.md, config.yaml and plots are replaced, anything else is left alone).
    Anything else is refused by name, and so is a symbolic link where the profile writes."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise RunFolderError(f"--out {out_dir} is a file, not a folder")
    names = sorted(n for n in os.listdir(out_dir) if n != LOCK_FILE and temp_writer(n) is None)
    links = [n for n in OUTPUTS if (out_dir / n).is_symlink()]
    if links:
        raise RunFolderError(f"{out_dir}: {', '.join(links)} is a symbolic link; a profile never writes through one")
    if STATS_FILE not in names:
        if names:
            raise RunFolderError(
                f"{out_dir} holds files `multimed-fl stats` did not write ({', '.join(names[:5])}); "
                "choose an empty or new folder"
            )
        return
    if not overwrite:
        raise RunFolderError(f"{out_dir} already holds a profile ({STATS_FILE}); pass --overwrite to replace it")
    plots = out_dir / PLOTS_DIR
    if plots.is_dir():
        foreign = sorted(p.name for p in plots.iterdir() if not (_PLOT_NAME.fullmatch(p.name) and p.is_file()))
        if foreign:
            raise RunFolderError(
                f"{plots} holds files a profile does not write ({', '.join(foreign[:5])}); move them, then rerun"
            )


def write_profile(out_dir: Path, profile: Profile, cfg: ExperimentConfig, engine: str) -> dict[str, Any]:
    """stats.json, report.md, config.yaml and plots/ (replacing an earlier profile's); returns stats."""
    out_dir = Path(out_dir)
    stats, hists = build_stats(profile, cfg, engine)
    plots_dir = out_dir / PLOTS_DIR
    plots_dir.mkdir(parents=True, exist_ok=True)
    for old in plots_dir.iterdir():  # check_profile_dir allowed only a profile's own plots here
        if _PLOT_NAME.fullmatch(old.name):
            old.unlink()
    written: list[str] = []
    for t, mix in stats["label_mix"].items():
        plot_label_mix(t, mix, plots_dir / f"labels_{t}.png")
        written.append(f"labels_{t}.png")
    sites = [s["site"] for s in stats["sites"]]
    for m, entry in stats["modalities"].items():
        plot_missingness(
            m, entry, [s for s in sites if s in entry["samples"]["lacking"]], plots_dir / f"missing_{m}.png"
        )
        written.append(f"missing_{m}.png")
        if hists.get(m):
            plot_histograms(m, hists[m], plots_dir / f"hist_{m}.png")
            written.append(f"hist_{m}.png")
    stats["plots"] = [f"{PLOTS_DIR}/{p}" for p in written]
    atomic_write_text(out_dir / CONFIG_FILE, config_to_yaml(cfg))
    atomic_write_text(out_dir / REPORT_FILE, "\n".join(report_lines(stats, written)))
    write_json(out_dir / STATS_FILE, stats)  # last: its presence says the profile is complete
    return stats
