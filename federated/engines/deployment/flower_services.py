"""`flower-supernode` and `flower-superlink`, each with what Flower 1.42 hard-codes for every
deployment set for ours, in the process that runs it:

- the SuperNode's fixed timers (a 3 s idle poll, 0.5 s reply checks, 1-8 s object retries),
  shortened (`shorten_flower_timers`);
- the SuperLink's SQLite state (`--database`, which keeps nodes and runs over a restart): the
  objects in flight (the model, each message) kept in memory instead of in SQLite, the
  expired-token sweep that Flower runs on every ServerApp request run at most once a second, and
  three lookups or writes that Flower runs in SQLite on every SuperNode request kept in memory
  (`lighten_superlink_state`).

Every change to Flower goes through federated/core/flower_door (guarded there: a Flower not
shaped as 1.42 is left as it is, and so is every Flower under MULTIMED_FL_STOCK_FLOWER=1); what
is kept here is the policy: which waits, what is cached and for how long.

This file is its own module because it is started as a script, by path (`supernode_argv`,
`superlink_argv`), like the ClientApp worker: of the project it imports only the door, which
imports nothing else of it. `python -m federated.engines.deployment supernode|superlink -- ...`
(`__main__.py`) ends up in `main` here.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from federated.core import flower_door as door

# Flower 1.42's SuperNode waits on fixed timers (flwr/supernode/start_client_internal.py, no option
# to change them): 3 s after every poll that finds no message, 0.5 s between checks for its
# ClientApp's reply, and, when a message's objects are not yet on the SuperLink, pull retries
# after 1, 2, 4, 8 s. With a model in one packed buffer, these timers were most of a round.
FLOWER_IDLE_SLEEP_S = 3
FLOWER_REPLY_SLEEP_S = 0.5
REPLY_POLL_S = 0.05
PULL_BACKOFF_S = (0.05, 0.5)  # initial, cap


def shorten_flower_timers(idle_poll_s: float) -> bool:
    """Shorten the SuperNode loop's fixed timers in this process: idle polls to idle_poll_s,
    reply checks to REPLY_POLL_S, object pull retries to PULL_BACKOFF_S. False (nothing changed)
    where this Flower's loop does not have the 1.42 timers, or under stock Flower."""
    waits = {FLOWER_IDLE_SLEEP_S: idle_poll_s, FLOWER_REPLY_SLEEP_S: REPLY_POLL_S}
    return door.patch_supernode_loop(waits, *PULL_BACKOFF_S)


# Flower 1.42's SuperLink refuses a SuperNode's activation with one public message, "[code: 2004]
# Failed to activate SuperNode.", for two causes it names only in its own log: the key is not
# registered ("No SuperNode found with the given public key"), or the node of that key is still
# online (an earlier session of it, e.g. before a restart, that has not missed two 30 s heartbeats).
ACTIVATION_CODE = "[code: 2004]"
# What our SuperLink adds to the refusal (the SuperNode prints it under Flower's line); the
# request was signed with the key's private half, so only the key's holder learns this.
NOT_REGISTERED = (
    "multimed-fl: this SuperNode's public key is not registered at the SuperLink. Send the public key "
    "(the .pub of --auth-supernode-private-key) to the coordinator, who registers it under the site's name "
    "(`flwr supernode register KEY.pub CONNECTION --name SITE`), then start the SuperNode again; waiting "
    "does not help."
)
STILL_ONLINE = (
    "multimed-fl: the node registered with this public key (node id {node}) is still online: an earlier "
    "session of it (this SuperNode before a restart, or another SuperNode using the same key) has not missed "
    "two heartbeats yet. If that one is stopped, this one activates when started again in about a minute "
    "(a service manager's Restart=on-failure does); never run two SuperNodes with one key."
)
NOT_ACTIVATED = (
    "multimed-fl: the node registered with this public key (node id {node}, status {status}) could not be "
    "activated; the coordinator can check it with `flwr supernode ls CONNECTION --verbose`."
)
# What our SuperNode prints when the SuperLink said no more than Flower's line (Flower's own
# `flower-superlink`): both causes, and how to tell them apart.
BOTH_CAUSES = (
    'multimed-fl: "[code: 2004] Failed to activate SuperNode" has two causes that this SuperLink does not tell '
    "apart to the SuperNode. (1) This SuperNode's public key is not registered: the coordinator registers it "
    "(`flwr supernode register KEY.pub CONNECTION --name SITE`; `flwr supernode ls CONNECTION` lists the "
    "registered nodes); waiting does not help. (2) An earlier session of this node (before a restart) is still "
    "counted online: it lapses within about a minute (two missed 30 s heartbeats), so a start a minute later "
    "succeeds. Still refused after a minute: it is (1). The coordinator's SuperLink log names the cause ('No "
    "SuperNode found with the given public key' for (1), 'could not be activated' for (2)); a SuperLink started "
    "as `python -m federated.engines.deployment superlink` tells the SuperNode itself."
)


def activation_refusal_details(node_id: int | None, status: str = "") -> str:
    """What the SuperLink tells a SuperNode it refused to activate: not registered (node_id None),
    still online, or registered in another state that cannot activate."""
    if node_id is None:
        return NOT_REGISTERED
    if status == "online":
        return STILL_ONLINE.format(node=node_id)
    return NOT_ACTIVATED.format(node=node_id, status=status or "unknown")


def explain_activation_refusals() -> bool:
    """Make the SuperLink's activation refusal (code 2004) say its cause to the SuperNode
    (activation_refusal_details, as Flower's public details); the SuperLink's own log is unchanged.
    False (nothing changed) where this Flower's activate_node is not shaped as 1.42's, or under
    stock Flower."""
    return door.explain_activation_refusals(activation_refusal_details)


def explain_supernode_exit(flower_log: str) -> str | None:
    """What to add to a SuperNode's exit: both causes of an activation refusal, where the SuperLink
    told no cause (our SuperLink's details start with "multimed-fl:"); None otherwise."""
    if ACTIVATION_CODE not in flower_log or "multimed-fl:" in flower_log:
        return None
    return BOTH_CAUSES


def supernode(flower_args: Sequence[str], idle_poll_s: float) -> int:
    """`flower-supernode` with its fixed timers shortened (shorten_flower_timers); an activation
    refusal it exits on is explained as it is logged (explain_supernode_exit)."""
    import logging

    if not shorten_flower_timers(idle_poll_s):
        print("supernode: running flower-supernode with Flower's own timers (the reason is logged above)")

    class Explain(logging.Handler):  # at once: Flower's exit handlers run, then a timer forces the exit
        def emit(self, record: logging.LogRecord) -> None:
            note = explain_supernode_exit(record.getMessage()) if record.levelno >= logging.ERROR else None
            if note:
                print(note, file=sys.stderr, flush=True)

    logging.getLogger("flwr").addHandler(Explain())  # Flower's logger
    door.run_flower_supernode(flower_args)
    return 0


# Flower 1.42's SQL state (flwr/supercore/corestate/sql_corestate.py) runs its expired-token sweep
# (two UPDATEs and a DELETE) at the start of every run-status and task lookup, i.e. on every
# ServerApp and Fleet request; profiled in deployed rounds it was the SuperLink's largest single SQL
# cost. A token lives for minutes (heartbeats), so sweeping at most this often changes nothing but
# when an expired claim is noticed, by under this many seconds.
TOKEN_SWEEP_EVERY_S = 1.0


# Besides a request's own work, Flower 1.42's SQL state runs three statements on every SuperNode
# (Fleet) request (profiled with py-spy in deployed rounds, together about a sixth of the
# SuperLink's CPU): which node the request's public key belongs to (node authentication: the
# signature itself is still checked on every request), whether the run still runs (check_abort),
# and an UPDATE of the run's byte counters. A SuperLink is the only writer of its SQLite file, so
# each is kept in memory here, exactly (another backend, which several processes may share, is
# left to Flower: `_own_database`):
# - a key's node id is cached; every node write (create_node, delete_node) drops the cache before
#   and after it commits, and a lookup that overlapped a write is not cached (a generation count),
#   so an unregistered SuperNode is refused at once; the cache is also re-read this often:
NODE_KEY_RECHECK_S = 5.0
# - a run found running is not looked up again for this long (a stopped run's SuperNode requests
#   are refused up to this much later; a run that is not running is looked up every time):
RUN_STATUS_RECHECK_S = 0.5
# - byte counts are added up in memory and written at most this often, and before anything reads
#   them (get_run_info: `flwr ls`) and at exit; a SuperLink killed outright loses at most this
#   long's counts, which only feed `flwr ls`:
TRAFFIC_WRITE_EVERY_S = 1.0


def _own_database(state: Any) -> bool:
    """Whether this process is the only writer of the state's database (SQLite: one SuperLink
    per file)."""
    return door.sqlite_database(state) is not None


class _NodeKeys:
    """public key -> node id of the SuperLink's database, for node authentication."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.generation = 0
        self.ids: dict[tuple[str, bytes], tuple[float, int]] = {}

    def lookup(self, real: Any, state: Any, public_key: bytes) -> int | None:
        if not _own_database(state):
            return real(state, public_key)
        key = (str(door.sqlite_database(state)), public_key)
        with self.lock:
            hit, generation = self.ids.get(key), self.generation
        if hit is not None and time.monotonic() - hit[0] < NODE_KEY_RECHECK_S:
            return hit[1]
        read_at = time.monotonic()
        node_id = real(state, public_key)
        with self.lock:
            if node_id is None or generation != self.generation:
                self.ids.pop(key, None)
            else:
                self.ids[key] = (read_at, node_id)
        return node_id

    def forget(self) -> None:
        with self.lock:
            self.generation += 1
            self.ids.clear()

    def writing(self, real: Any) -> Any:
        def write(state: Any, *args: Any, **kwargs: Any) -> Any:
            self.forget()
            try:
                return real(state, *args, **kwargs)
            finally:
                self.forget()

        return write


class _Traffic:
    """Byte counts per run, written to the database at most every TRAFFIC_WRITE_EVERY_S."""

    def __init__(self, real: Any) -> None:
        self.real, self.lock = real, threading.Lock()
        self.pending: dict[str, tuple[Any, dict[int, list[int]]]] = {}  # database -> (a state, run -> counts)
        self.written = time.monotonic()

    def store(self, state: Any, run_id: int, *, bytes_sent: int, bytes_recv: int) -> None:
        if bytes_sent < 0 or bytes_recv < 0 or bytes_sent == bytes_recv == 0 or not _own_database(state):
            self.real(state, run_id, bytes_sent=bytes_sent, bytes_recv=bytes_recv)  # or Flower's own error
            return
        with self.lock:
            runs = self.pending.setdefault(str(door.sqlite_database(state)), (state, {}))[1]
            counts = runs.setdefault(run_id, [0, 0])
            counts[0] += bytes_sent
            counts[1] += bytes_recv
            due = time.monotonic() - self.written >= TRAFFIC_WRITE_EVERY_S
        if due:
            self.write()

    def write(self, database: str | None = None) -> None:
        with self.lock:
            self.written = time.monotonic()
            keys = list(self.pending) if database is None else [database] if database in self.pending else []
            batches = [self.pending.pop(k) for k in keys]
        for state, runs in batches:
            for run_id, (sent, recv) in runs.items():
                with contextlib.suppress(ValueError):  # the run is gone from the database: nothing to count on
                    self.real(state, run_id, bytes_sent=sent, bytes_recv=recv)

    def write_at_exit(self) -> None:
        try:
            self.write()
        except Exception as e:  # at exit: say so, and let the SuperLink exit as it was going to
            print(f"superlink: the last second's byte counts were not written: {e}", file=sys.stderr)

    def reading(self, real: Any) -> Any:
        def read(state: Any, *args: Any, **kwargs: Any) -> Any:
            self.write(door.sqlite_database(state))
            return real(state, *args, **kwargs)

        return read


def _running_rechecked_every(real: Any, running_only: frozenset[str]) -> Any:
    """check_abort that looks up a run found running at most every RUN_STATUS_RECHECK_S."""
    seen: dict[tuple[str, int], float] = {}

    def check_abort(run_id: int, abort_status_list: list[str], state: Any) -> str | None:
        cacheable = frozenset(abort_status_list) == running_only and _own_database(state)
        key = (door.sqlite_database(state) or "", run_id)
        at = seen.get(key)
        if cacheable and at is not None and time.monotonic() - at < RUN_STATUS_RECHECK_S:
            return None
        checked_at = time.monotonic()
        why = real(run_id, abort_status_list, state)
        if cacheable and why is None:
            seen[key] = checked_at
        else:
            seen.pop(key, None)
        return why

    return check_abort


def lighten_superlink_state() -> bool:
    """For a SuperLink with an SQLite `--database`: keep message objects in Flower's in-memory
    object store under the SQL link state, sweep expired task tokens at most every
    TOKEN_SWEEP_EVERY_S, and keep node keys, running runs and byte counts in memory as said
    above. The link state (nodes, runs, messages, push sessions) stays in the database, so a
    restarted SuperLink still knows its SuperNodes and runs; objects in flight at a restart are
    lost, as are the ServerApp and the run that were sending them (a run resumes from its
    checkpoint as a new run, `multimed-fl deploy submit --resume`). Each of the five is applied
    on its own where this Flower is shaped as 1.42 is (the door says which is not, and what is
    lost); True where all five are."""
    keys, traffic = _NodeKeys(), _Traffic(None)

    def store(real: Any) -> Any:
        traffic.real = real
        atexit.register(traffic.write_at_exit)
        return traffic.store

    applied = [
        door.keep_objects_in_memory(),
        door.sweep_tokens_at_most_every(TOKEN_SWEEP_EVERY_S, lambda: time.monotonic()),
        door.cache_node_keys(keys.lookup, keys.writing),
        door.batch_traffic(store, traffic.reading),
        door.wrap_check_abort(lambda real: _running_rechecked_every(real, door.running_statuses())),
    ]
    return all(applied)


def superlink(flower_args: Sequence[str]) -> int:
    """`flower-superlink` with its SQLite state lightened (lighten_superlink_state) and its
    activation refusals explained (explain_activation_refusals)."""
    if lighten_superlink_state():
        print(
            "superlink: with --database, message objects, node keys, running runs and byte counts are kept "
            f"in memory and expired task tokens swept at most every {TOKEN_SWEEP_EVERY_S:g} s "
            "(python -m federated.engines.deployment superlink)",
            flush=True,
        )
    else:
        print("superlink: some of Flower's SQLite state is as Flower makes it (why is logged above)", flush=True)
    if not explain_activation_refusals():
        print("superlink: a refused SuperNode is not told why (why is logged above)", flush=True)
    door.run_flower_superlink(flower_args)
    return 0


def supernode_argv(idle_poll_s: float = 0.2) -> list[str]:
    """The command that starts a SuperNode with a short idle poll (supernode()); its own
    arguments follow. Run as a script, so it imports nothing of the project."""
    return [sys.executable, str(Path(__file__).resolve()), "supernode", "--idle-poll-s", str(idle_poll_s), "--"]


def superlink_argv() -> list[str]:
    """The command that starts a SuperLink with a lightened SQLite state (superlink()); its own
    arguments follow."""
    return [sys.executable, str(Path(__file__).resolve()), "superlink", "--"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m federated.engines.deployment")
    sub = parser.add_subparsers(dest="command", required=True)
    node = sub.add_parser(
        "supernode",
        help="flower-supernode, with its idle poll (3 s in Flower 1.42) shortened: "
        "python -m federated.engines.deployment supernode [--idle-poll-s S] -- FLOWER-SUPERNODE-ARGS",
    )
    node.add_argument("--idle-poll-s", type=float, default=0.2, help="seconds between polls that find no message")
    node.add_argument("flower_args", nargs=argparse.REMAINDER, help="flower-supernode's own arguments, after --")
    link = sub.add_parser(
        "superlink",
        help="flower-superlink, with message objects, node keys, running runs and byte counts in memory under "
        "its SQLite --database and the expired-token sweep at most once a second: "
        "python -m federated.engines.deployment superlink -- FLOWER-SUPERLINK-ARGS",
    )
    link.add_argument("flower_args", nargs=argparse.REMAINDER, help="flower-superlink's own arguments, after --")
    args = parser.parse_args(argv)
    flower_args = args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args
    if args.command == "superlink":
        return superlink(flower_args)
    if not 0 < args.idle_poll_s <= FLOWER_IDLE_SLEEP_S:
        parser.error(f"--idle-poll-s must be in (0, {FLOWER_IDLE_SLEEP_S}]")
    return supernode(flower_args, args.idle_poll_s)


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # run as a script: its folder must not shadow top-level modules
    sys.exit(main())
