"""One round's evaluation: every site (ID and OOD) scores a model; their replies read back.

The messages asking for it, the exchange, and the reading of the evaluate replies (also those
riding on a train reply under engine.evaluate_with_train, named EVALUATED + the record's name),
with site -> why a site's evaluation is missing.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp.grid import Grid

from federated.core.protocol import (
    ADAPTED_RECORD,
    ARRAYS_RECORD,
    CONFIG_RECORD,
    METRICS_RECORD,
    PERSONAL_RECORD,
    SERVER_ROUND,
)
from federated.core.replies import error_reason
from federated.server import transport
from federated.server.evaluation import SiteEvaluation, SiteProfile
from federated.server.transport import exchange, over_superlink

METRIC_SEPARATOR = "/"  # an evaluate reply's metric keys are "<task>/<metric>"


def evaluate_all(
    grid: Grid,
    arrays: ArrayRecord,
    server_round: int,
    profiles: dict[int, SiteProfile],
    timeout: float | None = None,
    extra: dict[str, str] | None = None,
    late: Collection[int] = (),
) -> tuple[list[SiteEvaluation], dict[str, str]]:
    """Every site evaluates `arrays`: their evaluations (in site order) and site -> why one failed.
    The `late` nodes (no reply to this round's training in time) are awaited briefly (exchange),
    over a SuperLink only: a simulated site is not dead, only slow, and keeps the whole timeout."""
    late = set(late) if over_superlink(grid) else set()
    replies = exchange(grid, evaluate_messages(list(profiles), arrays, server_round, extra), timeout, late)
    return site_evaluations(replies, profiles, timeout, late=late)


def evaluate_messages(
    nodes: Sequence[int], arrays: ArrayRecord, server_round: int, extra: dict[str, str] | None = None
) -> list[Message]:
    """Messages asking each node to evaluate `arrays` as round `server_round`'s global model."""
    config = ConfigRecord({SERVER_ROUND: server_round, **(extra or {})})
    content = RecordDict({ARRAYS_RECORD: arrays, CONFIG_RECORD: config})
    return [Message(content, dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]


def site_evaluations(
    replies: list[Message],
    profiles: dict[int, SiteProfile],
    timeout: float | None,
    prefix: str = "",
    late: Collection[int] = (),
) -> tuple[list[SiteEvaluation], dict[str, str]]:
    """The evaluations in `replies` (records named `prefix` + the evaluate reply's record names),
    in site order, and site -> why a site's is missing (an error reply, or no reply: within the
    timeout, or for the `late` nodes the short wait they were given)."""
    evals: dict[int, SiteEvaluation] = {}
    answered = {m.metadata.src_node_id for m in replies}
    failures: dict[str, str] = {
        profiles[n].site: (
            f"no reply within {transport.LATE_WAIT_S:g} s (transport.LATE_WAIT_S: it gave none to this round's "
            "training in time, so it was not awaited the whole engine.round_timeout_s again)"
            if n in late
            else f"no reply within {timeout} s"
        )
        for n in profiles
        if n not in answered
    }
    for msg in replies:
        node = msg.metadata.src_node_id
        profile = profiles[node]
        if msg.has_error():
            failures[profile.site] = error_reason(msg)
            continue
        records = msg.content.metric_records
        if prefix + METRICS_RECORD not in records:
            failures[profile.site] = f"the reply holds no {prefix + METRICS_RECORD!r} record"
            continue
        ev = SiteEvaluation(profile)
        _parse_metrics(records[prefix + METRICS_RECORD], ev.per_task)
        if prefix + PERSONAL_RECORD in records:
            ev.personal = {}
            _parse_metrics(records[prefix + PERSONAL_RECORD], ev.personal)
        if prefix + ADAPTED_RECORD in records:
            ev.adapted = {}
            _parse_metrics(records[prefix + ADAPTED_RECORD], ev.adapted)
        evals[node] = ev
    return [evals[n] for n in profiles if n in evals], failures


def _parse_metrics(record: Any, into: dict[str, dict[str, float]]) -> None:
    """A site's "<task>/<metric>" values into task -> metric -> value."""
    for key, value in record.items():
        if METRIC_SEPARATOR in key:
            task, metric = key.split(METRIC_SEPARATOR, 1)
            into.setdefault(task, {})[metric] = float(value)
