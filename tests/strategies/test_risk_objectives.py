"""Risk-reweighting objectives: V-REx across sites (fedrex) and GroupDRO over a site's tasks, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from federated.app.cli import main
from federated.app.runner import run_experiment
from federated.core.arrays import record_to_numpy
from federated.core.config import ConfigError, load_config
from federated.core.config.schema import ModelConfig, TrainConfig
from federated.core.config.strategy_section import strategy_config
from federated.core.models import build_model
from federated.core.multimed import MULTIMED
from federated.core.protocol import CONFIG_RECORD
from federated.engines.inprocess import InProcessGrid, claim_server_identity
from federated.server.callbacks import Callback
from federated.server.checkpoint import load_checkpoint
from strategies import SiteRound, build_strategy, client_algorithm
from strategies.risk_objectives import (
    DRO_ETA,
    DRO_LOG_WEIGHTS,
    DRO_STATE,
    DRO_TASKS,
    REX_BETA,
    REX_MEAN_RISK,
    RISK,
    RISK_RECORD,
    FedRex,
    GroupDRORound,
    RiskWeightedRound,
    groupdro_step,
    rex_risk_weight,
    vrex_objective,
)

KEYS = ("encoders.eeg.w", "fusion.w")
TARGETS = torch.zeros(1)

# fedrex needs plain SGD steps (Adam ignores a constant loss weight); groupdro accepts it too
SGD = ["train.optimizer=sgd", "train.lr=0.05", "train.momentum=0"]


def _arrays(values: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in values.items()})


def _reply(node: int, value: float, n: int, groups: dict, risk: object = None) -> Message:
    claim_server_identity(1)
    content = RecordDict(
        {
            "arrays": _arrays({k: [value] for k in KEYS}),
            "metrics": MetricRecord({"num-examples": n, "train_loss": 0.5}),
            "trained": ConfigRecord({"groups": list(groups), "examples": list(groups.values())}),
        }
    )
    if risk is not None:
        content[RISK_RECORD] = ConfigRecord({RISK: risk})  # type: ignore[dict-item]  # malformed values on purpose
    request = Message(RecordDict(), dst_node_id=node, message_type="train")
    request.metadata.__dict__["_message_id"] = f"m{node}"
    return Message(content, reply_to=request)


def _grid(n_sites: int) -> InProcessGrid:
    return InProcessGrid(client_app=None, node_configs=[{}] * n_sites, run_config={})  # type: ignore[arg-type]  # no ClientApp: only messages are built


def _configure(strategy, server_round: int, n_sites: int) -> ConfigRecord:
    messages = list(
        strategy.configure_train(server_round, _arrays({k: [0.0] for k in KEYS}), ConfigRecord(), _grid(n_sites))
    )
    return messages[0].content[CONFIG_RECORD]


def _context(state: RecordDict | None = None) -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=state or RecordDict(), run_config={})


# --- V-REx maths ---------------------------------------------------------------------------


def test_vrex_objective_and_weights_by_hand():
    # risks (1, 2, 3): mean 2, population variance 2/3
    assert vrex_objective([1.0, 2.0, 3.0], beta=0.5) == pytest.approx(2.0 + 0.5 * 2 / 3)
    # 1 + 2 * 0.5 * (R - 2) = (0, 1, 2)
    assert [rex_risk_weight(r, 2.0, 0.5) for r in (1.0, 2.0, 3.0)] == [0.0, 1.0, 2.0]
    assert rex_risk_weight(1.0, 2.0, 1.0) == 0.0  # 1 + 2 * (1 - 2) = -1, clipped at 0
    assert rex_risk_weight(1.0, 2.0, 0.0) == 1.0  # beta = 0: plain training
    with pytest.raises(ValueError, match="must be finite"):
        rex_risk_weight(math.nan, 2.0, 1.0)


def test_site_weight_is_n_times_the_objective_gradient():
    """The docstring's derivation: dJ/dR_k = (1 + 2 beta (R_k - mean)) / n, checked by central differences."""
    risks, beta, h = np.array([1.0, 1.5, 2.5]), 0.3, 1e-6
    mean = risks.mean()
    for k in range(3):
        up, down = risks.copy(), risks.copy()
        up[k] += h
        down[k] -= h
        grad = (vrex_objective(up, beta) - vrex_objective(down, beta)) / (2 * h)
        assert 3 * grad == pytest.approx(rex_risk_weight(float(risks[k]), float(mean), beta), rel=1e-6)
    # by hand: mean 5/3, weights 1 + 0.6 (R - 5/3) = (0.6, 0.9, 1.5)
    assert [rex_risk_weight(float(r), float(mean), beta) for r in risks] == pytest.approx([0.6, 0.9, 1.5])


# --- fedrex server ---------------------------------------------------------------------------


def _fedrex(n_sites: int = 3, **settings) -> FedRex:
    strategy = build_strategy(strategy_config("fedrex", {"min_train_sites": 1, **settings}), n_train_sites=n_sites)
    assert isinstance(strategy, FedRex)
    strategy.know_sites({i: f"site_{i}" for i in range(1, n_sites + 1)}, {i: 100 for i in range(1, n_sites + 1)})
    return strategy


def test_fedrex_server_sends_beta_then_the_last_mean_risk_and_averages_per_group():
    strategy = _fedrex(beta=0.5)
    first = _configure(strategy, 1, 3)
    assert first[REX_BETA] == 0.5 and REX_MEAN_RISK not in first  # round 1: no mean risk yet
    arrays, _ = strategy.aggregate_train(
        1,
        [
            _reply(1, 2.0, 10, {"encoder/eeg": 10, "fusion": 10}, risk=1.0),
            _reply(2, 4.0, 30, {"fusion": 30}, risk=3.5),
        ],
    )
    assert arrays is not None
    out = {k: float(v[0]) for k, v in record_to_numpy(arrays).items()}
    assert out == {"encoders.eeg.w": 2.0, "fusion.w": 3.5}  # modality_fedavg: (10*2 + 30*4) / 40
    assert strategy.mean_risk == 2.25  # unweighted mean over the sites
    assert _configure(strategy, 2, 3)[REX_MEAN_RISK] == 2.25
    assert strategy.state_dict() == {"mean_risk": 2.25}
    resumed = _fedrex(beta=0.5)
    resumed.load_state_dict(strategy.state_dict())
    assert _configure(resumed, 3, 3)[REX_MEAN_RISK] == 2.25


@pytest.mark.parametrize(
    "risk, reason",
    [
        (None, "no 'risk' number in a 'rex-risk' record"),
        ("high", "no 'risk' number in a 'rex-risk' record"),
        (math.nan, "risk nan is not finite and >= 0"),
        (-1.0, "risk -1.0 is not finite and >= 0"),
    ],
)
def test_fedrex_refuses_a_reply_without_a_usable_risk(risk, reason):
    strategy = _fedrex()
    _configure(strategy, 1, 3)
    strategy.aggregate_train(
        1, [_reply(1, 1.0, 10, {"fusion": 10}, risk=risk), _reply(2, 3.0, 10, {"fusion": 10}, 2.0)]
    )
    assert [r.reason[: len(reason)] for r in strategy.last_rejections] == [reason]
    assert strategy.mean_risk == 2.0  # only the accepted site's risk


# --- fedrex site -----------------------------------------------------------------------------


def _site(config: dict, global_loss: float, context: Context | None = None) -> SiteRound:
    model = build_model(ModelConfig(), MULTIMED, 0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    content = RecordDict({CONFIG_RECORD: ConfigRecord(config)})
    return SiteRound(model, start, content, context or _context(), TrainConfig(), lambda: global_loss)


def test_fedrex_site_weights_its_loss_by_its_risk_against_the_mean():
    client = client_algorithm(strategy_config("fedrex", {}))
    this_round = client.before_train(_site({"server-round": 2, REX_BETA: 1.0, REX_MEAN_RISK: 2.0}, 2.5))
    assert isinstance(this_round, RiskWeightedRound) and this_round.changes_objective
    assert this_round.weight == 2.0  # 1 + 2 * 1 * (2.5 - 2)
    assert float(this_round.objective("bone_age", torch.tensor(3.0), TARGETS)) == 6.0
    assert this_round.after_train(5)[RISK_RECORD][RISK] == 2.5  # type: ignore[index]  # a ConfigRecord
    low = client.before_train(_site({REX_BETA: 1.0, REX_MEAN_RISK: 2.0}, 1.0))
    assert isinstance(low, RiskWeightedRound) and low.weight == 0.0  # clipped
    first = client.before_train(_site({REX_BETA: 1.0}, 7.0))
    assert isinstance(first, RiskWeightedRound) and first.weight == 1.0  # no mean risk yet
    with pytest.raises(ValueError, match="no 'rex-beta'"):
        client.before_train(_site({}, 1.0))


# --- GroupDRO --------------------------------------------------------------------------------


def test_groupdro_step_by_hand():
    logits, weight = groupdro_step(torch.zeros(2, dtype=torch.float64), 0, torch.tensor(2.0), eta=0.1)
    assert logits.tolist() == pytest.approx([0.2, 0.0])  # q_0 * exp(0.1 * 2)
    assert float(weight) == pytest.approx(2 * math.exp(0.2) / (math.exp(0.2) + 1))
    _, uniform = groupdro_step(torch.zeros(3, dtype=torch.float64), 1, torch.tensor(5.0), eta=0.0)
    assert float(uniform) == 1.0  # uniform q: plain training


def test_groupdro_site_keeps_task_weights_across_rounds():
    context = _context()
    client = client_algorithm(strategy_config("groupdro", {}))
    first = client.before_train(_site({DRO_ETA: 0.1}, 1.0, context))
    assert isinstance(first, GroupDRORound) and first.changes_objective
    # task a, loss 1: L = (0.1); the only task seen so far, weight 1
    assert float(first.objective("a", torch.tensor(1.0), TARGETS)) == pytest.approx(1.0)
    # task b, loss 3: L = (0.1, 0.3); weight of b = 2 e^0.3 / (e^0.1 + e^0.3), times its loss 3
    expected_b = 2 * math.exp(0.3) / (math.exp(0.1) + math.exp(0.3))
    assert float(first.objective("b", torch.tensor(3.0), TARGETS)) == pytest.approx(3 * expected_b)
    assert first.after_train(2) == {}
    saved = context.state.config_records[DRO_STATE]
    assert saved[DRO_TASKS] == ["a", "b"] and saved[DRO_LOG_WEIGHTS] == pytest.approx([0.1, 0.3])
    # the next round continues from the saved weights: task a, loss 1 -> L = (0.2, 0.3)
    second = client.before_train(_site({DRO_ETA: 0.1}, 1.0, context))
    expected_a = 2 * math.exp(0.2) / (math.exp(0.2) + math.exp(0.3))
    assert float(second.objective("a", torch.tensor(1.0), TARGETS)) == pytest.approx(expected_a)


def test_groupdro_keeps_the_last_good_weights_after_a_non_finite_loss():
    context = _context(RecordDict({DRO_STATE: ConfigRecord({DRO_TASKS: ["a"], DRO_LOG_WEIGHTS: [0.5]})}))
    this_round = GroupDRORound(context, eta=0.1)
    this_round.objective("a", torch.tensor(math.nan), TARGETS)
    this_round.after_train(1)
    assert context.state.config_records[DRO_STATE][DRO_LOG_WEIGHTS] == [0.5]


def test_groupdro_server_sends_eta_and_averages_like_modality_fedavg():
    strategy = build_strategy(strategy_config("groupdro", {"min_train_sites": 1, "dro_eta": 0.05}), n_train_sites=2)
    strategy.know_sites({1: "site_1", 2: "site_2"}, {1: 100, 2: 100})
    assert _configure(strategy, 1, 2)[DRO_ETA] == 0.05
    arrays, _ = strategy.aggregate_train(
        1, [_reply(1, 2.0, 10, {"encoder/eeg": 10, "fusion": 10}), _reply(2, 4.0, 30, {"fusion": 30})]
    )
    assert arrays is not None
    assert {k: float(v[0]) for k, v in record_to_numpy(arrays).items()} == {"encoders.eeg.w": 2.0, "fusion.w": 3.5}


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fedrex", "groupdro"])
def test_changed_objectives_refuse_dp_sgd(name):
    with pytest.raises(ConfigError, match=rf"privacy.name cannot be dp_sgd with strategy={name}: it reweights"):
        load_config(["scale=smoke", f"strategy={name}", "privacy=dp_sgd", *SGD])


def test_fedrex_refuses_adam_whose_normalised_steps_ignore_a_loss_weight():
    with pytest.raises(
        ConfigError, match="train.optimizer must be sgd with strategy=fedrex: it scales each site's loss"
    ):
        load_config(["scale=smoke", "strategy=fedrex"])
    load_config(["scale=smoke", "strategy=fedrex", *SGD])
    load_config(["scale=smoke", "strategy=groupdro"])  # GroupDRO's weights differ from step to step


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("strategy.beta=-1", r"^strategy.beta=-1.0: must be finite and >= 0$"),
        ("strategy.dro_eta=inf", r"^strategy.dro_eta=inf: must be finite and >= 0$"),
    ],
)
def test_settings_refuse_bad_values(override, pattern):
    name = "fedrex" if "beta" in override else "groupdro"
    with pytest.raises(ConfigError, match=pattern):
        load_config(["scale=smoke", f"strategy={name}", override, *SGD])


class _Killed(Exception):
    pass


class _TableThenKill(Callback):
    """The run's metrics table, and a crash after round 3 (the last checkpoint is round 2)."""

    def __init__(self, table) -> None:
        self.table = table

    def on_resume(self, records) -> None:
        self.table.on_resume(records)

    def on_round_end(self, record) -> None:
        self.table.on_round_end(record)
        if record.round == 3:
            raise _Killed("killed after round 3")

    def on_end(self, result) -> None:
        self.table.on_end(result)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fedrex", "groupdro"])
def test_a_resumed_run_ends_with_the_uninterrupted_model(tmp_path, monkeypatch, name):
    """fedrex's mean risk (server STATE) and groupdro's task weights (site Context) survive a resume."""
    overrides = ["scale=smoke", "rounds=4", "engine.checkpoint_every=2", f"strategy={name}", *SGD]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["run", "--out", str(full), "--no-progress", *overrides]) == 0
    import federated.app.runner as runner

    original = runner.MetricsTable
    monkeypatch.setattr(runner, "MetricsTable", lambda path: _TableThenKill(original(path)))
    with pytest.raises(_Killed):
        run_experiment(load_config(overrides), cut, progress=False)
    monkeypatch.setattr(runner, "MetricsTable", original)
    checkpoint = load_checkpoint(cut)
    assert checkpoint.round == 2
    if name == "fedrex":
        assert math.isfinite(checkpoint.strategy_state["mean_risk"])
    assert main(["run", "--resume", str(cut), "--no-progress"]) == 0
    with np.load(full / "final_model.npz") as a, np.load(cut / "final_model.npz") as b:
        assert a.files == b.files
        assert max(float(np.abs(a[k] - b[k]).max()) for k in a.files) <= 1e-6
