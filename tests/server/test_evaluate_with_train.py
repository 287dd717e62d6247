"""engine.evaluate_with_train: a deployed round is one exchange (a training site scores the model
it receives before training on it), with the records, checkpoints and scores of the plain loop.

The loop runs only against a SuperLink; here it runs on the in-process grid with `over_superlink`
patched, side by side with the plain loop on the same plan, so that every difference shows."""

from __future__ import annotations

import numpy as np
import pytest

import federated.server.loop as loop
import federated.server.schedule as schedule
from clients.client_app import app as client_app
from federated.core.arrays import pack_arrays, record_to_numpy
from federated.core.config import config_to_yaml, load_config
from federated.core.protocol import ARRAYS_RECORD, EVALUATED, METRICS_RECORD, PERSONAL_RECORD, STATE_DIR_KEY
from federated.engines.inprocess import InProcessGrid
from federated.server.callbacks import Callback, ServerState
from federated.server.checkpoint import load_checkpoint
from federated.server.loop import run_federation

# Server state (fedadam moments), node sampling (Python's RNG) and sites that are not sampled in a
# round (they get an evaluate message in the training exchange) all take part.
SAMPLED = ["scale=smoke", "rounds=3", "strategy=fedadam", "strategy.fraction_train=0.5", "engine.checkpoint_every=1"]
PERSONAL = ["scale=smoke", "rounds=2", "strategy=fedbn"]  # a personalised score per training site


class CountingGrid(InProcessGrid):
    """The in-process grid, counting exchanges and the messages of each kind."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.exchanges: list[list[str]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.exchanges.append(sorted(m.metadata.message_type for m in messages))
        return super().send_and_receive(messages, timeout=timeout)


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.states: list[tuple[int, dict, object, int]] = []

    def on_round_end(self, record) -> None:
        self.events.append(f"round {record.round}")

    def on_server_state(self, state: ServerState) -> None:
        self.events.append(f"state {state.round}")
        self.states.append((state.round, state.strategy.state_dict(), state.python_rng, len(state.history)))


def _run(corpus, overrides, tmp, monkeypatch, riding: bool, callbacks=(), resume=None):
    cfg = load_config(overrides)
    run_config = {"multimed-config": config_to_yaml(cfg), "corpus-path": str(corpus), STATE_DIR_KEY: str(tmp / "sites")}
    grid = CountingGrid(client_app, [{"partition-id": i} for i in range(10)], run_config)
    monkeypatch.setattr(schedule, "over_superlink", lambda g: riding)
    result = run_federation(grid, cfg, list(callbacks), checkpoint_dir=tmp, resume=resume)
    return result, grid


def _records(result):
    """Every round's scores, per site and task (the personalised and adapted ones too)."""
    return [
        (r.round, [(e.profile.site, e.per_task, e.personal, e.adapted) for e in r.evaluations], r.train, r.failures)
        for r in [result.initial, *result.history]
    ]


@pytest.mark.parametrize(
    "overrides", [SAMPLED, pytest.param(PERSONAL, marks=pytest.mark.slow)], ids=["sampled-fedadam", "fedbn"]
)
def test_one_exchange_per_round_with_the_plain_loops_records(smoke_corpus, tmp_path, monkeypatch, overrides):
    plain, plain_grid = _run(smoke_corpus, overrides, tmp_path / "plain", monkeypatch, riding=False)
    riding, riding_grid = _run(smoke_corpus, overrides, tmp_path / "riding", monkeypatch, riding=True)
    rounds = len(plain.history)
    # handshake, then train + evaluate per round and round 0's evaluation / one exchange per round
    # and the last round's evaluation
    assert len(plain_grid.exchanges) == 1 + 2 * rounds + 1
    assert len(riding_grid.exchanges) == 1 + rounds + 1
    assert all("train" in kinds and "evaluate" in kinds for kinds in riding_grid.exchanges[1:-1])
    assert _records(riding) == _records(plain)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(record_to_numpy(riding.arrays).values(), record_to_numpy(plain.arrays).values(), strict=True)
    )


@pytest.mark.slow
def test_checkpoints_hold_the_state_after_the_round_not_after_the_next_ones_sampling(
    smoke_corpus, tmp_path, monkeypatch
):
    plain_rec, riding_rec = Recorder(), Recorder()
    _run(smoke_corpus, SAMPLED, tmp_path / "plain", monkeypatch, riding=False, callbacks=[plain_rec])
    _run(smoke_corpus, SAMPLED, tmp_path / "riding", monkeypatch, riding=True, callbacks=[riding_rec])
    # Each round's record and state reach the callbacks in the plain loop's order (one exchange later).
    assert (
        riding_rec.events
        == plain_rec.events
        == ["round 0", "round 1", "state 1", "round 2", "state 2", "round 3", "state 3"]
    )
    for (rnd, strategy, rng, n), (rnd_p, strategy_p, _, n_p) in zip(riding_rec.states, plain_rec.states, strict=True):
        assert (rnd, n) == (rnd_p, n_p) and rng is not None
        assert strategy.keys() == strategy_p.keys()
    a, b = load_checkpoint(tmp_path / "riding"), load_checkpoint(tmp_path / "plain")
    assert a.round == b.round == 3 and a.python_rng == b.python_rng
    assert all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)


class Killed(Exception):
    pass


class KillAt(Callback):
    def __init__(self, rnd: int) -> None:
        self.rnd = rnd

    def on_round_end(self, record) -> None:
        if record.round == self.rnd:
            raise Killed


@pytest.mark.slow
def test_a_run_stopped_mid_way_resumes_to_the_uninterrupted_model(smoke_corpus, tmp_path, monkeypatch):
    full, _ = _run(smoke_corpus, SAMPLED, tmp_path / "full", monkeypatch, riding=True)
    with pytest.raises(Killed):  # round 2's record arrives in round 3's exchange: the checkpoint is round 1's
        _run(smoke_corpus, SAMPLED, tmp_path / "cut", monkeypatch, riding=True, callbacks=[KillAt(2)])
    checkpoint = load_checkpoint(tmp_path / "cut")
    assert checkpoint.round == 1
    resumed, _ = _run(smoke_corpus, SAMPLED, tmp_path / "cut", monkeypatch, riding=True, resume=checkpoint)
    assert _records(resumed) == _records(full)
    for a, b in zip(record_to_numpy(full.arrays).values(), record_to_numpy(resumed.arrays).values(), strict=True):
        assert float(np.abs(a - b).max()) <= 1e-6


@pytest.mark.slow
def test_a_strategy_sending_other_arrays_gets_the_evaluation_in_an_exchange_before_training(
    smoke_corpus, tmp_path, monkeypatch
):
    """Where a train message does not carry the model being scored, that model is evaluated in an
    exchange of its own, first, and the train messages do not ask for it: same records."""
    original = loop._strategy

    def copying_strategy(*args):
        strategy = original(*args)
        configure = strategy.configure_train

        def configure_train(rnd, arrays, config, grid):
            messages = list(configure(rnd, arrays, config, grid))
            for m in messages:
                m.content[ARRAYS_RECORD] = pack_arrays(record_to_numpy(m.content[ARRAYS_RECORD]))  # equal, not it
            return messages

        strategy.configure_train = configure_train
        return strategy

    plain, _ = _run(smoke_corpus, PERSONAL, tmp_path / "plain", monkeypatch, riding=False)
    monkeypatch.setattr(loop, "_strategy", copying_strategy)
    riding, grid = _run(smoke_corpus, PERSONAL, tmp_path / "riding", monkeypatch, riding=True)
    assert len(grid.exchanges) == 1 + 2 * len(plain.history) + 1
    assert all(len(set(kinds)) == 1 for kinds in grid.exchanges)  # never a train and an evaluate together
    assert _records(riding) == _records(plain)


def test_the_site_scores_the_model_it_receives_and_the_server_strips_that_before_aggregating(
    smoke_corpus, tmp_path, monkeypatch
):
    """Every training site's reply carries its evaluation (global and personalised scores) under
    EVALUATED; the strategy then sees a plain train reply."""
    replied: list[set[str]] = []
    aggregated: list[set[str]] = []
    send = CountingGrid.send_and_receive

    def spy(self, messages, *, timeout=None):
        replies = list(send(self, messages, timeout=timeout))
        replied.extend(set(m.content) for m in replies if m.metadata.message_type == "train")
        return replies

    original = loop._strategy

    def watching_strategy(*args):
        strategy = original(*args)
        aggregate = strategy.aggregate_train

        def aggregate_train(rnd, replies):
            replies = list(replies)
            aggregated.extend(set(m.content) for m in replies)
            return aggregate(rnd, replies)

        strategy.aggregate_train = aggregate_train
        return strategy

    monkeypatch.setattr(CountingGrid, "send_and_receive", spy)
    monkeypatch.setattr(loop, "_strategy", watching_strategy)
    result, _ = _run(smoke_corpus, PERSONAL, tmp_path, monkeypatch, riding=True)
    trained = len(result.final.train) * len(result.history)
    assert len(replied) == len(aggregated) == trained > 0
    assert all(EVALUATED + METRICS_RECORD in keys for keys in replied)
    # fedbn's personalised model exists from a site's first training on: scored from round 1's model on
    assert sum(EVALUATED + PERSONAL_RECORD in keys for keys in replied) == trained - len(result.final.train)
    assert not any(k.startswith(EVALUATED) for keys in aggregated for k in keys)
    assert all(keys - {k for k in keys if k.startswith(EVALUATED)} in aggregated for keys in replied)


def test_an_error_stub_for_a_training_site_counts_against_it_whatever_its_message_type(
    smoke_corpus, tmp_path, monkeypatch
):
    """A reply the site never sent (a SuperLink's stub for an unreachable node: another sender, its
    own message type) is charged to the node its message went to: that site's training and
    evaluation fail for the round, the run goes on."""
    from flwr.app import Error, Message

    from federated.core.replies import attribute

    stubbed: list[str] = []
    send = CountingGrid.send_and_receive

    def stub_one(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(send(self, messages, timeout=timeout))
        if len(self.exchanges) == 3:  # round 2's exchange: the first training site's reply is a stub
            i = next(i for i, r in enumerate(replies) if r.metadata.message_type == "train")
            stub = Message(
                Error(code=0, reason="node unavailable"),
                reply_to=next(m for m in messages if m.metadata.message_id == replies[i].metadata.reply_to_message_id),
            )
            stub.metadata.__dict__["_message_type"] = "system"
            stub.metadata.__dict__["_src_node_id"] = 0
            stubbed.append(str(replies[i].metadata.src_node_id))
            replies[i] = stub
        return attribute(messages, replies)

    monkeypatch.setattr(CountingGrid, "send_and_receive", stub_one)
    result, _ = _run(smoke_corpus, PERSONAL, tmp_path, monkeypatch, riding=True)
    assert stubbed and len(result.history) == 2
    failures = result.history[1].failures | result.history[0].failures
    assert any(k.startswith("train:") for k in result.history[1].failures), failures
    assert any(k.startswith("evaluate:") for k in result.history[0].failures), failures
