"""The door to Flower's internals (federated/core/flower_door): each replacement stays inert,
Flower's code in place and one line saying what differed, where a function it relies on has
another signature than 1.42's; every private write notices a renamed field; the stock switch
applies nothing; the deployment scripts load the door without loading the project."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.server.superlink import utils as superlink_utils
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.linkstate import LinkState
from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
from flwr.supercore.corestate.sql_corestate import SqlCoreState
from flwr.supercore.error.base import FlowerError
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink import main as superlink_main
from flwr.superlink.grid import http_grid
from flwr.superlink.servicer.fleet import fleet_handlers
from flwr.supernode import start_client_internal as loop

from federated.core import flower_door as door
from federated.engines.inprocess import claim_server_identity

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def said(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """What the door said (Flower's logger), every line said afresh; every target Flower's own
    again after the test, and the stock switch off."""
    monkeypatch.delenv(door.STOCK_FLOWER_ENV, raising=False)
    for owner, name in _TARGET_OWNERS:
        monkeypatch.setattr(owner, name, owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name))
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler, flwr_logger = Keep(level=logging.WARNING), logging.getLogger("flwr")
    flwr_logger.addHandler(handler)
    door.forget_said()
    yield lines
    flwr_logger.removeHandler(handler)
    door.forget_said()


_TARGET_OWNERS = [
    (http_grid, "pull_objects"),
    (loop, "time"),
    (loop, "pull_objects"),
    (superlink_main, "get_objectstore_linkstate_factories"),
    (SqlCoreState, "_cleanup_expired_task_tokens"),
    *((SqlLinkState, m) for m in ("get_node_id_by_public_key", "create_node", "delete_node")),
    *((SqlLinkState, m) for m in ("store_traffic", "get_run_info")),
    (fleet_handlers, "check_abort"),
    (fleet_handlers, "activate_node"),
]


def _pass_through(real: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return real(*args, **kwargs)

    return wrapper


# Every group: how it is applied, and the targets it replaces (owner, attribute).
GROUPS: dict[str, tuple[Callable[[], bool], list[tuple[Any, str]]]] = {
    "reply pulls": (
        lambda: door.patch_reply_object_pulls(0.05, 0.5, lambda: None, "cut"),
        [(http_grid, "pull_objects")],
    ),
    "supernode timers": (
        lambda: door.patch_supernode_loop({3: 0.2, 0.5: 0.05}, 0.05, 0.5),
        [(loop, "time"), (loop, "pull_objects")],
    ),
    "objects in memory": (door.keep_objects_in_memory, [(superlink_main, "get_objectstore_linkstate_factories")]),
    "token sweep": (
        lambda: door.sweep_tokens_at_most_every(1.0),
        [(SqlCoreState, "_cleanup_expired_task_tokens")],
    ),
    "node keys": (
        lambda: door.cache_node_keys(lambda real, state, key: real(state, key), _pass_through),
        [(SqlLinkState, m) for m in ("get_node_id_by_public_key", "create_node", "delete_node")],
    ),
    "traffic": (
        lambda: door.batch_traffic(_pass_through, _pass_through),
        [(SqlLinkState, "store_traffic"), (SqlLinkState, "get_run_info")],
    ),
    "run status": (lambda: door.wrap_check_abort(_pass_through), [(fleet_handlers, "check_abort")]),
    "refusal reasons": (
        lambda: door.explain_activation_refusals(lambda node, status: "why"),
        [(fleet_handlers, "activate_node")],
    ),
}


def _now(targets: list[tuple[Any, str]]) -> list[Any]:
    return [owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name) for owner, name in targets]


@pytest.mark.parametrize("group", GROUPS)
def test_each_group_applies_once_to_flower_1_42(group: str) -> None:
    apply, targets = GROUPS[group]
    before = _now(targets)
    assert apply()
    after = _now(targets)
    assert all(a is not b for a, b in zip(after, before, strict=True))
    assert apply()  # idempotent: ours already, not wrapped twice
    assert _now(targets) == after


def _other_signature(*args: Any, changed: bool = True) -> None:
    """A Flower function whose parameters are not 1.42's."""


# A target of each group, replaced or only relied on, changed to a function of another signature
# (for a method: another parameter list after self), as a later Flower might have it: (group,
# owner, attribute, fake).
def _method(self: Any, something_else: int) -> None:
    """A method whose parameters are not 1.42's."""


CHANGED = [
    ("reply pulls", http_grid, "pull_objects", _other_signature),
    ("supernode timers", loop, "pull_objects", _other_signature),
    ("objects in memory", superlink_main, "get_objectstore_linkstate_factories", _other_signature),
    ("token sweep", SqlCoreState, "_cleanup_expired_task_tokens", _method),
    ("node keys", SqlLinkState, "create_node", _method),
    ("node keys", SqlLinkState, "delete_node", _method),
    ("node keys", SqlLinkState, "get_node_id_by_public_key", _method),
    ("traffic", SqlLinkState, "get_run_info", _method),
    ("traffic", SqlLinkState, "store_traffic", _method),
    ("run status", fleet_handlers, "check_abort", _other_signature),
    ("refusal reasons", fleet_handlers, "activate_node", _other_signature),
    # relied on, not replaced
    ("reply pulls", inflatable_utils, "pull_objects", _other_signature),
    ("reply pulls", http_grid.HttpGrid, "pull_messages", _method),
    ("objects in memory", LinkStateFactory, "__init__", _method),
    ("objects in memory", ObjectStoreFactory, "__init__", _method),
    ("refusal reasons", FlowerError, "__init__", _method),
    ("refusal reasons", LinkState, "get_node_info", _method),
]


@pytest.mark.parametrize(
    ("group", "owner", "name", "fake"), CHANGED, ids=[f"{g}:{getattr(o, '__name__', o)}.{n}" for g, o, n, _ in CHANGED]
)
def test_a_changed_signature_leaves_the_whole_group_inert(
    group: str, owner: Any, name: str, fake: Any, monkeypatch: pytest.MonkeyPatch, said: list[str]
) -> None:
    monkeypatch.setattr(owner, name, fake)
    apply, targets = GROUPS[group]
    before = _now(targets)
    assert not apply()
    assert _now(targets) == before  # nothing of the group replaced, the changed one left as it is
    (line,) = said
    assert f"{name} takes (" in line and "not applied" in line and "Flower runs unchanged" in line
    assert not apply() and len(said) == 1  # said once


def test_pull_objects_without_the_keywords_the_serverapp_passes_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, said: list[str]
) -> None:
    """The ServerApp's pull passes initial_backoff, backoff_cap and max_time by name: a
    pull_objects without max_time (or with any other parameter list) is not wrapped."""

    def pull_objects(
        object_ids: list[str],
        pull_object_fn: Callable[[str], bytes],
        *,
        max_concurrent_pulls: int = 2,
        max_tries_per_object: int | None = 500,
        initial_backoff: float = 1,
        backoff_cap: float = 10,
    ) -> dict[str, bytes]:
        return {}

    monkeypatch.setattr(http_grid, "pull_objects", pull_objects)
    monkeypatch.setattr(inflatable_utils, "pull_objects", pull_objects)
    assert not door.patch_reply_object_pulls(0.05, 0.5, lambda: None, "cut")
    assert http_grid.pull_objects is pull_objects
    assert "max_time" in said[0]


def test_an_object_pull_error_of_another_shape_leaves_the_pulls_alone(
    monkeypatch: pytest.MonkeyPatch, said: list[str]
) -> None:
    def __init__(self: Any, reason: str) -> None:
        Exception.__init__(self, reason)

    monkeypatch.setattr(inflatable_utils.ObjectPullError, "__init__", __init__)
    assert not door.patch_reply_object_pulls(0.05, 0.5, lambda: None, "cut")
    assert http_grid.pull_objects is inflatable_utils.pull_objects
    assert "ObjectPullError.__init__ takes (self, reason)" in said[0]


def test_a_supernode_loop_whose_time_is_not_the_time_module_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, said: list[str]
) -> None:
    other = type(sys)("time")
    monkeypatch.setattr(loop, "time", other)
    assert not door.patch_supernode_loop({3: 0.2}, 0.05, 0.5)
    assert loop.time is other and loop.pull_objects is inflatable_utils.pull_objects
    assert "not the time module" in said[0]


def test_a_supernode_loop_without_the_waits_to_shorten_is_left_alone(said: list[str]) -> None:
    assert not door.patch_supernode_loop({7: 0.2}, 0.05, 0.5)
    assert loop.time is __import__("time")
    assert "no time.sleep(7)" in said[0]


def _copy(function: Any, **kwdefaults: Any) -> Any:
    """Flower's function with the same code and signature (keyword defaults changed as given), as
    another object: what a later Flower might import from elsewhere or re-define."""
    copy = types.FunctionType(function.__code__, function.__globals__, function.__name__, function.__defaults__)
    copy.__kwdefaults__ = {**(function.__kwdefaults__ or {}), **kwdefaults}
    return copy


def _pull_messages_with_its_own_back_off(self: Any, message_ids: Any) -> Any:
    return http_grid.pull_objects([], lambda i: b"", initial_backoff=2.0)


def _activate_node_refusing_otherwise(request: Any, state: Any) -> Any:
    raise RuntimeError("refused")


def _set_both_pulls(function: Any) -> Callable[[pytest.MonkeyPatch], None]:
    def setup(monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(http_grid, "pull_objects", function)
        monkeypatch.setattr(inflatable_utils, "pull_objects", function)

    return setup


# Each check beyond the signatures (a group's `also`), failed with every signature as 1.42's:
# (group, how to change Flower, what the line says).
SOURCE_CHECKS: dict[str, tuple[str, Callable[[pytest.MonkeyPatch], None], str]] = {
    "pull_messages passes its own back-off": (
        "reply pulls",
        lambda mp: mp.setattr(http_grid.HttpGrid, "pull_messages", _pull_messages_with_its_own_back_off),
        "HttpGrid.pull_messages does not call pull_objects once on its defaults",
    ),
    "http_grid's pull_objects is someone else's": (
        "reply pulls",
        lambda mp: mp.setattr(http_grid, "pull_objects", _copy(inflatable_utils.pull_objects)),
        "http_grid.pull_objects is not inflatable_utils.pull_objects",
    ),
    "pull_objects starts at another back-off": (
        "reply pulls",
        _set_both_pulls(_copy(inflatable_utils.pull_objects, initial_backoff=2)),
        "pull_objects' initial_backoff is not 1 s",
    ),
    "the factories function is not config_loader's": (
        "objects in memory",
        lambda mp: mp.setattr(
            superlink_main,
            "get_objectstore_linkstate_factories",
            _copy(superlink_main.get_objectstore_linkstate_factories),
        ),
        "get_objectstore_linkstate_factories is not config_loader's",
    ),
    "check_abort is not utils'": (
        "run status",
        lambda mp: mp.setattr(fleet_handlers, "check_abort", _copy(superlink_utils.check_abort)),
        "fleet_handlers.check_abort is not flwr.server.superlink.utils.check_abort",
    ),
    "activate_node refuses with another code": (
        "refusal reasons",
        lambda mp: mp.setattr(fleet_handlers, "activate_node", _activate_node_refusing_otherwise),
        "activate_node does not raise FLEET_NODE_ACTIVATION_FAILED",
    ),
}


@pytest.mark.parametrize("check", SOURCE_CHECKS)
def test_flower_code_that_differs_beyond_its_signature_leaves_the_group_inert(
    check: str, monkeypatch: pytest.MonkeyPatch, said: list[str]
) -> None:
    group, change, says = SOURCE_CHECKS[check]
    change(monkeypatch)
    apply, targets = GROUPS[group]
    before = _now(targets)
    assert not apply()
    assert _now(targets) == before
    (line,) = said
    assert says in line and "not applied" in line and "Flower runs unchanged" in line


def test_a_replacement_that_cannot_be_built_leaves_its_whole_group_as_it_was() -> None:
    """All of a group's replacements are built before any is put in place: one that fails leaves
    none behind (here the node-key lookup would otherwise be cached without its write hooks)."""

    def broken(real: Any) -> Any:
        raise RuntimeError("cannot wrap")

    targets = GROUPS["node keys"][1]
    before = _now(targets)
    with pytest.raises(RuntimeError, match="cannot wrap"):
        door.cache_node_keys(lambda real, state, key: real(state, key), broken)
    assert _now(targets) == before


def test_stock_flower_applies_nothing_and_says_what_is_lost(monkeypatch: pytest.MonkeyPatch, said: list[str]) -> None:
    monkeypatch.setenv(door.STOCK_FLOWER_ENV, "1")
    assert door.stock_flower()
    for group, (apply, targets) in GROUPS.items():
        before = _now(targets)
        assert not apply(), group
        assert _now(targets) == before, group
    assert len(said) == len(GROUPS) == len(door.WHAT_STOCK_LOSES)
    assert all(f"{door.STOCK_FLOWER_ENV}=1" in line for line in said)
    assert any("180 s" in line and "engine.round_timeout_s" in line for line in said)  # the reply deadline


# ------------------------------------------------------------------- private fields ----


def _message() -> Message:
    claim_server_identity(1)
    return Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=7, message_type=MessageType.TRAIN)


def test_private_writes_read_back_through_flower_s_properties() -> None:
    msg = _message()
    door.set_message_id(msg, "m1")
    assert door.set_run_id(msg, 42)
    assert door.set_src_node_id(msg, 9)
    assert (msg.metadata.message_id, msg.metadata.run_id, msg.metadata.src_node_id) == ("m1", 42, 9)
    reply = Message(RecordDict({"c": ConfigRecord({"x": 2})}), reply_to=msg)
    out = door.error_reply(reply, Error(3, "bad"))
    assert out is reply and not out.has_content() and out.error.reason == "bad"


class _Renamed:
    """Metadata as a later Flower might keep it: the id under another field."""

    def __init__(self) -> None:
        self._id, self._src = "", 1

    @property
    def message_id(self) -> str:
        return self._id

    @property
    def src_node_id(self) -> int:
        return self._src


class _Holder:
    def __init__(self, metadata: Any) -> None:
        self.metadata = metadata


def test_a_renamed_message_id_field_is_named_not_written_into_nowhere() -> None:
    meta = _Renamed()
    with pytest.raises(door.FlowerInternalsChanged, match=r"_Renamed\._message_id \(flwr/app/metadata.py\) is gone"):
        door.set_message_id(_Holder(meta), "m1")  # type: ignore[arg-type]
    assert "_message_id" not in vars(meta)


def test_a_field_the_property_no_longer_reads_is_noticed() -> None:
    meta = _Renamed()
    meta.__dict__["_message_id"] = ""  # the old field is still there, but message_id reads _id
    with pytest.raises(door.FlowerInternalsChanged, match="is not what _Renamed.message_id reads"):
        door.set_message_id(_Holder(meta), "m1")  # type: ignore[arg-type]


def test_metadata_without_a_fields_dict_is_named() -> None:
    class Slotted:
        __slots__ = ("_id",)

        @property
        def message_id(self) -> str:
            return ""

    with pytest.raises(door.FlowerInternalsChanged, match=r"Slotted\._message_id \(flwr/app/metadata.py\) is gone"):
        door.set_message_id(_Holder(Slotted()), "m1")  # type: ignore[arg-type]


def test_a_task_identity_flower_no_longer_reads_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    door.claim_task_identity(4, 5, 6)
    assert (TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id) == (4, 5, 6)
    monkeypatch.delattr(type(TaskIdentity), "run_id")  # as if the identity moved elsewhere
    with pytest.raises(door.FlowerInternalsChanged, match=r"TaskIdentity \(flwr/supercore/task_identity.py\) has no"):
        door.claim_task_identity(7, 8, 9)
    assert TaskIdentity.task_id == 4  # nothing set


def test_a_renamed_source_node_field_leaves_the_reply_as_flower_made_it(said: list[str]) -> None:
    meta = _Renamed()
    assert not door.set_src_node_id(_Holder(meta), 5)  # type: ignore[arg-type]
    assert meta.src_node_id == 1 and "_src_node_id" not in vars(meta)
    assert "_Renamed._src_node_id" in said[0]


class _ContentElsewhere(Message):
    """A Message as a later Flower might keep it: its content under another field."""

    def has_content(self) -> bool:
        return self.__dict__["_body"] is not None


def test_an_error_reply_where_the_content_field_is_renamed_is_a_new_message(said: list[str]) -> None:
    reply = Message(RecordDict({"c": ConfigRecord({"x": 2})}), reply_to=_message())
    reply.__dict__["_body"] = body = reply.__dict__.pop("_content")
    reply.__class__ = _ContentElsewhere
    out = door.error_reply(reply, Error(3, "bad"))
    assert out is not reply and out.has_error() and out.metadata is reply.metadata
    assert reply.__dict__["_body"] is body and "_content" not in reply.__dict__  # nothing written into it
    assert "Message._content" in said[0]


# ------------------------------------------------------------ loaded by the scripts ----


def test_the_worker_script_loads_the_door_by_path_without_the_project_or_flower() -> None:
    """The ClientApp worker runs as a script and must load no module of the project before the
    app bundle's: it loads the door by path, under a private name; the door imports no flwr."""
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location(
            "clientapp_worker", {str(ROOT / "federated/engines/deployment/clientapp_worker.py")!r})
        worker = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(worker)
        door = worker.flower_door()
        print(door.__name__, door.stock_flower(), door is worker._door)
        print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"federated", "clients", "flwr"}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["_multimed_fl_flower_door False True", "[]"]


def test_site_level_dp_refuses_to_build_where_flowers_noise_hook_changed() -> None:
    """The DP wrapper overrides Flower's private noise hook: Flower 1.42's passes the check, a parent
    whose hook is gone or takes other parameters is refused by name instead of skipped silently."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    from federated.core.flower_door import FlowerInternalsChanged, check_server_noise_hook

    class Ours(DifferentialPrivacyServerSideFixedClipping):
        pass

    check_server_noise_hook(Ours)

    class RenamedParent:
        def aggregate_train(self, server_round, replies):  # calls no hook
            return None

    class Gone(RenamedParent):
        pass

    class OtherParams:
        def _add_noise_to_aggregated_arrays(self, arrays, scale):
            return arrays

        def aggregate_train(self, server_round, replies):
            return self._add_noise_to_aggregated_arrays(None, 1.0)

    class Changed(OtherParams):
        pass

    for cls in (Gone, Changed):
        with pytest.raises(FlowerInternalsChanged, match="_add_noise_to_aggregated_arrays"):
            check_server_noise_hook(cls)
