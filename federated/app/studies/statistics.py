"""Paired comparisons of a study's conditions against a reference condition (results.csv in, tables out).

A unit is everything a run shares with its counterpart under the reference: the seed, the labels
of the other axes and, for the OOD score, the held-out site (one unit per `ood_site/<site>`
column). Comparing within units removes what seeds and sites add to every condition alike, so
a difference far smaller than the sd over seeds can still be told apart from zero. The OOD
difference is thus a mean over (run, held-out site) pairs, each site weighing equally; it differs
from the difference of the `ood` column (tasks pooled over sites) when sites hold different tasks.

Choices, and why:

- CI: percentile bootstrap of the mean paired difference (scipy.stats.bootstrap, fixed seed, so
  a report rerun on the same results gives the same numbers). Not BCa: studies have 3-20 pairs,
  where BCa's jackknife acceleration is itself noisy and scipy returns NaN (with a warning) once
  resamples take few distinct values; for a mean, a smooth unbiased statistic, its bias
  correction buys little.
- Test: the sign-flip permutation test of the mean difference is the primary test. It tests the
  quantity the CI and the table report (the mean), assumes only that under no effect a
  difference is as likely positive as negative, and is exact (all 2^n sign patterns) up to 13
  pairs, with ties and zero differences handled as they come. The Wilcoxon signed-rank p-value is
  kept beside it as a check that one outlying pair does not carry the result; it is not primary
  because with ties or zeros scipy falls back to a normal approximation that is poor at this n.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

METRICS = ("ood", "ood_adapted", "id", "worst_site_score")  # compared, primary first, where present
SITE_PREFIX = "ood_site/"
HELD_OUT_AXIS = "held_out"  # the generated leave-one-site-out axis: its labels are sites
CONFIDENCE = 0.95
ALPHA = 0.05
N_RESAMPLES = 9999  # sign flips are enumerated exactly while 2^n <= this (n <= 13)
SEED = 0
MIN_PAIRS_FOR_CI = 3  # below this a bootstrap only reshuffles one or two numbers


@dataclass(frozen=True)
class PairedResult:
    """The mean paired difference, its CI, the p-values, and why a CI or p-value is NaN."""

    n: int
    mean: float
    ci_low: float
    ci_high: float
    p_value: float  # sign-flip permutation test, two-sided (the primary test)
    p_wilcoxon: float
    note: str = ""

    @property
    def distinguishable(self) -> bool:
        """Both criteria: the CI excludes zero and the primary test rejects at ALPHA."""
        excludes_zero = bool(self.ci_low > 0 or self.ci_high < 0)  # False when NaN
        return excludes_zero and bool(self.p_value < ALPHA)


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.asarray(np.mean(x, axis=axis))


def bootstrap_ci(diffs: np.ndarray) -> tuple[float, float, str]:
    """(low, high, note): the percentile bootstrap 95% CI of the mean; the point itself when every
    difference is equal (no resample can differ), NaN with the reason when too few pairs."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        return np.nan, np.nan, "no pairs"
    if np.ptp(d) == 0:
        return float(d[0]), float(d[0]), "all differences equal"
    if d.size < MIN_PAIRS_FOR_CI:
        return np.nan, np.nan, f"fewer than {MIN_PAIRS_FOR_CI} pairs"
    res = stats.bootstrap(
        (d,),
        _mean,
        confidence_level=CONFIDENCE,
        n_resamples=N_RESAMPLES,
        method="percentile",
        vectorized=True,
        random_state=SEED,  # not rng=: scipy < 1.15 (the test extra allows 1.11) lacks it
    )
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return low, high, ""


def sign_flip_p(diffs: np.ndarray) -> float:
    """Two-sided p-value of the mean difference under random sign flips (exact for n <= 13)."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        return np.nan
    if d.size == 1:  # its two sign patterns have the same |mean| (scipy needs two observations)
        return 1.0
    res = stats.permutation_test(
        (d,),
        _mean,
        permutation_type="samples",  # one sample: each difference keeps or flips its sign
        vectorized=True,
        n_resamples=N_RESAMPLES,
        alternative="two-sided",
        random_state=SEED,
    )
    return float(res.pvalue)


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value; NaN when no difference is non-zero."""
    d = np.asarray(diffs, dtype=float)
    if not np.any(d != 0):
        return np.nan
    with warnings.catch_warnings():  # scipy warns when ties or zeros force the normal approximation
        warnings.simplefilter("ignore")
        return float(stats.wilcoxon(d).pvalue)


def paired_test(diffs: np.ndarray) -> PairedResult:
    """Every figure of one comparison, from its paired differences."""
    d = np.asarray(diffs, dtype=float)
    low, high, note = bootstrap_ci(d)
    mean = float(d.mean()) if d.size else np.nan
    return PairedResult(d.size, mean, low, high, sign_flip_p(d), wilcoxon_p(d), note)


def site_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df if c.startswith(SITE_PREFIX)]


def _site_level(df: pd.DataFrame, axis: str, metric: str) -> bool:
    """OOD pairs per held-out site, unless the compared conditions are the held-out sites (then
    no site is shared and runs pair on their seed and other axes)."""
    return metric == "ood" and axis != HELD_OUT_AXIS and bool(site_columns(df))


def _long(df: pd.DataFrame, axes: list[str], axis: str, metric: str) -> tuple[pd.DataFrame, list[str]]:
    """(one row per unit and condition with its `value`, the columns that name a unit)."""
    keys = [a for a in axes if a != axis and a in df] + ["seed"]
    frame = df[[axis, *keys]].astype(str)
    if _site_level(df, axis, metric):
        cols = site_columns(df)
        wide = pd.concat([frame, df[cols]], axis=1)
        long = wide.melt(id_vars=[axis, *keys], value_vars=cols, var_name="site", value_name="value")
        long["site"] = long["site"].str.removeprefix(SITE_PREFIX)
        keys = [*keys, "site"]
    else:
        long = frame.assign(value=df.get(metric, np.nan))
    long["value"] = pd.to_numeric(long["value"], errors="coerce")
    return long.dropna(subset=["value"]), keys


def paired_differences(
    df: pd.DataFrame, axes: list[str], axis: str, condition: str, reference: str, metric: str
) -> pd.DataFrame:
    """The units both conditions scored, with `condition` - `reference` in column `diff`, in unit
    order. A unit run twice (not a study's grid) counts once, as its mean."""
    long, keys = _long(df, axes, axis, metric)
    by = {
        c: long[long[axis] == c].groupby(keys, sort=True)["value"].mean().rename(c)
        for c in dict.fromkeys((condition, reference))
    }
    both = pd.concat([by[condition].rename("condition"), by[reference].rename("reference")], axis=1, join="inner")
    return both.assign(diff=both["condition"] - both["reference"]).reset_index()


def resolve_reference(values: list[str], reference: str | None) -> str:
    """The named reference if it ran, else the first condition (a quick run may leave it out)."""
    return reference if reference is not None and reference in values else values[0]


def compare(df: pd.DataFrame, axes: list[str], reference: str | None = None) -> pd.DataFrame:
    """One row per (condition of the first axis, metric): each condition against the reference."""
    columns = ["metric", "per_site", "condition", "reference", "n", "mean_diff", "ci_low", "ci_high", "p_value"]
    columns += ["p_wilcoxon", "distinguishable", "note"]
    if not axes or axes[0] not in df or not len(df):
        return pd.DataFrame(columns=columns)
    axis = axes[0]
    values = list(dict.fromkeys(df[axis].astype(str)))
    ref = resolve_reference(values, reference)
    metrics = [m for m in METRICS if m in df and pd.to_numeric(df[m], errors="coerce").notna().any()]
    rows = []
    for cond in values:
        if cond == ref:
            continue
        for m in metrics:
            r = paired_test(paired_differences(df, axes, axis, cond, ref, m)["diff"].to_numpy())
            per_site = _site_level(df, axis, m)
            rows.append([m, per_site, cond, ref, r.n, r.mean, r.ci_low, r.ci_high, r.p_value, r.p_wilcoxon])
            rows[-1] += [r.distinguishable, r.note]
    return pd.DataFrame(rows, columns=columns)


def ood_spread(df: pd.DataFrame, axis: str | None) -> pd.DataFrame:
    """Per condition of `axis`: the mean OOD score, each held-out site's OOD mean over runs, and
    over those sites their mean, the worst (min) and the sd (population, as the summary's): how evenly a
    condition serves hospitals it never saw. When the conditions are the held-out sites, or there
    is no axis, one row over all runs."""
    cols = site_columns(df)
    out = ["condition", "ood_mean", "site_mean", "n_sites", "worst_site", "worst_site_ood", "site_sd"]
    if not cols or "ood" not in df:
        return pd.DataFrame(columns=out)
    ok = df[pd.to_numeric(df["ood"], errors="coerce").notna()]
    per_condition = axis is not None and axis != HELD_OUT_AXIS and axis in ok
    groups = ok.groupby(ok[axis].astype(str), sort=False) if per_condition else [("all runs", ok)]
    rows = []
    for cond, g in groups:
        sites = g[cols].apply(pd.to_numeric, errors="coerce").mean().dropna()
        if not len(sites):
            continue
        sites.index = sites.index.str.removeprefix(SITE_PREFIX)
        ood = float(pd.to_numeric(g["ood"], errors="coerce").mean())
        rows.append([str(cond), ood, float(sites.mean()), len(sites), str(sites.idxmin()), float(sites.min())])
        rows[-1].append(float(sites.std(ddof=0)))
    return pd.DataFrame(rows, columns=out)
