"""The SuperLink we start (`python -m federated.engines.deployment superlink`): Flower 1.42's SQL
link state with message objects in memory and the expired-token sweep at most once a second
(flower_services.lighten_superlink_state), through Flower's own factories and state."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
from flwr.supercore.corestate.sql_corestate import SqlCoreState
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
from flwr.supercore.object_store.sql_object_store import SqlObjectStore
from flwr.superlink import main as superlink_main
from flwr.superlink.federation import NoOpFederationManager

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
    return calls


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


def test_the_superlink_command_passes_flower_s_own_arguments_through() -> None:
    out = subprocess.run(
        [*flower_services.superlink_argv(), "--help"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert "--enable-supernode-auth" in out and "--database" in out
    listed = subprocess.run(
        [sys.executable, "-m", "federated.engines.deployment", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "superlink" in listed and "clientapp-worker" in listed


def test_an_unknown_command_is_named_with_every_valid_one() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "federated.engines.deployment", "superlnk"], capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "unknown command 'superlnk'" in done.stderr
    assert "superlink, supernode, clientapp-worker" in done.stderr
