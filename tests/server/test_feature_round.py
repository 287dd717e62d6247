"""The feature statistics round: federated statistics equal pooled ones (simulation), per-site
ones differ, small cells are suppressed, DP noise needs ranges and its epsilon is reported, a
resume does not ask again, and in a deployment-like run no message of the round carries a row."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from clients.client_app import app as client_app
from clients.site_data import SiteData, exact_median, pooled_feature_rows
from clients.site_runtime import SiteRuntime
from federated.app.cli import main
from federated.core.config import config_to_yaml, load_config
from federated.core.feature_stats import HIST_BINS, coarse_enough, grid
from federated.core.protocol import (
    CONFIG_KEY,
    CONFIG_RECORD,
    CORPUS_KEY,
    FEATURE_HISTOGRAM,
    FEATURE_MOMENTS,
    STATE_DIR_KEY,
    Role,
)
from federated.data.format import Corpus
from federated.data.split import split_corpus
from federated.engines.inprocess import FIRST_NODE_ID, InProcessGrid
from federated.server.checkpoint import load_checkpoint
from federated.server.evaluation import SiteProfile
from federated.server.feature_round import FeatureStatistics, run_statistics
from federated.server.loop import run_federation
from federated.server.site_agreement import FederationError
from federated.server.transport import exchange
from partitions import plan_sites
from tests.clients.test_feature_transform import FEATURES, HOSPITALS, NATURAL, write_raw_corpus

RUN = ["rounds=2", "model.dim=16", "model.heads=2", "train.batch_size=16", "engine.torch_threads=1"]
D = len(FEATURES)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("feature_round")
    return {impute: write_raw_corpus(root / impute, impute=impute) for impute in ("mean", "median")}


def run(out: Path, corpus: Path, *extra: str) -> dict:
    assert main(["run", "--out", str(out), "--no-progress", f"corpus.path={corpus}", *NATURAL, *RUN, *extra]) == 0
    return json.loads((out / "summary.json").read_text())


class RecordingGrid(InProcessGrid):
    """The in-process grid, keeping every message sent and every reply received."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent += messages
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.received += replies
        return replies


def simulated_grid(corpus: Path, *extra: str, state: Path | None = None):
    cfg = load_config([*NATURAL, *RUN, f"corpus.path={corpus}", *extra])
    plans = plan_sites(Corpus.open(corpus), cfg)
    run_config = {CONFIG_KEY: config_to_yaml(cfg), CORPUS_KEY: str(corpus)}
    if state is not None:
        run_config[STATE_DIR_KEY] = str(state)
    grid = RecordingGrid(client_app, [{"partition-id": i} for i in range(len(plans))], run_config)
    train = [FIRST_NODE_ID + i for i, p in enumerate(plans) if p.role == Role.TRAIN]
    return cfg, plans, grid, train


def profiles_of(plans: list) -> dict[int, SiteProfile]:
    """What the handshake would have said, by node: each site's name and training sample count."""
    return {
        FIRST_NODE_ID + i: SiteProfile(p.site, p.role, p.archetype, list(p.modalities), list(p.tasks), p.n_train, 0)
        for i, p in enumerate(plans)
    }


def statistics(corpus: Path, *extra: str) -> tuple[FeatureStatistics | None, list, RecordingGrid]:
    cfg, plans, grid, train = simulated_grid(corpus, *extra)
    schema = Corpus.open(corpus).schema
    stats = run_statistics(lambda ms: exchange(grid, ms), train, schema, cfg, profiles_of(plans))
    return stats, plans, grid


def test_federated_statistics_equal_pooled_ones_and_so_do_the_runs(corpora, tmp_path, capsys) -> None:
    corpus = corpora["mean"]
    fed = run(tmp_path / "federated", corpus)
    # the run's report says what the round released
    said = " ".join(capsys.readouterr().out.split())  # as printed, wrapped to the terminal
    assert "Feature statistics (preprocess.statistics=federated): exact aggregates, min_count 10" in said
    pooled = run(tmp_path / "pooled", corpus, "preprocess.statistics=pooled")
    assert fed["preprocess"] == {"statistics": "federated", "min_count": 10, "epsilon": 0.0}
    assert pooled["preprocess"]["statistics"] == "pooled"
    a, b = fed["feature_statistics"]["labs"], pooled["feature_statistics"]["labs"]
    assert a["features"] == [f.name for f in FEATURES] and a["n"] == b["n"]
    for key in ("mean", "std", "fill"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-9, atol=1e-12)
    # and both are the training sites' training rows, computed here from the corpus directly
    opened = Corpus.open(corpus)
    plans = plan_sites(opened, load_config([*NATURAL, f"corpus.path={corpus}"]))
    rows = pooled_feature_rows(opened, plans, "labs")
    assert "lakeview" not in {p.origin_site for p in plans if p.role == Role.TRAIN}
    np.testing.assert_allclose(a["mean"], np.nanmean(rows, axis=0), rtol=1e-9)
    np.testing.assert_allclose(a["std"], np.nanstd(rows, axis=0), rtol=1e-9)
    for group in ("id", "ood"):
        assert fed["final"][group]["score"] == pytest.approx(pooled["final"][group]["score"], abs=1e-6)
        for task, score in fed["final"][group]["per_task"].items():
            assert score == pytest.approx(pooled["final"][group]["per_task"][task], abs=1e-6)
    # per-site statistics are each hospital's own, not the pooled ones: another transform, another run
    per_site = run(tmp_path / "per_site", corpus, "preprocess.statistics=per_site")
    assert per_site["preprocess"]["statistics"] == "per_site" and "feature_statistics" not in per_site
    for p in plans:
        own = SiteData(opened, p).own_feature_stats()["labs"]
        assert np.abs(own.mean - np.asarray(a["mean"])).max() > 1e-3
    assert per_site["final"]["id"]["per_task"] != fed["final"]["id"]["per_task"]


def _runs(row: np.ndarray, lo: float, width: float) -> list[tuple[float, float]]:
    """[start, end) of each released cell (a run of equal non-zero bins) of one feature's histogram."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0.0], row, [0.0]])))
    return [(lo + a * width, lo + b * width) for a, b in itertools.pairwise(edges) if row[a] > 0]


def test_the_federated_median_is_the_pooled_one_to_the_width_of_the_cells_around_it(corpora) -> None:
    """Each site sends coarsened histograms (cells of >= min_count values, spread evenly), so the
    merged median is the pooled rows' to within the widest cell around it at any site (here 1.8 to
    2.3 SD: about 30 values a site, cells of >= 10). Measured on this corpus, the error is far
    smaller: 0.005 SD (age, 0.09 years), 0.004 SD (lactate), 0.085 SD (wbc, 0.30 x 10^9/L)."""
    corpus = corpora["median"]
    stats, plans, grid_ = statistics(corpus)
    assert stats is not None
    rows = pooled_feature_rows(Corpus.open(corpus), plans, "labs")
    std = stats.standardisers["labs"]
    lo, width = grid(std.mean, std.std)
    replies = [
        np.asarray(r.content.metric_records["metrics"]["labs/hist"])
        for r in grid_.received
        if r.content.metric_records and "labs/hist" in r.content.metric_records["metrics"]
    ]
    assert len(replies) == 3
    hists = [h.reshape(D, HIST_BINS) for h in replies]
    errors = {}
    for j in range(D):
        col = np.sort(rows[:, j][~np.isnan(rows[:, j])])
        if FEATURES[j].kind == "indicator":  # filled with the level's share, not its 0/1 median
            assert std.fill[j] == pytest.approx(col.mean(), abs=1e-9) and 0 < std.fill[j] < 1
            continue
        median = exact_median(rows[:, j : j + 1])[0]
        cells = [c for h in hists for c in _runs(h[j], lo[j], width[j]) if c[0] <= median < c[1]]
        allowed = max(b - a for a, b in cells) + width[j]  # plus one fine bin: the quantile's interpolation
        errors[FEATURES[j].name] = abs(std.fill[j] - median) / std.std[j]
        assert abs(std.fill[j] - median) <= allowed, (FEATURES[j].name, std.fill[j], median, allowed)
    assert max(errors.values()) < 0.1, errors  # in pooled SDs; this corpus is fixed (seed 0), so is the error
    kinds = [k for m in grid_.sent for k in m.content.config_records[CONFIG_RECORD]]
    assert kinds.count(FEATURE_MOMENTS) == kinds.count(FEATURE_HISTOGRAM) == 3  # one each per training site


def test_a_feature_seen_too_rarely_at_a_site_is_left_out_of_the_merge(corpora, caplog) -> None:
    corpus = corpora["mean"]
    exact, plans, _ = statistics(corpus, "preprocess.min_count=1")
    opened = Corpus.open(corpus)
    counts = {p.origin_site: SiteData(opened, p).feature_moments("labs").n for p in plans if p.role == Role.TRAIN}
    lactate = {site: int(n[1]) for site, n in counts.items()}
    k = sorted(lactate.values())[0] + 1  # above the smallest site's count of lactate values
    suppressed, _, _ = statistics(corpus, f"preprocess.min_count={k}")
    assert exact is not None and suppressed is not None
    assert suppressed.counts["labs"][1] == sum(n for n in lactate.values() if n >= k)
    assert suppressed.counts["labs"][0] == exact.counts["labs"][0]  # age: every site has enough
    with caplog.at_level(logging.WARNING):
        nobody, _, _ = statistics(corpus, f"preprocess.min_count={max(lactate.values()) + 1}")
    assert nobody is not None and nobody.counts["labs"][1] == 0 and nobody.standardisers["labs"].std[1] == 1.0
    assert "lactate" in caplog.text and "preprocess.min_count" in caplog.text


def test_noise_needs_every_features_range_and_its_epsilon_is_reported(corpora, tmp_path, capsys) -> None:
    corpus = corpora["median"]
    noisy = run(tmp_path / "dp", corpus, "preprocess.epsilon=2.0", "preprocess.min_count=1")
    assert noisy["preprocess"] == {"statistics": "federated", "min_count": 1, "epsilon": 2.0}
    said = " ".join(capsys.readouterr().out.split())
    assert "Laplace noise, epsilon 2 per training site (DP per record, not per patient), min_count 1" in said
    # noise is post-processed into what each feature's range allows: no mean, fill or SD outside it
    low, high = np.array([f.low or 0.0 for f in FEATURES]), np.array([f.high or 1.0 for f in FEATURES])
    released = noisy["feature_statistics"]["labs"]
    for key in ("mean", "fill"):
        assert ((np.asarray(released[key]) >= low) & (np.asarray(released[key]) <= high)).all(), key
    assert (np.asarray(released["std"]) <= (high - low) / 2).all()
    exact = run(tmp_path / "exact", corpus, "preprocess.min_count=1")
    assert noisy["feature_statistics"]["labs"]["n"] != exact["feature_statistics"]["labs"]["n"]
    # without a range for a numeric feature the server refuses before asking anyone
    cfg, _, grid, train = simulated_grid(corpus, "preprocess.epsilon=1.0")
    schema = Corpus.open(corpus).schema
    labs = schema.modalities["labs"]
    unbounded = dataclasses.replace(labs, features=(dataclasses.replace(FEATURES[0], low=None), *FEATURES[1:]))
    schema = dataclasses.replace(schema, modalities={"labs": unbounded})
    with pytest.raises(FederationError, match=r"preprocess.epsilon > 0 .*feature 'age' of modality labs has none"):
        run_statistics(lambda ms: exchange(grid, ms), train, schema, cfg, {})
    assert grid.sent == []


def test_statistics_read_back_are_checked_like_any_input(corpora) -> None:
    stats, _, _ = statistics(corpora["mean"])
    assert stats is not None
    schema = Corpus.open(corpora["mean"]).schema
    saved = stats.to_dict()
    again = FeatureStatistics.from_dict(json.loads(json.dumps(saved)), schema, "checkpoint")
    assert again.to_dict() == saved
    short = json.loads(json.dumps(saved))
    short["modalities"]["labs"]["std"] = short["modalities"]["labs"]["std"][:-1]
    with pytest.raises(FederationError, match=f"checkpoint: labs: std must be a list of {D} numbers"):
        FeatureStatistics.from_dict(short, schema, "checkpoint")
    other = json.loads(json.dumps(saved))
    other["modalities"] = {"vitals": other["modalities"]["labs"]}
    with pytest.raises(FederationError, match=r"for modalities \['vitals'\], the schema stores \['labs'\] raw"):
        FeatureStatistics.from_dict(other, schema, "checkpoint")


def test_a_resumed_run_uses_the_checkpoints_statistics_without_a_round(corpora, tmp_path) -> None:
    corpus = corpora["median"]
    cfg, _, grid, _ = simulated_grid(corpus, "rounds=1", "engine.checkpoint_every=1", state=tmp_path / "sites")
    first = run_federation(grid, cfg, checkpoint_dir=tmp_path)
    assert first.feature_statistics is not None
    assert any(FEATURE_MOMENTS in m.content.config_records.get(CONFIG_RECORD, {}) for m in grid.sent)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.feature_statistics == first.feature_statistics.to_dict()
    resumed_cfg, _, again, _ = simulated_grid(corpus, "rounds=2", "engine.checkpoint_every=1", state=tmp_path / "sites")
    second = run_federation(again, resumed_cfg, checkpoint_dir=tmp_path, resume=ckpt)
    asked = [k for m in again.sent for k in m.content.config_records.get(CONFIG_RECORD, {})]
    assert FEATURE_MOMENTS not in asked and FEATURE_HISTOGRAM not in asked
    assert second.feature_statistics is not None
    assert second.feature_statistics.message() == first.feature_statistics.message()
    assert len(second.history) == 2


def _lengths(value: object) -> list[int]:
    """The lengths of every list inside a record value (a JSON string is parsed first)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return []
    if isinstance(value, list):
        return [len(value), *(n for v in value for n in _lengths(v))]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _lengths(v)]
    return []


def _hospital_nodes(corpus: Path, tmp_path: Path) -> tuple[Any, list[dict[str, str | int]]]:
    """Each hospital's own corpus folder and its node config (`site`, `corpus-path`), as a
    SuperNode has, and the site-local run config with lakeview held out."""
    opened = Corpus.open(corpus)
    m = opened.manifest
    rows = {h: np.flatnonzero((m["origin_site"] == h).to_numpy()) for h in HOSPITALS}
    folders = split_corpus(opened, rows, tmp_path / "sites")
    cfg = load_config(["sites.planner=site_local", "sites.holdout=named", "sites.holdout_sites=[lakeview]", *RUN])
    return cfg, [{"site": h, "corpus-path": str(folders[h])} for h in HOSPITALS]


def test_a_deployed_statistics_round_moves_no_row(corpora, tmp_path) -> None:
    """Each hospital holds only its own corpus (node config `site` + `corpus-path`, as a SuperNode
    has); every message of the statistics rounds, both ways, holds only per-feature aggregates."""
    corpus = corpora["median"]
    cfg, nodes = _hospital_nodes(corpus, tmp_path)
    m = Corpus.open(corpus).manifest
    rows = {h: np.flatnonzero((m["origin_site"] == h).to_numpy()) for h in HOSPITALS}
    grid = RecordingGrid(client_app, nodes, {CONFIG_KEY: config_to_yaml(cfg)})
    result = run_federation(grid, cfg)
    stats = result.feature_statistics
    assert stats is not None and stats.source == "federated"
    # every count a site holds, which no aggregate may be as long as
    n_rows = {
        int(n)
        for h in HOSPITALS
        for n in (rows[h].size, rows[h].size // 2, (m.iloc[rows[h]]["split"] == "train").sum())
    }
    allowed = {D, D * HIST_BINS}
    assert not allowed & n_rows
    reply_to = {r.metadata.reply_to_message_id: r for r in grid.received}
    assert len(reply_to) == len(grid.sent)
    statistics_round = [  # the queries after the handshake (which sends no config), and their replies
        (msg, reply_to[msg.metadata.message_id])
        for msg in grid.sent
        if msg.metadata.message_type == "query" and CONFIG_RECORD in msg.content.config_records
    ]
    keys = {k for msg, _ in statistics_round for k in msg.content.config_records[CONFIG_RECORD]}
    assert {FEATURE_MOMENTS, FEATURE_HISTOGRAM} <= keys
    hists = [
        r.content.metric_records["metrics"]["labs/hist"]
        for _, r in statistics_round
        if "labs/hist" in r.content.metric_records.get("metrics", {})
    ]
    assert len(hists) == 3 and all(coarse_enough(np.reshape(h, (D, HIST_BINS)), 10) for h in hists)
    for msg, reply in statistics_round:
        for message in (msg, reply):
            assert not message.content.array_records, "an array in the statistics round"
            for record in [*message.content.config_records.values(), *message.content.metric_records.values()]:
                assert isinstance(record, ConfigRecord | MetricRecord)
                for key, value in record.items():
                    kinds = {FEATURE_MOMENTS, FEATURE_HISTOGRAM}
                    if key in kinds or key.startswith("labs/"):
                        lengths = [n for n in _lengths(value) if n != 1]  # a one-modality list
                        assert set(lengths) <= allowed, (key, lengths)
                    else:  # the target statistics round: one number per task
                        assert not [n for n in _lengths(value) if n > 1], key
    # every train and evaluate message carried the statistics, one value per feature
    for msg in grid.sent:
        if msg.metadata.message_type in ("train", "evaluate"):
            sent = json.loads(str(msg.content.config_records[CONFIG_RECORD]["feature-stats"]))
            assert {len(v) for v in sent["labs"].values()} == {D}
    # and they are the simulation's pooled statistics of the same rows
    pooled, _, _ = statistics(corpus, "preprocess.statistics=pooled")
    assert pooled is not None
    for key in ("mean", "std"):
        np.testing.assert_allclose(
            getattr(stats.standardisers["labs"], key), getattr(pooled.standardisers["labs"], key), rtol=1e-9
        )
    assert isinstance(result.arrays, ArrayRecord)


def _forging(monkeypatch, site: str, kind: str, forge) -> None:
    """Site `site` replies to the `kind` query (moments, histogram) with forge(its honest reply)."""
    name = f"feature_{kind}_reply"
    honest = getattr(SiteRuntime, name)

    def reply(self, request, ledger):
        out = honest(self, request, ledger)
        return forge(out) if self.plan.site == site else out

    monkeypatch.setattr(SiteRuntime, name, reply)


@pytest.mark.parametrize(
    "forge, match",
    [
        (lambda r: r | {"labs/n": [1e300] * D}, "a count that no set of its .* training samples has of feature 'age'"),
        (lambda r: r | {"labs/n": [r["labs/n"][0] + 0.5, *r["labs/n"][1:]]}, "a count .* of feature 'age'"),
        (lambda r: r | {"labs/m2": [1e300] * D}, "an M2 wider than values in the declared .* of feature 'age'"),
        (lambda r: r | {"labs/mean": [-5.0, *r["labs/mean"][1:]]}, "a mean outside the declared range .* 'age'"),
        (lambda r: r | {"labs/n": [0.0] * D}, "an M2 that no set of values has of feature 'age'"),
        (lambda r: r | {"labs/mean": [float("inf")] * D}, "labs/mean that is not a list of 5 finite numbers"),
        (lambda r: 1 / 0, "failed: .*ZeroDivisionError"),
    ],
)
def test_a_moments_reply_no_site_could_send_is_refused_naming_the_site(corpora, monkeypatch, forge, match) -> None:
    """n = 1e300 used to win the merge silently; M2 = 1e300 made every site blame the server."""
    _forging(monkeypatch, "riverside", "moments", forge)
    with pytest.raises(FederationError, match=rf"feature statistics: site riverside (sent )?{match}"):
        statistics(corpora["mean"])


def test_under_noise_a_mean_pushed_out_of_its_range_is_clamped_not_refused(corpora, monkeypatch) -> None:
    _forging(monkeypatch, "riverside", "moments", lambda r: r | {"labs/mean": [-1e4, *r["labs/mean"][1:]]})
    stats, _, _ = statistics(corpora["mean"], "preprocess.epsilon=50.0", "preprocess.min_count=1")
    assert stats is not None and 0 <= stats.standardisers["labs"].mean[0] <= 120  # riverside's taken as 0
    assert stats.standardisers["labs"].std[0] <= 60


def test_a_histogram_finer_than_min_count_is_refused_naming_the_site(corpora, monkeypatch) -> None:
    def fine(reply: dict) -> dict:  # one more value in a bin of its own: a cell that places it
        hist = np.reshape(reply["labs/hist"], (D, HIST_BINS)).copy()
        hist[0, int(np.flatnonzero(hist[0])[0])] += 1.0
        return reply | {"labs/hist": hist.reshape(-1).tolist()}

    _forging(monkeypatch, "st_anne", "histogram", fine)
    with pytest.raises(FederationError, match=r"site st_anne sent a histogram of labs with a cell of fewer than"):
        statistics(corpora["median"])


def test_a_hospital_holds_the_server_to_the_floor_its_own_node_config_sets(corpora, tmp_path) -> None:
    """Deployed, the run config is the server's; a hospital's node config sets the least min_count."""
    cfg, nodes = _hospital_nodes(corpora["mean"], tmp_path)
    nodes[list(HOSPITALS).index("riverside")]["stats-min-count"] = 20
    grid_ = RecordingGrid(client_app, nodes, {CONFIG_KEY: config_to_yaml(cfg)})
    with pytest.raises(
        FederationError,
        match=r"site riverside failed: .*min_count 10 is below this site's node config "
        r"stats-min-count=20",
    ):
        run_federation(grid_, cfg)
