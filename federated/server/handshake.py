"""The handshake: before round 1, every node says which site it is and what that site holds.

A query message to every node; each answers with its site profile (PROFILE_RECORD: its site,
role, modalities, tasks, sizes, corpus schema, version). A node that cannot answer, fewer nodes
than engine.expected_sites, or one site on two nodes stops the run, naming who. What the
answers must agree on (one schema, at least one training site) is checked right after, by
federated/server/preflight.py's after_handshake.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from logging import INFO
from typing import Any, NoReturn

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp.grid import Grid

from federated.core.corpus_schema import CorpusSchema, SchemaError
from federated.core.protocol import (
    CONFIG_RECORD,
    PROFILE_ARCHETYPE,
    PROFILE_MODALITIES,
    PROFILE_N_TEST,
    PROFILE_N_TRAIN,
    PROFILE_ORIGIN_SITE,
    PROFILE_RECORD,
    PROFILE_ROLE,
    PROFILE_SITE,
    PROFILE_TASKS,
    RESTORE_ROUND,
    SCHEMA_KEY,
    VERSION_KEY,
    Role,
)
from federated.core.replies import error_reason
from federated.server.evaluation import SiteProfile
from federated.server.site_agreement import FederationError
from federated.server.site_roster import SHORTFALL_QUERY_S, node_site_lines, registered_names, shortfall_message
from federated.server.transport import exchange, over_superlink, wait_for_nodes

# The least time the handshake's query gets after the wait for nodes, whatever is left of
# engine.handshake_timeout_s: a node that connected just in time still loads its site and answers.
HANDSHAKE_REPLY_MIN_S = 30.0


def handshake(
    grid: Grid,
    restore_round: int | None = None,
    expected: int = 0,
    timeout_s: float = 300.0,
    expected_names: Sequence[str] = (),
) -> dict[int, SiteProfile]:
    """Ask every node for its site profile; a node that cannot answer stops the run, and so do
    fewer than `expected` nodes within timeout_s (naming the sites that are missing: site_roster).
    On resume, each site is also told to restore its own state of `restore_round`. The run's log
    gets one line per node: its id, its site, and the name its key was registered under.
    In a deployment timeout_s bounds the whole handshake, from the start of the wait for nodes to
    the last profile (a node that connected late still gets HANDSHAKE_REPLY_MIN_S to answer); a
    node whose ClientApp does not answer by then is named."""
    deadline = time.monotonic() + timeout_s
    nodes = wait_for_nodes(grid, expected, timeout_s)
    registered = registered_names(grid)
    if len(nodes) < expected:
        _too_few_sites(grid, nodes, expected, timeout_s, expected_names, registered)
    content = (
        RecordDict()
        if restore_round is None
        else RecordDict({CONFIG_RECORD: ConfigRecord({RESTORE_ROUND: restore_round})})
    )
    # over a SuperLink a connected node's ClientApp may never answer; a simulated site always does
    wait = max(deadline - time.monotonic(), HANDSHAKE_REPLY_MIN_S) if over_superlink(grid) else None
    queries = [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    replies = exchange(grid, queries, wait, setting="engine.handshake_timeout_s")

    def named(node: int) -> str:
        return f"node {node} (registered as {registered[node]})" if node in registered else f"node {node}"

    profiles: dict[int, SiteProfile] = {}
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            raise FederationError(f"handshake: {named(node)} failed: {error_reason(msg)}")
        profiles[node] = _site_profile(dict(msg.content.config_records[PROFILE_RECORD]), node)
    missing = set(nodes) - set(profiles)
    if missing:
        raise FederationError(
            f"handshake: no reply within engine.handshake_timeout_s={timeout_s:g} from "
            f"{', '.join(named(n) for n in sorted(missing))}: its SuperNode is connected but its ClientApp "
            "did not answer (on that machine, check the ClientApp process and its log; a site that loads a "
            "large corpus may need a longer engine.handshake_timeout_s)"
        )
    sites = [p.site for p in profiles.values()]
    twice = sorted({s for s in sites if sites.count(s) > 1})
    if twice:
        raise FederationError(
            f"handshake: sites {twice} answered from more than one node; "
            "each node must run a different site (node config 'site')"
        )
    profiles = dict(sorted(profiles.items(), key=lambda kv: kv[1].site))
    roles = {n: str(p.role.value) for n, p in profiles.items()}
    for line in node_site_lines({n: p.site for n, p in profiles.items()}, roles, registered):
        log(INFO, line)  # `flwr log RUN_ID`: which node is which site (`flwr supernode ls` shows ids only)
    return profiles


def _site_profile(p: dict[str, Any], node: int) -> SiteProfile:
    """The profile one node sent (PROFILE_RECORD), its schema checked as one read from disk."""
    return SiteProfile(
        site=str(p[PROFILE_SITE]),
        role=Role(str(p[PROFILE_ROLE])),
        archetype=str(p[PROFILE_ARCHETYPE]),
        modalities=list(p[PROFILE_MODALITIES]),
        tasks=list(p[PROFILE_TASKS]),
        n_train=int(p[PROFILE_N_TRAIN]),
        n_test=int(p[PROFILE_N_TEST]),
        origin_site=str(p[PROFILE_ORIGIN_SITE]),
        schema=_profile_schema(p, f"handshake: node {node} (site {p[PROFILE_SITE]})"),
        version=str(p.get(VERSION_KEY, "")),
    )


def _too_few_sites(
    grid: Grid,
    nodes: list[int],
    expected: int,
    timeout_s: float,
    expected_names: Sequence[str],
    registered: dict[int, str],
) -> NoReturn:
    """Stop the run: fewer than `expected` nodes connected. In a deployment, first ask the nodes that
    did which site they are (a plain query: nothing is restored), so the error names who is missing."""
    sites: dict[int, str | None] = dict.fromkeys(nodes)
    deployment = over_superlink(grid)
    if deployment and nodes:
        query = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        for msg in exchange(grid, query, SHORTFALL_QUERY_S):
            if not msg.has_error() and PROFILE_RECORD in msg.content.config_records:
                site = msg.content.config_records[PROFILE_RECORD].get(PROFILE_SITE)
                sites[msg.metadata.src_node_id] = str(site) if site else None
    raise FederationError(shortfall_message(expected, timeout_s, sites, expected_names, deployment, registered))


def _profile_schema(profile: dict[str, Any], where: str) -> CorpusSchema:
    """The corpus schema a site sent, checked like one read from disk (a peer is not trusted)."""
    raw = profile.get(SCHEMA_KEY)
    if not isinstance(raw, str):
        raise FederationError(f"{where}: the profile carries no corpus schema ({SCHEMA_KEY!r})")
    try:
        return CorpusSchema.from_dict(json.loads(raw), f"{where}: schema")
    except json.JSONDecodeError as e:
        raise FederationError(f"{where}: the schema is not JSON ({e})") from None
    except SchemaError as e:
        raise FederationError(str(e)) from None
