"""Which node is which site: the sites a run expects, the handshake's message when some never
connect (naming them, with the remedy of the engine at hand), and the node id -> site lines the
run's log carries, since `flwr supernode ls` (Flower 1.42) lists node ids, owners and status but
not the name a key was registered under."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from flwr.serverapp.grid import Grid

from federated.core.config.schema import ExperimentConfig
from federated.server.transport import superlink_grid

# How long the handshake asks the nodes that did connect for their site, when too few did: only
# to name them in the error (a connected node answers in seconds; its first message loads the app).
SHORTFALL_QUERY_S = 60.0


def expected_site_names(cfg: ExperimentConfig, planned: Sequence[str] = ()) -> list[str]:
    """The site names the run expects, as far as the server knows them: the plan's (when the
    server can plan the sites: simulation, the demo), else in site-local mode the sites held out
    by name (the others name themselves only when they connect)."""
    if planned:
        return list(planned)
    if cfg.sites.holdout == "named":
        return list(cfg.sites.holdout_sites)
    return []


def registered_names(grid: Grid) -> dict[int, str]:
    """node id -> the name its key was registered under (`flwr supernode register --name`), as the
    SuperLink tells the ServerApp (Flower 1.42's NodeInfo.name); {} where there is no SuperLink."""
    link = superlink_grid(grid)
    if link is None:
        return {}
    try:
        return {int(n.node_id): str(n.name) for n in link.get_nodes() if n.name}
    except Exception:  # the names only annotate messages: never fail a run over them
        return {}


def _node(node: int, registered: Mapping[int, str]) -> str:
    name = registered.get(node)
    return f"node {node}" + (f", registered as {name}" if name else "")


def shortfall_message(
    expected: int,
    timeout_s: float,
    connected: Mapping[int, str | None],
    expected_names: Sequence[str],
    deployment: bool,
    registered: Mapping[int, str] | None = None,
) -> str:
    """Why the handshake stops when fewer than `expected` sites connected within timeout_s:
    which connected (node id -> site, None where a node did not say), which are missing (by name
    where the server knows the names) and what to do: in a deployment, start the missing sites'
    SuperNodes with a registered key; under `flwr run` simulation, ask for more SuperNodes."""
    registered = registered or {}
    head = (
        f"handshake: {len(connected)} of the {expected} planned sites connected within {timeout_s:g} s "
        f"(engine.expected_sites={expected}, engine.handshake_timeout_s={timeout_s:g})"
    )
    if not deployment:
        return (
            f'{head}; under `flwr run`, start one SuperNode per site: --federation-config "num-supernodes={expected}"'
        )
    sites = {s for s in connected.values() if s}
    here = ", ".join(
        f"{site} ({_node(n, registered)})" if site else f"{_node(n, registered)} (did not say which site it is)"
        for n, site in sorted(connected.items(), key=lambda kv: (kv[1] or "", kv[0]))
    )
    named = [s for s in expected_names if s not in sites]
    unnamed = max(0, expected - len(connected) - len(named))
    missing = ", ".join(named)
    if unnamed:
        missing += (", and " if named else "") + (
            f"{unnamed} site{'s' if unnamed > 1 else ''} the server cannot name (in site-local mode a site "
            "names itself when it connects: compare the connected sites with your list of hospitals)"
        )
    target = named[0] if len(named) == 1 else "SITE"
    return (
        f"{head}. Connected: {here or 'none'}. Missing: {missing}. "
        f"On each missing site's machine, start its SuperNode (`python -m federated.engines.deployment supernode "
        f"-- --superlink HOST:PORT --root-certificates ca.crt --auth-supernode-private-key node_key "
        f"--node-config \"site='{target}' corpus-path=...\"`, docs/how-to/deploy.md) and its ClientApp worker, "
        f'then submit the run again. A SuperNode that exits with "[code: 2004] Failed to activate SuperNode" '
        f"was refused by the SuperLink: its public key is not registered (at the coordinator: `flwr supernode "
        f"register node_key.pub CONNECTION --name {target}`), or an earlier session of the same node is still "
        f"counted online (it activates again within about a minute); its log says which, or how to tell them "
        f"apart. `flwr supernode ls CONNECTION` lists every registered node id and whether it is online; "
        f"the run's log (`flwr log RUN_ID`) maps node ids to sites."
    )


def node_site_lines(sites: Mapping[int, str], roles: Mapping[int, str], registered: Mapping[int, str]) -> list[str]:
    """One line per node for the run's log: its id, its site and role, and the name its key was
    registered under where the SuperLink knows one, flagged when it is not the site's name."""
    lines = []
    for node, site in sites.items():
        line = f"handshake: node {node} is site {site} ({roles.get(node, '?')})"
        name = registered.get(node)
        if name and name != site:
            line += f"; its key was registered as {name!r}, not as the site it says it is"
        elif name:
            line += f", registered as {name}"
        lines.append(line)
    return lines
