"""The SuperLink we start (`python -m federated.engines.deployment superlink`): Flower 1.42's SQL
link state with message objects in memory, the expired-token sweep at most once a second, and
node keys, running runs and byte counts kept in memory (flower_services.lighten_superlink_state),
through Flower's own factories and state."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.common.constant import Status
from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
from flwr.supercore.constant import TaskType
from flwr.supercore.corestate.sql_corestate import SqlCoreState
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
from flwr.supercore.object_store.sql_object_store import SqlObjectStore
from flwr.superlink import main as superlink_main
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.servicer.fleet import fleet_handlers

from federated.engines.deployment import flower_services


@pytest.fixture
def sweeps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Flower's sweep, counted (restored after the test, as is the factory lighten replaces)."""
    factories = superlink_main.get_objectstore_linkstate_factories
    monkeypatch.setattr(superlink_main, "get_objectstore_linkstate_factories", factories)
    real = SqlCoreState._cleanup_expired_task_tokens
    calls: list[int] = []

    def counted(self: SqlCoreState) -> None:
        calls.append(1)
        real(self)

    monkeypatch.setattr(SqlCoreState, "_cleanup_expired_task_tokens", counted)
    for name in ("get_node_id_by_public_key", "create_node", "delete_node", "store_traffic", "get_run_info"):
        monkeypatch.setattr(SqlLinkState, name, getattr(SqlLinkState, name))  # put back after the test
    monkeypatch.setattr(fleet_handlers, "check_abort", fleet_handlers.check_abort)
    return calls


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [100.0]
    monkeypatch.setattr(flower_services.time, "monotonic", lambda: now[0])
    return now


def _state(database: str) -> SqlLinkState:
    _, factory = superlink_main.get_objectstore_linkstate_factories(database, NoOpFederationManager())
    state = factory.state()
    assert isinstance(state, SqlLinkState)
    return state


def test_flower_alone_keeps_message_objects_in_the_sqlite_database(tmp_path: Path, sweeps: list[int]) -> None:
    state = _state(str(tmp_path / "superlink.db"))
    assert isinstance(state.object_store, SqlObjectStore)
    state.get_run_status({1})
    state.get_run_status({1})
    assert len(sweeps) == 2  # every lookup sweeps


def test_a_lightened_superlink_keeps_its_link_state_in_the_database_and_objects_in_memory(
    tmp_path: Path, sweeps: list[int]
) -> None:
    assert flower_services.lighten_superlink_state()
    db = tmp_path / "superlink.db"
    state = _state(str(db))
    assert isinstance(state.object_store, InMemoryObjectStore)
    node_id = state.create_node(heartbeat_interval=30, owner_aid="test", owner_name="test", public_key=b"key-1")
    assert db.is_file()
    again = _state(str(db))  # a restarted SuperLink: a new state over the same file
    assert node_id in {n.node_id for n in again.get_node_info()}
    assert isinstance(again.object_store, InMemoryObjectStore)


def test_the_token_sweep_runs_at_most_once_a_second(
    tmp_path: Path, sweeps: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [100.0]
    monkeypatch.setattr(flower_services.time, "monotonic", lambda: clock[0])
    assert flower_services.lighten_superlink_state()
    state = _state(str(tmp_path / "superlink.db"))
    state.get_run_status({1})  # a fresh state sweeps at once
    state.get_run_status({1})
    clock[0] += flower_services.TOKEN_SWEEP_EVERY_S - 0.01
    state.get_run_status({1})
    assert len(sweeps) == 1
    clock[0] += 0.01
    state.get_run_status({1})
    assert len(sweeps) == 2


def test_an_in_memory_superlink_is_left_as_flower_makes_it(sweeps: list[int]) -> None:
    assert flower_services.lighten_superlink_state()
    objects, factory = superlink_main.get_objectstore_linkstate_factories(":flwr-in-memory:", NoOpFederationManager())
    assert isinstance(objects.store(), InMemoryObjectStore)
    assert not isinstance(factory.state(), SqlLinkState)


def test_a_flower_not_shaped_as_1_42_is_left_alone(monkeypatch: pytest.MonkeyPatch, sweeps: list[int]) -> None:
    def other(database: str) -> None:
        raise AssertionError("not called")

    monkeypatch.setattr(superlink_main, "get_objectstore_linkstate_factories", other)
    assert not flower_services.lighten_superlink_state()
    assert superlink_main.get_objectstore_linkstate_factories is other


@pytest.mark.slow  # two fresh interpreters importing Flower; the deployment tests start this command
def test_the_superlink_command_passes_flower_s_own_arguments_through() -> None:
    out = subprocess.run(
        [*flower_services.superlink_argv(), "--help"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert "--enable-supernode-auth" in out and "--database" in out
    listed = subprocess.run(
        [sys.executable, "-m", "federated.engines.deployment", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "superlink" in listed and "clientapp-worker" in listed


@pytest.mark.slow  # a fresh interpreter importing Flower
def test_an_unknown_command_is_named_with_every_valid_one() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "federated.engines.deployment", "superlnk"], capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "unknown command 'superlnk'" in done.stderr
    assert "superlink, supernode, clientapp-worker" in done.stderr


def _counted(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple]:
    """Calls of SqlLinkState.<name> that reach Flower's own (SQL) method."""
    real = getattr(SqlLinkState, name)
    calls: list[tuple] = []

    @functools.wraps(real)  # its signature is Flower's: lighten checks it
    def counted(self, *args, **kwargs):
        calls.append(args)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SqlLinkState, name, counted)
    return calls


def test_a_node_s_key_is_looked_up_once_and_forgotten_when_the_node_is_deleted(
    tmp_path: Path, sweeps: list[int], clock: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups = _counted(monkeypatch, "get_node_id_by_public_key")
    assert flower_services.lighten_superlink_state()
    state = _state(str(tmp_path / "superlink.db"))
    node = state.create_node(owner_aid="hospital", owner_name="h", public_key=b"key-1", heartbeat_interval=30)
    assert state.get_node_id_by_public_key(b"key-1") == node
    assert state.get_node_id_by_public_key(b"key-1") == node
    assert len(lookups) == 1  # the second request did not ask SQLite
    clock[0] += flower_services.NODE_KEY_RECHECK_S
    assert state.get_node_id_by_public_key(b"key-1") == node
    assert len(lookups) == 2  # re-read after NODE_KEY_RECHECK_S
    state.delete_node("hospital", node)  # `flwr supernode unregister`
    assert state.get_node_id_by_public_key(b"key-1") is None  # refused at once, not 5 s later
    assert state.get_node_id_by_public_key(b"unknown") is None
    assert state.get_node_id_by_public_key(b"unknown") is None
    assert len(lookups) == 5  # an unknown key is never cached


def test_a_key_lookup_that_overlapped_a_node_write_is_not_cached(
    tmp_path: Path, sweeps: list[int], clock: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = SqlLinkState.get_node_id_by_public_key
    state_box: list[SqlLinkState] = []
    lookups: list[bytes] = []

    def read_then_unregister(self, public_key):
        lookups.append(public_key)
        found = real(self, public_key)  # read before the write commits ...
        if len(lookups) == 1:
            state_box[0].delete_node("hospital", found)  # ... which lands before this lookup returns
        return found

    monkeypatch.setattr(SqlLinkState, "get_node_id_by_public_key", read_then_unregister)
    assert flower_services.lighten_superlink_state()
    state = _state(str(tmp_path / "superlink.db"))
    state_box.append(state)
    node = state.create_node(owner_aid="hospital", owner_name="h", public_key=b"key-1", heartbeat_interval=30)
    assert state.get_node_id_by_public_key(b"key-1") == node  # the stale read itself is Flower's race
    assert state.get_node_id_by_public_key(b"key-1") is None  # but it was not cached
    assert len(lookups) == 2


def _run(state: SqlLinkState) -> int:
    return state.create_run(None, None, None, {}, "default", None, "aid", TaskType.SERVER_APP)


def test_byte_counts_are_written_at_most_once_a_second_and_before_they_are_read(
    tmp_path: Path, sweeps: list[int], clock: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = _counted(monkeypatch, "store_traffic")
    assert flower_services.lighten_superlink_state()
    state = _state(str(tmp_path / "superlink.db"))
    run = _run(state)
    state.store_traffic(run, bytes_sent=100, bytes_recv=0)
    state.store_traffic(run, bytes_sent=0, bytes_recv=7)
    assert writes == []  # kept in memory
    info = state.get_run_info(run_ids=[run])[0]  # `flwr ls` reads exact counts
    assert (info.bytes_sent, info.bytes_recv) == (100, 7) and len(writes) == 1
    state.store_traffic(run, bytes_sent=1, bytes_recv=1)
    clock[0] += flower_services.TRAFFIC_WRITE_EVERY_S
    state.store_traffic(run, bytes_sent=2, bytes_recv=0)  # a second on: this one writes both
    assert len(writes) == 2
    again = _state(str(tmp_path / "superlink.db")).get_run_info(run_ids=[run])[0]
    assert (again.bytes_sent, again.bytes_recv) == (103, 8)


def test_bad_byte_counts_get_flower_s_own_error_and_a_run_gone_is_not_counted(
    tmp_path: Path, sweeps: list[int], clock: list[float]
) -> None:
    assert flower_services.lighten_superlink_state()
    state = _state(str(tmp_path / "superlink.db"))
    run = _run(state)
    with pytest.raises(ValueError, match="Negative traffic"):
        state.store_traffic(run, bytes_sent=-1, bytes_recv=0)
    with pytest.raises(ValueError, match="cannot be zero"):
        state.store_traffic(run, bytes_sent=0, bytes_recv=0)
    state.store_traffic(run + 1, bytes_sent=5, bytes_recv=0)  # no such run: dropped when written
    assert state.get_run_info(run_ids=[run])[0].bytes_sent == 0


def test_a_running_run_is_looked_up_at_most_every_half_second(clock: list[float]) -> None:
    """check_abort as every Fleet handler calls it: a run found running is not looked up again
    for RUN_STATUS_RECHECK_S; a run that is not running (or another question) every time."""
    statuses = {1: None, 2: "Run is finished."}
    asked: list[int] = []

    def real(run_id, abort_status_list, state):
        asked.append(run_id)
        return statuses[run_id]

    aborting = [Status.PENDING, Status.STARTING, Status.FINISHED]
    check = flower_services._running_rechecked_every(real, frozenset(aborting))
    state = type("State", (), {"database_url": "sqlite:///x.db", "database_backend": "sqlite"})()
    assert check(1, aborting, state) is None and check(1, aborting, state) is None
    assert asked == [1]
    assert check(2, aborting, state) == "Run is finished." and check(2, aborting, state) == "Run is finished."
    assert asked == [1, 2, 2]
    check(1, [Status.FINISHED], state)  # another question: asked
    assert asked == [1, 2, 2, 1]
    statuses[1] = "Run is finished. Stopped by user."
    clock[0] += flower_services.RUN_STATUS_RECHECK_S
    assert check(1, aborting, state) == "Run is finished. Stopped by user."  # a stop is seen within 0.5 s
    assert check(1, aborting, state) == "Run is finished. Stopped by user."


def test_a_database_other_processes_may_share_is_left_to_flower(clock: list[float]) -> None:
    """Only a SQLite file has one writer (its SuperLink); another backend is asked every time."""
    shared = type("State", (), {"database_url": "postgresql://db/flwr", "database_backend": "postgresql"})()
    asked: list[object] = []

    def real(*args, **kwargs):
        asked.append(args)
        return None if len(args) == 3 else 7

    aborting = [Status.PENDING, Status.STARTING, Status.FINISHED]
    check = flower_services._running_rechecked_every(real, frozenset(aborting))
    check(1, aborting, shared)
    check(1, aborting, shared)
    keys = flower_services._NodeKeys()
    assert keys.lookup(real, shared, b"key") == 7 and keys.lookup(real, shared, b"key") == 7
    written: list[int] = []
    traffic = flower_services._Traffic(lambda state, run_id, **counts: written.append(run_id))
    traffic.store(shared, 3, bytes_sent=10, bytes_recv=0)
    assert len(asked) == 4 and written == [3]  # nothing cached, the bytes written at once
