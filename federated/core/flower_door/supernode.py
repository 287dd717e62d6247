"""The SuperNode's loop (flwr/supernode/start_client_internal.py): its fixed waits, and Flower's
own `flower-supernode` entry point."""

from __future__ import annotations

import functools
import sys
import time
import types
from collections.abc import Mapping, Sequence
from typing import Any

from .guards import Target, ours, replace_all, source_of
from .serverapp import PULL_OBJECTS_PARAMS

LOOP_SOURCE = "flwr/supernode/start_client_internal.py"
LOOP_TIME = Target("flwr.supernode.start_client_internal", "time", None, LOOP_SOURCE)
LOOP_PULL_OBJECTS = Target("flwr.supernode.start_client_internal", "pull_objects", PULL_OBJECTS_PARAMS, LOOP_SOURCE)
SUPERNODE_TIMERS = "the SuperNode's short timers"
SUPERNODE_TIMERS_LOST = (
    "the SuperNode waits Flower's fixed 3 s after every poll that finds no message, 0.5 s between "
    "checks for its ClientApp's reply, and 1, 2, 4 .. 10 s between pulls of a message's objects"
)


def _waits_in_loop(waits: Mapping[float, float]) -> Any:
    def check() -> list[str]:
        from flwr.supernode import start_client_internal as loop

        problems = [f"the loop has no time.sleep({s:g})" for s in waits if f"time.sleep({s:g})" not in source_of(loop)]
        if loop.time is not time and not ours(loop.time, SUPERNODE_TIMERS):
            problems.append("the loop's `time` is not the time module")
        return problems

    return check


def patch_supernode_loop(waits: Mapping[float, float], initial_backoff: float, backoff_cap: float) -> bool:
    """In this process, make the SuperNode loop's `time.sleep(s)` sleep `waits[s]` instead (any
    other wait as it was), and its pulls of a message's objects retry from `initial_backoff` to
    `backoff_cap` s. Guarded: each `time.sleep(s)` of `waits` in the loop's source, the loop's
    module global `time` being the time module, pull_objects' exact parameters; False where not
    applied."""
    real_sleep = time.sleep

    def shim(real_time: Any) -> types.ModuleType:
        module = types.ModuleType("time")
        module.__dict__.update({k: v for k, v in vars(real_time).items() if not k.startswith("__")})

        def sleep(seconds: float) -> None:
            real_sleep(waits.get(seconds, seconds))

        module.sleep = sleep  # type: ignore[attr-defined]  # a module's attribute, set at run time
        return module

    def pulls(real: Any) -> Any:
        return functools.partial(real, initial_backoff=initial_backoff, backoff_cap=backoff_cap)

    changes = {LOOP_TIME: shim, LOOP_PULL_OBJECTS: pulls}
    return replace_all(SUPERNODE_TIMERS, SUPERNODE_TIMERS_LOST, changes, also=_waits_in_loop(waits))


def run_flower_supernode(flower_args: Sequence[str]) -> None:
    """Flower's own `flower-supernode` entry point, in this process, with these arguments."""
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()
