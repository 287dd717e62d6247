"""A site's own state across rounds, saved by the site next to its data, for resumed runs.

Context.state holds what a site carries from round to round (DP-SGD accountants, SCAFFOLD's
control variate, personal parameters). Flower keeps it in memory; to survive a restart each
site writes it to `state-dir` at every checkpoint round, when it is evaluated (every site is
evaluated every round, so every site saves). A resumed run's handshake carries `restore-round`;
the site loads its state of that round. A site never takes its state from the server: a
hospital's privacy ledger stays its own. In deployment `state-dir` comes only from the site's
node config (clients/site_runtime.py: site_local_path); simulation engines set it in the run config.

Files: STATE_DIR/<site>/round_00012.npz, arrays plus JSON without pickle (federated/core/statefile.py:
versioned, authenticated with an HMAC under the site's own state key, written atomically); the last
two are kept. A file that is not one (a `round_*.pkl` of an earlier release, a foreign file, one
edited or written under another key) is refused by name, never run. The key is checked at the
handshake of a run that checkpoints (check_can_save), so a site whose key cannot be used is refused by
name then, not silently at its first save.

Each state also records the privacy and secure-aggregation settings the site trained with
(federated/core/config/protected.py); a site refuses to restore into a run whose settings differ,
naming each key with both values. The refusal is the site's answer to a resumed run's handshake
(the only one that names a round to restore), so a server (or a config) that switched DP or secure
aggregation off cannot continue a run with this hospital. A new run is compared with nothing: the
coordinator who starts one chooses its privacy settings.

The DP ledger is monotone: restoring an earlier round never lowers the epsilon a site has spent.
When the site holds a state (in memory, or another saved round) whose DP-SGD ledger has spent
more, that ledger is kept instead of the restored one (clients/dp_sgd.py: keep_highest_ledger)
and a warning says so. Refusing would make a legitimate resume impossible after a crash between
the sites' save and the server's checkpoint; keeping the higher ledger counts every release.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from clients.dp_sgd import keep_highest_ledger
from clients.site_runtime import site_local_path
from federated.core.config.protected import changed_settings
from federated.core.config.schema import PrivacyConfig
from federated.core.protocol import STATE_DIR_KEY
from federated.core.state_key import StateKeyError, check_key
from federated.core.statefile import StateFileError, read_state_file, write_state_file

KEEP = 2
KIND = "site-state"
FORMAT_VERSION = 1


class SiteStateError(RuntimeError):
    """A site cannot restore the state a resumed run needs; the message names the file."""


def state_dir(context: Context) -> Path | None:
    value = site_local_path(STATE_DIR_KEY, context.node_config, context.run_config)
    return Path(value) if value else None


def state_file(root: Path, site: str, server_round: int) -> Path:
    return root / site / f"round_{server_round:05d}.npz"


def check_can_save(context: Context, site: str) -> None:
    """A site that will save its state (it has a state-dir): its state key must be usable, else
    SiteStateError naming the site, the key and the fix (the site's answer to the handshake)."""
    if state_dir(context) is None:
        return
    try:
        check_key()
    except StateKeyError as e:
        raise SiteStateError(f"site {site} cannot save its state for this checkpointing run: {e}") from None


def _to_tree(state: RecordDict) -> list[list[Any]]:
    """Each record as [name, kind, [[key, value], ...]] (lists keep the records' order)."""
    tree: list[list[Any]] = []
    for name, record in state.items():
        if isinstance(record, ArrayRecord):
            tree.append([name, "arrays", [[k, a.numpy()] for k, a in record.items()]])
        elif isinstance(record, ConfigRecord):
            tree.append([name, "config", [[k, v] for k, v in record.items()]])
        elif isinstance(record, MetricRecord):
            tree.append([name, "metrics", [[k, v] for k, v in record.items()]])
        else:
            raise TypeError(f"site state record {name!r} is a {type(record).__name__}, which is not saved")
    return tree


def _from_tree(tree: Any) -> RecordDict:
    state = RecordDict()
    for name, kind, items in tree:
        values = {str(k): v for k, v in items}
        if kind == "arrays":
            if not all(isinstance(v, np.ndarray) for v in values.values()):
                raise ValueError(f"record {name!r} holds something other than arrays")
            state[str(name)] = ArrayRecord({k: Array(v) for k, v in values.items()})
        elif kind == "config":
            state[str(name)] = ConfigRecord(values)
        elif kind == "metrics":
            state[str(name)] = MetricRecord(values)
        else:
            raise ValueError(f"record {name!r} has unknown kind {kind!r}")
    return state


def save(context: Context, site: str, server_round: int, settings: Mapping[str, Any] | None = None) -> None:
    """Write the site's state of `server_round`, with the protected settings it trained with."""
    root = state_dir(context)
    if root is None:
        return
    path = state_file(root, site, server_round)
    state = {"site": site, "round": server_round, "records": _to_tree(context.state)}
    if settings is not None:
        state["trained_with"] = dict(settings)
    write_state_file(path, KIND, FORMAT_VERSION, state)
    for old in sorted(path.parent.glob("round_*.npz"))[:-KEEP]:
        old.unlink(missing_ok=True)


def load(path: Path, site: str, server_round: int) -> RecordDict:
    """The site state in `path`; SiteStateError naming the file when it is not this site's state
    of that round or cannot be read (nothing in it is unpickled)."""
    return _load(path, site, server_round)[0]


def _load(path: Path, site: str, server_round: int) -> tuple[RecordDict, dict[str, Any] | None]:
    """load(), and the settings the state recorded (None: it recorded none)."""
    try:
        raw = read_state_file(path, KIND, FORMAT_VERSION)
        if not isinstance(raw, dict) or (raw.get("site"), raw.get("round")) != (site, server_round):
            held = (raw.get("site"), raw.get("round")) if isinstance(raw, dict) else None
            raise SiteStateError(
                f"{path} holds {held!r} (site, round), not site {site}'s state of round {server_round}"
            )
        trained_with = raw.get("trained_with")
        if trained_with is not None and not isinstance(trained_with, dict):
            raise ValueError("its trained_with is not a mapping")
        return _from_tree(raw["records"]), trained_with
    except StateFileError as e:
        raise SiteStateError(f"site {site}: {e}") from None
    except (TypeError, ValueError, KeyError) as e:
        raise SiteStateError(f"site {site}: {path} is not a MultiMed-FL site state: {e}") from None


def _missing(root: Path | None, site: str, server_round: int) -> str:
    if root is None:
        return "no state-dir is configured"
    path = state_file(root, site, server_round)
    legacy = path.with_suffix(".pkl")
    if legacy.exists():
        return f"{legacy} is a pickle of an earlier release: it is not loaded (a pickle runs code when read)"
    return f"{path} does not exist"


def _saved_rounds(root: Path, site: str) -> list[int]:
    rounds = []
    for p in (root / site).glob("round_*.npz"):
        digits = p.stem.removeprefix("round_")
        if digits.isdigit():
            rounds.append(int(digits))
    return sorted(rounds)


def _check_settings(path: Path, site: str, server_round: int, recorded: Any, settings: Mapping[str, Any]) -> None:
    """SiteStateError naming each changed key when the resumed run's settings are not those the site
    trained with (or its state does not say which those were)."""
    if recorded is None:
        raise SiteStateError(
            f"site {site} refuses to resume at round {server_round}: {path} does not record the privacy settings "
            "the site trained with (an earlier release wrote it)"
        )
    changed = changed_settings(recorded, settings)
    if changed:
        raise SiteStateError(
            f"site {site} refuses to resume at round {server_round}: the run asks it to change what it trained "
            f"with ({'; '.join(changed)}; recorded in {path}); a resume keeps the privacy and secure-aggregation "
            "settings"
        )


def restore(
    context: Context,
    site: str,
    server_round: int,
    privacy: PrivacyConfig | None = None,
    settings: Mapping[str, Any] | None = None,
) -> None:
    """Replace the context's state with the site's saved state of `server_round`, keeping the most
    spent DP-SGD ledger the site holds (in memory or in another saved round) when `privacy` is given.
    With `settings` (the protected settings of the config the site would now train with), refuse a
    state that recorded others."""
    root = state_dir(context)
    if root is None or not state_file(root, site, server_round).is_file():
        raise SiteStateError(f"site {site} cannot resume at round {server_round}: {_missing(root, site, server_round)}")
    path = state_file(root, site, server_round)
    state, recorded = _load(path, site, server_round)
    if settings is not None:
        _check_settings(path, site, server_round, recorded, settings)
    if privacy is not None:
        others = [context.state] + [
            load(state_file(root, site, r), site, r) for r in _saved_rounds(root, site) if r != server_round
        ]
        kept = keep_highest_ledger(state, others, privacy)
        if kept is not None:
            logging.getLogger(__name__).warning(
                "site %s: the restored round %d's DP ledger had spent less than the site has (epsilon %.6g kept)",
                site,
                server_round,
                kept,
            )
    for key in list(context.state.keys()):
        del context.state[key]
    for key, value in state.items():
        context.state[key] = value
