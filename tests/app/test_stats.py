"""`multimed-fl stats`: a federated pre-flight profile (federated/app/stats.py, clients/site_profile.py,
federated/server/profile.py, profile_report.py). Counts are the manifest's exactly; small cells are
suppressed and cannot be recovered from a total; histograms leave a site only in cells of at least
min_count values, and a quantile is published only with min_count values on each side; a site holds
a request to its own floor and answers a phase once per run; raw features are profiled raw, with
their missingness; no reply of a profile run carries a row; site-local and deployed runs give the
same profile as the simulation of the same rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from clients.client_app import app as client_app
from clients.site_profile import ProfileRequestError, profile_reply
from clients.site_runtime import SiteRuntime, site_runtime
from federated.app.cli import main
from federated.app.stats import run_stats, stats_run_config
from federated.core.arrays import record_to_numpy
from federated.core.config import config_to_yaml, load_config
from federated.core.feature_stats import BLOCKS, HIST_BINS, coarse_enough, coarsened
from federated.core.protocol import (
    CONFIG_KEY,
    CONFIG_RECORD,
    CORPUS_KEY,
    PROFILE_COARSE_BINS,
    PROFILE_REPLY,
    SCHEMA_KEY,
    STATISTICS_ONLY_KEY,
)
from federated.data.format import Corpus, index_column
from federated.data.synthetic import GeneratorConfig, build_synthetic_corpus
from federated.server.profile import coarse_cells
from federated.server.profile_report import PRIMARY, QUANTILES, SECONDARY, SHOWN, protect, quantile_shown
from federated.server.run_folder import RunFolderError
from federated.server.site_agreement import FederationError
from partitions import plan_sites

TASKS = ("breast_cancer_classification", "motor_imagery", "bone_age")
NATURAL = ["sites.planner=natural", "sites.min_site_size=10"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three origin sites of 30 samples per task: each site's test split of a task is under 10."""
    cfg = GeneratorConfig(samples_per_task_site=30, n_origin_sites=3, tasks=TASKS)
    return build_synthetic_corpus(tmp_path_factory.mktemp("stats") / "corpus", cfg)


@pytest.fixture(scope="module")
def raw_corpus(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus with its tabular modality declared as 12 raw features (the 4 columns after them
    padding), some values missing: lab_0 at 7 samples of the first site, lab_1 at all but 4 of its
    samples, and lab_2 with no declared range (not released under DP)."""
    folder = tmp_path_factory.mktemp("raw") / "corpus"
    shutil.copytree(corpus, folder)
    spec = json.loads((folder / "spec.json").read_text())
    for entry in spec["schema"]["modalities"]:
        if entry["name"] == "tabular":
            entry["features"] = [
                {"name": f"lab_{j}", "column": f"lab_{j}", **({} if j == 2 else {"low": -10.0, "high": 10.0})}
                for j in range(12)
            ]
            entry["impute"] = "mean"
    (folder / "spec.json").write_text(json.dumps(spec))
    manifest = Corpus.open(folder).manifest
    first = sorted(manifest["origin_site"].unique())[0]
    idx = manifest[(manifest["origin_site"] == first) & (manifest[index_column("tabular")] >= 0)][
        index_column("tabular")
    ]
    idx = np.sort(idx.to_numpy())
    values = np.load(folder / "arrays" / "tabular.npy", mmap_mode="r+")
    values[idx[:7], 0] = np.nan
    values[idx[4:], 1] = np.nan
    values.flush()
    return folder


class Recording:
    """The ClientApp every site runs, keeping every reply it sends."""

    def __init__(self) -> None:
        self.replies: list[Message] = []

    def __call__(self, message: Message, context: Context) -> Message:
        reply = client_app(message, context)
        self.replies.append(reply)
        return reply


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory):
    """`profile(corpus, *overrides)`: the natural plan's profile (stats.json's dict, every reply the
    sites sent, the output folder), run once per corpus and overrides, as several tests read the same
    one; theirs to read, not to change."""
    made: dict[tuple[str, ...], tuple[dict[str, Any], list[Message], Path]] = {}

    def run(corpus: Path, *overrides: str) -> tuple[dict[str, Any], list[Message], Path]:
        key = (str(corpus), *overrides)
        if key not in made:
            rec, out = Recording(), tmp_path_factory.mktemp("profile") / "profile"
            stats = run_stats(load_config([f"corpus.path={corpus}", *NATURAL, *overrides]), out, client=rec)
            made[key] = (stats, rec.replies, out)
        return made[key]

    return run


def _plans(corpus: Path, *overrides: str) -> list[Any]:
    return plan_sites(Corpus.open(corpus), load_config([f"corpus.path={corpus}", *NATURAL, *overrides]))


def _expected_counts(corpus: Path) -> dict[str, Any]:
    """Per site of the natural plan: samples per task and split, and class counts, from the manifest."""
    c = Corpus.open(corpus)
    m = c.manifest
    out: dict[str, Any] = {}
    for p in _plans(corpus):
        site: dict[str, Any] = {"samples": {}, "labels": {}}
        for t in p.tasks:
            rows = {s: r[m["task"].to_numpy()[r] == t] for s, r in (("train", p.train_rows), ("test", p.test_rows))}
            site["samples"][t] = {s: len(r) for s, r in rows.items()}
            classes = c.schema.task(t).classes
            if classes:
                labels = m["label"].to_numpy()[np.concatenate(list(rows.values()))].astype(int)
                site["labels"][t] = dict(
                    zip(classes, np.bincount(labels, minlength=len(classes)).tolist(), strict=True)
                )
        out[p.site] = site
    return out


def _lists(value: Any) -> list[list[Any]]:
    if isinstance(value, list):
        return [value, *(x for v in value for x in _lists(v))]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _lists(v)]
    return []


def _assert_no_row_leaves(replies: list[Message], corpus: Path, widths: dict[str, int]) -> int:
    """Every array and list in every reply is a per-feature, per-class or per-bin aggregate: no
    length is a number of samples; returns the arrays checked."""
    c = Corpus.open(corpus)
    plans = _plans(corpus)
    row_counts = {len(p.train_rows) + len(p.test_rows) for p in plans}
    for p in plans:
        tasks = c.manifest["task"].to_numpy()
        row_counts |= {int((tasks[r] == t).sum()) for r in (p.train_rows, p.test_rows) for t in p.tasks}
    row_counts.discard(0)
    legit_dims = set(widths.values()) | {3, HIST_BINS, PROFILE_COARSE_BINS}
    assert not row_counts & legit_dims, "the test corpus must not make a row count look like a width"
    classes = {len(t.classes) for t in c.schema.tasks.values()}
    checked = 0
    for reply in replies:
        assert not reply.has_error(), reply.error.reason
        for record in reply.content.array_records.values():
            for name, array in record_to_numpy(record).items():
                assert set(array.shape) <= legit_dims, (name, array.shape)
                assert not set(array.shape) & row_counts, (name, array.shape)
                checked += 1
        for config in reply.content.config_records.values():
            for key, value in config.items():
                if key == SCHEMA_KEY:  # the handshake's corpus schema: definitions (shapes, classes), no data
                    continue
                parsed = json.loads(value) if isinstance(value, str) and value[:1] in "[{" else value
                for lst in _lists(parsed):
                    numbers = [x for x in lst if isinstance(x, int | float) and not isinstance(x, bool)]
                    if numbers:  # names (modalities, tasks) are no rows; numbers are per class or feature
                        assert len(lst) in classes or max(numbers) < max(widths.values()), lst[:5]
                        assert len(lst) not in row_counts, lst[:5]
    return checked


def test_counts_are_the_manifest_s_and_no_reply_carries_a_row(corpus, profile):
    stats, replies, out = profile(corpus, "preprocess.min_count=1")
    expected = _expected_counts(corpus)
    assert [s["site"] for s in stats["sites"]] == sorted(expected)
    for site, exp in expected.items():
        for t, splits in exp["samples"].items():
            for split, n in splits.items():
                assert stats["samples"][t][split][site] == n, (site, t, split)
        for t, classes in exp["labels"].items():
            assert stats["label_mix"][t]["counts"][site] == classes, (site, t)
    pooled = stats["label_mix"]["breast_cancer_classification"]["counts"]["pooled"]
    assert sum(pooled.values()) == 3 * 30
    # pooled moments are the corpus's exactly (merged, not averaged), quantiles within a fine bin
    c = Corpus.open(corpus)
    values = np.asarray(c.array("tabular"), dtype=np.float64)
    feature = stats["modalities"]["tabular"]["per_feature"]["tabular[3]"]
    assert feature["observed"]["pooled"] == len(values) and feature["missing"]["pooled"] == 0
    assert feature["mean"]["pooled"] == pytest.approx(values[:, 3].mean(), rel=1e-5)
    assert feature["sd"]["pooled"] == pytest.approx(values[:, 3].std(), rel=1e-5)
    fine_bin = 16 * values[:, 3].std() / HIST_BINS  # the median: between the middle two values, to a fine bin
    middle = np.sort(values[:, 3])[len(values) // 2 - 1 : len(values) // 2 + 1]
    assert middle[0] - fine_bin <= feature["quantiles"]["pooled"]["q50"] <= middle[1] + fine_bin
    assert feature["pooled_over"] == sorted(expected)
    checked = _assert_no_row_leaves(replies, corpus, {"tabular": 16})
    assert checked >= 3 * 3  # observed, moments and a histogram from each site
    report = (out / "report.md").read_text()
    assert "## Label mix" in report and "plots/hist_tabular.png" in report
    for png in stats["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _table_cells(report: str, heading: str, site: str) -> list[str]:
    section = report.split(f"### {heading}", 1)[1].split("###", 1)[0]
    row = next(line for line in section.splitlines() if line.startswith(f"| {site} |"))
    return [c.strip() for c in row.strip("|").split("|")][1:]


def test_small_cells_are_suppressed_and_cannot_be_recovered(corpus, tmp_path):
    out = tmp_path / "profile"
    assert main(["stats", "--out", str(out), f"corpus.path={corpus}", *NATURAL]) == 0
    stats = json.loads((out / "stats.json").read_text())
    report = (out / "report.md").read_text()
    expected = _expected_counts(corpus)
    small = [
        (site, t, cls, n)
        for site, exp in expected.items()
        for t, classes in exp["labels"].items()
        for cls, n in classes.items()
        if 0 < n < 10
    ]
    assert small, "the corpus must give some site a class of under 10 samples"
    for site, t, cls, n in small:
        mix = stats["label_mix"][t]
        assert mix["counts"][site][cls] == "<10"
        cells = _table_cells(report, f"{t} (classes)", site)
        assert str(n) not in cells and "<10" in cells
        # not the site's total minus its other classes, nor the pooled count minus the other sites'
        others = [v for c, v in mix["counts"][site].items() if c != cls]
        assert any(isinstance(v, str) for v in others), (site, t, mix["counts"][site])
        column = [mix["counts"][s][cls] for s in mix["counts"] if s != site]
        assert any(isinstance(v, str) for v in column), (site, t, column)
    for t, per in stats["samples"].items():  # every test split is under 10 at every site
        assert all(per["test"][s] == "<10" for s in expected)
        assert all(per["train"][s] == "suppressed" for s in expected)  # else total - train = test
        assert per["test"]["pooled"] == sum(e["samples"][t]["test"] for e in expected.values())
    # no histogram is a count of its own: each is per 1/64th of the grid, or hidden with its total
    for feature in stats["modalities"]["tabular"]["per_feature"].values():
        counts = feature["histogram"]["counts"]
        assert all(c == "suppressed" or len(c) == len(feature["histogram"]["edges"]) - 1 for c in counts.values())


def test_protect_hides_a_second_cell_wherever_one_would_follow_from_a_total():
    cells = np.array([[20.0, 3.0, 23.0], [15.0, 12.0, 27.0], [35.0, 15.0, 50.0]])  # rows and columns sum
    st = protect(cells, 10)
    assert st[0, 1] == PRIMARY
    assert st[0, 0] == SECONDARY  # else 23 - 20 = 3
    assert st[1, 1] == SECONDARY  # else 15 - 12 = 3 (the column)
    assert st[1, 0] == SECONDARY  # and then 27 - 12 = 15 would give away (1, 1)... and 35 - 15 = 20
    assert st[2].tolist() == [SHOWN] * 3 and st[:, 2].tolist() == [SHOWN] * 3
    assert protect(np.array([[0.0, 12.0, 12.0]]), 10).tolist() == [[SHOWN] * 3]  # zero is nobody
    fixed = np.array([[False, False, True]])
    assert protect(np.array([[12.0, 4.0, 16.0]]), 10, fixed=fixed).tolist() == [[SECONDARY, PRIMARY, SHOWN]]


def test_raw_features_are_profiled_raw_with_their_missingness(raw_corpus, profile):
    stats, replies, _ = profile(raw_corpus)
    tab = stats["modalities"]["tabular"]
    assert tab["raw"] and tab["features"] == [f"lab_{j}" for j in range(12)]  # the padding is no feature
    first = stats["sites"][0]["site"]
    raw = np.asarray(Corpus.open(raw_corpus).array("tabular"), dtype=np.float64)
    lab0, lab1 = tab["per_feature"]["lab_0"], tab["per_feature"]["lab_1"]
    assert lab0["missing"][first] == "<10" and lab0["missing"]["pooled"] == "<10"
    assert lab0["mean"]["pooled"] == pytest.approx(np.nanmean(raw[:, 0]), rel=1e-5)  # raw, not standardised
    # 4 values of lab_1 at the first site: under min_count (10), so it sent nothing for it
    assert first not in lab1["pooled_over"] and first not in lab1["mean"] and first not in lab1["quantiles"]
    others = ~np.isnan(raw[:, 1])
    assert lab1["mean"]["pooled"] != pytest.approx(np.nanmean(raw[:, 1]), rel=1e-9)
    assert lab1["observed"][first] == "<10"
    assert lab1["observed"]["pooled"] == "suppressed"  # pooled minus the others' would be its 4
    assert int(others.sum()) - 4 == sum(v for s, v in lab1["observed"].items() if isinstance(v, int) and s != "pooled")
    # a histogram's total is its released count: hidden with it (lab_0's at the first site, whose 7
    # missing values are <10, and so the pooled one), shown where the counts it adds up to are
    counts0, counts1 = lab0["histogram"]["counts"], lab1["histogram"]["counts"]
    assert counts0[first] == counts0["pooled"] == "suppressed"
    assert all(isinstance(c, list) for s, c in counts0.items() if s not in (first, "pooled"))
    assert sum(counts1["pooled"]) == pytest.approx(int(others.sum()) - 4, abs=0.05)
    assert _assert_no_row_leaves(replies, raw_corpus, {"tabular": 12}) >= 9


def test_dp_noise_states_its_epsilon_and_sends_coarse_histograms(raw_corpus, profile):
    stats, replies, out = profile(raw_corpus, "preprocess.epsilon=2")
    assert stats["epsilon"] == 2 and "epsilon=2-DP" in stats["privacy"]
    assert "epsilon=2-DP" in (out / "report.md").read_text()
    assert stats["histogram_bins"]["sent"] == PROFILE_COARSE_BINS
    hists = [
        a
        for r in replies
        for record in r.content.array_records.values()
        for k, a in record_to_numpy(record).items()
        if k.endswith("/hist")
    ]
    assert hists and all(h.shape == (12, PROFILE_COARSE_BINS) for h in hists)
    tab = stats["modalities"]["tabular"]["per_feature"]
    assert tab["lab_2"]["pooled_over"] == [] and "quantiles" not in tab["lab_2"]  # no range: not released
    assert tab["lab_3"]["pooled_over"]
    assert _assert_no_row_leaves(replies, raw_corpus, {"tabular": 12})


def test_site_local_stats_profile_each_site_s_own_corpus_as_the_simulation_does(corpus, tmp_path, profile):
    sites = tmp_path / "sites"
    assert main(["corpus", "split", str(corpus), "--out", str(sites), "sites.min_site_size=10"]) == 0
    local = run_stats(
        load_config(["sites.planner=site_local", f"corpus.site_corpora={sites}", "preprocess.min_count=1"]),
        tmp_path / "local",
    )
    simulated, _, _ = profile(corpus, "preprocess.min_count=1")
    assert local["planner"] == "site_local" and [s["site"] for s in local["sites"]] == sorted(
        p.name for p in sites.iterdir()
    )
    for key in ("samples", "label_mix"):
        assert local[key] == simulated[key]
    for name, feature in local["modalities"]["tabular"]["per_feature"].items():
        theirs = simulated["modalities"]["tabular"]["per_feature"][name]
        assert feature["observed"] == theirs["observed"]
        assert feature["mean"] == pytest.approx(theirs["mean"], rel=1e-9)
        assert feature["quantiles"] == theirs["quantiles"]


def test_the_output_folder_is_checked_and_an_earlier_profile_replaced_only_when_asked(corpus, tmp_path, capsys):
    out = tmp_path / "p"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["stats", "--out", str(out), f"corpus.path={corpus}", *NATURAL]
    assert main(args) == 2
    assert "notes.txt" in capsys.readouterr().err
    (out / "notes.txt").unlink()
    assert main(args) == 0
    assert main(args) == 2
    assert "already holds a profile" in capsys.readouterr().err
    (out / "plots" / "mine.txt").write_text("mine")
    assert main([*args, "--overwrite"]) == 2
    assert "mine.txt" in capsys.readouterr().err
    (out / "plots" / "mine.txt").unlink()
    assert main([*args, "--overwrite"]) == 0
    assert main(["stats", "--out", str(out), "--connection", "x", "--overwrite"]) == 2


def test_the_server_app_switch_runs_a_profile_and_refuses_to_resume(tmp_path):
    from federated.server import server_app

    text = stats_run_config("seed: 1\n", str(tmp_path))
    assert f"{STATISTICS_ONLY_KEY} = true" in text
    import tomllib

    assert tomllib.loads(text)[STATISTICS_ONLY_KEY] is True
    pyproject = tomllib.loads((Path(server_app.__file__).parents[2] / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"][STATISTICS_ONLY_KEY] is False  # `flwr run` accepts the key

    class _Run:
        run_id = 7

    class _Grid:
        run = _Run()

    context = Context(
        run_id=7,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={STATISTICS_ONLY_KEY: True, "resume": True, "out-dir": str(tmp_path / "x")},
    )
    with pytest.raises(RunFolderError, match="nothing to resume"):
        server_app.main(_Grid(), context)


def _sent_histograms(replies: list[Message]) -> list[np.ndarray]:
    return [
        a
        for r in replies
        for record in r.content.array_records.values()
        for k, a in record_to_numpy(record).items()
        if k.endswith("/hist")
    ]


@pytest.mark.parametrize("epsilon", [0.0, 2.0])
def test_a_site_sends_histograms_only_in_cells_of_min_count_values(raw_corpus, profile, epsilon):
    """A fine bin holding one patient would place that patient's value to 1/4096 of the grid:
    every histogram a site sends, exact or noisy, is in cells of whole 1/64ths of the grid holding
    at least min_count (10) values each; exact, nothing is lost (a feature's cells hold its values)."""
    stats, replies, _ = profile(raw_corpus, *([f"preprocess.epsilon={epsilon:g}"] if epsilon else []))  # 0: the default
    hists = _sent_histograms(replies)
    assert len(hists) == 3
    for h in hists:
        assert coarse_enough(h, 10) and coarse_cells(h, 10) is None
        blocks = h.reshape(len(h), BLOCKS, -1)
        assert (blocks == blocks[..., :1]).all()  # constant within each block: no finer edge
    if epsilon == 0:
        for h in hists:
            totals = h.sum(axis=1)
            assert np.allclose(totals, np.round(totals)) and ((totals == 0) | (totals >= 10)).all()
        # a shape survives: some feature's values fall in cells of different densities
        assert any(len(np.unique(row[row > 0])) > 1 for h in hists for row in h)
        raw = np.asarray(Corpus.open(raw_corpus).array("tabular"), dtype=np.float64)
        lab3 = stats["modalities"]["tabular"]["per_feature"]["lab_3"]["histogram"]["counts"]["pooled"]
        assert sum(lab3) == pytest.approx(len(raw), abs=0.05)  # every value in some cell


def test_coarse_cells_names_the_feature_a_server_must_refuse():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(40, 2))
    fine = np.stack(
        [np.bincount(np.clip((v * 500 + 2048).astype(int), 0, HIST_BINS - 1), minlength=HIST_BINS) for v in values.T]
    ).astype(np.float64)
    assert coarse_cells(coarsened(fine, 10), 10) is None
    assert coarse_cells(fine, 10) == 0  # single patients' bins
    odd = coarsened(fine, 10)
    odd[1, :] = 0.0
    odd[1, 10:30] = 1.0  # 20 values, but a cell that is not whole blocks
    assert coarse_cells(odd, 10) == 1
    assert coarse_cells(coarsened(fine, 10), 41) == 0  # 40 values: no cell of 41


def test_the_server_refuses_a_histogram_that_could_place_a_patient_naming_the_site(raw_corpus, tmp_path, monkeypatch):
    import clients.site_profile as site_profile

    # a site that sends its fine bins (raising=False: before coarsening existed, the name did not)
    monkeypatch.setattr(site_profile, "coarsened", lambda hist, k: hist, raising=False)
    cfg = load_config([f"corpus.path={raw_corpus}", *NATURAL])
    sites = {p.site for p in _plans(raw_corpus)}
    with pytest.raises(FederationError, match=r"modality tabular: the histogram of feature lab_\d+ has a cell") as e:
        run_stats(cfg, tmp_path / "profile")
    named = str(e.value).split("site ", 1)[1].split(":")[0]
    assert named in sites and "node" not in str(e.value)


def test_a_quantile_is_published_only_with_min_count_values_on_each_side(raw_corpus, profile):
    """The reviewer's case: the 5% and 95% of a site of about 30 values were its second smallest
    and second largest, one patient's each."""
    stats, _, _ = profile(raw_corpus)
    shown_any = suppressed_any = 0
    for name in ("lab_3", "lab_5"):
        per = stats["modalities"]["tabular"]["per_feature"][name]
        n = {s: per["observed"][s] for s in per["pooled_over"]}
        assert all(isinstance(v, int) for v in n.values())
        n["pooled"] = sum(n.values())
        assert set(per["quantiles"]) == set(n)
        for group, qs in per["quantiles"].items():
            for q in QUANTILES:
                value = qs[f"q{round(q * 100):02d}"]
                if quantile_shown(q, n[group], 10):
                    assert isinstance(value, float), (name, group, q)
                    shown_any += 1
                else:
                    assert value == "suppressed", (name, group, q, n[group])
                    suppressed_any += 1
        for site in per["pooled_over"]:  # ~30 values: 1.5 below the 5%
            assert per["quantiles"][site]["q05"] == per["quantiles"][site]["q95"] == "suppressed"
    assert shown_any and suppressed_any
    assert quantile_shown(0.05, 200, 10) and not quantile_shown(0.05, 199, 10) and not quantile_shown(0.5, 19, 10)


def _site(corpus: Path, node_config: dict[str, Any], *overrides: str) -> tuple[SiteRuntime, Context]:
    """A site's runtime and a fresh run's Context; deployed when node_config names the site."""
    cfg = load_config([f"corpus.path={corpus}", *NATURAL, *overrides])
    run_config: dict[str, bool | float | int | str] = {CONFIG_KEY: config_to_yaml(cfg), CORPUS_KEY: str(corpus)}
    rt = site_runtime(run_config, node_config)
    return rt, Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)


def _counts(min_count: int, epsilon: float) -> str:
    return json.dumps({"phase": "counts", "min_count": min_count, "epsilon": epsilon})


def test_a_deployed_site_holds_a_request_to_its_own_floor_naming_the_key(raw_corpus):
    site = _plans(raw_corpus)[0].site
    node = {"site": site, "corpus-path": str(raw_corpus)}
    # the server's config says min_count 5; the site's floor is its node config's (default 10)
    rt, ctx = _site(raw_corpus, node, "preprocess.min_count=5")
    with pytest.raises(ProfileRequestError, match="min_count 5 is below this site's node config stats-min-count=10"):
        profile_reply(rt, _counts(5, 0.0), ctx)
    assert profile_reply(rt, _counts(10, 0.0), ctx).config_records[CONFIG_RECORD][PROFILE_REPLY]
    rt, ctx = _site(raw_corpus, {**node, "stats-min-count": 20})
    with pytest.raises(ProfileRequestError, match="stats-min-count=20"):
        profile_reply(rt, _counts(10, 0.0), ctx)
    rt, ctx = _site(raw_corpus, {**node, "stats-epsilon": 1.0})
    for asked in (0.0, 2.0):  # no noise, or less than the site's budget allows
        with pytest.raises(ProfileRequestError, match="stats-epsilon=1"):
            profile_reply(rt, _counts(10, asked), ctx)
    assert profile_reply(rt, _counts(10, 0.5), ctx).config_records[CONFIG_RECORD][PROFILE_REPLY]
    # simulated, the run's settings are the sites' own
    rt, ctx = _site(raw_corpus, {"partition-id": 0, "num-partitions": 3}, "preprocess.min_count=5")
    assert profile_reply(rt, _counts(5, 0.0), ctx).config_records[CONFIG_RECORD][PROFILE_REPLY]


def test_a_repeated_profile_request_gets_the_same_noisy_reply(raw_corpus):
    site = _plans(raw_corpus)[0].site
    node = {"site": site, "corpus-path": str(raw_corpus), "stats-epsilon": 2.0}
    rt, ctx = _site(raw_corpus, node, "preprocess.epsilon=2")

    def read(reply: RecordDict) -> tuple[str, dict[str, np.ndarray]]:
        return str(reply.config_records[CONFIG_RECORD][PROFILE_REPLY]), record_to_numpy(
            next(iter(reply.array_records.values()))
        )

    first, again = read(profile_reply(rt, _counts(10, 2.0), ctx)), read(profile_reply(rt, _counts(10, 2.0), ctx))
    assert first[0] == again[0] and all(np.array_equal(first[1][k], again[1][k]) for k in first[1])
    other_run = Context(run_id=2, node_id=1, node_config=node, state=RecordDict(), run_config=ctx.run_config)
    fresh = read(profile_reply(rt, _counts(10, 2.0), other_run))
    assert not all(np.array_equal(first[1][k], fresh[1][k]) for k in first[1])  # the noise is fresh per run
    with pytest.raises(ProfileRequestError, match="already asked for its counts profile"):
        profile_reply(rt, _counts(11, 2.0), ctx)


# ------------------------------------------------------------------------- deployment (slow) --


@pytest.mark.slow
def test_stats_over_a_deployment_is_the_site_local_simulation_s(tmp_path, monkeypatch):
    """Three SuperNodes (TLS, node auth), each with only its own corpus folder; `multimed-fl stats
    --connection` submits a statistics-only run, whose ServerApp writes the profile; it equals the
    in-process site-local profile of the same folders."""
    from federated.data.split import split_corpus
    from federated.engines.deployment import CONNECTION, LoopbackFederation
    from federated.engines.deployment.demo import _demo_plan, _start_sites

    out = tmp_path / "deployed"
    _, corpus_path, plans = _demo_plan(3, ["scale=smoke"])
    rows = {p.site: np.concatenate([p.train_rows, p.test_rows]) for p in plans}
    folders = split_corpus(Corpus.open(corpus_path), rows, tmp_path / "deploy" / "sites")
    held = [p.site for p in plans if p.role == "held_out"]
    overrides = ["sites.planner=site_local", "sites.holdout=named", f"sites.holdout_sites=[{','.join(held)}]"]
    fed = LoopbackFederation(tmp_path / "deploy", 3, grace_s=5)
    try:
        fed.start_superlink()
        _start_sites(fed, plans, folders, tmp_path / "state", "worker", lambda line: None)
        monkeypatch.setenv("FLWR_HOME", str(fed.flwr_home))
        assert main(["stats", "--connection", CONNECTION, "--out", str(out), "--timeout", "300", *overrides]) == 0
    finally:
        fed.close()
    deployed = json.loads((out / "stats.json").read_text())
    assert deployed["engine"].startswith("flwr run")
    local = run_stats(
        load_config([*overrides, f"corpus.site_corpora={tmp_path / 'deploy' / 'sites'}"]), tmp_path / "local"
    )
    assert [s["site"] for s in deployed["sites"]] == [s["site"] for s in local["sites"]]
    for key in ("samples", "label_mix"):
        assert deployed[key] == local[key]
    for m, entry in local["modalities"].items():
        for name, feature in entry["per_feature"].items():
            theirs = deployed["modalities"][m]["per_feature"][name]
            assert theirs["observed"] == feature["observed"] and theirs.get("quantiles") == feature.get("quantiles")
