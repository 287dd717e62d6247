"""The server side of one federated run: handshake, rounds, ID/OOD evaluation.

The round loop calls the Flower strategy's configure_train / aggregate_train (so any
`flwr.serverapp.strategy` Strategy plugs in) but is our own, not Strategy.start: training
goes to the training sites only, evaluation to every site (ID and OOD), and side effects
(progress, TensorBoard, metrics tables) are callbacks invoked once per round.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp.grid import Grid

from federated.core.arrays import record_to_numpy
from federated.server.checkpoint import (Checkpoint, python_rng_state,
                                  restore_python_rng, save_checkpoint)
from federated.core.config.loader import config_to_yaml
from federated.core.config.schema import ExperimentConfig
from federated.server.evaluation import SiteEvaluation, SiteProfile, summarize
from federated.core.models import build_model
from federated.core.replies import attribute, error_reason
from federated.core.protocol import ARRAYS_RECORD, CONFIG_RECORD, METRICS_RECORD, NUM_EXAMPLES, PERSONAL_RECORD, PRIVACY_RECORD, PROFILE_RECORD, RESTORE_ROUND, SERVER_ROUND, STEPS, TRAIN_LOSS, report_from_record
from strategies.site_dp import build_private_strategy, server_privacy_report
from federated.core.protocol import Role


class FederationError(RuntimeError):
    """A run that cannot continue; the message names the round and the sites involved."""


@dataclass
class RoundRecord:
    round: int
    evaluations: list[SiteEvaluation]
    summary: dict[str, Any]
    train: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> loss, n, steps
    failures: dict[str, str] = field(default_factory=dict)  # site -> reason
    rejections: dict[str, str] = field(default_factory=dict)  # site -> why its update was refused
    skipped: bool = False  # too few valid updates and strategy.on_too_few_valid=skip
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> privacy report
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class FederationResult:
    profiles: list[SiteProfile]
    initial: RoundRecord
    history: list[RoundRecord]
    arrays: ArrayRecord
    timing: dict[str, float]

    @property
    def final(self) -> RoundRecord:
        return self.history[-1] if self.history else self.initial

    def privacy(self) -> dict[str, dict[str, Any]]:
        """Each site's latest privacy report (its cumulative spend)."""
        latest: dict[str, dict[str, Any]] = {}
        for record in self.history:
            latest.update(record.privacy)
        return dict(sorted(latest.items()))


class Callback:
    """Side effects of a run; every hook is optional."""

    def on_start(self, cfg: ExperimentConfig, profiles: list[SiteProfile]) -> None: ...
    def on_resume(self, records: list[RoundRecord]) -> None:
        """A resumed run: the records of the rounds before the checkpoint."""
    def on_round_end(self, record: RoundRecord) -> None: ...
    def on_end(self, result: FederationResult) -> None: ...


class NodeSubsetGrid(Grid):
    """A view of a Grid that exposes only some nodes (so a strategy samples training sites only)."""

    def __init__(self, grid: Grid, node_ids: Sequence[int]) -> None:
        self._grid, self._ids = grid, list(node_ids)

    def set_run(self, run):  # type: ignore[no-untyped-def]
        self._grid.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._ids)

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        return self._grid.send_and_receive(messages, timeout=timeout)


def _error_reason(msg: Message) -> str:
    return error_reason(msg)


def exchange(grid: Grid, messages: list[Message], timeout: float | None = None) -> list[Message]:
    """send_and_receive, with every reply charged to the node its message went to."""
    return attribute(messages, grid.send_and_receive(messages, timeout=timeout))


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float) -> list[int]:
    """In a deployment the ServerApp starts as soon as the run is submitted; SuperNodes come
    online when they do. Wait (up to timeout_s) until `expected` nodes are connected."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= expected or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if len(nodes) < expected:
        raise FederationError(
            f"handshake: {len(nodes)} of the {expected} planned sites connected within {timeout_s:g} s "
            f"(engine.expected_sites / engine.handshake_timeout_s); under `flwr run`, start one "
            f"SuperNode per site: --federation-config \"num-supernodes={expected}\"")
    return nodes


def handshake(grid: Grid, restore_round: int | None = None, expected: int = 0,
              timeout_s: float = 300.0) -> dict[int, SiteProfile]:
    """Ask every node for its site profile; a node that cannot answer stops the run.
    On resume, each site is also told to restore its own state of `restore_round`."""
    nodes = wait_for_nodes(grid, expected, timeout_s)
    content = RecordDict() if restore_round is None else RecordDict(
        {CONFIG_RECORD: ConfigRecord({RESTORE_ROUND: restore_round})})
    replies = exchange(grid, [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes])
    profiles: dict[int, SiteProfile] = {}
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            raise FederationError(f"handshake: node {node} failed: {_error_reason(msg)}")
        p = msg.content[PROFILE_RECORD]
        profiles[node] = SiteProfile(
            site=str(p["site"]), role=Role(str(p["role"])), archetype=str(p["archetype"]),
            modalities=list(p["modalities"]), tasks=list(p["tasks"]), n_train=int(p["n_train"]),
            n_test=int(p["n_test"]), origin_site=str(p["origin_site"]))
    missing = set(nodes) - set(profiles)
    if missing:
        raise FederationError(f"handshake: no reply from nodes {sorted(missing)}")
    sites = [p.site for p in profiles.values()]
    twice = sorted({s for s in sites if sites.count(s) > 1})
    if twice:
        raise FederationError(f"handshake: sites {twice} answered from more than one node; "
                              "each node must run a different site (node config 'site')")
    return dict(sorted(profiles.items(), key=lambda kv: kv[1].site))


def _parse_metrics(record: Any, into: dict[str, dict[str, float]]) -> None:
    for key, value in record.items():
        if "/" in key:
            task, metric = key.split("/", 1)
            into.setdefault(task, {})[metric] = float(value)


def evaluate_all(grid: Grid, arrays: ArrayRecord, server_round: int, profiles: dict[int, SiteProfile],
                 timeout: float | None = None) -> tuple[list[SiteEvaluation], dict[str, str]]:
    content = RecordDict({ARRAYS_RECORD: arrays, CONFIG_RECORD: ConfigRecord({SERVER_ROUND: server_round})})
    replies = exchange(grid, [Message(content, dst_node_id=n, message_type=MessageType.EVALUATE)
                              for n in profiles], timeout)
    evals: dict[int, SiteEvaluation] = {}
    answered = {m.metadata.src_node_id for m in replies}
    failures: dict[str, str] = {profiles[n].site: f"no reply within {timeout} s" for n in profiles
                                if n not in answered}
    for msg in replies:
        node = msg.metadata.src_node_id
        profile = profiles[node]
        if msg.has_error():
            failures[profile.site] = _error_reason(msg)
            continue
        ev = SiteEvaluation(profile)
        _parse_metrics(msg.content[METRICS_RECORD], ev.per_task)
        if PERSONAL_RECORD in msg.content.metric_records:
            ev.personal = {}
            _parse_metrics(msg.content[PERSONAL_RECORD], ev.personal)
        evals[node] = ev
    return [evals[n] for n in profiles if n in evals], failures


def run_federation(grid: Grid, cfg: ExperimentConfig, callbacks: Sequence[Callback] = (),
                   checkpoint_dir: Path | None = None, resume: Checkpoint | None = None) -> FederationResult:
    """Run (or, given a checkpoint, continue) a federation. With engine.checkpoint_every = k
    and a checkpoint_dir, the server state is saved every k rounds and after the last one."""
    t_start = time.perf_counter()
    random.seed(cfg.seed)  # Flower's node sampling uses Python's global RNG
    node_profiles = handshake(grid, restore_round=resume.round if resume else None,
                              expected=cfg.engine.expected_sites, timeout_s=cfg.engine.handshake_timeout_s)
    train_nodes = [n for n, p in node_profiles.items() if p.role == Role.TRAIN]
    if not train_nodes:
        raise FederationError("no training sites answered the handshake")
    profiles = list(node_profiles.values())
    for cb in callbacks:
        cb.on_start(cfg, profiles)

    arrays = ArrayRecord(build_model(cfg.model, cfg.seed).state_dict())
    strategy = build_private_strategy(cfg, len(train_nodes))
    timeout = cfg.engine.round_timeout_s or None
    strategy.know_sites({n: p.site for n, p in node_profiles.items()},
                        {n: p.n_train for n, p in node_profiles.items()})
    training_grid = NodeSubsetGrid(grid, train_nodes)
    timing = {"train_s": 0.0, "aggregate_s": 0.0, "evaluate_s": 0.0}

    def evaluated(server_round: int, **extra: Any) -> RoundRecord:
        t0 = time.perf_counter()
        evals, failures = evaluate_all(grid, arrays, server_round, node_profiles, timeout)
        timing["evaluate_s"] += time.perf_counter() - t0
        record = RoundRecord(server_round, evals, summarize(evals), **extra)
        record.failures.update({f"evaluate:{k}": v for k, v in failures.items()})
        for cb in callbacks:
            cb.on_round_end(record)
        return record

    if resume is None:
        initial, history, first = evaluated(0), [], 1
    else:
        initial, history, first = resume.initial, list(resume.history), resume.round + 1
        arrays = resume.array_record()
        strategy.load_state_dict(resume.strategy_state)
        restore_python_rng(resume.python_rng)
        for cb in callbacks:
            cb.on_resume([initial, *history])
    every = cfg.engine.checkpoint_every
    for rnd in range(first, cfg.rounds + 1):
        t0 = time.perf_counter()
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), training_grid))
        replies = exchange(grid, messages, timeout)
        answered = {m.metadata.src_node_id for m in replies}
        late = [node_profiles[m.metadata.dst_node_id].site for m in messages
                if m.metadata.dst_node_id not in answered]
        t1 = time.perf_counter()
        new_arrays, _ = strategy.aggregate_train(rnd, replies)
        t2 = time.perf_counter()
        timing["train_s"] += t1 - t0
        timing["aggregate_s"] += t2 - t1
        train_stats, failures, privacy = {}, {}, {}
        for site in late:  # no reply within engine.round_timeout_s: the round went on without it
            failures[f"train:{site}"] = f"no reply within engine.round_timeout_s={cfg.engine.round_timeout_s}"
        for msg in replies:
            site = node_profiles[msg.metadata.src_node_id].site
            if msg.has_error():
                failures[f"train:{site}"] = _error_reason(msg)
            else:
                m = msg.content[METRICS_RECORD]
                train_stats[site] = {"loss": float(m[TRAIN_LOSS]), "n": float(m[NUM_EXAMPLES]),
                                     "steps": float(m[STEPS])}
                if PRIVACY_RECORD in msg.content.config_records:
                    privacy[site] = report_from_record(msg.content[PRIVACY_RECORD])
        privacy.update(server_privacy_report(strategy, [node_profiles[m.metadata.src_node_id].site
                                                             for m in replies if not m.has_error()]))
        rejections = {r.site: r.reason for r in strategy.last_rejections}
        if new_arrays is None:
            if cfg.strategy.on_too_few_valid != "skip":
                detail = "; ".join(f"{k}: {v}" for k, v in {**failures, **rejections}.items()) or "no replies"
                raise FederationError(f"round {rnd}: no training update could be aggregated ({detail})")
        else:
            bad = [k for k, a in record_to_numpy(new_arrays).items() if not np.isfinite(a).all()]
            if bad:  # defence in depth: validation should make this impossible
                raise FederationError(f"round {rnd}: the aggregated model has non-finite values in "
                                      f"{bad[:3]}; refusing to continue with it")
            arrays = new_arrays
        history.append(evaluated(rnd, train=train_stats, failures=failures, rejections=rejections,
                                 skipped=new_arrays is None, privacy=privacy,
                                 seconds={"train": t1 - t0, "aggregate": t2 - t1}))
        if checkpoint_dir is not None and every and (rnd % every == 0 or rnd == cfg.rounds):
            save_checkpoint(checkpoint_dir, Checkpoint(
                round=rnd, arrays={k: a.numpy() for k, a in arrays.items()},
                strategy_state=strategy.state_dict(), python_rng=python_rng_state(),
                initial=initial, history=history, config_yaml=config_to_yaml(cfg)))
    timing["wall_s"] = time.perf_counter() - t_start
    result = FederationResult(profiles, initial, history, arrays, timing)
    for cb in callbacks:
        cb.on_end(result)
    return result
