"""Paired comparisons in study reports: the figures against scipy and hand enumeration, the pairing
of units, the report section and the `reference:` key."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from federated.app.studies import statistics
from federated.app.studies.report import write_report
from federated.app.studies.spec import Study, StudyError, load_study

DIFFS = np.array([0.031, 0.012, -0.004, 0.027, 0.018, 0.009, 0.022, -0.001])


def _exact_two_sided(d: np.ndarray) -> float:
    """P(|mean of sign-flipped d| >= |mean of d|), over all 2^n sign patterns."""
    observed = abs(d.mean())
    flips = [abs((np.array(signs) * d).mean()) for signs in itertools.product((1, -1), repeat=len(d))]
    return sum(f >= observed - 1e-12 for f in flips) / len(flips)


def test_the_bootstrap_ci_is_scipys_percentile_bootstrap_with_the_fixed_seed():
    low, high, note = statistics.bootstrap_ci(DIFFS)
    direct = stats.bootstrap(
        (DIFFS,), np.mean, confidence_level=0.95, n_resamples=9999, method="percentile", random_state=0
    ).confidence_interval
    assert (low, high, note) == (pytest.approx(direct.low, rel=1e-12), pytest.approx(direct.high, rel=1e-12), "")
    assert low < DIFFS.mean() < high
    assert statistics.bootstrap_ci(DIFFS) == (low, high, note)  # reproducible: the seed is fixed


def test_the_sign_flip_p_value_is_scipys_and_the_exact_enumeration():
    direct = stats.permutation_test(
        (DIFFS,),
        lambda x, axis: np.mean(x, axis=axis),
        permutation_type="samples",
        n_resamples=9999,
        random_state=0,
    )
    p = statistics.sign_flip_p(DIFFS)
    assert p == pytest.approx(direct.pvalue, rel=1e-12)
    assert p == pytest.approx(_exact_two_sided(DIFFS), rel=1e-12)  # n = 8: all 256 patterns
    # [1, 2, 3]: of the 8 sign patterns only +++ and --- reach |mean| >= 2
    assert _exact_two_sided(np.array([1.0, 2.0, 3.0])) == 2 / 8
    assert statistics.sign_flip_p(np.array([1.0, 2.0, 3.0])) == pytest.approx(0.25)
    assert statistics.sign_flip_p(np.array([1.0, -2.0, 3.0])) == pytest.approx(_exact_two_sided(np.array([1, -2, 3])))


def test_beyond_13_pairs_the_sign_flip_p_value_is_sampled_reproducibly():
    d = np.linspace(-0.5, 1.0, 16)
    p = statistics.sign_flip_p(d)
    direct = stats.permutation_test(
        (d,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples", n_resamples=9999, random_state=0
    )
    assert p == pytest.approx(direct.pvalue, rel=1e-12) and p == statistics.sign_flip_p(d)
    assert abs(p - _exact_two_sided(d)) < 0.02  # the sample of 9999 patterns estimates the exact value


def test_the_wilcoxon_p_value_is_scipys():
    assert statistics.wilcoxon_p(DIFFS) == pytest.approx(stats.wilcoxon(DIFFS).pvalue, rel=1e-12)


def test_few_or_equal_differences_give_a_reason_not_a_crash():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor a warning
        empty = statistics.paired_test(np.array([]))
        two = statistics.paired_test(np.array([0.1, 0.3]))
        equal = statistics.paired_test(np.array([0.1] * 4))
        zeros = statistics.paired_test(np.zeros(5))
        one = statistics.paired_test(np.array([0.3]))  # a quick study: one seed, one pair
    assert one.n == 1 and one.mean == pytest.approx(0.3) and one.p_value == 1.0 and not one.distinguishable
    assert (one.ci_low, one.ci_high) == (0.3, 0.3) and one.note == "all differences equal"
    assert empty.n == 0 and np.isnan([empty.mean, empty.ci_low, empty.p_value]).all() and empty.note == "no pairs"
    assert two.n == 2 and two.mean == pytest.approx(0.2) and np.isnan(two.ci_low) and np.isnan(two.ci_high)
    assert two.note == "fewer than 3 pairs" and two.p_value == pytest.approx(0.5)  # 2 of 4 patterns
    assert (equal.ci_low, equal.ci_high) == (0.1, 0.1) and equal.note == "all differences equal"
    assert equal.p_value == pytest.approx(2 / 16) and not equal.distinguishable
    assert (zeros.ci_low, zeros.ci_high, zeros.p_value) == (0.0, 0.0, 1.0) and np.isnan(zeros.p_wilcoxon)
    assert not any(r.distinguishable for r in (empty, two, equal, zeros))


def test_distinguishable_needs_both_the_ci_and_the_p_value():
    assert statistics.paired_test(DIFFS + 0.01).distinguishable  # p = 2/256, CI above zero
    assert not statistics.paired_test(DIFFS - DIFFS.mean()).distinguishable
    # a CI that excludes zero is not enough: 3 pairs cannot reach p < 0.05
    three = statistics.paired_test(np.array([0.1, 0.2, 0.3]))
    assert three.ci_low > 0 and three.p_value == pytest.approx(0.25) and not three.distinguishable


def _site_table() -> pd.DataFrame:
    """2 conditions x 2 seeds, each run scoring 2 held-out sites; one unrelated run (other lr)."""
    rows = [
        # cond, seed, site_a, site_b
        ("A", 0, 0.50, 0.30),
        ("A", 1, 0.55, 0.20),
        ("B", 0, 0.60, 0.25),
        ("B", 1, 0.65, 0.40),
    ]
    df = pd.DataFrame(
        [
            {"cond": c, "seed": s, "id": 0.7 + a / 10, "ood": (a + b) / 2, "worst_site_score": min(a, b)}
            | {"ood_site/site_a": a, "ood_site/site_b": b}
            for c, s, a, b in rows
        ]
    )
    return df


def test_units_pair_on_seed_and_held_out_site():
    diffs = statistics.paired_differences(_site_table(), ["cond"], "cond", "B", "A", "ood")
    got = {(r.seed, r.site): r.diff for r in diffs.itertuples()}
    want = {("0", "site_a"): 0.10, ("0", "site_b"): -0.05, ("1", "site_a"): 0.10, ("1", "site_b"): 0.20}
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k]) for k in want)
    run_level = statistics.paired_differences(_site_table(), ["cond"], "cond", "B", "A", "id")
    assert run_level["diff"].to_numpy() == pytest.approx([0.01, 0.01]) and "site" not in run_level


def test_a_held_out_axis_pairs_on_the_site_and_the_other_axes_are_matched():
    """The same 4 units when each run holds one site out (a `held_out` axis); a run of another lr
    label pairs with nothing, and a failed run drops its unit."""
    runs = []
    for r in _site_table().to_dict("records"):
        for site in ("site_a", "site_b"):
            score = r[f"ood_site/{site}"]
            runs.append({"cond": r["cond"], "held_out": site, "lr": "x", "seed": r["seed"], "ood": score})
            runs[-1][f"ood_site/{site}"] = score
    df = pd.DataFrame(runs)
    df = pd.concat([df, df.iloc[[0]].assign(lr="y", ood=9.0, **{"ood_site/site_a": 9.0})], ignore_index=True)
    axes = ["cond", "held_out", "lr"]
    diffs = statistics.paired_differences(df, axes, "cond", "B", "A", "ood")
    assert sorted(diffs["diff"].round(6)) == [-0.05, 0.1, 0.1, 0.2] and set(diffs["lr"]) == {"x"}
    failed = (df["cond"] == "B") & (df["seed"] == 1) & (df["held_out"] == "site_b")
    df.loc[failed, ["ood", "ood_site/site_b"]] = np.nan
    left = statistics.paired_differences(df, axes, "cond", "B", "A", "ood")
    assert sorted(left["diff"].round(6)) == [-0.05, 0.1, 0.1]


def test_compare_reports_each_condition_and_metric_against_the_reference():
    df = pd.concat([_site_table(), _site_table().query("cond == 'A'").assign(cond="C")], ignore_index=True)
    table = statistics.compare(df, ["cond"])
    assert list(zip(table["condition"], table["metric"], strict=True)) == [
        ("B", "ood"),
        ("B", "id"),
        ("B", "worst_site_score"),
        ("C", "ood"),
        ("C", "id"),
        ("C", "worst_site_score"),
    ]
    assert set(table["reference"]) == {"A"} and table["per_site"].tolist() == [True, False, False] * 2
    b_ood = table.iloc[0]
    assert b_ood["n"] == 4 and b_ood["mean_diff"] == pytest.approx(0.0875)
    assert b_ood["p_value"] == pytest.approx(_exact_two_sided(np.array([0.1, -0.05, 0.1, 0.2])))
    assert table.iloc[3]["mean_diff"] == 0 and table.iloc[3]["ci_low"] == 0  # C is A again
    against_b = statistics.compare(df, ["cond"], reference="B")
    assert set(against_b["reference"]) == {"B"} and set(against_b["condition"]) == {"A", "C"}
    assert statistics.compare(df, ["cond"], reference="not run")["reference"].iloc[0] == "A"


def test_ood_spread_gives_each_conditions_worst_site_and_sd_across_sites():
    spread = statistics.ood_spread(_site_table(), "cond").set_index("condition")
    a = spread.loc["A"]  # site means: a 0.525, b 0.25
    assert a["worst_site"] == "site_b" and a["worst_site_ood"] == pytest.approx(0.25) and a["n_sites"] == 2
    assert a["site_sd"] == pytest.approx(np.std([0.525, 0.25])) and a["site_mean"] == pytest.approx(0.3875)
    assert a["ood_mean"] == pytest.approx(np.mean([0.4, 0.375]))
    assert statistics.ood_spread(_site_table(), "held_out")["condition"].tolist() == ["all runs"]
    assert statistics.ood_spread(_site_table().drop(columns=["ood_site/site_a", "ood_site/site_b"]), "cond").empty


def _study(**kw: object) -> Study:
    base = dict(
        name="s",
        title="S",
        description="",
        base=[],
        quick=[],
        seeds=8,
        quick_seeds=1,
        axes={"cond": {"A": [], "B": []}},
        quick_axes={},
        generated_axes=[],
    )
    return Study(**(base | kw))  # type: ignore[arg-type]


def test_the_report_has_the_paired_section_in_report_md_summary_md_and_comparisons_csv(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for seed in range(8):
        a = rng.uniform(0.3, 0.6, 2)
        for cond, shift in (("A", 0.0), ("B", 0.05)):
            sites = a + shift + rng.normal(0, 0.005, 2)
            rows.append(
                {"cond": cond, "seed": seed, "error": "", "id": 0.7 + shift / 5 + rng.normal(0, 0.001)}
                | {"ood": sites.mean(), "ood_site/s1": sites[0], "ood_site/s2": sites[1]}
            )
    df = pd.DataFrame(rows)
    write_report(_study(), df, ["cond"], tmp_path, "cmd")
    comparisons = pd.read_csv(tmp_path / "comparisons.csv")
    ood = comparisons[comparisons["metric"] == "ood"].iloc[0]
    assert ood["n"] == 16 and ood["distinguishable"] and ood["ci_low"] > 0
    assert ood["mean_diff"] == pytest.approx(df[df.cond == "B"]["ood"].mean() - df[df.cond == "A"]["ood"].mean())
    for name in ("report.md", "summary.md"):
        text = (tmp_path / name).read_text()
        assert "## Paired differences vs A" in text
        row = next(line for line in text.splitlines() if line.startswith("| B | OOD score, per held-out site |"))
        assert "| 16 |" in row and " * |" in row and row.endswith("| yes |")
        assert "| condition | OOD score | mean over sites |" in text
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("| cond |") and "±" in summary.split("## Paired")[0]

    # the same runs with the reference named: B is the reference, A's differences change sign
    write_report(_study(reference="B"), df, ["cond"], tmp_path, "cmd")
    assert "## Paired differences vs B" in (tmp_path / "summary.md").read_text()
    flipped = pd.read_csv(tmp_path / "comparisons.csv")
    assert flipped["mean_diff"].to_numpy() == pytest.approx(-comparisons["mean_diff"].to_numpy())


def test_a_study_with_one_condition_or_no_axes_writes_no_comparison_rows(tmp_path):
    df = _site_table().query("cond == 'A'").assign(error="")
    write_report(_study(), df, ["cond"], tmp_path, "cmd")
    assert "No other cond condition has scores to compare with A." in (tmp_path / "report.md").read_text()
    assert pd.read_csv(tmp_path / "comparisons.csv").empty
    (tmp_path / "none").mkdir()
    write_report(_study(axes={}), df.drop(columns="cond"), [], tmp_path / "none", "cmd")
    assert "Paired" not in (tmp_path / "none" / "report.md").read_text()
    assert not (tmp_path / "none" / "comparisons.csv").exists()


GRID = "axes:\n  lr:\n    small: [train.lr=0.001]\n    large: [train.lr=0.01]\n  mu:\n    '0': [strategy.mu=0]\n"


def test_the_reference_must_name_a_label_of_the_first_axis(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(GRID)
    assert load_study(str(path)).reference is None
    path.write_text(GRID + "reference: large\n")
    assert load_study(str(path)).reference == "large"
    path.write_text(GRID + "reference: '0'\n")  # a label of the second axis, not the first
    with pytest.raises(StudyError, match=r"s\.yaml: reference '0' is not a label of axis lr; choices: small, large"):
        load_study(str(path))
    path.write_text("axes:\n  rate:\n    '0': []\n    '0.5': []\nreference: 0.5\n")
    assert load_study(str(path)).reference == "0.5"  # YAML reads 0.5 as a number; labels are strings
    path.write_text("generated_axes: [leave_one_site_out]\nreference: site_00\n")
    with pytest.raises(StudyError, match="reference 'site_00' needs an axes: entry"):
        load_study(str(path))
