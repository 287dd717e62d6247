"""How the server talks to sites: a Grid view of some nodes, and `exchange`, send-and-receive with
every reply charged to its node and, against a SuperLink, Flower's fixed 3 s waits shortened."""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from logging import WARNING
from typing import TYPE_CHECKING, Any

from flwr.app import Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp.grid import Grid

from federated.core import flower_door
from federated.core.folding import FoldError, fold, is_folded, unfold
from federated.core.replies import attribute

if TYPE_CHECKING:
    from federated.core.flower_door.objects import Run


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

# A reply whose header is on the SuperLink but whose objects never arrive (its SuperNode or ClientApp
# killed while sending it) blocks Flower's pull_messages in pull_objects until the SuperLink's push
# session expires: flwr.supercore.constant.OBJECT_PUSH_SESSION_TTL_SECONDS, 180 s after the header,
# whatever engine.round_timeout_s says (the ~180 s stall of a hand-run deployment). Within an exchange
# with a timeout, a reply's objects are awaited until the deadline plus this grace, then the reply is
# that site's error; a reply whose objects are all there is still pulled after the deadline.
REPLY_GRACE_S = 5.0
# When the exchange's pulls of reply objects end: None outside an exchange with a timeout.
_PULLS_END: contextvars.ContextVar[float | None] = contextvars.ContextVar("multimed_pulls_end", default=None)
_CUT_SHORT = "multimed-fl: cut at the exchange's deadline"


def shorten_reply_object_pulls() -> bool:
    """Make HttpGrid.pull_messages retry a reply's missing objects on REPLY_OBJECT_BACKOFF_S
    instead of Flower's 1 s -> 10 s (Flower's try limit kept), and within an exchange with a timeout
    stop at its deadline plus REPLY_GRACE_S (flower_door.patch_reply_object_pulls, guarded there:
    False, nothing changed, where this Flower's pull is not 1.42's or under stock Flower).
    Idempotent; it changes the pull in this process only (the ServerApp's)."""
    return flower_door.patch_reply_object_pulls(*REPLY_OBJECT_BACKOFF_S, ends=_PULLS_END.get, cut_reason=_CUT_SHORT)


def superlink_grid(grid: Grid) -> Any:
    """The SuperLink's grid (Flower's HttpGrid) under any NodeSubsetGrid view; None where the nodes
    are simulated."""
    while isinstance(grid, NodeSubsetGrid):
        grid = grid._grid
    return grid if flower_door.is_superlink_grid(grid) else None


def over_superlink(grid: Grid) -> bool:
    """Whether messages to these nodes go through a SuperLink (a deployment), where every
    exchange costs network round trips, rather than to simulated sites."""
    return superlink_grid(grid) is not None


@contextlib.contextmanager
def _reply_pulls_end(end: float | None) -> Iterator[None]:
    token = _PULLS_END.set(end)
    try:
        yield
    finally:
        _PULLS_END.reset(token)


# A node that gave no reply to an earlier exchange of the same round within its deadline (dead, or
# still busy with that message: a SuperNode handles one message at a time) is awaited this long in a
# later exchange of the round, not the whole timeout again: with training and evaluation in two
# exchanges, a node killed mid-round otherwise cost the round up to two timeouts.
LATE_WAIT_S = 5.0
ROUND_TIMEOUT = "engine.round_timeout_s"  # the setting an exchange's timeout is, unless told another
_STOPPED = "the site stopped while sending it?)"


def exchange(
    grid: Grid,
    messages: list[Message],
    timeout: float | None = None,
    late: Collection[int] = (),
    setting: str = ROUND_TIMEOUT,
) -> list[Message]:
    """send_and_receive, with every reply charged to the node its message went to; against a
    SuperLink, messages and replies travel folded (push_folded, unfolded), replies are pulled on
    PULL_WAITS_S instead of Flower's fixed 3 s, a reply's objects still being uploaded are retried
    on REPLY_OBJECT_BACKOFF_S (shorten_reply_object_pulls), and with a timeout nothing waits past
    the deadline plus REPLY_GRACE_S (a reply whose content never comes is that site's error). The
    nodes in `late` (no reply in an earlier exchange of the round) are awaited LATE_WAIT_S at most,
    and once only they are left, their replies' content REPLY_GRACE_S after that. `setting` names
    the timeout in what the site's error and the log say."""
    if not over_superlink(grid):
        return attribute(messages, grid.send_and_receive(messages, timeout=timeout))
    shorten_reply_object_pulls()
    t0 = time.monotonic()
    pending = push_folded(grid, messages)
    deadline = None if timeout is None else t0 + timeout
    ids = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    brief = {i for i, n in ids.items() if n in set(late)}
    round_end = None if deadline is None else deadline + REPLY_GRACE_S
    whose = "the round's" if setting == ROUND_TIMEOUT else "the"
    round_cut = f"{whose} {timeout:g} s ({setting}; {_STOPPED}" if timeout is not None else ""
    late_cut = f"{LATE_WAIT_S:g} s, the wait for a node late in this round (transport.LATE_WAIT_S; {_STOPPED}"
    replies: list[Message] = []
    last_call = False
    k = 0  # pulls since the last reply came in
    while True:
        end, cut = round_end, round_cut
        if brief and pending <= brief:  # only late nodes left: their content too gets the short wait
            late_end = max(time.monotonic(), t0 + LATE_WAIT_S) + REPLY_GRACE_S
            if end is None or late_end < end:
                end, cut = late_end, late_cut
        with _reply_pulls_end(end):
            got = [_named_cut(unfolded(m), cut) for m in grid.pull_messages(pending)]
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or last_call:
            break
        now = time.monotonic()
        if (deadline is not None and now >= deadline) or (pending <= brief and now - t0 >= LATE_WAIT_S):
            # One more pull at once: a pull can block (up to the deadline plus REPLY_GRACE_S, on a
            # reply whose objects never arrive), and the replies that came in meanwhile are in
            # time; without it a healthy site's reply was counted as missing.
            last_call = True
            continue
        if got:  # replies come in bunches (sites that finish together): wait short again
            k = 0
        time.sleep(PULL_WAITS_S[min(k, len(PULL_WAITS_S) - 1)])
        k += 1
    out = attribute(messages, replies)
    if pending and (deadline is not None or brief):
        short = pending <= brief and (deadline is None or time.monotonic() < deadline)
        log(
            WARNING,
            "no reply from node(s) %s within %s; the exchange went on after %.1f s",
            sorted(ids[i] for i in pending if i in ids),
            f"{LATE_WAIT_S:g} s (transport.LATE_WAIT_S: late in this round)" if short else f"{timeout:g} s ({setting})",
            time.monotonic() - t0,
        )
    return out


# Flower's error codes for a reply that never came, as opposed to one a site sent: its content lost on
# the way (MESSAGE_UNAVAILABLE: HttpGrid.pull_messages when a reply's objects never arrive, which is
# also what _named_cut makes of one cut at the deadline), or made by the SuperLink for a message that
# expired unanswered (REPLY_MESSAGE_UNAVAILABLE) or whose node is offline (NODE_UNAVAILABLE).
LOST_REPLY_CODES = frozenset(
    {ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE}
)


def lost_reply(reply: Message) -> bool:
    """Whether an error reply stands for no answer (its node dead or its content lost), so that the
    node counts as late for the rest of the round, like one that gave no reply at all."""
    return reply.has_error() and reply.error.code in LOST_REPLY_CODES


def _named_cut(reply: Message, waited: str) -> Message:
    """A reply whose content the deadline cut off says so, instead of Flower's words about an
    expired upload session; `waited`: the wait that ran out."""
    if reply.has_error() and _CUT_SHORT in (reply.error.reason or ""):
        reply.error = Error(
            ErrorCode.MESSAGE_UNAVAILABLE,
            f"its reply's content did not arrive within {waited}",
        )
    return reply


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
        return flower_door.error_reply(
            reply, Error(ErrorCode.UNKNOWN, f"FoldError: its reply could not be unfolded: {e}")
        )
    return reply


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float) -> list[int]:
    """In a deployment the ServerApp starts as soon as the run is submitted; SuperNodes come
    online when they do. Wait (up to timeout_s) until `expected` nodes are connected; the nodes
    connected then, fewer than expected if some never came (the handshake names them)."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= expected or time.monotonic() >= deadline:
            return nodes
        time.sleep(1.0)
