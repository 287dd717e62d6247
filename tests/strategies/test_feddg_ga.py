"""FedDG-GA: the weight adjustment by hand, per-group aggregation, the site side, a real run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from federated.core.arrays import record_to_numpy
from federated.core.config import load_config
from federated.core.config.schema import ConfigError, TrainConfig
from federated.core.config.strategy_section import strategy_config
from federated.engines.inprocess import InProcessGrid, claim_server_identity
from strategies import SiteRound, build_strategy, client_algorithm
from strategies.feddg_ga import (
    GA_RECORD,
    GA_STATE,
    GLOBAL_LOSS,
    LOCAL_LOSS,
    LOCAL_ROUND,
    FedDGGA,
    adjust_weights,
    ga_step_size,
    site_group_weights,
)

KEYS = ("encoders.eeg.w", "encoders.ct.w", "fusion.w", "heads.bone_age.w")
ZERO = {k: [0.0] for k in KEYS}
ALL = {"encoder/eeg": 10, "encoder/ct": 10, "fusion": 10, "head/bone_age": 10}


# --- pure maths ----------------------------------------------------------------------------


def test_step_size_decays_linearly_and_not_without_a_schedule():
    assert ga_step_size(0.1, 1, 0) == 0.1
    assert ga_step_size(0.1, 50, 0) == 0.1
    assert ga_step_size(0.1, 1, 10) == pytest.approx(0.1)
    assert ga_step_size(0.1, 2, 10) == pytest.approx(0.09)  # d (1 - 1/10)
    assert ga_step_size(0.1, 10, 10) == pytest.approx(0.01)
    assert ga_step_size(0.1, 12, 10) == 0.0  # past the schedule: floored at 0


def test_adjust_weights_by_hand():
    # G = (0.3, 0.1, 0.2): mean 0.2, centred (0.1, -0.1, 0), max |.| 0.1 -> a += 0.1 * (1, -1, 0)
    a = adjust_weights({"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 0.3, "b": 0.1, "c": 0.2}, 0.1)
    assert a == pytest.approx({"a": 0.6, "b": 0.2, "c": 0.2})


def test_adjust_weights_clips_at_zero_and_renormalises():
    # centred (0.5, -0.5), scale 0.5: a = 0.9 + 0.2, 0.1 - 0.2 -> 1.1, 0 (clipped) -> 1, 0
    a = adjust_weights({"a": 0.9, "b": 0.1}, {"a": 1.0, "b": 0.0}, 0.2)
    assert a == pytest.approx({"a": 1.0, "b": 0.0})
    # three sites, one clipped at 0, the rest renormalised:
    # G = (2, 0, 1): centred (1, -1, 0), scale 1; a = (0.4 + 0.3, 0.1 - 0.3, 0.5) = (0.7, 0, 0.5) / 1.2
    a = adjust_weights({"a": 0.4, "b": 0.1, "c": 0.5}, {"a": 2.0, "b": 0.0, "c": 1.0}, 0.3)
    assert a == pytest.approx({"a": 0.7 / 1.2, "b": 0.0, "c": 0.5 / 1.2})


def test_sites_without_a_gap_keep_their_weight_and_equal_gaps_move_nothing():
    # only a and b report: mean 0.5, centred (0.5, -0.5), scale 0.5 -> a += 0.1, b -= 0.1; c kept
    a = adjust_weights({"a": 0.25, "b": 0.25, "c": 0.5}, {"a": 1.0, "b": 0.0}, 0.1)
    assert a == pytest.approx({"a": 0.35, "b": 0.15, "c": 0.5})
    assert adjust_weights({"a": 1.0, "b": 3.0}, {"a": 0.7, "b": 0.7}, 0.1) == pytest.approx({"a": 0.25, "b": 0.75})
    assert adjust_weights({"a": 1.0, "b": 1.0}, {"a": 5.0}, 0.1) == pytest.approx({"a": 0.5, "b": 0.5})
    assert adjust_weights({"a": 2.0, "b": 2.0}, {}, 0.1) == {"a": 0.5, "b": 0.5}


def test_adjust_weights_refuses_bad_input():
    with pytest.raises(ValueError, match="without a weight"):
        adjust_weights({"a": 1.0}, {"z": 1.0}, 0.1)
    with pytest.raises(ValueError, match="finite"):
        adjust_weights({"a": 1.0, "b": 1.0}, {"a": math.nan, "b": 0.0}, 0.1)
    with pytest.raises(ValueError, match="weights"):
        adjust_weights({"a": 0.0}, {}, 0.1)


def test_site_group_weights_use_site_weights_and_rescue_all_zero_groups():
    out, zero = site_group_weights(
        [0.0, 0.6, 0.0],
        [{"fusion": 10, "encoder/eeg": 5}, {"fusion": 20, "encoder/ct": 0}, {"encoder/eeg": 3, "fusion": 1}],
    )
    assert out == [{"fusion": 0.0, "encoder/eeg": 1.0}, {"fusion": 0.6}, {"encoder/eeg": 1.0, "fusion": 0.0}]
    assert zero == ["encoder/eeg"]


# --- server, through real Flower messages ------------------------------------------------


def _arrays(values: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in values.items()})


def _reply(node: int, value: float, n: int, groups: dict, losses: dict | None) -> Message:
    claim_server_identity(1)
    content = RecordDict(
        {
            "arrays": _arrays({k: [value] for k in KEYS}),
            "metrics": MetricRecord({"num-examples": n, "train_loss": 0.5}),
            "trained": ConfigRecord({"groups": list(groups), "examples": list(groups.values())}),
        }
    )
    if losses is not None:
        content[GA_RECORD] = ConfigRecord(losses)
    request = Message(RecordDict(), dst_node_id=node, message_type="train")
    request.metadata.__dict__["_message_id"] = f"m{node}"
    return Message(content, reply_to=request)


def _strategy(**settings) -> FedDGGA:
    strategy = build_strategy(strategy_config("feddg_ga", {"min_train_sites": 1, **settings}), n_train_sites=3)
    assert isinstance(strategy, FedDGGA)
    strategy.know_sites({i: f"site_{i}" for i in (1, 2, 3)}, {1: 100, 2: 100, 3: 200})
    return strategy


def _round(strategy: FedDGGA, rnd: int, replies: list[Message]) -> dict:
    grid = InProcessGrid(client_app=None, node_configs=[{}] * 3, run_config={})  # type: ignore[arg-type]  # messages only
    list(strategy.configure_train(rnd, _arrays(ZERO), ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(rnd, replies)
    assert arrays is not None
    return {k: float(a[0]) for k, a in record_to_numpy(arrays).items()}


def test_first_round_is_modality_fedavg_then_gaps_move_the_weights():
    strategy = _strategy(step_size=0.1)
    only_head = {"fusion": 10, "head/bone_age": 10}
    # round 1: no local losses yet; initial weights n_k / n = 0.25, 0.25, 0.5
    out = _round(
        strategy,
        1,
        [
            _reply(1, 1.0, 100, ALL, {GLOBAL_LOSS: 1.0}),
            _reply(2, 2.0, 100, only_head, {GLOBAL_LOSS: 1.0}),
            _reply(3, 4.0, 200, only_head, {GLOBAL_LOSS: 1.0}),
        ],
    )
    assert strategy.site_weights == pytest.approx({"site_1": 0.25, "site_2": 0.25, "site_3": 0.5})
    assert out["fusion.w"] == pytest.approx(0.25 * 1 + 0.25 * 2 + 0.5 * 4)
    assert out["encoders.eeg.w"] == pytest.approx(1.0)  # site 1 alone trained it
    # round 2: gaps (0.9 - 0.5, 0.6 - 0.4, 0.5 - 0.5) = (0.4, 0.2, 0): mean 0.2, centred
    # (0.2, 0, -0.2), scale 0.2 -> a = (0.25 + 0.1, 0.25, 0.5 - 0.1) = (0.35, 0.25, 0.4)
    loss = {LOCAL_ROUND: 1}
    out = _round(
        strategy,
        2,
        [
            _reply(1, 1.0, 100, ALL, {GLOBAL_LOSS: 0.9, LOCAL_LOSS: 0.5, **loss}),
            _reply(2, 2.0, 100, only_head, {GLOBAL_LOSS: 0.6, LOCAL_LOSS: 0.4, **loss}),
            _reply(3, 4.0, 200, only_head, {GLOBAL_LOSS: 0.5, LOCAL_LOSS: 0.5, **loss}),
        ],
    )
    assert strategy.site_weights == pytest.approx({"site_1": 0.35, "site_2": 0.25, "site_3": 0.4})
    assert strategy.last_gaps == pytest.approx({"site_1": 0.4, "site_2": 0.2, "site_3": 0.0})
    assert out["fusion.w"] == pytest.approx(0.35 * 1 + 0.25 * 2 + 0.4 * 4)
    assert out["encoders.eeg.w"] == pytest.approx(1.0)
    assert out["encoders.ct.w"] == pytest.approx(1.0)


def test_group_weights_are_renormalised_over_the_groups_trainers_and_state_round_trips():
    strategy = _strategy(step_size=0.1)
    strategy.load_state_dict({"site_weights": {"site_1": 0.2, "site_2": 0.3, "site_3": 0.5}})
    # no gaps this round: weights stay; eeg trained by sites 1 and 2 only -> (0.2 * 1 + 0.3 * 3) / 0.5
    out = _round(
        strategy,
        5,
        [
            _reply(1, 1.0, 100, ALL, {GLOBAL_LOSS: 1.0}),
            _reply(2, 3.0, 100, {"encoder/eeg": 10, "fusion": 10}, {GLOBAL_LOSS: 1.0}),
            _reply(3, 6.0, 200, {"fusion": 10}, {GLOBAL_LOSS: 1.0}),
        ],
    )
    assert out["encoders.eeg.w"] == pytest.approx((0.2 * 1 + 0.3 * 3) / 0.5)
    assert out["fusion.w"] == pytest.approx(0.2 * 1 + 0.3 * 3 + 0.5 * 6)
    assert out["heads.bone_age.w"] == pytest.approx(1.0)
    assert strategy.state_dict() == {"site_weights": pytest.approx({"site_1": 0.2, "site_2": 0.3, "site_3": 0.5})}


def test_a_group_whose_trainers_all_have_weight_zero_is_averaged_equally_and_logged():
    strategy = _strategy()
    strategy.load_state_dict({"site_weights": {"site_1": 0.0, "site_2": 0.0, "site_3": 1.0}})
    out = _round(
        strategy,
        3,
        [
            _reply(1, 1.0, 100, {"encoder/eeg": 10, "fusion": 10}, {GLOBAL_LOSS: 1.0}),
            _reply(2, 3.0, 100, {"encoder/eeg": 10, "fusion": 10}, {GLOBAL_LOSS: 1.0}),
            _reply(3, 6.0, 200, {"fusion": 10}, {GLOBAL_LOSS: 1.0}),
        ],
    )
    assert out["encoders.eeg.w"] == pytest.approx(2.0)
    assert out["fusion.w"] == pytest.approx(6.0)
    assert len(strategy.last_fallbacks) == 1 and "encoder/eeg" in strategy.last_fallbacks[0]


@pytest.mark.parametrize(
    "losses, reason",
    [
        (None, "no 'feddg-ga' record"),
        ({GLOBAL_LOSS: math.nan}, "must be finite"),
        ({GLOBAL_LOSS: 1.0, LOCAL_LOSS: -1.0}, "must be finite and >= 0"),
        ({GLOBAL_LOSS: "high"}, "not a number"),
    ],
)
def test_replies_without_usable_losses_are_refused(losses, reason):
    strategy = _strategy()
    _round(strategy, 1, [_reply(1, 1.0, 100, ALL, losses), _reply(2, 2.0, 100, ALL, {GLOBAL_LOSS: 1.0})])
    assert [r.site for r in strategy.last_rejections] == ["site_1"]
    assert reason in strategy.last_rejections[0].reason


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="step_size"):
        strategy_config("feddg_ga", {"step_size": 0.0})
    with pytest.raises(ConfigError, match="rounds_for_schedule"):
        strategy_config("feddg_ga", {"rounds_for_schedule": -1})
    assert load_config(["strategy=feddg_ga", "strategy.rounds_for_schedule=20"]).strategy.name == "feddg_ga"


# --- site side -----------------------------------------------------------------------------


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([2.0]))


def test_site_reports_the_global_loss_and_its_last_local_loss_and_keeps_the_new_one():
    model = _Model()
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    algorithm = client_algorithm(strategy_config("feddg_ga", {}))

    def site_round(rnd: int) -> SiteRound:
        content = RecordDict({"config": ConfigRecord({"server-round": rnd})})
        # the "loss" is w^2: what the model holds when it is called
        return SiteRound(model, {}, content, context, TrainConfig(), lambda: float(model.w.item() ** 2))  # type: ignore[arg-type]

    first = algorithm.before_train(site_round(1))  # global w = 2: loss 4
    with torch.no_grad():
        model.w.fill_(1.0)  # local training -> w = 1: loss 1
    record = first.after_train(steps=3)[GA_RECORD]
    assert dict(record) == {GLOBAL_LOSS: 4.0}  # no local model yet
    assert dict(context.state.config_records[GA_STATE]) == {LOCAL_LOSS: 1.0, LOCAL_ROUND: 1}
    with torch.no_grad():
        model.w.fill_(1.5)  # round 2's global model: loss 2.25
    second = algorithm.before_train(site_round(2))
    with torch.no_grad():
        model.w.fill_(0.5)
    record = second.after_train(steps=3)[GA_RECORD]
    assert dict(record) == {GLOBAL_LOSS: 2.25, LOCAL_LOSS: 1.0, LOCAL_ROUND: 1}  # gap 1.25 at the server
    assert dict(context.state.config_records[GA_STATE]) == {LOCAL_LOSS: 0.25, LOCAL_ROUND: 2}
    third = algorithm.before_train(site_round(3))
    third.after_train(steps=0)  # trained nothing: the stored local loss stays
    assert dict(context.state.config_records[GA_STATE]) == {LOCAL_LOSS: 0.25, LOCAL_ROUND: 2}


# --- end to end ----------------------------------------------------------------------------
