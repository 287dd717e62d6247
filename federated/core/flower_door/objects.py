"""Flower objects the framework handles where Flower has no public way: the private fields of a
Message and its Metadata (written as Flower's own grids and runtimes write them), the process's
task identity, an empty Run, the SuperLink's grid class, the array chunk size and SecAgg+ key
bytes. Each write is checked: the field must be there before and read back through Flower's
public property after, so a renamed field is named instead of written into nowhere."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from .guards import FlowerInternalsChanged, say_once

if TYPE_CHECKING:
    from flwr.app import Error, Message
    from flwr.supercore.run import Run as Run  # the type of a Grid's run, for annotations elsewhere

METADATA_SOURCE = "flwr/app/metadata.py"
MESSAGE_SOURCE = "flwr/app/message/message.py"
TASK_IDENTITY_SOURCE = "flwr/supercore/task_identity.py"
# Flower 1.42's chunk size (flwr/common/constant.py), used where the constant is gone.
FLOWER_1_42_CHUNK_BYTES = 5 * 1024 * 1024


def _write(obj: Any, field: str, value: Any, read_back: str, source: str) -> str | None:
    """Write obj's private `field` as Flower does; what went wrong, or None."""
    fields = getattr(obj, "__dict__", {})  # none where Flower moved to __slots__: the field is gone too
    what = f"{type(obj).__qualname__}.{field} ({source})"
    if field not in fields:
        return f"{what} is gone"
    fields[field] = value
    if getattr(obj, read_back) != value:
        return f"{what} is not what {type(obj).__qualname__}.{read_back} reads"
    return None


def set_message_id(msg: Message, message_id: str) -> None:
    """Give a message its id, as a SuperLink or Flower's in-memory grid does (no public setter).
    Replies are matched to messages by it, so there is no doing without: raises
    FlowerInternalsChanged where the field is not Flower 1.42's."""
    problem = _write(msg.metadata, "_message_id", message_id, "message_id", METADATA_SOURCE)
    if problem:
        raise FlowerInternalsChanged(f"cannot set a message's id: {problem} (CONTRIBUTING.md: Upgrading Flower)")


def set_run_id(msg: Message, run_id: int) -> bool:
    """Stamp a message with its run, as a SuperLink does; False (logged once) where the field is
    not Flower 1.42's: the message keeps the run id Flower gave it."""
    problem = _write(msg.metadata, "_run_id", run_id, "run_id", METADATA_SOURCE)
    if problem:
        say_once("metadata._run_id", f"messages keep Flower's run id: {problem}")
    return problem is None


def set_src_node_id(msg: Message, node_id: int) -> bool:
    """Charge a reply to a node (Metadata has no public setter); False (logged once) where the
    field is not Flower 1.42's: the reply stays charged as Flower made it (a SuperLink-made error
    to the SuperLink, node 1)."""
    problem = _write(msg.metadata, "_src_node_id", node_id, "src_node_id", METADATA_SOURCE)
    if problem:
        say_once("metadata._src_node_id", f"replies stay charged to the node Flower names: {problem}")
    return problem is None


def error_reply(reply: Message, error: Error) -> Message:
    """The reply with its content dropped and `error` set (Message has no public way to swap
    content for an error): the same object where Message keeps its content as 1.42's does, else a
    new Message with the reply's metadata (Flower's constructor takes it)."""
    from flwr.app import Message

    fields = vars(reply)
    if "_content" in fields and "_error" in fields:
        fields["_content"] = None
        if not reply.has_content():
            reply.error = error
            return reply
    say_once("message._content", f"Message._content ({MESSAGE_SOURCE}) is not 1.42's: error replies are new messages")
    build: Any = Message  # `metadata=` is in no overload: Flower keeps it for its own use
    return build(metadata=reply.metadata, error=error)


def claim_task_identity(task_id: int, run_id: int, node_id: int) -> None:
    """Set the identity Flower stamps on every message this process creates (a SuperLink-launched
    ServerApp and flwr-clientapp set it at start-up); without it Flower builds no message. Raises
    FlowerInternalsChanged where TaskIdentity is gone or has no settable task_id, run_id, node_id
    (set on another class, they would be plain attributes Flower never reads)."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError as e:
        raise FlowerInternalsChanged(
            f"flwr.supercore.task_identity is gone ({e}): messages cannot be built in this process "
            "(CONTRIBUTING.md: Upgrading Flower)"
        ) from e
    names = ("task_id", "run_id", "node_id")
    unsettable = [
        n for n in names if getattr(inspect.getattr_static(type(TaskIdentity), n, None), "fset", None) is None
    ]
    if unsettable:
        raise FlowerInternalsChanged(
            f"TaskIdentity ({TASK_IDENTITY_SOURCE}) has no settable {', '.join(unsettable)}: messages cannot be "
            "built in this process (CONTRIBUTING.md: Upgrading Flower)"
        )
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, run_id, node_id


def empty_run(run_id: int) -> Run:
    """A Run with only its id, as a Grid holds before it knows more."""
    from flwr.supercore.run import Run

    return Run.create_empty(run_id)


def is_superlink_grid(grid: Any) -> bool:
    """Whether `grid` is the SuperLink's (Flower's HttpGrid), not a simulated one."""
    from flwr.superlink.grid.http_grid import HttpGrid

    return isinstance(grid, HttpGrid)


def max_array_chunk_size() -> int:
    """Flower's array chunk size (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE, flwr/common/constant.py); 1.42's
    default where the constant is gone (logged once)."""
    from flwr.common import constant

    size = getattr(constant, "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", None)
    if size is None:
        say_once("chunk size", f"FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE is gone: using {FLOWER_1_42_CHUNK_BYTES} bytes")
        return FLOWER_1_42_CHUNK_BYTES
    return int(size)


def private_key_from_bytes(data: bytes) -> Any:
    """A SecAgg+ private key from its bytes, as Flower's SecAgg+ mod encodes it."""
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key

    return bytes_to_private_key(data)


def public_key_from_bytes(data: bytes) -> Any:
    """A SecAgg+ public key from its bytes, as Flower's SecAgg+ mod encodes it."""
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key

    return bytes_to_public_key(data)


DP_FIXED_CLIPPING_SOURCE = "flwr/serverapp/strategy/dp_fixed_clipping.py"
# The hook Flower's server-side fixed-clipping wrapper noises an aggregate with (no public call).
SERVER_NOISE_HOOK = "_add_noise_to_aggregated_arrays"


def check_server_noise_hook(wrapper_class: type) -> None:
    """Site-level DP overrides Flower's private noise hook (the model travels packed, Flower noises
    per tensor) and calls it on a secure sum, which has no other way in. A renamed hook would be
    skipped silently by Flower's own aggregate_train, so refuse to build the wrapper instead."""
    flowers = wrapper_class.__mro__[1]
    hook = getattr(flowers, SERVER_NOISE_HOOK, None)
    params = list(inspect.signature(hook).parameters) if callable(hook) else None
    aggregate = getattr(flowers, "aggregate_train", None)
    calls = callable(aggregate) and SERVER_NOISE_HOOK in inspect.getsource(aggregate)
    if params != ["self", "aggregated_arrays"] or not calls:
        raise FlowerInternalsChanged(
            f"{flowers.__qualname__}.{SERVER_NOISE_HOOK} ({DP_FIXED_CLIPPING_SOURCE}) is not "
            "Flower 1.42's (gone, other parameters, or no longer called by aggregate_train): site-level DP "
            "cannot noise the model; see CONTRIBUTING.md, Upgrading Flower"
        )


def add_server_noise(wrapper: Any, arrays: Any) -> Any:
    """Flower's own server-side noise on `arrays`, through the hook check_server_noise_hook checked."""
    flower_hook = getattr(type(wrapper).__mro__[1], SERVER_NOISE_HOOK)
    return flower_hook(wrapper, arrays)
