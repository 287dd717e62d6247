"""FedSR: L2R and CMI by hand, the fusion hook, the site objective, the server's pooled r(z|y)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from clients.site_data import SiteData
from clients.trainer import task_loss, train_local
from federated.core.arrays import pack_arrays, record_to_numpy
from federated.core.config import ConfigError, load_config
from federated.core.config.schema import ModelConfig, TrainConfig
from federated.core.config.strategy_section import strategy_config
from federated.core.models import build_model
from federated.core.targets import CLASS_TARGETS
from federated.data.format import Corpus
from federated.engines.inprocess import InProcessGrid, claim_server_identity
from partitions import plan_sites
from strategies import SiteRound, build_strategy, client_algorithm
from strategies.fedsr import (
    REFERENCE_RECORD,
    STATISTICS_RECORD,
    FedSRClient,
    FedSRRound,
    FedSRSettings,
    cmi_regulariser,
    l2_regulariser,
    pool_reference,
    update_reference,
)

LN2 = math.log(2.0)
# A hand-built batch: z [3, 2], labels, and r(z|y) for two classes, sigma^2 = 0.5.
Z = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.0]])
Y = torch.tensor([0, 1, 0])
MEAN = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
VAR = torch.tensor([[1.0, 2.0], [0.5, 1.0]])
SIGMA2 = 0.5


# --- the maths by hand ----------------------------------------------------------------------


def test_l2r_is_the_mean_squared_norm():
    assert float(l2_regulariser(Z)) == pytest.approx((5 + 1 + 9) / 3)


def test_cmi_is_the_mean_gaussian_kl_by_hand():
    # KL_i = 1/2 sum_d [(s2 + (z - mu)^2) / v + log(v / s2) - 1]
    # i=0 (y=0): d0 0.5/1 + ln2 - 1, d1 4.5/2 + ln4 - 1 -> (0.75 + 3 ln2) / 2
    # i=1 (y=1): d0 0.5/0.5 + 0 - 1, d1 1.5/1 + ln2 - 1 -> (0.5 + ln2) / 2
    # i=2 (y=0): d0 4.5/1 + ln2 - 1, d1 0.5/2 + ln4 - 1 -> (2.75 + 3 ln2) / 2
    expected = ((0.375 + 1.5 * LN2) + (0.25 + 0.5 * LN2) + (1.375 + 1.5 * LN2)) / 3
    assert float(cmi_regulariser(Z, Y, MEAN, VAR, SIGMA2)) == pytest.approx(expected)
    # a label outside the classes does not count; none at all -> 0
    assert float(cmi_regulariser(Z, torch.tensor([0, 5, -1]), MEAN, VAR, SIGMA2)) == pytest.approx(0.375 + 1.5 * LN2)
    assert float(cmi_regulariser(Z, torch.tensor([-1, -1, 7]), MEAN, VAR, SIGMA2)) == 0.0


def test_cmi_is_zero_when_r_matches_a_single_sample():
    z = torch.tensor([[2.0, -3.0]])
    assert float(cmi_regulariser(z, torch.tensor([0]), z, torch.full_like(z, SIGMA2), SIGMA2)) == pytest.approx(0.0)


def test_running_update_of_r_by_hand():
    # batch estimate: class 0 from [1,2],[3,0]: mean [2,1], var [1,1] + 0.5; class 1 from [0,-1]: var 0 + 0.5
    mean, var, known = update_reference((MEAN, VAR, torch.tensor([1.0, 1.0])), Z, Y, 0.5, SIGMA2)
    torch.testing.assert_close(mean, torch.tensor([[1.5, 0.5], [0.0, -0.5]]))
    torch.testing.assert_close(var, torch.tensor([[1.25, 1.75], [0.5, 0.75]]))
    torch.testing.assert_close(known, torch.tensor([1.0, 1.0]))
    # a class not known before takes the batch estimate; a class absent from the batch is unchanged
    mean, var, known = update_reference((MEAN, VAR, torch.tensor([1.0, 0.0])), Z[1:2], Y[1:2], 0.5, SIGMA2)
    torch.testing.assert_close(mean, torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    torch.testing.assert_close(var, torch.tensor([[1.0, 2.0], [0.5, 0.5]]))
    torch.testing.assert_close(known, torch.tensor([1.0, 1.0]))


def test_pool_reference_moment_matches_by_hand():
    a = (np.array([[0.0], [2.0]]), np.array([[1.0], [1.0]]), np.array([0.5, 0.5]))  # 10 examples: w = 5, 5
    b = (np.array([[2.0], [4.0]]), np.array([[3.0], [1.0]]), np.array([1.0, 0.0]))  # 15 examples: w = 15, 0
    mean, var, known = pool_reference(None, [a, b], [10.0, 15.0])
    # class 0: mu = (5*0 + 15*2)/20 = 1.5; s2 = (5*(1 + 1.5^2) + 15*(3 + 0.5^2)) / 20 = 3.25
    np.testing.assert_allclose(mean, [[1.5], [2.0]])
    np.testing.assert_allclose(var, [[3.25], [1.0]])
    np.testing.assert_allclose(known, [1.0, 1.0])
    # a class no site reported keeps its previous reference
    previous = (np.array([[9.0], [7.0]]), np.array([[2.0], [4.0]]), np.array([1.0, 1.0]))
    mean, var, known = pool_reference(previous, [b], [15.0])
    np.testing.assert_allclose(mean, [[2.0], [7.0]])
    np.testing.assert_allclose(var, [[3.0], [4.0]])
    with pytest.raises(ValueError, match="shape"):
        pool_reference(None, [a, (np.zeros((3, 1)), np.ones((3, 1)), np.ones(3) / 3)], [1.0, 1.0])


# --- site side --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(smoke_corpus):
    corpus = Corpus.open(smoke_corpus)
    plan = plan_sites(corpus, load_config(["scale=smoke"]))[2]
    return SiteData(corpus, plan)


def _client(**settings) -> FedSRClient:
    client = client_algorithm(strategy_config("fedsr", settings))
    assert isinstance(client, FedSRClient)
    return client


def _site_round(model, reference: dict | None = None) -> SiteRound:
    content = RecordDict({"config": ConfigRecord({}), REFERENCE_RECORD: pack_arrays(reference or {})})
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    return SiteRound(model, dict(model.state_dict()), content, context, TrainConfig())


def _class_task(site) -> str:
    return next(t for t in site.plan.tasks if site.schema.task(t).target in CLASS_TARGETS)


def _batch(site, task: str):
    return site.split(task, "train").take(torch.arange(4))


def test_hook_captures_exactly_the_fusion_output_and_is_removed(site):
    model = build_model(ModelConfig(), site.schema, 0).eval()
    round_ = _client().before_train(_site_round(model))
    assert isinstance(round_, FedSRRound) and round_.changes_objective
    seen = []
    other = model.fusion.register_forward_hook(lambda m, a, out: seen.append(out))
    task = _class_task(site)
    batch = _batch(site, task)
    out = model(task, batch.inputs, batch.present)
    other.remove()
    z = round_.capture.take()
    assert z is seen[0] and z.shape == (4, model.cfg.dim)
    assert z.requires_grad  # with its graph: the regularisers reach the fusion block and encoders
    head = model.heads[task](z, None)
    torch.testing.assert_close(head.squeeze(-1) if head.shape[-1] == 1 else head, out)
    with pytest.raises(RuntimeError, match="no fusion output"):
        round_.capture.take()  # taken once per forward pass
    records = round_.after_train(0)  # no objective ran: no statistics to send
    assert set(records) == {STATISTICS_RECORD} and record_to_numpy(records[STATISTICS_RECORD]) == {}
    assert len(model.fusion._forward_hooks) == 0


def test_a_failed_round_leaves_no_second_hook():
    from federated.core.multimed import MULTIMED

    model = build_model(ModelConfig(), MULTIMED, 0)
    client = _client()
    client.before_train(_site_round(model))
    client.before_train(_site_round(model))  # the first round never reached after_train
    assert len(model.fusion._forward_hooks) == 1


def test_objective_raises_the_loss_by_exactly_the_regulariser(site):
    s = FedSRSettings(alpha_l2=0.3, alpha_cmi=0.2, z_variance=0.05, reference_momentum=0.5)
    model = build_model(ModelConfig(), site.schema, 0).eval()
    task = _class_task(site)
    n_classes = 2 if site.schema.task(task).target == "binary" else len(site.schema.task(task).classes)
    dim = model.cfg.dim
    sent = {
        f"{task}/mean": np.zeros((n_classes, dim), np.float32),
        f"{task}/var": np.full((n_classes, dim), 2.0, np.float32),
        f"{task}/known": np.ones(n_classes, np.float32),
    }
    round_ = _client(**vars(s)).before_train(_site_round(model, sent))
    batch = _batch(site, task)
    loss = task_loss(site.schema.task(task), model(task, batch.inputs, batch.present), batch.targets)
    z = round_.capture.z
    assert z is not None
    labels = batch.targets.reshape(-1).long()
    ref = (torch.zeros(n_classes, dim), torch.full((n_classes, dim), 2.0), torch.ones(n_classes))
    mean, var, _ = update_reference(ref, z, labels, 0.5, 0.05)  # r moves first, then the step uses it
    expected = 0.3 * l2_regulariser(z) + 0.2 * cmi_regulariser(z, labels, mean, var, 0.05)
    total = round_.objective(task, loss, batch.targets)
    assert float((total - loss).detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert float(expected.detach()) > 0
    torch.testing.assert_close(round_.reference[task][0], mean)
    # the regulariser's gradient reaches the fusion block
    total.backward()
    assert model.fusion.norm.weight.grad is not None
    records = round_.after_train(1)
    stats = record_to_numpy(records[STATISTICS_RECORD])
    freq = np.bincount(labels.numpy(), minlength=n_classes) / len(labels)
    np.testing.assert_allclose(stats[f"{task}/freq"], freq, rtol=1e-6)
    np.testing.assert_allclose(stats[f"{task}/mean"], mean.numpy(), rtol=1e-6)


def test_tasks_without_classes_get_l2r_only(site):
    model = build_model(ModelConfig(), site.schema, 0).eval()
    round_ = _client(alpha_l2=0.5, alpha_cmi=1.0).before_train(_site_round(model))
    z = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    for task in site.schema.task_names:
        if site.schema.task(task).target not in CLASS_TARGETS:
            targets = torch.zeros(2)
            assert float(round_.regularisers(task, z, targets)) == pytest.approx(0.5 * 3.0)
            assert task not in round_.counts


def test_a_local_round_trains_with_the_objective(site):
    model = build_model(ModelConfig(), site.schema, 0)
    round_ = _client().before_train(_site_round(model))
    result = train_local(model, site, TrainConfig(), seed=0, objective=round_.objective)
    assert result.steps > 0 and math.isfinite(result.mean_loss)
    stats = record_to_numpy(round_.after_train(result.steps)[STATISTICS_RECORD])
    for key, value in stats.items():
        assert np.isfinite(value).all()
        if key.endswith("/freq"):
            assert value.sum() == pytest.approx(1.0, abs=1e-5)
        if key.endswith("/var"):
            assert (value >= 0.01 - 1e-6).all()  # sigma^2 is r's variance floor
    assert len(model.fusion._forward_hooks) == 0


# --- server side ------------------------------------------------------------------------------

KEYS = ("encoders.eeg.w", "fusion.w", "heads.sleep.w")
ALL = {"encoder/eeg": 10, "fusion": 10, "head/sleep": 10}


def _arrays(values: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in values.items()})


def _reply(node: int, value: float, n: int, stats: dict | None, groups: dict) -> Message:
    claim_server_identity(1)
    content = RecordDict(
        {
            "arrays": _arrays({k: [value] for k in KEYS}),
            "metrics": MetricRecord({"num-examples": n, "train_loss": 0.5}),
            "trained": ConfigRecord({"groups": list(groups), "examples": list(groups.values())}),
        }
    )
    if stats is not None:
        content[STATISTICS_RECORD] = pack_arrays({k: np.asarray(v, np.float32) for k, v in stats.items()})
    request = Message(RecordDict(), dst_node_id=node, message_type="train")
    request.metadata.__dict__["_message_id"] = f"m{node}"
    return Message(content, reply_to=request)


def _stats(mean, var, freq) -> dict:
    return {"sleep/mean": mean, "sleep/var": var, "sleep/freq": freq}


def test_server_averages_the_model_and_pools_r_by_hand():
    strategy = build_strategy(strategy_config("fedsr", {"min_train_sites": 1}), n_train_sites=3)
    strategy.know_sites({i: f"site_{i}" for i in (1, 2, 3)}, {i: 100 for i in (1, 2, 3)})
    grid = InProcessGrid(client_app=None, node_configs=[{}] * 3, run_config={})  # type: ignore[arg-type]
    messages = list(strategy.configure_train(1, _arrays({k: [0.0] for k in KEYS}), ConfigRecord(), grid))
    assert all(record_to_numpy(m.content[REFERENCE_RECORD]) == {} for m in messages)  # no r before round 1
    a = _reply(1, 2.0, 10, _stats([[0.0], [2.0]], [[1.0], [1.0]], [0.5, 0.5]), ALL)
    b = _reply(2, 4.0, 15, _stats([[2.0], [4.0]], [[3.0], [1.0]], [1.0, 0.0]), dict.fromkeys(ALL, 15))
    no_stats = _reply(3, 9.0, 10, None, ALL)
    foreign = _reply(3, 9.0, 10, _stats([[0.0], [2.0]], [[1.0], [1.0]], [0.5, 0.5]), {"fusion": 10})
    bad_freq = _reply(3, 9.0, 10, _stats([[0.0], [2.0]], [[1.0], [1.0]], [0.5, 0.7]), ALL)
    arrays, _ = strategy.aggregate_train(1, [a, b, no_stats, foreign, bad_freq])
    reasons = [r.reason for r in strategy.last_rejections]
    assert len(reasons) == 3
    assert "no 'fedsr-statistics' record" in reasons[0]
    assert "did not train" in reasons[1] and "summing to 1" in reasons[2]
    out = record_to_numpy(arrays)
    assert out["fusion.w"].tolist() == [pytest.approx((2 * 10 + 4 * 15) / 25)]  # example-weighted, per group
    ref = strategy.reference
    assert ref is not None
    np.testing.assert_allclose(ref["sleep/mean"], [[1.5], [2.0]])  # as in the pool_reference test
    np.testing.assert_allclose(ref["sleep/var"], [[3.25], [1.0]])
    np.testing.assert_allclose(ref["sleep/known"], [1.0, 1.0])
    assert strategy.state_dict() == {"reference": ref}
    messages = list(strategy.configure_train(2, arrays, ConfigRecord(), grid))
    sent = record_to_numpy(messages[0].content[REFERENCE_RECORD])
    np.testing.assert_allclose(sent["sleep/var"], [[3.25], [1.0]])
    wrong_shape = _reply(1, 2.0, 10, _stats([[0.0, 1.0]] * 2, [[1.0, 1.0]] * 2, [0.5, 0.5]), ALL)
    strategy.aggregate_train(2, [wrong_shape, a])
    assert "not the reference's" in strategy.last_rejections[0].reason


def test_settings_are_checked_and_dp_sgd_is_refused():
    with pytest.raises(ConfigError, match=r"^strategy.alpha_cmi=-1.0: must be finite and >= 0$"):
        FedSRSettings(alpha_cmi=-1.0)
    with pytest.raises(ConfigError, match="z_variance"):
        FedSRSettings(z_variance=0.0)
    with pytest.raises(ConfigError, match="reference_momentum"):
        FedSRSettings(reference_momentum=0.0)
    cfg = load_config(["strategy=fedsr", "strategy.alpha_l2=0.02"])
    assert cfg.strategy.settings == FedSRSettings(alpha_l2=0.02)
    with pytest.raises(ConfigError, match="dp_sgd with strategy=fedsr"):
        load_config(["strategy=fedsr", "privacy=dp_sgd"])
