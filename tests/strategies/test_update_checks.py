"""Updates checked against what the server knows (issue 14 item 2): declared groups, the handshake's
declared size, the update-norm bound, and robust rules over too few trainers; numbers by hand."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from clients.attacks import HUGE, fill_groups, foreign_encoder, shift_group
from federated.core.arrays import record_to_numpy
from federated.core.config import ConfigError
from federated.core.config.schema import StrategyConfig
from federated.core.config.strategy_section import strategy_config
from federated.core.models import group_of
from federated.core.multimed import MULTIMED
from federated.engines.inprocess import InProcessGrid, claim_server_identity
from strategies import build_strategy
from strategies.robust import TooFewTrainers
from strategies.validation import (
    declared_groups,
    norm_outliers,
    norm_ratios,
    over_declared,
    undeclared_claims,
    undeclared_moves,
    update_norm,
)

KEYS = ("encoders.eeg.w", "encoders.ct.w", "fusion.w", "heads.bone_age.w")
ZERO = {k: [0.0] for k in KEYS}
CT_SITE = (["ct"], ["bone_age"])  # declares encoder/ct, head/bone_age (and fusion), not encoder/eeg
CT_GROUPS = {"encoder/ct": 10, "fusion": 10, "head/bone_age": 10}


def _arrays(values: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in values.items()})


def _reply(node: int, values: dict, n: int, groups: dict | None = None) -> Message:
    claim_server_identity(1)
    content = RecordDict({"arrays": _arrays(values), "metrics": MetricRecord({"num-examples": n, "train_loss": 0.5})})
    if groups is not None:
        content["trained"] = ConfigRecord({"groups": list(groups), "examples": list(groups.values())})
    request = Message(RecordDict(), dst_node_id=node, message_type="train")
    request.metadata.__dict__["_message_id"] = f"m{node}"
    return Message(content, reply_to=request)


def _start(name: str, n_sites: int = 3, declared: dict | None = None, data: dict | None = None, **cfg):
    strategy = build_strategy(strategy_config(name, {"min_train_sites": 1, **cfg}), n_train_sites=n_sites)
    nodes = range(1, n_sites + 1)
    strategy.know_sites(
        {i: f"site_{i}" for i in nodes},
        declared or dict.fromkeys(nodes, 100),
        data if data is not None else dict.fromkeys(nodes, CT_SITE),
    )
    grid = InProcessGrid(client_app=None, node_configs=[{}] * n_sites, run_config={})  # type: ignore[arg-type]  # no ClientApp: only messages are built
    list(strategy.configure_train(1, _arrays(ZERO), ConfigRecord(), grid))
    return strategy


def _out(arrays: ArrayRecord) -> dict:
    return {k: a.tolist() for k, a in record_to_numpy(arrays).items()}


def _same(v: float) -> dict:
    """An honest CT site's update: every group it declared moved to v, encoder/eeg untouched."""
    return {k: [0.0 if k == "encoders.eeg.w" else v] for k in KEYS}


# --- the pure checks ----------------------------------------------------------------------------


def test_declared_groups_are_the_encoders_heads_and_fusion():
    assert declared_groups(["ct", "mri"], ["bone_age"]) == {"fusion", "encoder/ct", "encoder/mri", "head/bone_age"}


def test_an_undeclared_claim_names_the_group_and_what_was_declared():
    allowed = declared_groups(*CT_SITE)
    assert undeclared_claims(["fusion", "encoder/ct"], allowed) is None
    assert undeclared_claims(["encoder/eeg", "fusion"], allowed) == (
        "claims to have trained undeclared group(s) 'encoder/eeg' (declared: encoder/ct, fusion, head/bone_age)"
    )


def test_an_undeclared_move_names_the_group_and_the_largest_change():
    ref = {k: np.zeros(2, dtype=np.float32) for k in KEYS}
    update = dict(ref, **{"encoders.eeg.w": np.array([0.5, -1307.75], dtype=np.float32)})
    allowed = declared_groups(*CT_SITE)
    assert undeclared_moves(ref, ref, allowed, group_of) is None
    moved_declared = dict(ref, **{"encoders.ct.w": np.array([9.0, 9.0], dtype=np.float32)})
    assert undeclared_moves(moved_declared, ref, allowed, group_of) is None
    assert undeclared_moves(update, ref, allowed, group_of) == (
        "moved undeclared group(s) 'encoder/eeg' (largest change 1307.75 in 'encoder/eeg'; "
        "declared: encoder/ct, fusion, head/bone_age)"
    )


def test_update_norm_is_the_l2_of_the_difference_in_float64():
    ref = {"a": np.array([1.0, 1.0], dtype=np.float32), "b": np.array([0.0], dtype=np.float32), "i": np.array([7])}
    assert update_norm({"a": np.array([4.0, 5.0], dtype=np.float32), "b": np.array([12.0]), "i": ref["i"]}, ref) == (
        pytest.approx(13.0)  # sqrt(3^2 + 4^2 + 12^2)
    )
    huge = {"a": np.full(2, HUGE, dtype=np.float32), "b": np.zeros(1, dtype=np.float32), "i": ref["i"]}
    norm = update_norm(huge, ref)  # a float32 difference would overflow; float64 keeps it finite
    assert math.isfinite(norm) and norm == pytest.approx(math.sqrt(2) * float(np.float32(HUGE)), rel=1e-6)


def test_norm_outliers_absolute_and_relative_to_the_round_median():
    norms = {0: 1.0, 1: 2.0, 2: 3.0, 3: 100.0}
    ratios = norm_ratios(norms, dict.fromkeys(norms, 4.0))  # equal examples: the plain median, 2.5
    assert norm_outliers(norms, ratios, 50.0, 0.0) == {3: "update norm 100 > strategy.max_update_norm=50"}
    assert norm_outliers(norms, ratios, 0.0, 10.0) == {
        3: "update norm 100 is 40 x the round's median update norm per sqrt(training example), above "
        "strategy.max_update_norm_ratio=10"
    }
    assert norm_outliers(norms, ratios, 0.0, 0.0) == {}
    two = {0: 1.0, 1: 100.0}
    assert norm_outliers(two, norm_ratios(two, {0: 1, 1: 1}), 0.0, 10.0) == {}  # two norms: no median to trust
    assert norm_outliers({0: math.inf}, {0: None}, 1e4, 0.0) == {0: "update norm inf > strategy.max_update_norm=10000"}


def test_norm_ratios_are_per_sqrt_example_to_the_round_median_and_need_three_updates():
    assert norm_ratios({0: 1.0, 1: 2.0, 2: 3.0, 3: 100.0}, {0: 1, 1: 1, 2: 1, 3: 1}) == {
        0: 0.4,
        1: 0.8,
        2: 1.2,
        3: 40.0,
    }
    assert norm_ratios({0: 1.0, 1: 100.0}, {0: 1, 1: 1}) == {0: None, 1: None}
    zeros = norm_ratios({0: 0.0, 1: 0.0, 2: 5.0}, {0: 9, 1: 9, 2: 9})
    assert zeros == {0: 0.0, 1: 0.0, 2: math.inf}  # median 0: any move is out
    # a site with 16x the examples moves 4x as far (sqrt): the same per sqrt(example), ratio 1
    assert norm_ratios({0: 1.0, 1: 1.0, 2: 4.0}, {0: 10, 1: 10, 2: 160}) == {0: 1.0, 1: 1.0, 2: 1.0}
    assert norm_ratios({0: 1.0, 1: 1.0, 2: 4.0}, {0: 10, 1: 10, 2: 10})[2] == 4.0


def test_over_declared_bounds_a_site_by_its_share_of_all_declared_examples():
    assert over_declared({1: 100, 2: 100, 3: 200}, 0.5) == {}  # 200 / 400 = 50%: at the bound, kept
    assert over_declared({1: 100, 2: 100, 3: 201}, 0.5) == {
        3: "declared 201 training examples at the handshake, 50.1% of the 401 declared by all 3 training sites, "
        "above strategy.max_site_weight_share=0.5"
    }
    assert list(over_declared({1: 100, 2: 100, 3: 100, 4: 10**9}, 0.5)) == [4]
    assert over_declared({1: 100, 2: 10**9}, 0.5) == {}  # two sites: one may hold most of the data
    assert over_declared({1: 100, 2: 100, 3: 10**9}, 1.0) == {}  # share 1: no bound
    assert over_declared({1: 0, 2: 0, 3: 100, 4: 100}, 0.5) == {}  # held-out style zeros do not count
    # the default is generous: one site with 960 of 1397 examples (68.7%, quantity skew) is a clean run
    assert over_declared({1: 960, 2: 200, 3: 237}, StrategyConfig().max_site_weight_share) == {}


# --- inside a strategy ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fedavg", "modality_fedavg"])
def test_a_site_moving_an_undeclared_group_is_rejected_and_the_rest_averaged(name):
    strategy = _start(name)
    forged = dict(_same(4.0), **{"encoders.eeg.w": [1307.8]})
    arrays, _ = strategy.aggregate_train(
        1,
        [
            _reply(1, _same(1.0), 10, CT_GROUPS),
            _reply(2, _same(3.0), 30, dict.fromkeys(CT_GROUPS, 30)),
            _reply(3, forged, 10),
        ],
    )
    assert [(r.site, r.reason) for r in strategy.last_rejections] == [
        (
            "site_3",
            "moved undeclared group(s) 'encoder/eeg' (largest change 1307.8 in 'encoder/eeg'; "
            "declared: encoder/ct, fusion, head/bone_age)",
        )
    ]
    # (1 x 10 + 3 x 30) / 40 = 2.5 for the declared groups; encoder/eeg untouched
    assert _out(arrays) == {
        "encoders.eeg.w": [0.0],
        "encoders.ct.w": [2.5],
        "fusion.w": [2.5],
        "heads.bone_age.w": [2.5],
    }


def test_a_site_claiming_an_undeclared_group_is_rejected():
    strategy = _start("modality_fedavg")
    claim = {**CT_GROUPS, "encoder/eeg": 10}
    arrays, _ = strategy.aggregate_train(1, [_reply(1, _same(1.0), 10, CT_GROUPS), _reply(2, _same(5.0), 10, claim)])
    assert [r.site for r in strategy.last_rejections] == ["site_2"]
    assert strategy.last_rejections[0].reason.startswith("claims to have trained undeclared group(s) 'encoder/eeg'")
    assert _out(arrays)["fusion.w"] == [1.0]


def test_a_reply_without_trained_record_counts_only_its_declared_groups():
    strategy = _start("modality_fedavg")
    arrays, _ = strategy.aggregate_train(1, [_reply(1, _same(2.0), 10), _reply(2, _same(4.0), 30)])
    assert strategy.last_rejections == []
    assert _out(arrays) == {
        "encoders.eeg.w": [0.0],
        "encoders.ct.w": [3.5],
        "fusion.w": [3.5],
        "heads.bone_age.w": [3.5],
    }


@pytest.mark.parametrize("name", ["fedavg", "modality_fedavg", "median", "trimmed_mean", "krum"])
def test_huge_finite_values_are_refused_by_the_norm_bound(name):
    strategy = _start(name, n_sites=6)  # 5 honest trainers per group: enough for every robust rule
    honest = [_reply(i, _same(1.0 + 0.1 * i), 10, CT_GROUPS) for i in range(1, 6)]
    arrays, _ = strategy.aggregate_train(1, [*honest, _reply(6, _same(HUGE), 10, CT_GROUPS)])
    [rejection] = strategy.last_rejections
    # sqrt(3) x 3e38 in float32, over the three declared keys
    expected = math.sqrt(3) * float(np.float32(HUGE))
    assert rejection.site == "site_6" and rejection.reason == (
        f"update norm {expected:.6g} > strategy.max_update_norm=10000"
    )
    assert all(np.isfinite(v).all() and abs(v[0]) < 2 for v in _out(arrays).values())


def test_the_relative_bound_is_per_sqrt_example_and_plain_once_updates_are_clipped():
    """A site with 100x the examples moves 10x as far: kept (its ratio per sqrt(example) is 1),
    as the plain ratio (10 > 4) would not; under privacy=dp_fedavg every update is clipped to one
    norm first, so a small site's clipped update is compared plain (per sqrt(example) it would be
    10 > 4) and kept."""
    declared = {1: 100, 2: 100, 3: 100, 4: 10_000}
    strategy = _start("fedavg", n_sites=4, declared=declared, max_site_weight_share=1.0)
    replies = [_reply(i, _same(1.0), 100, CT_GROUPS) for i in (1, 2, 3)]
    strategy.aggregate_train(1, [*replies, _reply(4, _same(10.0), 10_000, CT_GROUPS)])
    assert strategy.last_rejections == []
    assert strategy.last_update_norms["site_4"][1] == pytest.approx(1.0)
    # 10x the norm at the same examples: refused, its ratio named
    strategy.aggregate_train(2, [*replies, _reply(4, _same(10.0), 100, CT_GROUPS)])
    assert [r.site for r in strategy.last_rejections] == ["site_4"]
    assert "is 10 x the round's median update norm per sqrt(training example)" in strategy.last_rejections[0].reason

    from federated.core.config import load_config
    from strategies.site_dp import build_private_strategy

    private = build_private_strategy(load_config(["privacy=dp_fedavg", "strategy=fedavg"]), 4)
    assert private.strategy.clipped_updates and not build_strategy(StrategyConfig(), 4).clipped_updates
    large = {1: 100, 2: 10_000, 3: 10_000, 4: 10_000}
    clipped = _start("fedavg", n_sites=4, declared=large, max_site_weight_share=1.0)
    clipped.clipped_updates = True
    same_norm = [_reply(i, _same(1.0), n, CT_GROUPS) for i, n in large.items()]
    clipped.aggregate_train(1, same_norm)
    assert clipped.last_rejections == [] and clipped.last_update_norms["site_1"][1] == pytest.approx(1.0)
    clipped.clipped_updates = False  # the same round per sqrt(example): the small site is 10x
    clipped.aggregate_train(2, same_norm)
    assert [r.site for r in clipped.last_rejections] == ["site_1"]


def test_an_inflated_handshake_has_every_update_refused_with_its_reason():
    strategy = _start("fedavg", n_sites=4, declared={1: 100, 2: 100, 3: 100, 4: 10**9})
    for rnd in (1, 2):
        replies = [_reply(i, _same(float(i)), 64, CT_GROUPS) for i in (1, 2, 3)]
        arrays, _ = strategy.aggregate_train(rnd, [*replies, _reply(4, _same(100.0), 6.4e8, CT_GROUPS)])
        assert [(r.site, r.reason) for r in strategy.last_rejections] == [
            (
                "site_4",
                "declared 1000000000 training examples at the handshake, 100.0% of the 1000000300 declared by all 4 "
                "training sites, above strategy.max_site_weight_share=0.9",
            )
        ]
        assert _out(arrays)["fusion.w"] == [2.0]  # (1 + 2 + 3) / 3


def test_the_new_common_settings_are_checked_by_name():
    for key, value, why in [
        ("max_update_norm", math.inf, "must be finite and >= 0"),
        ("max_update_norm", math.nan, "must be finite and >= 0"),
        ("max_update_norm", -1.0, "must be finite and >= 0"),
        ("max_update_norm_ratio", 0.5, "must be 0 (off) or finite and >= 1"),
        ("max_site_weight_share", 0.0, "must be in (0, 1]"),
        ("max_site_weight_share", math.nan, "must be in (0, 1]"),
        ("max_examples_factor", math.inf, "must be finite and >= 1"),
    ]:
        with pytest.raises(ConfigError, match=rf"^strategy.{key}={value}: {re.escape(why)}"):
            StrategyConfig(**{key: value})


# --- robust rules over too few trainers ---------------------------------------------------------


def _five_and_two(name: str, **settings):
    """5 sites train fusion (values 1..4 and a wild 50); 2 of them also train encoder/ct (1 and 3).
    The relative norm bound is off: the robust rule itself meets the wild site."""
    data = {i: (["ct"] if i <= 2 else [], ["bone_age"]) for i in range(1, 6)}
    strategy = _start(name, n_sites=5, data=data, max_update_norm_ratio=0.0, **settings)
    replies = []
    for i, v in enumerate([1.0, 2.0, 3.0, 4.0, 50.0], start=1):
        values = {"encoders.eeg.w": [0.0], "encoders.ct.w": [1.0 if i == 1 else 3.0 if i == 2 else 0.0]}
        values |= {"fusion.w": [v], "heads.bone_age.w": [v]}
        groups = {"fusion": 10, "head/bone_age": 10} | ({"encoder/ct": 10} if i <= 2 else {})
        replies.append(_reply(i, values, 10, groups))
    arrays, _ = strategy.aggregate_train(1, replies)
    return strategy, _out(arrays)


@pytest.mark.parametrize(
    "name, settings, fusion, need",
    [
        ("median", {}, 3.0, "the median (of 2 it is their mean) needs at least 3"),
        ("trimmed_mean", {"trim_fraction": 0.2}, 3.0, "trim_fraction=0.2 (to trim one per side) needs at least 5"),
        ("krum", {"n_byzantine": 1}, 2.0, "Krum with n_byzantine=1 (2f + 3) needs at least 5"),
    ],
)
def test_a_group_with_too_few_trainers_is_refused_averaged_or_fails_by_setting(name, settings, fusion, need):
    strategy, out = _five_and_two(name, **settings)
    assert out["encoders.ct.w"] == [0.0]  # refused: the group keeps its value, never the mean of 1 and 3
    # median of 1, 2, 3, 4, 50 = 3; trimmed mean of (2, 3, 4) = 3; Krum: updates 2 and 3 both score
    # 1 + 1 over their 2 nearest, the tie goes to the first
    assert out["fusion.w"] == [fusion]
    [note] = strategy.last_fallbacks
    assert note.startswith("round 1: group 'encoder/ct' has 2 trainer(s), ") and need in note
    assert note.endswith("left unchanged")

    strategy, out = _five_and_two(name, too_few_trainers="mean", **settings)
    assert out["encoders.ct.w"] == [2.0] and strategy.last_fallbacks[0].endswith("(too_few_trainers=mean)")

    with pytest.raises(TooFewTrainers, match=r"round 1: group 'encoder/ct' has 2 trainer\(s\), .*fail\)$"):
        _five_and_two(name, too_few_trainers="fail", **settings)


def test_trimmed_mean_with_four_trainers_at_a_fifth_trims_nothing_so_it_is_refused():
    strategy = _start("trimmed_mean", n_sites=4, trim_fraction=0.2)
    arrays, _ = strategy.aggregate_train(
        1, [_reply(i, _same(v), 10, CT_GROUPS) for i, v in enumerate([1, 2, 3, 99], 1)]
    )
    assert _out(arrays)["fusion.w"] == [0.0]
    assert len(strategy.last_fallbacks) == 3  # encoder/ct, fusion, head/bone_age: 4 < 5


def test_krum_refuses_more_byzantine_sites_than_the_training_sites_allow():
    with pytest.raises(ConfigError, match=r"^strategy.n_byzantine=2: Krum needs at least 2f \+ 3 = 7 training sites, "):
        build_strategy(strategy_config("krum", {"n_byzantine": 2}), n_train_sites=6)


def test_too_few_trainers_setting_is_checked_by_name():
    with pytest.raises(ConfigError, match=r"^strategy.too_few_trainers=average: must be one of: refuse, mean, fail$"):
        strategy_config("median", {"too_few_trainers": "average"})


# --- the attacks' helpers --------------------------------------------------------------------------


def test_attack_helpers_touch_only_the_named_groups():
    update = {k: np.ones(2, dtype=np.float32) for k in KEYS}
    huge = fill_groups(update, {"fusion"}, HUGE)
    assert huge["fusion.w"].tolist() == [float(np.float32(HUGE))] * 2 and huge["encoders.ct.w"].tolist() == [1.0, 1.0]
    moved = shift_group(update, "encoder/eeg", 1000.0)
    assert moved["encoders.eeg.w"].tolist() == [1001.0, 1001.0] and moved["fusion.w"].tolist() == [1.0, 1.0]
    foreign = foreign_encoder(["ct", "mri", "xray", "oct"], MULTIMED.modality_names)
    assert foreign not in {"encoder/ct", "encoder/mri", "encoder/xray", "encoder/oct"}
    assert foreign == "encoder/pathology"  # the first the site lacks, in the model's (schema) order
    assert foreign_encoder(["vitals"], ["vitals", "notes", "ecg"]) == "encoder/notes"
