"""A site's own state across rounds, saved by the site next to its data, for resumed runs.

Context.state holds what a site carries from round to round (DP-SGD accountants, SCAFFOLD's
control variate, personal parameters). Flower keeps it in memory; to survive a restart each
site writes it to `state-dir` (node config, or run config in simulation) at every checkpoint
round, when it is evaluated (every site is evaluated every round, so every site saves). A
resumed run's handshake carries `restore-round`; the site loads its state of that round.
A site never takes its state from the server: a hospital's privacy ledger stays its own.

Files: STATE_DIR/<site>/round_00012.pkl, written atomically; the last two are kept.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from flwr.app import Context, RecordDict

from federated.core.io import atomic_write
from federated.core.protocol import STATE_DIR_KEY

KEEP = 2


class SiteStateError(RuntimeError):
    """A site cannot restore the state a resumed run needs."""


def state_dir(context: Context) -> Path | None:
    value = context.node_config.get(STATE_DIR_KEY) or context.run_config.get(STATE_DIR_KEY)
    return Path(str(value)) if value else None


def save(context: Context, site: str, server_round: int) -> None:
    root = state_dir(context)
    if root is None:
        return
    folder = root / site
    blob = pickle.dumps(context.state, protocol=pickle.HIGHEST_PROTOCOL)
    atomic_write(folder / f"round_{server_round:05d}.pkl", lambda tmp: tmp.write_bytes(blob))
    for old in sorted(folder.glob("round_*.pkl"))[:-KEEP]:
        old.unlink(missing_ok=True)


def restore(context: Context, site: str, server_round: int) -> None:
    """Replace the context's state with the site's saved state of `server_round`."""
    root = state_dir(context)
    path = None if root is None else root / site / f"round_{server_round:05d}.pkl"
    if path is None or not path.is_file():
        where = "no state-dir is configured" if root is None else f"{path} does not exist"
        raise SiteStateError(f"site {site} cannot resume at round {server_round}: {where}")
    state = pickle.loads(path.read_bytes())
    if not isinstance(state, RecordDict):
        raise SiteStateError(f"{path} does not hold a site state")
    for key in list(context.state.keys()):
        del context.state[key]
    for key, value in state.items():
        context.state[key] = value
