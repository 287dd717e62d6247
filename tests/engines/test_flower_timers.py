"""The waits we shorten on a deployed message's path, through Flower 1.42's own code: the
ServerApp's pull of a reply whose objects are still being uploaded (HttpGrid.pull_messages),
and the ClientApp worker's pull of a message its SuperNode is still receiving."""

from __future__ import annotations

import importlib
import threading
import types
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.serde import context_to_proto, fab_to_proto, message_to_proto, run_to_proto
from flwr.proto.message_pb2 import ConfirmMessageReceivedResponse, PullObjectResponse  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import PullAppMessagesResponse, PullTaskInputResponse  # pylint: disable=E0611
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.run import Run
from flwr.superlink.grid import http_grid
from flwr.superlink.grid.http_grid import HttpGrid

from federated.engines.inprocess import claim_server_identity
from federated.server import transport

# The module, not the function of the same name that federated.engines.deployment exports.
clientapp_worker = importlib.import_module("federated.engines.deployment.clientapp_worker")

UNAVAILABLE_TRIES = 3  # Flower's own back-off would wait 1 + 2 + 4 s for these


@pytest.fixture(autouse=True)
def _restore_http_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_grid, "pull_objects", inflatable_utils.pull_objects)


@pytest.fixture
def backoffs(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every wait of flwr's pull_objects between tries of an object (it waits on an Event)."""
    waits: list[float] = []

    class Event(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(float(timeout or 0.0))
            return super().wait(timeout)

    fake = types.SimpleNamespace(Event=Event, Lock=threading.Lock)
    monkeypatch.setattr(inflatable_utils, "threading", fake)
    return waits


def _assert_backoff(waits: list[float], initial: float, cap: float) -> None:
    """Waits from `initial`, doubling to `cap`, with flwr's +-20 % jitter."""
    assert waits, "no retry: the objects were never missing"
    assert min(waits) == pytest.approx(initial, rel=0.21)
    assert max(waits) <= cap * 1.2 + 1e-9


class SlowUpload:
    """A store whose objects (of one message) are not there for the first UNAVAILABLE_TRIES
    pulls of each, as on a SuperLink (or SuperNode) the sender is still uploading to."""

    def __init__(self, msg: Message) -> None:
        self.objects = {k: v.deflate() for k, v in get_all_nested_objects(msg).items()}
        self.tries: dict[str, int] = {}

    def PullObject(self, request: Any) -> PullObjectResponse:
        oid = request.object_id
        self.tries[oid] = self.tries.get(oid, 0) + 1
        if self.tries[oid] <= UNAVAILABLE_TRIES:
            return PullObjectResponse(object_found=True, object_available=False)
        return PullObjectResponse(object_found=True, object_available=True, object_content=self.objects[oid])

    def ConfirmMessageReceived(self, request: Any) -> ConfirmMessageReceivedResponse:
        return ConfirmMessageReceivedResponse()


def _reply(run_id: int) -> Message:
    claim_server_identity(run_id=run_id)  # Flower builds messages only inside a run
    model = ArrayRecord([np.arange(12, dtype=np.float32)])
    sent = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=7, message_type=MessageType.TRAIN)
    sent.metadata.__dict__["_message_id"] = "m0"
    reply = Message(RecordDict({"arrays": model}), reply_to=sent)
    reply.metadata.__dict__["_message_id"] = reply.object_id
    return reply


class FakeRuntime(SlowUpload):
    """The SuperLink's Runtime API as HttpGrid.pull_messages sees it: one reply, just pushed."""

    def __init__(self, reply: Message) -> None:
        super().__init__(reply)
        self.proto = message_to_proto(remove_content_from_message(reply))
        self.tree = get_object_tree(reply)

    def PullMessages(self, request: Any) -> PullAppMessagesResponse:
        return PullAppMessagesResponse(messages_list=[self.proto], message_object_trees=[self.tree])


def _grid(runtime: FakeRuntime, run_id: int) -> HttpGrid:
    grid = HttpGrid(token="t")
    grid.set_run(Run.create_empty(run_id))
    grid._client = runtime  # type: ignore[assignment]  # connected, to a fake
    return grid


def test_a_reply_being_uploaded_is_pulled_on_short_retries_through_flower_s_pull_messages(
    backoffs: list[float],
) -> None:
    reply = _reply(run_id=5)
    assert transport.shorten_reply_object_pulls()
    assert transport.shorten_reply_object_pulls()  # idempotent
    assert http_grid.pull_objects.keywords == {  # type: ignore[attr-defined]
        "initial_backoff": transport.REPLY_OBJECT_BACKOFF_S[0],
        "backoff_cap": transport.REPLY_OBJECT_BACKOFF_S[1],
    }
    runtime = FakeRuntime(reply)
    (got,) = _grid(runtime, 5).pull_messages(["m0"])
    assert not got.has_error() and got.metadata.reply_to_message_id == "m0"
    np.testing.assert_array_equal(got.content["arrays"].to_numpy_ndarrays()[0], np.arange(12, dtype=np.float32))
    assert min(runtime.tries.values()) == UNAVAILABLE_TRIES + 1
    _assert_backoff(backoffs, *transport.REPLY_OBJECT_BACKOFF_S)  # Flower's: 1 s -> 10 s


def test_exchange_against_a_superlink_shortens_the_reply_object_retries() -> None:
    from tests.server.test_exchange import FakeSuperLink, _messages

    assert not isinstance(http_grid.pull_objects, __import__("functools").partial)
    transport.exchange(FakeSuperLink(block_s=0.0), _messages(2))
    assert http_grid.pull_objects.func is inflatable_utils.pull_objects  # type: ignore[attr-defined]


def test_a_pull_objects_that_is_not_flower_1_42_s_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def theirs(*args: Any, **kwargs: Any) -> dict[str, bytes]:
        return {}

    monkeypatch.setattr(http_grid, "pull_objects", theirs)
    assert not transport.shorten_reply_object_pulls()
    assert http_grid.pull_objects is theirs


def test_a_pull_messages_with_its_own_back_off_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def pull_messages(self: HttpGrid, message_ids: Any) -> Any:
        return http_grid.pull_objects([], lambda i: b"", initial_backoff=2.0)

    monkeypatch.setattr(HttpGrid, "pull_messages", pull_messages)
    assert not transport.shorten_reply_object_pulls()
    assert http_grid.pull_objects is inflatable_utils.pull_objects


class FakeSuperNode(SlowUpload):
    """A SuperNode's Runtime API as the worker sees it: a claimed task whose message content
    the SuperNode is still pulling from the SuperLink."""

    def __init__(self, msg: Message, context: Context) -> None:
        super().__init__(msg)
        self.msg, self.context = msg, context

    def PullTaskInput(self, request: Any) -> PullTaskInputResponse:
        run = Run.create_empty(self.context.run_id)
        fab = Fab("h", b"", {})
        return PullTaskInputResponse(
            context=context_to_proto(self.context), run=run_to_proto(run), fab=fab_to_proto(fab), task_id=3
        )

    def PullMessages(self, request: Any) -> PullAppMessagesResponse:
        proto = message_to_proto(remove_content_from_message(self.msg))
        return PullAppMessagesResponse(messages_list=[proto], message_object_trees=[get_object_tree(self.msg)])


def test_the_worker_pulls_a_message_still_arriving_on_short_retries(backoffs: list[float]) -> None:
    msg = _reply(run_id=9)  # any message with a model in it
    context = Context(run_id=9, node_id=7, node_config={}, state=RecordDict(), run_config={})
    node = FakeSuperNode(msg, context)
    got, ctx, _, _ = clientapp_worker._pull_task_input(node)
    assert got.metadata.message_id == msg.object_id and ctx.node_id == 7
    np.testing.assert_array_equal(got.content["arrays"].to_numpy_ndarrays()[0], np.arange(12, dtype=np.float32))
    assert min(node.tries.values()) == UNAVAILABLE_TRIES + 1
    initial, cap = clientapp_worker.TASK_OBJECT_BACKOFF_S
    assert initial < cap <= 0.1  # the former 0.05 -> 0.5 s left the model waiting up to 0.4 s
    _assert_backoff(backoffs, initial, cap)
