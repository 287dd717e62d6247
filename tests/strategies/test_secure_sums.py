"""Modality-aware sums under secure aggregation (strategies/secure_sums.py), against numbers by hand."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from federated.core.config import load_config
from federated.core.config.schema import ConfigError
from federated.core.models import group_of
from strategies.aggregation import groupwise_weighted_mean, weighted_mean
from strategies.fedavg import FedAvg, ModalityFedAvg
from strategies.registry import STRATEGIES
from strategies.secure_sums import (
    GROUPED,
    SINGLE,
    WHOLE_MODEL,
    Layout,
    SecureSupport,
    apply_sums,
    declaration_problem,
    lone_contributions,
    quantisation_bound,
    quantization_levels,
    site_vector,
    site_weights,
    sites_capacity,
    sum_problems,
    vector_weights,
    weight_resolution,
    withheld_groups,
    zero_level,
)
from strategies.secure_support import check_secure_strategy, secure_strategies

# Two groups: encoder/ct (3 + 1 entries) and head/bone_age (2 entries), in this key order.
GLOBAL = {
    "encoders.ct.w": np.array([1.0, 2.0, 3.0], np.float32),
    "heads.bone_age.w": np.array([0.0, 0.0], np.float32),
    "encoders.ct.b": np.array([5.0], np.float32),
}


def test_the_layout_groups_keys_in_first_appearance_order_with_a_weight_entry_after_each_group():
    layout = Layout.of(GLOBAL, GROUPED)
    assert [(s.group, s.keys, s.start, s.size) for s in layout.segments] == [
        ("encoder/ct", ("encoders.ct.w", "encoders.ct.b"), 0, 4),
        ("head/bone_age", ("heads.bone_age.w",), 5, 2),
    ]
    assert [s.weight_index for s in layout.segments] == [4, 7]
    assert layout.length == 8
    single = Layout.of(GLOBAL, SINGLE)
    assert [(s.group, s.size, s.weight_index) for s in single.segments] == [(WHOLE_MODEL, 6, 6)]


def test_integer_buffers_stay_out_of_the_vector_and_keep_their_value():
    arrays = {**GLOBAL, "encoders.ct.steps": np.array([7], np.int64)}
    layout = Layout.of(arrays, GROUPED)
    assert "encoders.ct.steps" not in layout.segments[0].keys
    new, _ = apply_sums(layout, arrays, np.ones(layout.length), 0.5)
    assert new["encoders.ct.steps"].tolist() == [7]


def test_a_site_vector_by_hand():
    # ct trained on 30 examples, the head on 10; W = 60: a_ct = 0.5, a_head = 1/6
    trained = {
        "encoders.ct.w": np.array([1.5, 1.0, 3.0], np.float32),  # delta 0.5, -1, 0
        "heads.bone_age.w": np.array([3.0, -0.6], np.float32),  # delta 3 (clipped to 2), -0.6
        "encoders.ct.b": np.array([5.25], np.float32),  # delta 0.25
    }
    layout = Layout.of(GLOBAL, GROUPED)
    vector, clipped, declared = site_vector(layout, GLOBAL, trained, {"encoder/ct": 30, "head/bone_age": 10}, 60.0, 2.0)
    # ct: 0.5 x (0.5, -1, 0, 0.25), weight 0.5; head: 1/6 x (2, -0.6), weight 1/6
    np.testing.assert_allclose(vector, [0.25, -0.5, 0.0, 0.125, 0.5, 2 / 6, -0.1, 1 / 6], rtol=1e-6)
    assert clipped == 1
    assert declared == pytest.approx({"encoder/ct": 0.5, "head/bone_age": 1 / 6})  # what it declares in the clear


def test_a_group_the_site_did_not_train_is_all_zeros_and_weights_cap_at_one():
    trained = {k: v + 1 for k, v in GLOBAL.items()}
    layout = Layout.of(GLOBAL, GROUPED)
    vector = site_vector(layout, GLOBAL, trained, {"encoder/ct": 500}, 60.0, 2.0).vector
    np.testing.assert_array_equal(vector, [1, 1, 1, 1, 1, 0, 0, 0])  # a_ct = min(1, 500/60)


def test_site_level_dp_clips_the_whole_difference_to_its_norm_first():
    trained = {"encoders.ct.w": np.array([4.0, 2.0, 3.0]), "heads.bone_age.w": np.array([0.0, 4.0])}
    base = {"encoders.ct.w": np.array([1.0, 2.0, 3.0]), "heads.bone_age.w": np.array([0.0, 0.0])}
    layout = Layout.of(base, SINGLE)  # delta (3, 0, 0, 0, 4): norm 5, scaled to norm 1
    vector = site_vector(layout, base, trained, {WHOLE_MODEL: 1.0}, 1.0, 1.0, clip_norm=1.0).vector
    np.testing.assert_allclose(vector, [0.6, 0, 0, 0, 0.8, 1.0])


def test_sums_equal_the_groupwise_weighted_mean_of_the_strategies():
    rng = np.random.default_rng(0)
    sites = [{k: v + rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in GLOBAL.items()} for _ in range(3)]
    examples = [{"encoder/ct": 30.0, "head/bone_age": 10.0}, {"encoder/ct": 50.0}, {"head/bone_age": 20.0}]
    layout = Layout.of(GLOBAL, GROUPED)
    vectors = [site_vector(layout, GLOBAL, s, w, 60.0, 1.0)[0] for s, w in zip(sites, examples, strict=True)]
    new, totals = apply_sums(layout, GLOBAL, np.sum(vectors, axis=0), 0.5 / 60)
    expected = groupwise_weighted_mean(GLOBAL, sites, examples, group_of)
    for k in GLOBAL:
        np.testing.assert_allclose(new[k], expected[k], atol=1e-6)
        assert new[k].dtype == GLOBAL[k].dtype
    assert totals == pytest.approx({"encoder/ct": 80 / 60, "head/bone_age": 30 / 60})


def test_the_single_layout_is_fedavg_weighted_by_examples():
    sites = [{k: v + i for k, v in GLOBAL.items()} for i in (1.0, 0.5)]
    layout = Layout.of(GLOBAL, SINGLE)
    vectors = [
        site_vector(layout, GLOBAL, s, {WHOLE_MODEL: n}, 100.0, 1.0)[0] for s, n in zip(sites, (30, 10), strict=True)
    ]
    new, _ = apply_sums(layout, GLOBAL, np.sum(vectors, axis=0), 0.5 / 100)
    expected = weighted_mean(sites, [30.0, 10.0])
    for k in GLOBAL:
        np.testing.assert_allclose(new[k], expected[k], atol=1e-6)  # every entry moved by 0.875


def test_a_group_nobody_trained_keeps_its_value():
    layout = Layout.of(GLOBAL, GROUPED)
    summed = np.array([1, 1, 1, 1, 2.0, 1e-7, 1e-7, 1e-7])  # only quantisation noise for the head
    new, _ = apply_sums(layout, GLOBAL, summed, 0.5 / 60)
    np.testing.assert_array_equal(new["heads.bone_age.w"], GLOBAL["heads.bone_age.w"])
    np.testing.assert_allclose(new["encoders.ct.w"], [1.5, 2.5, 3.5])


def test_site_weights_by_layout_and_weighting():
    assert site_weights({"a": 10, "b": 0}, 12, GROUPED, uniform=False) == {"a": 10.0}
    assert site_weights({"a": 10, "b": 0}, 12, GROUPED, uniform=True) == {"a": 1.0}
    assert site_weights({"a": 10}, 12, SINGLE, uniform=False) == {WHOLE_MODEL: 12.0}
    assert site_weights({}, 0, SINGLE, uniform=True) == {}  # trained nothing: weighs nothing


def test_overflow_and_quantisation_bounds():
    assert sites_capacity(1023, 2**22, 2**32) is None
    assert "1024 sites" in sites_capacity(1024, 2**22, 2**32)
    assert quantisation_bound(3, 1.0, 2**22) == pytest.approx(3 * 2 / 2**22)


@pytest.mark.parametrize(
    ("sites", "configured", "levels"),
    [
        (3, 0, 2**30),
        (5, 0, 2**29),
        (8, 0, 2**28),
        (9, 0, 2**28),
        (1023, 0, 2**22),
        (1024, 0, 2**21),
        (50, 2**22, 2**22),
    ],
)
def test_quantisation_levels_are_the_finest_the_field_holds_unless_set(sites, configured, levels):
    assert quantization_levels(sites, configured, 2**32) == levels
    assert sites_capacity(sites, levels, 2**32) is None


def test_a_weight_cap_too_fine_for_the_levels_is_refused_with_what_to_raise():
    assert weight_resolution(8, 1.0, 2**28, 1e6) is None  # 8 x 2/2**28 = 6e-8 < 0.25e-6
    assert "raise secure_aggregation.quantization_range" in weight_resolution(8, 1.0, 2**22, 1e6)


def test_groups_too_few_sites_hold_are_withheld_and_lone_contributions_named():
    holders = [frozenset({"encoder/ct", "fusion"}), frozenset({"encoder/mri", "fusion"}), None]
    # ct: site 0 and the site that declared nothing (counted for every group); mri likewise; eeg: only that one
    assert withheld_groups(["encoder/ct", "encoder/mri", "encoder/eeg", "fusion"], holders, 2) == ["encoder/eeg"]
    assert withheld_groups(["fusion"], holders, 4) == ["fusion"]
    sent = {"site_a": ["encoder/ct", "fusion"], "site_b": ["fusion"], "site_c": ["fusion", "head/x"]}
    assert lone_contributions(sent, 2) == {"encoder/ct": ["site_a"], "head/x": ["site_c"]}
    assert lone_contributions(sent, 4) == {
        "encoder/ct": ["site_a"],
        "fusion": ["site_a", "site_b", "site_c"],
        "head/x": ["site_c"],
    }


def test_a_withheld_group_gets_no_weight_from_a_site():
    assert site_weights({"a": 10, "b": 5}, 12, GROUPED, False, frozenset({"b"})) == {"a": 10.0}
    assert site_weights({}, 12, SINGLE, False, frozenset({WHOLE_MODEL})) == {}


def test_strategies_say_which_sums_they_need():
    assert (FedAvg.SECURE.layout, ModalityFedAvg.SECURE.layout) == (SINGLE, GROUPED)
    # what each class declares, collected from the registry: the strategies that ran under SecAgg+ before
    assert secure_strategies() == sorted(
        ["fedavg", "modality_fedavg", "fedprox", "fedbn", "fedper", "fedadam", "fedyogi", "fedadagrad"]
    )
    for name in STRATEGIES.names():  # every other one says why not
        support = STRATEGIES.get(name).server.SECURE
        assert support.layout is not None or support.why_not, name


def test_a_declaration_must_name_a_layout_or_say_why_not():
    with pytest.raises(ValueError, match="must say why"):
        SecureSupport(None)
    with pytest.raises(ValueError, match="unknown secure-sum layout 'rows'"):
        SecureSupport.sums("rows")


def test_the_refusal_lists_what_the_registry_declares(monkeypatch):
    """No list of names is kept beside the strategies: a newly registered strategy that declares
    masked sums appears in the refusal of one that does not, with that one's own reason."""

    class Probe(ModalityFedAvg):
        SECURE = SecureSupport.sums(GROUPED)

    monkeypatch.setitem(STRATEGIES._items, "secure_probe", dataclasses.replace(STRATEGIES.get("fedavg"), server=Probe))
    with pytest.raises(ConfigError) as e:
        check_secure_strategy(load_config(["strategy=median", "secure_aggregation=secaggplus"]))
    assert "takes a coordinate-wise median" in str(e.value)
    assert f"(it works with {', '.join(secure_strategies())})" in str(e.value) and "secure_probe" in str(e.value)
    check_secure_strategy(load_config(["strategy=fedprox", "secure_aggregation=secaggplus"]))  # works: no error


@pytest.mark.parametrize(
    ("strategy", "reason"),
    [
        ("median", "coordinate-wise median"),
        ("krum", "distance to the others"),
        ("trimmed_mean", "trims"),
        ("scaffold", "control-variate"),
        ("fedsr", "representation statistics"),
        ("groupdro", "not been tested on masked sums"),
    ],
)
def test_strategies_that_need_individual_updates_are_refused_with_the_reason(strategy, reason):
    overrides = [f"strategy={strategy}", "secure_aggregation=secaggplus"]
    if strategy == "scaffold":
        overrides += ["train.optimizer=sgd", "train.momentum=0"]
    cfg = load_config(overrides)
    with pytest.raises(ConfigError, match=re.escape(reason)) as e:
        check_secure_strategy(cfg)
    assert f"strategy={strategy}" in str(e.value)


def test_a_clip_below_one_is_refused_because_weights_travel_in_it():
    cfg = load_config(["secure_aggregation=secaggplus", "secure_aggregation.clipping_range=0.5"])
    with pytest.raises(ConfigError, match="clipping_range must be >= 1"):
        check_secure_strategy(cfg)


def test_a_clip_for_which_zero_does_not_quantise_exactly_is_refused():
    """c = 1.9: c x (T / 2c) is not T / 2 in floating point, so honest zeros would not sum to an exact level."""
    assert zero_level(1.0, 2**28) == 2**27 and zero_level(1.5, 2**22) == 2**21 and zero_level(8.0, 2**29) == 2**28
    assert zero_level(1.9, 2**28) is None and zero_level(1.0, 1001) is None
    cfg = load_config(["secure_aggregation=secaggplus", "secure_aggregation.clipping_range=1.9"])
    with pytest.raises(ConfigError, match="a zero entry must quantise to an exact level"):
        check_secure_strategy(cfg)


def test_the_declared_weights_are_the_vectors_weight_entries():
    layout = Layout.of(GLOBAL, GROUPED)
    weights = {"encoder/ct": 30.0, "head/bone_age": 0.0, "fusion": 5.0}  # fusion: not a group of this model
    assert vector_weights(layout, weights, 60.0) == {"encoder/ct": 0.5}
    vector, _, declared = site_vector(layout, GLOBAL, GLOBAL, weights, 60.0, 1.0)
    assert vector[[s.weight_index for s in layout.segments]].tolist() == [0.5, 0.0]
    assert declared == {"encoder/ct": 0.5}  # the site declares what its vector holds, from the same computation


@pytest.mark.parametrize(
    ("declared", "why"),
    [
        ({"encoder/ct": 0.5}, None),
        ({"encoder/ct": -1.0}, "declares weight -1.0 for group encoder/ct, outside (0, 0.5]"),
        ({"encoder/ct": 0.6}, "outside (0, 0.5]"),  # above what its handshake's examples allow
        ({"encoder/ct": float("nan")}, "declares weight nan"),
        ({"head/bone_age": 0.1}, "group head/bone_age, which it did not declare at the handshake"),
        ({"encoder/mri": 0.1}, "'encoder/mri', which is not a parameter group of the model"),
    ],
)
def test_a_declaration_is_checked_against_the_handshake(declared, why):
    groups = frozenset({"encoder/ct", "head/bone_age"})
    problem = declaration_problem(declared, groups, 0.5, frozenset({"encoder/ct"}), frozenset())
    assert problem == why if why is None else why in problem


def test_a_withheld_group_cannot_be_declared():
    problem = declaration_problem({"encoder/ct": 0.2}, frozenset({"encoder/ct"}), 1.0, None, frozenset({"encoder/ct"}))
    assert problem == "declares a weight for group encoder/ct, which this round withholds"


def _quantised(summed: np.ndarray, n: int, clip: float, levels: int) -> np.ndarray:
    """The integer sum an exact float sum would have (as the server's unmask stage holds it)."""
    return np.round((summed + n * clip) * levels / (2 * clip)).astype(np.int64)


def test_the_sum_checks_by_hand():
    """Two sites, c = 1: ct declared 0.5 + 0.25, the head by nobody. An honest sum passes; each
    dishonest change fails the check named, and only that group."""
    layout = Layout.of(GLOBAL, GROUPED)
    n, clip, levels = 2, 1.0, 2**20
    honest = np.array([0.25, -0.5, 0.125, 0.0, 0.75, 0.0, 0.0, 0.0])
    declared = {"encoder/ct": 0.75}

    def problems(summed, norm_bound=None):
        q = _quantised(summed, n, clip, levels)
        return sum_problems(layout, summed, q, declared, n, clip, levels, norm_bound, frozenset({"head/bone_age"}))

    assert problems(honest) == []
    assert problems(honest, norm_bound=1.0) == []  # ||(0.25, -0.5, 0.125, 0)|| = 0.573 <= 1 x 0.75
    moved = honest.copy()
    moved[5] = 2**-19  # one step (2c / T) in a group no site declared
    assert problems(moved) == [
        "group head/bone_age (withheld this round): no site declared a weight for it, yet 1 of its 3 entries do "
        "not sum to zero"
    ]
    lighter = honest.copy()
    lighter[4] = -0.25  # one site's weight entry -0.5 in place of 0.5
    assert problems(lighter) == [
        "group encoder/ct: total weight -0.25 where the sites declared 0.75 (quantisation allows +-3.8e-06)"
    ]
    beyond = honest.copy()
    beyond[0] = 0.9  # more than c x 0.75 from sites whose weights sum to 0.75
    assert problems(beyond) == [
        "group encoder/ct: an entry of its weighted sum is 0.9, above c x the declared weight = 0.75 "
        "(secure_aggregation.clipping_range=1)"
    ]
    assert problems(honest, norm_bound=0.5) == [
        "group encoder/ct: the L2 norm of its weighted sum is 0.572822, above the norm bound 0.5 x the declared "
        "weight = 0.375"
    ]


def test_the_sum_checks_refuse_a_clip_for_which_zero_is_not_exact():
    """No inexact fallback: check_secure_strategy refuses such a configuration before any run."""
    layout = Layout.of(GLOBAL, GROUPED)
    summed = np.zeros(layout.length)
    with pytest.raises(ValueError, match="0 does not quantise to an exact level"):
        sum_problems(layout, summed, np.zeros(layout.length, np.int64), {}, 2, 1.9, 2**28)


def test_an_honest_quantised_sum_passes_the_checks_within_the_bound():
    """Flower's own quantisation of three honest vectors: the withheld group's zeros sum exactly."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    layout = Layout.of(GLOBAL, GROUPED)
    rng = np.random.default_rng(3)
    clip, levels = 1.0, 2**20
    sites = [{k: v + rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in GLOBAL.items()} for _ in range(3)]
    vectors = [site_vector(layout, GLOBAL, s, {"encoder/ct": 20.0 + i}, 60.0, clip)[0] for i, s in enumerate(sites)]
    quantised = np.sum([quantize([v], clip, levels)[0].astype(np.int64) for v in vectors], axis=0)
    summed = dequantize([quantised], clip, levels)[0] - 2 * clip
    declared = {
        "encoder/ct": sum(vector_weights(layout, {"encoder/ct": 20.0 + i}, 60.0)["encoder/ct"] for i in range(3))
    }
    assert sum_problems(layout, summed, quantised, declared, 3, clip, levels, 10.0, frozenset({"head/bone_age"})) == []
    head = layout.segments[1]
    assert (quantised[head.start : head.weight_index + 1] == 3 * zero_level(clip, levels)).all()
