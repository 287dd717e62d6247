"""A raw-feature vector modality at a site: kept raw, counted once per sample, imputed and
standardised only with the run's statistics (and refused before they come), and what the site
sends in a statistics round: aggregates per feature, under min_count and optional noise."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clients.site_data import FeatureStatsMissing, SiteData, exact_median, pooled_feature_rows, site_feature_rows
from clients.site_runtime import ReleaseFloor, SiteConfigError, SiteRuntime
from federated.core.config import config_to_yaml, load_config
from federated.core.corpus_schema import CorpusSchema, Modality, Task
from federated.core.feature_stats import BLOCKS, HIST_BINS, Moments, Standardiser, coarse_enough, grid
from federated.core.features import Feature
from federated.data.format import Corpus, CorpusFormatError, write_corpus
from partitions import plan_sites
from strategies import client_algorithm

HOSPITALS = {"st_anne": 40, "riverside": 55, "north_gen": 35, "lakeview": 30}  # patients each
FEATURES = (
    Feature("age", "age", unit="years", low=0.0, high=120.0),
    Feature("lactate", "lactate", unit="mmol/L", low=0.0, high=30.0),
    Feature("wbc", "wbc", unit="10^9/L", low=0.0, high=100.0),
    Feature("sex=female", "sex", kind="indicator", level="female"),
    Feature("smoker=yes", "smoker", kind="indicator", level="yes"),
)
WIDTH = 6  # one zero-padded column after the five features
NATURAL = [
    "sites.planner=natural",
    "sites.min_site_size=10",
    "sites.holdout=named",
    "sites.holdout_sites=[lakeview]",
]


def raw_schema(impute: str = "median", features: tuple[Feature, ...] = FEATURES) -> CorpusSchema:
    """`labs`, a raw-feature vector read by two tasks (a sample feeds both: one patient)."""
    labs = Modality("labs", "vector", (WIDTH,), "float32", features=features, impute=impute)
    return CorpusSchema(
        {"labs": labs},
        {
            "outcome": Task("outcome", ("labs",), "binary", ("auroc", "accuracy"), classes=("no", "yes")),
            "stay": Task("stay", ("labs",), "regression", ("mae",), unit="days"),
        },
    )


def write_raw_corpus(path: Path, impute: str = "median", seed: int = 0, missing: float = 0.15) -> Path:
    """Four hospitals whose lab values differ in level and spread (so per-site statistics differ
    from pooled ones), NaN where a value was not measured; every patient has two manifest rows,
    one per task, pointing at one row of arrays/labs.npy."""
    rng = np.random.default_rng(seed)
    rows, labs, outcome, stay = [], [], [], []
    for h, (hospital, n) in enumerate(HOSPITALS.items()):
        for i in range(n):
            age = rng.uniform(20, 90)
            lactate = rng.gamma(2.0, 1.0 + 0.4 * h)
            wbc = rng.normal(8 + 2 * h, 2 + h)
            x = [age, lactate, wbc, float(rng.random() < 0.5), float(rng.random() < 0.3), 0.0]
            if rng.random() < missing:
                x[1] = np.nan
            if rng.random() < missing / 2:
                x[2] = np.nan
            split = "test" if rng.random() < 0.25 else "train"
            risk = 0.8 * ((0 if np.isnan(x[1]) else x[1]) - 2) + 0.02 * (age - 55)
            patient = f"{hospital}-{i:03d}"
            for task in ("outcome", "stay"):
                target_row = len(outcome) if task == "outcome" else len(stay)
                rows.append(
                    {
                        "sample_id": f"{patient}/{task}",
                        "dataset": "icu",
                        "task": task,
                        "patient_id": patient,
                        "origin_site": hospital,
                        "split": split,
                        "label": np.nan,
                        "target_row": target_row,
                        "idx_labs": len(labs),
                    }
                )
                if task == "outcome":
                    outcome.append(int(risk + rng.normal(0, 0.7) > 0))
                else:
                    stay.append(float(3 + 1.5 * (x[1] if not np.isnan(x[1]) else 2) + rng.normal(0, 1)))
            labs.append(x)
    manifest = pd.DataFrame(rows)
    targets = {"outcome": np.asarray(outcome, dtype=np.int64), "stay": np.asarray(stay, dtype=np.float32)}
    manifest["label"] = [float(targets[t][r]) for t, r in zip(manifest["task"], manifest["target_row"], strict=True)]
    arrays = {"labs": np.asarray(labs, dtype=np.float32)}
    return write_corpus(path, manifest, arrays, targets, "icu", {"test": True}, raw_schema(impute))


@pytest.fixture(scope="module")
def raw_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return Corpus.open(write_raw_corpus(tmp_path_factory.mktemp("raw") / "icu"))


def _plans(corpus: Corpus, *extra: str):
    cfg = load_config([*NATURAL, f"corpus.path={corpus.path}", *extra])
    return cfg, plan_sites(corpus, cfg)


def _runtime(corpus: Corpus, site: str, *extra: str) -> SiteRuntime:
    cfg, plans = _plans(corpus, *extra)
    plan = next(p for p in plans if p.origin_site == site)
    yaml = config_to_yaml(cfg)
    return SiteRuntime(
        cfg, plan, SiteData(corpus, plan), yaml, client_algorithm(cfg.strategy), corpus_path=str(corpus.path)
    )


def test_nan_is_stored_only_for_raw_features_that_declare_an_impute(tmp_path) -> None:
    corpus = Corpus.open(write_raw_corpus(tmp_path / "ok"))
    assert np.isnan(np.asarray(corpus.array("labs"))).any() and corpus.check() == []
    with pytest.raises(CorpusFormatError, match="NaN or infinite"):
        write_raw_corpus(tmp_path / "no_impute", impute="")


def test_rows_are_raw_counted_once_per_sample_and_refused_until_statistics_come(raw_corpus) -> None:
    _, plans = _plans(raw_corpus)
    plan = next(p for p in plans if p.origin_site == "riverside")
    data = SiteData(raw_corpus, plan)
    rows = data.feature_rows("labs")
    m = raw_corpus.manifest
    train = m.iloc[plan.train_rows]
    patients = train["patient_id"].nunique()
    assert rows.shape == (patients, len(FEATURES))  # two tasks per patient, counted once
    stored = np.asarray(raw_corpus.array("labs"))[np.unique(train["idx_labs"])][:, : len(FEATURES)]
    np.testing.assert_array_equal(rows, stored.astype(np.float64))
    np.testing.assert_array_equal(rows, site_feature_rows(raw_corpus, plan, "labs", "train"))
    with pytest.raises(FeatureStatsMissing, match=r"site .*modality labs \(task outcome\) is stored raw"):
        data.split("outcome", "train")
    moments = data.feature_moments("labs")
    assert moments.n.tolist() == (~np.isnan(rows)).sum(axis=0).tolist()
    np.testing.assert_allclose(moments.mean, np.nanmean(rows, axis=0), rtol=1e-12)


def test_the_transform_imputes_standardises_and_is_reapplied_from_the_raw_rows(raw_corpus) -> None:
    _, plans = _plans(raw_corpus)
    plan = next(p for p in plans if p.origin_site == "st_anne")
    data = SiteData(raw_corpus, plan)
    d = len(FEATURES)
    mean, std, fill = np.arange(d, dtype=float), np.full(d, 2.0), np.arange(d, dtype=float) + 0.5
    data.use_feature_stats({"labs": Standardiser(mean, std, fill)})
    x = data.split("outcome", "train").inputs["labs"].numpy()
    raw = data.raw[("outcome", "train")]["labs"]
    want = (np.where(np.isnan(raw.values[:, :d]), fill, raw.values[:, :d]) - mean) / std
    np.testing.assert_allclose(x[raw.has][:, :d], want, rtol=1e-6)
    assert (x[:, d:] == 0).all() and (x[~raw.has] == 0).all()  # padding and absent samples stay zero
    other = Standardiser(np.zeros(d), np.ones(d), np.zeros(d))
    data.use_feature_stats({"labs": other})  # another transform: from the raw rows, not on top
    y = data.split("outcome", "train").inputs["labs"].numpy()
    np.testing.assert_allclose(y[raw.has][:, :d], np.nan_to_num(raw.values[:, :d], nan=0.0), rtol=1e-6)
    with pytest.raises(ValueError, match="declares no impute"):
        data.use_feature_stats({"labs": Standardiser(np.zeros(d), np.ones(d), np.full(d, np.nan))})
    with pytest.raises(ValueError, match=r"no feature statistics for raw-feature modality\(ies\) \['labs'\]"):
        data.use_feature_stats({})


def test_per_site_statistics_are_the_sites_own_rows_held_out_sites_their_test_rows(raw_corpus) -> None:
    for site in ("riverside", "lakeview"):
        rt = _runtime(raw_corpus, site, "preprocess.statistics=per_site")
        split = "train" if rt.plan.role == "train" else "test"
        rows = rt.data.feature_rows("labs", split)
        std = rt.data.feature_stats["labs"]
        np.testing.assert_allclose(std.mean, np.nanmean(rows, axis=0), rtol=1e-12)
        np.testing.assert_allclose(std.std, np.nanstd(rows, axis=0), rtol=1e-12)
        indicator = np.array([f.kind == "indicator" for f in FEATURES])  # filled with the level's share
        want = np.where(indicator, np.nanmean(rows, axis=0), np.nanmedian(rows, axis=0))
        np.testing.assert_allclose(std.fill, want, rtol=1e-12)
        assert rt.data.split("outcome", "test") is not None  # usable from the start: no round


def test_moments_are_suppressed_under_min_count_and_the_request_is_held_to_the_run(raw_corpus) -> None:
    rt = _runtime(raw_corpus, "north_gen", "preprocess.min_count=10")
    n = rt.data.feature_moments("labs").n
    request = {"modalities": ["labs"], "min_count": int(n[1]) + 1, "epsilon": 0.0, "seed": 0}
    reply = rt.feature_moments_reply(request, {})
    assert set(reply) == {"labs/n", "labs/mean", "labs/m2"} and all(len(v) == len(FEATURES) for v in reply.values())
    assert reply["labs/n"][1] == 0 and reply["labs/mean"][1] == 0 and reply["labs/m2"][1] == 0  # lactate: too few
    assert reply["labs/n"][0] == n[0]  # age: every row
    with pytest.raises(SiteConfigError, match=r"min_count 5 is below this run's preprocess.min_count=10"):
        rt.feature_moments_reply(request | {"min_count": 5}, {})
    lo, width = grid(np.zeros(len(FEATURES)), np.full(len(FEATURES), 50.0))
    hist = rt.feature_histogram_reply(
        {
            "modalities": {"labs": {"lo": lo.tolist(), "width": width.tolist()}},
            "min_count": int(n[1]) + 1,
            "epsilon": 0,
        },
        {},
    )
    counts = np.asarray(hist["labs/hist"]).reshape(len(FEATURES), HIST_BINS)
    assert counts[1].sum() == 0 and counts[0].sum() == pytest.approx(n[0], abs=1e-9)


def test_noisy_moments_need_ranges_and_a_share_of_the_runs_epsilon(raw_corpus, tmp_path) -> None:
    rt = _runtime(raw_corpus, "riverside", "preprocess.epsilon=1.0", "preprocess.min_count=1")
    exact = rt.data.feature_moments("labs")
    request = {"modalities": ["labs"], "min_count": 1, "epsilon": 1.0, "seed": 3}
    noisy = rt.feature_moments_reply(request, {})
    assert noisy == rt.feature_moments_reply(request, {})  # simulation: seeded, reproducible
    assert not np.allclose(noisy["labs/n"], exact.n)
    with pytest.raises(SiteConfigError, match=r"asks for epsilon 0.*preprocess.epsilon=1.0"):
        rt.feature_moments_reply(request | {"epsilon": 0.0}, {})
    with pytest.raises(SiteConfigError, match=r"asks for epsilon 2.0"):
        rt.feature_moments_reply(request | {"epsilon": 2.0}, {})
    unbounded = (Feature("age", "age"), *FEATURES[1:])
    path = write_raw_corpus(tmp_path / "unbounded")
    spec = json.loads((path / "spec.json").read_text())
    spec["schema"]["modalities"][0]["features"] = [f.to_dict() for f in unbounded]
    (path / "spec.json").write_text(json.dumps(spec))
    rt = _runtime(Corpus.open(path), "riverside", "preprocess.epsilon=1.0", "preprocess.min_count=1")
    with pytest.raises(SiteConfigError, match=r"feature 'age' of modality labs has none.*low/high"):
        rt.feature_moments_reply(request, {})


def test_pooled_rows_are_every_training_sites_rows_and_no_held_out_one(raw_corpus) -> None:
    _, plans = _plans(raw_corpus)
    pooled = pooled_feature_rows(raw_corpus, plans, "labs")
    train = [p for p in plans if p.role == "train"]
    assert len(pooled) == sum(len(site_feature_rows(raw_corpus, p, "labs", "train")) for p in train)
    held = next(p for p in plans if p.role == "held_out")
    m = raw_corpus.manifest
    held_idx = set(m.iloc[held.test_rows]["idx_labs"])
    train_idx = set(m.iloc[np.concatenate([p.train_rows for p in train])]["idx_labs"])
    assert len(pooled) == len(train_idx) and not held_idx & train_idx
    rt = _runtime(raw_corpus, "st_anne", "preprocess.statistics=pooled")
    reply = rt.feature_moments_reply({"modalities": ["labs"], "scope": "pooled", "medians": ["labs"]}, {})
    want = Moments.of(pooled)
    np.testing.assert_array_equal(reply["labs/n"], want.n)
    np.testing.assert_allclose(reply["labs/mean"], want.mean, rtol=1e-12)
    np.testing.assert_allclose(reply["labs/median"], exact_median(pooled), rtol=1e-12)


def test_statistics_from_the_server_are_checked_before_use(raw_corpus) -> None:
    rt = _runtime(raw_corpus, "riverside")
    d = len(FEATURES)
    good = {"labs": {"mean": [0.0] * d, "std": [1.0] * d, "fill": [0.0] * d}}
    for bad, match in [
        ("not json", "not JSON"),
        (json.dumps([1]), "not a mapping"),
        (json.dumps({}), "no entry for modality labs"),
        (json.dumps({"labs": good["labs"] | {"std": [1.0] * (d + 1)}}), f"std must be a list of {d} numbers"),
        (json.dumps({"labs": good["labs"] | {"std": [0.0] * d}}), "std positive"),
        (json.dumps({"labs": good["labs"] | {"mean": [float("inf")] * d}}), "finite"),
        # a NaN fill where the modality imputes is the server's error, not the schema's
        (json.dumps({"labs": good["labs"] | {"fill": [float("nan")] * d}}), "no fill for feature 'age', and the"),
        (json.dumps({"labs": good["labs"] | {"std": [1e-300] * d}}), "std of feature 'age' is under 1e-12"),
    ]:
        with pytest.raises(SiteConfigError, match=match):
            rt.apply_feature_stats(bad)
    rt.apply_feature_stats(json.dumps(good))
    assert rt.data.split("outcome", "train") is not None


def _grid_request(rt: SiteRuntime, min_count: int = 10, epsilon: float = 0.0) -> dict:
    """The histogram query a server sends: the site's own moments' grid stands in for the merged one."""
    moments = rt.data.feature_moments("labs")
    lo, width = grid(moments.mean, moments.std)
    grids = {"labs": {"lo": lo.tolist(), "width": width.tolist()}}
    return {"modalities": grids, "min_count": min_count, "epsilon": epsilon, "seed": 1}


def test_a_histogram_leaves_the_site_coarsened_so_no_cell_places_a_value(raw_corpus) -> None:
    """The reviewer's attack: a 27-row site's fine histogram gave back every age to 0.04 years."""
    rt = _runtime(raw_corpus, "north_gen")
    rows = rt.data.feature_rows("labs")
    reply = rt.feature_histogram_reply(_grid_request(rt), {})
    counts = np.asarray(reply["labs/hist"]).reshape(len(FEATURES), HIST_BINS)
    assert coarse_enough(counts, 10)
    observed = (~np.isnan(rows)).sum(axis=0)
    np.testing.assert_allclose(counts.sum(axis=1), np.where(observed >= 10, observed, 0), atol=1e-9)
    per = HIST_BINS // BLOCKS
    for row in counts:  # every cell is a run of whole blocks: its edges are the grid's, no value's
        edges = np.flatnonzero(np.diff(np.concatenate([[0.0], row, [0.0]])))
        assert (edges % per == 0).all()
    assert (counts[0] > 0).sum() >= per and counts[0].max() < 1  # 27 ages: at most a few cells, not 27 bins


def test_a_grid_that_could_place_single_values_is_refused_naming_the_key(raw_corpus) -> None:
    rt = _runtime(raw_corpus, "north_gen")
    ok = _grid_request(rt)
    lo, width = ok["modalities"]["labs"]["lo"], ok["modalities"]["labs"]["width"]
    for key, j, value, match in [
        ("width", 0, 0.0, "width of feature 'age' must be positive"),
        ("width", 0, -1.0, "width of feature 'age' must be positive"),
        ("width", 1, float("inf"), "width must be a list of 5 finite numbers"),
        ("lo", 0, float("nan"), "lo must be a list of 5 finite numbers"),
        ("width", 2, width[2] / 10_000, "width of feature 'wbc' spans less than 1/64 of this site's values' spread"),
    ]:
        bad = {"lo": list(lo), "width": list(width)}
        bad[key][j] = value
        with pytest.raises(SiteConfigError, match=match):
            rt.feature_histogram_reply(ok | {"modalities": {"labs": bad}}, {})


def test_each_query_is_answered_once_per_run_and_the_runs_epsilon_spent_once(raw_corpus) -> None:
    """A server that repeats a noisy query gets the same noise, so it cannot average it away."""
    rt = _runtime(raw_corpus, "riverside", "preprocess.epsilon=1.0", "preprocess.min_count=1")
    deployed = dataclasses.replace(rt, deployed=True)  # noise from the OS, which no seed repeats
    ledger: dict = {}
    request = {"modalities": ["labs"], "min_count": 1, "epsilon": 0.5, "seed": 3}
    first = deployed.feature_moments_reply(request, ledger)
    assert deployed.feature_moments_reply(request, ledger) == first
    assert deployed.feature_moments_reply(request, {}) != first  # another run: fresh noise
    with pytest.raises(SiteConfigError, match="already answered a feature moments query in this run"):
        deployed.feature_moments_reply(request | {"seed": 4}, ledger)
    histogram = _grid_request(rt, min_count=1, epsilon=0.6)
    with pytest.raises(SiteConfigError, match=r"would spend epsilon 1.1 in all, over this run's preprocess.epsilon=1"):
        deployed.feature_histogram_reply(histogram, ledger)
    again = deployed.feature_histogram_reply(histogram | {"epsilon": 0.5}, ledger)  # what is left: answered
    assert again == deployed.feature_histogram_reply(histogram | {"epsilon": 0.5}, ledger)
    assert ledger["spent"] == pytest.approx(1.0)


def test_noisy_moments_are_held_to_the_sites_sample_count_and_the_range(raw_corpus) -> None:
    rt = _runtime(raw_corpus, "riverside", "preprocess.epsilon=0.01", "preprocess.min_count=1")
    reply = rt.feature_moments_reply({"modalities": ["labs"], "min_count": 1, "epsilon": 0.01, "seed": 0}, {})
    n, mean = np.asarray(reply["labs/n"]), np.asarray(reply["labs/mean"])
    low, high = np.array([0.0, 0.0, 0.0, 0.0, 0.0]), np.array([120.0, 30.0, 100.0, 1.0, 1.0])
    assert ((n >= 1) & (n <= rt.plan.n_train)).all() and ((mean >= low) & (mean <= high)).all()
    sd = np.sqrt(np.asarray(reply["labs/m2"]) / n)
    assert (sd <= (high - low) / 2 + 1e-9).all()


def test_a_deployed_site_holds_the_server_to_its_own_node_configs_floor(raw_corpus) -> None:
    """In deployment the run config is the server's: a hostile one asks min_count=1 and epsilon=0."""
    floor = ReleaseFloor.of_node({"site": "riverside", "stats-min-count": "20", "stats-epsilon": 1.0})
    assert (floor.min_count, floor.epsilon) == (20, 1.0)
    default = ReleaseFloor.of_node({"site": "riverside"})
    assert (default.min_count, default.epsilon) == (10, 0.0)
    for config, match in [
        ({"stats-min-count": 0}, "node config stats-min-count must be an integer >= 1"),
        ({"stats-min-count": 2.5}, "node config stats-min-count must be an integer >= 1"),
        ({"stats-epsilon": "lots"}, "node config stats-epsilon must be a finite number >= 0"),
        ({"stats-epsilon": -1}, "node config stats-epsilon must be a finite number >= 0"),
    ]:
        with pytest.raises(SiteConfigError, match=match):
            ReleaseFloor.of_node({"site": "riverside", **config})
    server = _runtime(raw_corpus, "riverside", "preprocess.min_count=1")  # the server's run config
    site = dataclasses.replace(server, deployed=True, floor=floor)
    request = {"modalities": ["labs"], "min_count": 1, "epsilon": 0.0, "seed": 0}
    with pytest.raises(SiteConfigError, match=r"min_count 1 is below this site's node config stats-min-count=20"):
        site.feature_moments_reply(request, {})
    with pytest.raises(SiteConfigError, match=r"asks for epsilon 0.0; this site's node config stats-epsilon=1.0"):
        site.feature_moments_reply(request | {"min_count": 20}, {})
    assert len(site.feature_moments_reply(request | {"min_count": 20, "epsilon": 1.0}, {})["labs/n"]) == len(FEATURES)


def test_statistics_that_push_a_sites_values_past_a_float32_are_refused_naming_the_feature(raw_corpus) -> None:
    _, plans = _plans(raw_corpus)
    data = SiteData(raw_corpus, next(p for p in plans if p.origin_site == "st_anne"))
    d = len(FEATURES)
    std = np.ones(d)
    std[2] = 1e-40  # past from_lists' check (a caller that skips it): the site still refuses
    with pytest.raises(ValueError, match="standardise feature 'wbc' of this site's values beyond a float32"):
        data.use_feature_stats({"labs": Standardiser(np.zeros(d), std, np.zeros(d))})
