"""Issue 28, finding 5: one dishonest site steered a SecAgg+ round, and item 6's threshold bound.

The probe: Flower's secaggplus_mod unchanged, every other site honest, one site (site_00) replaces
the vector it masks (here: a mod between the secure-aggregation gate and masked_update_mod, so
the declaration masked_update_mod wrote stays honest). Before the checks, a withheld group moved
by 1.0 on every coordinate and a weight entry of -1 shrank a group's total weight, with no failure
recorded. Now the server checks the unmasked sum against the weights the sites declared in the
clear, refuses the round (the model keeps its value) and records why, without naming a site.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

import clients.client_app as site_app
import federated.engines.inprocess as inprocess
import federated.server.secure_checks as secure_checks
from clients.attacks import attack_mod
from clients.faults import fault_mod
from clients.folded_messages import folding_mod
from clients.secure_aggregation import FITRES_PARAMETERS, masked_update_mod, secure_aggregation_gate
from federated.app.runner import run_experiment
from federated.core import protocol as P
from federated.core.arrays import record_to_numpy
from federated.core.config import load_config
from federated.core.config.schema import ConfigError, SecureAggregationConfig
from federated.core.models import group_of
from federated.server.secure_round import ProtocolSizes
from strategies.secure_sums import Layout

DISHONEST = 0  # partition 0 is site_00, a training site holding oct, xray and mri
SECURE = ["scale=smoke", "rounds=1", "secure_aggregation=secaggplus"]
WITHHELD = ("encoder/eeg", "head/motor_imagery")  # one smoke training site holds eeg: left out

Change = Callable[[np.ndarray, Layout], None]


def _tamper(change: Change):
    """A mod at site_00 that changes the vector masked_update_mod built before secaggplus_mod masks it."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        if context.node_config.get("partition-id") != DISHONEST or reply.has_error():
            return reply
        if FITRES_PARAMETERS not in reply.content.array_records:
            return reply
        config = msg.content.config_records[P.CONFIG_RECORD]
        layout = Layout.of(record_to_numpy(msg.content.array_records[P.ARRAYS_RECORD]), str(config[P.SECURE_LAYOUT]))
        (vector,) = reply.content.array_records[FITRES_PARAMETERS].to_numpy_ndarrays()
        vector = np.array(vector, np.float64)
        change(vector, layout)
        reply.content[FITRES_PARAMETERS] = ArrayRecord([vector])
        return reply

    return mod


def _segment(layout: Layout, group: str):
    return next(s for s in layout.segments if s.group == group)


def move_withheld(vector: np.ndarray, layout: Layout) -> None:
    """As the probe: every coordinate of the withheld groups +1 (the clip), with weight 1."""
    for group in WITHHELD:
        s = _segment(layout, group)
        vector[s.start : s.weight_index] = 1.0
        vector[s.weight_index] = 1.0


def negative_weight(vector: np.ndarray, layout: Layout) -> None:
    """As the probe: the weight entry of a group every training site holds set to -1."""
    vector[_segment(layout, "fusion").weight_index] = -1.0


def full_clip_on_fusion(vector: np.ndarray, layout: Layout) -> None:
    """Within what site_00 declared (weight 1 on fusion): every fusion entry at +c."""
    s = _segment(layout, "fusion")
    vector[s.start : s.weight_index] = 1.0


def declare_negative(declaration: dict[str, float]) -> None:
    declaration["fusion"] = -1.0


def _app(mod=None) -> ClientApp:
    """The project's ClientApp, with `mod` just inside the gate: what a modified site would run."""
    mods = [folding_mod, secure_aggregation_gate, fault_mod, *([mod] if mod else []), masked_update_mod, attack_mod]
    app = ClientApp(mods=mods)
    app.query()(site_app.query)
    app.train()(site_app.train)
    app.evaluate()(site_app.evaluate)
    return app


def _lying_declaration(change: Callable[[dict[str, float]], None]):
    """A mod at site_00 that changes the weights it declares in the clear (its vector stays honest)."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        record = reply.content.config_records.get(P.SECURE_GROUPS_RECORD)
        if context.node_config.get("partition-id") != DISHONEST or record is None:
            return reply
        declared = json.loads(str(record[P.SECURE_WEIGHTS]))
        change(declared)
        reply.content[P.SECURE_GROUPS_RECORD] = ConfigRecord({**record, P.SECURE_WEIGHTS: json.dumps(declared)})
        return reply

    return mod


def _run(tmp_path, monkeypatch, smoke_corpus, name: str, mod=None, checks: bool = True, extra=()):
    monkeypatch.setattr(inprocess, "client_app", _app(mod))
    if not checks:  # the code before this issue: no check on the unmasked sum
        monkeypatch.setattr(secure_checks, "sum_problems", lambda *a, **k: [])
    out = tmp_path / name
    run_experiment(load_config([*SECURE, f"corpus.path={smoke_corpus}", *extra]), out, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    with np.load(out / "final_model.npz") as z:
        model = {k: z[k] for k in z.files}
    return summary, model, out


@pytest.fixture(scope="module")
def honest(tmp_path_factory, smoke_corpus):
    """An honest secure round, checks on; the model the others are compared with."""
    with pytest.MonkeyPatch.context() as mp:
        return _run(tmp_path_factory.mktemp("honest"), mp, smoke_corpus, "honest")


@pytest.fixture(scope="module")
def initial(smoke_corpus):
    from federated.core.models import build_model
    from federated.data.format import Corpus

    cfg = load_config([*SECURE, f"corpus.path={smoke_corpus}"])
    model = build_model(cfg.model, Corpus.open(smoke_corpus).schema, cfg.seed)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _moved(model, reference, groups) -> float:
    return max(float(np.max(np.abs(model[k] - reference[k]))) for k in model if group_of(k) in groups)


def _assert_refused_and_recorded(summary, out, model, initial) -> str:
    reason = summary["failures"]["1"]["secure_aggregation"]
    assert reason.startswith("aggregate refused, the model keeps its value this round")
    assert "which one cannot be told: SecAgg+ shows the server only the sum" in reason
    assert "site_0" not in reason  # the sum names no site
    assert summary["skipped_rounds"] == [1]
    assert all(np.array_equal(model[k], initial[k]) for k in initial)  # the global model unchanged
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert ((metrics["round"] == 1) & (metrics["metric"] == "secure_aggregation_failed")).any()
    return reason


@pytest.mark.slow  # the sum checks themselves: test_secure_round.py
def test_a_site_moving_a_withheld_group_gets_the_round_refused_and_recorded(
    tmp_path, monkeypatch, smoke_corpus, initial, honest
):
    _, probe, _ = _run(tmp_path, monkeypatch, smoke_corpus, "probe", _tamper(move_withheld), checks=False)
    # the probe, reproduced: without the checks the withheld groups move by the clip, 1.0
    assert _moved(probe, initial, WITHHELD) == pytest.approx(1.0, abs=1e-6)
    monkeypatch.undo()
    summary, model, out = _run(tmp_path, monkeypatch, smoke_corpus, "checked", _tamper(move_withheld))
    reason = _assert_refused_and_recorded(summary, out, model, initial)
    for group in WITHHELD:
        assert f"group {group} (withheld this round): no site declared a weight for it" in reason


@pytest.mark.slow
def test_a_site_sending_a_negative_weight_gets_the_round_refused_and_recorded(
    tmp_path, monkeypatch, smoke_corpus, initial, honest
):
    _, probe, _ = _run(tmp_path, monkeypatch, smoke_corpus, "probe", _tamper(negative_weight), checks=False)
    _, honest_model, _ = honest
    # the probe, reproduced: fusion's total weight shrank, so its step grew (by 6.75 / 4.75 here)
    ratio = _moved(probe, initial, {"fusion"}) / _moved(honest_model, initial, {"fusion"})
    assert ratio > 1.2
    monkeypatch.undo()
    summary, model, out = _run(tmp_path, monkeypatch, smoke_corpus, "checked", _tamper(negative_weight))
    reason = _assert_refused_and_recorded(summary, out, model, initial)
    assert "group fusion: total weight" in reason and "where the sites declared 6.75" in reason


@pytest.mark.slow
def test_an_honest_round_is_unchanged_by_the_checks(tmp_path, monkeypatch, smoke_corpus, honest):
    summary, model, _ = honest
    assert not summary.get("failures") and summary["skipped_rounds"] == []
    _, unchecked, _ = _run(tmp_path, monkeypatch, smoke_corpus, "unchecked", checks=False)
    assert all(np.array_equal(model[k], unchecked[k]) for k in unchecked)  # bit for bit


def test_a_declaration_outside_the_handshake_bound_is_refused_naming_the_site(
    tmp_path, monkeypatch, smoke_corpus, initial
):
    """What a site declares travels in the clear: that check can name it, before anything is unmasked."""
    summary, model, _ = _run(tmp_path, monkeypatch, smoke_corpus, "lying", _lying_declaration(declare_negative))
    reason = summary["failures"]["1"]["secure_aggregation"]
    assert reason.startswith("not unmasked: site_00 declares weight -1.0 for group fusion, outside (0, 1]")
    assert summary["skipped_rounds"] == [1]
    assert all(np.array_equal(model[k], initial[k]) for k in initial)


def _unreadable_declaration(kind: str):
    """A mod at site_00 that sends no declaration record, or one whose weights are not JSON."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        if context.node_config.get("partition-id") != DISHONEST or P.SECURE_GROUPS_RECORD not in reply.content:
            return reply
        if kind == "missing":
            del reply.content[P.SECURE_GROUPS_RECORD]
        else:
            reply.content[P.SECURE_GROUPS_RECORD] = ConfigRecord({P.SECURE_WEIGHTS: "{not json"})
        return reply

    return mod


@pytest.mark.parametrize("kind", ["missing", "malformed"])
def test_a_site_sending_no_readable_declaration_gets_the_round_refused_naming_it(
    tmp_path, monkeypatch, smoke_corpus, initial, kind
):
    """Before, the server read the record unguarded: KeyError / JSONDecodeError stopped the run.
    Now the round is refused before unmasking, naming the site, and the run goes on."""
    summary, model, _ = _run(tmp_path, monkeypatch, smoke_corpus, kind, _unreadable_declaration(kind))
    reason = summary["failures"]["1"]["secure_aggregation"]
    assert reason.startswith("not unmasked: site_00 sent no readable declaration of its weights")
    assert summary["skipped_rounds"] == [1] and summary["rounds_completed"] == 1
    assert all(np.array_equal(model[k], initial[k]) for k in initial)


@pytest.mark.slow
def test_what_a_dishonest_site_can_still_do_stays_within_the_readme_bound(tmp_path, monkeypatch, smoke_corpus, honest):
    """Within its declared weight a (1 on fusion) and the clip c, site_00 can send anything: the sum
    passes, and fusion moves from the honest round's by at most (c + a c) / A (A = 6.75, the
    declared total: the README's bound), here about c / A."""
    summary, model, _ = _run(tmp_path, monkeypatch, smoke_corpus, "within", _tamper(full_clip_on_fusion))
    _, honest_model, _ = honest
    assert not summary.get("failures")
    shift = _moved(model, honest_model, {"fusion"})
    assert 0.5 / 6.75 < shift <= 2 * 1.0 / 6.75 + 1e-6


# ------------------------------------------------------- reconstruction_threshold (item 6) ----


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        (["secure_aggregation.reconstruction_threshold=0.5"], "more than half"),
        (["secure_aggregation.reconstruction_threshold=0.3"], "more than half"),
        (["secure_aggregation.num_shares=7", "secure_aggregation.reconstruction_threshold=3"], "more than half"),
        (["secure_aggregation.num_shares=7", "secure_aggregation.reconstruction_threshold=7"], "less than num_shares"),
        (["secure_aggregation.reconstruction_threshold=3"], "whole-number secure_aggregation.num_shares"),
    ],
)
def test_a_reconstruction_threshold_below_the_safe_bound_is_refused_with_the_reason(overrides, why):
    with pytest.raises(ConfigError, match="secure_aggregation.reconstruction_threshold") as e:
        load_config(["secure_aggregation=secaggplus", *overrides])
    assert why in str(e.value)


def test_a_threshold_of_one_means_every_share_as_in_flower():
    cfg = load_config(["secure_aggregation=secaggplus", "secure_aggregation.reconstruction_threshold=1"])
    assert ProtocolSizes.for_round(8, cfg.secure_aggregation) == ProtocolSizes(8, 8)


def test_a_fraction_that_rounds_to_half_the_shares_is_raised_above_half():
    sa = SecureAggregationConfig("secaggplus", num_shares=1.0, reconstruction_threshold=0.6)
    assert ProtocolSizes.for_round(4, sa) == ProtocolSizes(4, 3)  # 0.6 x 4 rounds to 2: half
