"""The round loop in parts: one training round's step, the model it keeps, checkpoints as a callback,
and the order in which callbacks hear of a run."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from clients.client_app import app as client_app
from federated.core.config import config_to_yaml, load_config
from federated.core.protocol import METRICS_RECORD, NUM_EXAMPLES, PRIVACY_RECORD, STEPS, TRAIN_LOSS, Role
from federated.engines.inprocess import InProcessGrid, claim_server_identity
from federated.server.callbacks import Callback, ServerState
from federated.server.checkpoint import Checkpointer, checkpointers, load_checkpoint
from federated.server.evaluation import SiteProfile, summarize
from federated.server.loop import run_federation
from federated.server.records import RoundRecord, TrainStats
from federated.server.results import RoundSummary
from federated.server.round import Federation, TrainOutcome, accepted_model, train_round
from federated.server.site_agreement import FederationError
from federated.server.transport import NodeSubsetGrid

claim_server_identity(1)  # Flower stamps new messages with the sender's task identity


class ScriptedGrid:
    """Answers a training round as scripted: node 1 trains, node 2 fails, node 3 never answers."""

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        by_node = {m.metadata.dst_node_id: m for m in messages}
        good = RecordDict(
            {
                METRICS_RECORD: MetricRecord({TRAIN_LOSS: 0.5, NUM_EXAMPLES: 10, STEPS: 2}),
                PRIVACY_RECORD: ConfigRecord({"epsilon": 1.5, "steps": [2]}),
            }
        )
        return [
            Message(good, reply_to=by_node[1]),
            Message(Error(code=2, reason="ValueError: boom"), reply_to=by_node[2]),
        ]


class ScriptedStrategy:
    """Sends to nodes 1-3, aggregates to `aggregate`, and says it refused site_b's update."""

    def __init__(self, aggregate: ArrayRecord | None) -> None:
        self.aggregate = aggregate
        self.last_rejections = [SimpleNamespace(site="site_b", reason="update not finite")]
        self.last_update_norms = {"site_a": (0.5, 1.0), "site_c": (0.5, 1.0)}

    def configure_train(self, rnd: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any) -> list[Message]:
        return [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN) for n in grid.get_node_ids()]

    def aggregate_train(self, rnd: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord]:
        return self.aggregate, MetricRecord()

    def state_dict(self) -> dict[str, Any]:
        return {"moments": [1.0, 2.0]}


def _federation(strategy: ScriptedStrategy) -> Federation:
    grid: Any = ScriptedGrid()
    profiles = {n: SiteProfile(f"site_{c}", Role.TRAIN, "x", [], [], 10, 2) for n, c in ((1, "a"), (2, "b"), (3, "c"))}
    return Federation(grid, load_config(["scale=smoke"]), profiles, strategy, NodeSubsetGrid(grid, [1, 2, 3]), None)


def _arrays(value: float) -> ArrayRecord:
    return ArrayRecord({"w": torch.full((2,), value)})


def test_a_training_round_collects_each_sites_report_failure_and_rejection():
    fed = _federation(ScriptedStrategy(_arrays(1.0)))
    outcome = train_round(fed, 1, _arrays(0.0))
    assert outcome.train == {"site_a": TrainStats(loss=0.5, n=10.0, steps=2.0)}
    assert outcome.failures == {
        "train:site_c": "no reply within engine.round_timeout_s=0.0",
        "train:site_b": "ValueError: boom",
    }
    assert outcome.privacy == {"site_a": {"epsilon": 1.5, "steps": [2]}}
    assert outcome.rejections == {"site_b": "update not finite"}
    assert outcome.update_norms == {"site_a": (0.5, 1.0), "site_c": (0.5, 1.0)}
    assert fed.timing.train_s == pytest.approx(outcome.train_s) and fed.timing.aggregate_s > 0


def test_the_model_a_round_keeps():
    current = _arrays(0.0)
    fed = _federation(ScriptedStrategy(None))
    nothing = train_round(fed, 3, current)
    with pytest.raises(
        FederationError,
        match=r"round 3: no training update could be aggregated "
        r"\(train:site_c: .*; train:site_b: ValueError: boom; "
        r"site_b: update not finite\)",
    ):
        accepted_model(fed.cfg, 3, nothing, current)
    skip = load_config(["scale=smoke", "strategy.on_too_few_valid=skip"])
    assert accepted_model(skip, 3, nothing, current) is current
    assert accepted_model(fed.cfg, 3, TrainOutcome(_arrays(2.0)), current).to_torch_state_dict()["w"][0] == 2.0
    with pytest.raises(FederationError, match=r"non-finite values in \['w'\]"):
        accepted_model(fed.cfg, 3, TrainOutcome(_arrays(float("nan"))), current)


def _record(rnd: int) -> RoundRecord:
    return RoundRecord(rnd, [], summarize([]))


def test_checkpoints_are_a_callback_saving_every_k_rounds_and_the_last(tmp_path):
    cfg = load_config(["scale=smoke", "rounds=5", "engine.checkpoint_every=2"])
    (saver,) = checkpointers(cfg, tmp_path)
    assert checkpointers(cfg, None) == [] and checkpointers(load_config(["scale=smoke"]), tmp_path) == []
    assert isinstance(saver, Checkpointer)
    saver.on_start(cfg, [])
    state = ServerState(0, _arrays(0.0), ScriptedStrategy(None), _record(0), [])
    saved = []
    for rnd in range(1, 6):
        state.round, state.arrays = rnd, _arrays(float(rnd))
        state.history.append(_record(rnd))
        saver.on_server_state(state)
        if (tmp_path / "checkpoint.npz").exists():
            ckpt = load_checkpoint(tmp_path)
            if ckpt.round == rnd:
                saved.append(rnd)
                assert float(ckpt.arrays["w"][0]) == rnd and len(ckpt.history) == rnd
    assert saved == [2, 4, 5]
    assert ckpt.strategy_state == {"moments": [1.0, 2.0]} and ckpt.config_yaml == config_to_yaml(cfg)
    assert isinstance(ckpt.initial.summary, RoundSummary)


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_start(self, cfg: Any, profiles: list[SiteProfile]) -> None:
        self.events.append(f"start {len(profiles)}")

    def on_round_end(self, record: RoundRecord) -> None:
        assert isinstance(record.summary, RoundSummary)
        self.events.append(f"round {record.round}")

    def on_server_state(self, state: ServerState) -> None:
        self.events.append(f"state {state.round} ({len(state.history)} records)")

    def on_end(self, result: Any) -> None:
        self.events.append(f"end {len(result.history)}")


def test_callbacks_hear_a_run_in_order_and_the_checkpoint_follows_them(smoke_corpus, tmp_path):
    cfg = load_config(["scale=smoke", "rounds=1", "engine.checkpoint_every=1"])
    run_config = {"multimed-config": config_to_yaml(cfg), "corpus-path": str(smoke_corpus)}
    grid = InProcessGrid(client_app, [{"partition-id": i} for i in range(10)], run_config)
    recorder = Recorder()
    result = run_federation(grid, cfg, [recorder], checkpoint_dir=tmp_path)
    assert recorder.events == ["start 10", "round 0", "round 1", "state 1 (1 records)", "end 1"]
    assert load_checkpoint(tmp_path).round == 1
    assert set(result.final.train) == {p.site for p in result.profiles if p.role == Role.TRAIN}
    assert result.timing.wall_s >= result.timing.train_s + result.timing.evaluate_s > 0
    assert dataclasses.asdict(result.final.train[result.profiles[0].site])["steps"] > 0
