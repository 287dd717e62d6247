"""A federated statistics round: the regression targets' scale without any site sending rows.

Site-local mode has no pooled corpus whose statistics every site could read, and a site's own
statistics would give every site a different scale. So before the first round the server asks
each training site for (n, mean, M2) of each regression task's training targets and combines
them exactly (Chan, Golub & LeVeque's pairwise update: no cancellation from sums of squares),
then asks for the sum of |y - mean| around the combined mean, for the MAD the score uses. Only
these aggregates leave a site. The result is sent with every train and evaluate message.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from federated.core.protocol import CONFIG_RECORD, METRICS_RECORD, STATS_CENTRE, STATS_REQUEST
from federated.core.replies import error_reason
from federated.server.site_agreement import FederationError

Exchange = Callable[[list[Message]], list[Message]]


def combine_moments(parts: Sequence[tuple[int, float, float]]) -> tuple[int, float, float]:
    """(n, mean, M2) of the union of groups given each group's (n, mean, M2)."""
    n, mean, m2 = 0, 0.0, 0.0
    for n_b, mean_b, m2_b in parts:
        if n_b == 0:
            continue
        total = n + n_b
        delta = mean_b - mean
        mean += delta * n_b / total
        m2 += m2_b + delta * delta * n * n_b / total
        n = total
    return n, mean, m2


def _ask(exchange: Exchange, nodes: Sequence[int], config: dict[str, str], what: str) -> list[dict[str, float]]:
    content = RecordDict({CONFIG_RECORD: ConfigRecord(dict(config.items()))})
    replies = exchange([Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes])
    out = []
    for msg in replies:
        if msg.has_error():
            raise FederationError(f"{what}: node {msg.metadata.src_node_id} failed: {error_reason(msg)}")
        record = msg.content.metric_records[METRICS_RECORD]
        values = {k: float(v) for k, v in record.items() if not isinstance(v, list)}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise FederationError(f"{what}: node {msg.metadata.src_node_id} sent non-finite {bad}")
        out.append(values)
    if len(out) != len(nodes):
        raise FederationError(f"{what}: {len(nodes) - len(out)} of {len(nodes)} training sites did not answer")
    return out


def target_scales(exchange: Exchange, train_nodes: Sequence[int], tasks: Sequence[str]) -> dict[str, list[float]]:
    """task -> [mean, std, mad] over every training site's training targets of that task."""
    if not tasks:
        return {}
    moments = _ask(exchange, train_nodes, {STATS_REQUEST: json.dumps(list(tasks))}, "statistics round")
    scales: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    for t in tasks:
        parts = []
        for reply in moments:
            n, mean, m2 = reply.get(f"{t}/n", 0.0), reply.get(f"{t}/mean", 0.0), reply.get(f"{t}/m2", 0.0)
            if n < 0 or m2 < 0 or n != int(n):
                raise FederationError(f"statistics round: task {t}: a site sent n={n}, M2={m2}")
            parts.append((int(n), mean, m2))
        n, mean, m2 = combine_moments(parts)
        if n == 0:
            raise FederationError(f"statistics round: no training site holds training targets of task {t}")
        scales[t], counts[t] = [mean, math.sqrt(m2 / n)], n
    centres = {t: s[0] for t, s in scales.items()}
    deviations = _ask(exchange, train_nodes, {STATS_CENTRE: json.dumps(centres)}, "statistics round (MAD)")
    for t, scale in scales.items():
        total = sum(r.get(f"{t}/absdev", 0.0) for r in deviations)
        if total < 0:
            raise FederationError(f"statistics round: task {t}: a negative sum of absolute deviations")
        scale.append(total / counts[t])
    return scales
