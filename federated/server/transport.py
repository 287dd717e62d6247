"""How the server talks to sites: a Grid view of some nodes, and `exchange`, send-and-receive with
every reply charged to its node and, against a SuperLink, Flower's fixed 3 s waits shortened."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from flwr.app import Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp.grid import Grid
from flwr.supercore.run import Run
from flwr.superlink.grid.http_grid import HttpGrid

from federated.core.folding import FoldError, fold, is_folded, unfold
from federated.core.replies import attribute
from federated.server.site_agreement import FederationError


class NodeSubsetGrid(Grid):
    """A view of a Grid that exposes only some nodes (so a strategy samples training sites only)."""

    def __init__(self, grid: Grid, node_ids: Sequence[int]) -> None:
        self._grid, self._ids = grid, list(node_ids)

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


# Waits between pulls for replies from a SuperLink: short at first and again after each reply (an
# evaluation reply comes in tenths of a second, the other sites' often soon after the first), then
# every 0.2 s while sites train. Flower's HttpGrid.send_and_receive sleeps 3 s between pulls
# (flwr/superlink/grid/http_grid.py), which made every round trip up to 3 s longer; a 0.5 s cap
# still cost a train reply 0.25 s on average (a pull is ~10-40 ms).
PULL_WAITS_S = (0.05, 0.05, 0.1, 0.1, 0.2)

# Retries of a reply's objects that are not on the SuperLink yet: initial, cap (seconds).
# The SuperLink hands out a reply as soon as its SuperNode has pushed the message header, before
# the SuperNode has uploaded its objects (tenths of a second later), so the first PullObject of a
# fresh reply often finds them missing; HttpGrid.pull_messages then retries after 1, 2, 4 .. 10 s
# (flwr.supercore.constant.PULL_INITIAL_BACKOFF / PULL_BACKOFF_CAP). Profiled in a deployed round
# (3 TLS SuperNodes on loopback), that first 1 s back-off was most of the ~1.5 s per exchange that
# no site accounted for.
REPLY_OBJECT_BACKOFF_S = (0.05, 0.5)
# Flower's 500 tries per object still bound a pull that never completes (a site killed mid-upload)
# at ~250 s at this cap; no try limit would block the round for Flower's 2 h.
_REPLY_PULL_KEYWORDS: dict[str, Any] = {
    "initial_backoff": REPLY_OBJECT_BACKOFF_S[0],
    "backoff_cap": REPLY_OBJECT_BACKOFF_S[1],
}


def shorten_reply_object_pulls() -> bool:
    """Make HttpGrid.pull_messages retry a reply's missing objects on REPLY_OBJECT_BACKOFF_S
    instead of Flower's 1 s -> 10 s (Flower's try limit kept). Only where this Flower's pull_messages
    is 1.42's (one call of the module's `pull_objects`, on its default back-off); False (nothing
    changed) otherwise. Idempotent; it changes the back-off in this process only (the ServerApp's)."""
    import functools
    import inspect

    from flwr.supercore.inflatable import inflatable_utils
    from flwr.superlink.grid import http_grid

    current: Any = http_grid.pull_objects
    if isinstance(current, functools.partial) and current.func is inflatable_utils.pull_objects:
        return current.keywords == _REPLY_PULL_KEYWORDS  # ours already (or someone else's: leave it)
    if current is not inflatable_utils.pull_objects:
        return False  # someone else's pull_objects: leave it
    source = inspect.getsource(http_grid.HttpGrid.pull_messages)
    params = inspect.signature(current).parameters
    if (
        source.count("pull_objects(") != 1
        or "backoff" in source
        or "max_tries_per_object" in source
        or not all(k in params for k in _REPLY_PULL_KEYWORDS)
        or params["initial_backoff"].default != 1
    ):
        return False
    http_grid.pull_objects = functools.partial(current, **_REPLY_PULL_KEYWORDS)
    return True


def over_superlink(grid: Grid) -> bool:
    """Whether messages to these nodes go through a SuperLink (a deployment), where every
    exchange costs network round trips, rather than to simulated sites."""
    while isinstance(grid, NodeSubsetGrid):
        grid = grid._grid
    return isinstance(grid, HttpGrid)


def exchange(grid: Grid, messages: list[Message], timeout: float | None = None) -> list[Message]:
    """send_and_receive, with every reply charged to the node its message went to; against a
    SuperLink, messages and replies travel folded (push_folded, unfolded), replies are pulled on
    PULL_WAITS_S instead of Flower's fixed 3 s, and a reply's objects still being uploaded are
    retried on REPLY_OBJECT_BACKOFF_S (shorten_reply_object_pulls)."""
    if not over_superlink(grid):
        return attribute(messages, grid.send_and_receive(messages, timeout=timeout))
    shorten_reply_object_pulls()
    pending = push_folded(grid, messages)
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    last_call = False
    k = 0  # pulls since the last reply came in
    while True:
        got = [unfolded(m) for m in grid.pull_messages(pending)]
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or last_call:
            break
        if deadline is not None and time.monotonic() >= deadline:
            # One more pull at once: a pull can block for long (the SuperLink retrying a reply whose
            # objects never arrive, e.g. of a site killed mid-upload), and the replies that came in
            # meanwhile are in time; without it a healthy site's reply was counted as missing.
            last_call = True
            continue
        if got:  # replies come in bunches (sites that finish together): wait short again
            k = 0
        time.sleep(PULL_WAITS_S[min(k, len(PULL_WAITS_S) - 1)])
        k += 1
    return attribute(messages, replies)


def push_folded(grid: Grid, messages: list[Message]) -> set[str]:
    """Push the messages with their records folded into one object each (core/folding.py: 3
    requests per message and hop instead of 6-8); the messages keep their own content."""
    contents = [m.content for m in messages]
    try:
        for m, content in zip(messages, contents, strict=True):
            m.content = fold(content)
        return set(grid.push_messages(messages))
    finally:
        for m, content in zip(messages, contents, strict=True):
            m.content = content


def unfolded(reply: Message) -> Message:
    """A reply with its records unfolded; one that cannot be unfolded becomes an error reply
    naming why (so it is that site's failure, not the round's)."""
    if reply.has_error() or not is_folded(reply.content):
        return reply
    try:
        reply.content = unfold(reply.content)
    except FoldError as e:
        reply.__dict__["_content"] = None  # Message has no public way to swap content for an error
        reply.error = Error(ErrorCode.UNKNOWN, f"FoldError: its reply could not be unfolded: {e}")
    return reply


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float) -> list[int]:
    """In a deployment the ServerApp starts as soon as the run is submitted; SuperNodes come
    online when they do. Wait (up to timeout_s) until `expected` nodes are connected."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= expected or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if len(nodes) < expected:
        raise FederationError(
            f"handshake: {len(nodes)} of the {expected} planned sites connected within {timeout_s:g} s "
            f"(engine.expected_sites / engine.handshake_timeout_s); under `flwr run`, start one "
            f'SuperNode per site: --federation-config "num-supernodes={expected}"'
        )
    return nodes
