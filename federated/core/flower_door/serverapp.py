"""The ServerApp's pull of a reply's objects from the SuperLink (HttpGrid.pull_messages calls
the module's `pull_objects`, flwr/superlink/grid/http_grid.py): shorter retries, and a deadline."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from .guards import Target, replace_all, source_of

PULL_OBJECTS_PARAMS = (
    "object_ids",
    "pull_object_fn",
    "max_concurrent_pulls",
    "max_time",
    "max_tries_per_object",
    "initial_backoff",
    "backoff_cap",
)
INFLATABLE_SOURCE = "flwr/supercore/inflatable/inflatable_utils.py"
GRID_PULL_OBJECTS = Target(
    "flwr.superlink.grid.http_grid", "pull_objects", PULL_OBJECTS_PARAMS, "flwr/superlink/grid/http_grid.py"
)
PULL_OBJECTS = Target(
    "flwr.supercore.inflatable.inflatable_utils", "pull_objects", PULL_OBJECTS_PARAMS, INFLATABLE_SOURCE
)
OBJECT_PULL_ERROR = Target(
    "flwr.supercore.inflatable.inflatable_utils",
    "ObjectPullError.__init__",
    ("self", "object_id", "reason"),
    INFLATABLE_SOURCE,
)
PULL_MESSAGES = Target(
    "flwr.superlink.grid.http_grid",
    "HttpGrid.pull_messages",
    ("self", "message_ids"),
    "flwr/superlink/grid/http_grid.py",
)
REPLY_PULLS = "the ServerApp's reply-object pulls"
REPLY_PULLS_LOST = (
    "a reply's objects still being uploaded are retried after Flower's 1, 2, 4 .. 10 s, and a reply whose "
    "content never arrives holds its exchange until the SuperLink drops the upload (180 s), whatever "
    "engine.round_timeout_s says"
)


class _ReplyObjectPull(functools.partial[Any]):
    """Flower's pull_objects on the given back-off, and, while `ends()` gives a time (an exchange
    with a deadline), given no more time than is left before it; an object the deadline cut off
    fails with `cut_reason`."""

    ends: Callable[[], float | None]
    cut_reason: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        end = self.ends()
        if end is None:
            return super().__call__(*args, **kwargs)
        from flwr.supercore.inflatable.inflatable_utils import ObjectPullError

        left = max(0.0, end - time.monotonic())
        kwargs["max_time"] = min(left, kwargs.get("max_time") or left)
        try:
            return super().__call__(*args, **kwargs)
        except ObjectPullError as e:
            if time.monotonic() >= end:  # the deadline, not the object: say so
                raise ObjectPullError(str(e).partition("'")[2].partition("'")[0], self.cut_reason) from None
            raise


def _pull_messages_as_1_42() -> list[str]:
    """HttpGrid.pull_messages calls pull_objects once, on its default back-off and try limit,
    and the module's pull_objects is inflatable_utils' (not someone else's)."""
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.superlink.grid import http_grid

    source = source_of(http_grid.HttpGrid.pull_messages)
    problems = []
    if source.count("pull_objects(") != 1 or "backoff" in source or "max_tries_per_object" in source:
        problems.append("HttpGrid.pull_messages does not call pull_objects once on its defaults")
    if http_grid.pull_objects is not inflatable_utils.pull_objects:
        problems.append("http_grid.pull_objects is not inflatable_utils.pull_objects (someone else's)")
    elif (inflatable_utils.pull_objects.__kwdefaults__ or {}).get("initial_backoff") != 1:
        problems.append("pull_objects' initial_backoff is not 1 s")
    return problems


def patch_reply_object_pulls(
    initial_backoff: float, backoff_cap: float, ends: Callable[[], float | None], cut_reason: str
) -> bool:
    """Make HttpGrid.pull_messages retry a reply's missing objects from `initial_backoff` to
    `backoff_cap` seconds (Flower's try limit kept), and, while `ends()` gives a monotonic time,
    stop at it (an object cut off there fails with `cut_reason`). This process only (the
    ServerApp's). Guarded: pull_objects' exact parameters (their keywords are passed by name),
    ObjectPullError's, and pull_messages' one call on the defaults; False where not applied."""

    def make(real: Any) -> _ReplyObjectPull:
        pull = _ReplyObjectPull(real, initial_backoff=initial_backoff, backoff_cap=backoff_cap)
        pull.ends, pull.cut_reason = ends, cut_reason
        return pull

    changes = {GRID_PULL_OBJECTS: make, PULL_OBJECTS: None, OBJECT_PULL_ERROR: None, PULL_MESSAGES: None}
    return replace_all(REPLY_PULLS, REPLY_PULLS_LOST, changes, also=_pull_messages_as_1_42)
