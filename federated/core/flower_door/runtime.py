"""A SuperNode's Runtime API as a ClientApp process speaks it (the calls of Flower's
`flwr-clientapp`, flwr/supernode/runtime/run_clientapp.py): claim a task, pull its input, load
the app from its bundle, push the reply and the task's outcome, beat the task's heartbeat. The
long-lived ClientApp worker (federated/engines/deployment/clientapp_worker.py) is built on these;
what it does with them (one task after another, restarts, timings) is its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .objects import claim_task_identity, set_message_id


def watch_parent(pid: int) -> None:
    """SIGINT to this process when process `pid` (its SuperNode) is gone, as Flower's own do."""
    from flwr.supercore.app_utils import start_parent_process_monitor

    start_parent_process_monitor(pid)


def runtime_client(address: str, component: str, token: str | None = None) -> tuple[Any, Any]:
    """(client, retry invoker) of the SuperNode's Runtime API at `address` (plain HTTP, local), as
    `component` ("SuperExec" to claim tasks, "flwr-clientapp" to run one, with its `token`)."""
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    retry = make_simple_http_retry_invoker()
    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None, interceptors=interceptors, retry_invoker=retry
    )
    return client, retry


def acquire_clientapp_task(client: Any) -> tuple[str, str] | None:
    """Claim the SuperNode's next ClientApp task: (its token, its app bundle's hash), or None
    when there is none."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType

    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    if not (res.HasField("task") and res.token):
        return None
    return str(res.token), str(res.task.fab_hash)


def send_task_heartbeat(client: Any) -> bool:
    """One heartbeat of the claimed task; False where the SuperNode refused it (the task is lost)."""
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611

    return bool(client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success)


def heartbeat_sender(beat: Callable[[], bool]) -> Any:
    """Flower's HeartbeatSender around `beat` (True: sent; False: retry soon): start(), stop(),
    is_running."""
    from flwr.supercore.heartbeat import HeartbeatSender

    return HeartbeatSender(beat)


def pull_task_input(
    client: Any, initial_backoff: float, backoff_cap: float, max_time: float
) -> tuple[Any, Any, Any, Any]:
    """(message, context, run, app bundle) of the claimed task, as flwr-clientapp pulls them, with
    the message's objects retried from `initial_backoff` to `backoff_cap` s for up to `max_time`
    s in all (no try limit); this process takes the task's identity."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

    res = client.PullTaskInput(PullTaskInputRequest())
    claim_task_identity(res.task_id, res.run.run_id, res.context.node_id)
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=initial_backoff,
        backoff_cap=backoff_cap,
        max_tries_per_object=None,
        max_time=max_time,
    )
    set_message_id(message, tree.object_id)  # as flwr-clientapp does
    return message, context, run, fab


def load_clientapp(fab: Any, run: Any) -> tuple[Callable[..., Any], str]:
    """(the ClientApp of the app bundle `fab` of `run`, the folder it was installed to), as
    flwr-clientapp loads it; a failure to load raises what `is_load_error` recognises."""
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn

    app_path = install_from_fab(fab.content, skip_prompt=True)
    app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
        run.fab_id, run.fab_version, fab.hash_str
    )
    return app, str(app_path)


def is_load_error(error: BaseException) -> bool:
    """Whether `error` is Flower's "the ClientApp could not be loaded"."""
    from flwr.clientapp.client_app import LoadClientAppError

    return isinstance(error, LoadClientAppError)


def push_reply(client: Any, reply: Any, context: Any) -> None:
    """Push the app's reply and its Context to the SuperNode (flwr-clientapp's push_message,
    looked up when called)."""
    from flwr.supernode.runtime import run_clientapp

    run_clientapp.push_message(client, reply, context)


def push_task_output(client: Any, context: Any, sub_status: str, details: str) -> None:
    """Tell the SuperNode how the task ended (flwr-clientapp's push_task_output)."""
    from flwr.supernode.runtime import run_clientapp

    run_clientapp.push_task_output(client=client, context=context, sub_status=sub_status, details=details)
