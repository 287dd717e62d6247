"""Engines move messages between the ServerApp logic and the ClientApps; nothing else.

An engine is a function (cfg, corpus_path, n_sites, callbacks, out_dir, resume) ->
FederationResult. Sites keep their own state under out_dir/site_state (clients/site_state.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from federated.core.registry import Registry
from federated.engines.inprocess import run_inprocess
from federated.server.records import FederationResult

Engine = Callable[..., FederationResult]
ENGINES: Registry[Engine] = Registry("engine")
ENGINES.add("inprocess", run_inprocess)


@ENGINES.register("ray")
def run_ray(*args: Any, **kwargs: Any) -> FederationResult:
    """Flower's Ray simulation; Ray itself is imported only when this engine runs."""
    from federated.engines.ray_engine import run_ray as run

    return run(*args, **kwargs)
