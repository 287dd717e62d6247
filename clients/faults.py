"""Simulated failing sites: a ClientApp mod that makes chosen sites crash, stall or die in training.

For fault-tolerance tests and studies (`faults.kind`, `faults.sites`, `faults.rounds`); a
no-op otherwise. In the training rounds listed (all if none):
    crash   the ClientApp raises: the site's reply is an error, the round goes on without it
    stall   the site sleeps `faults.stall_s` before training: past engine.round_timeout_s its
            reply is discarded
    exit    the site's process dies (os._exit) mid-round, as a killed machine would; only
            with an engine that runs each site in its own process
"""

from __future__ import annotations

import os
import time

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from federated.core.protocol import CONFIG_RECORD, record_round


class SimulatedCrash(RuntimeError):
    """Raised by a site configured to crash (faults.kind=crash)."""


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    from clients.site_runtime import site_runtime  # lazy: keeps the mod importable alone

    rt = site_runtime(dict(context.run_config), dict(context.node_config))
    faults = rt.cfg.faults
    server_round = record_round(msg.content.config_records[CONFIG_RECORD])
    if (
        faults.kind == "none"
        or rt.plan.site not in faults.sites
        or (faults.rounds and server_round not in faults.rounds)
    ):
        return call_next(msg, context)
    if faults.kind == "crash":
        raise SimulatedCrash(f"site {rt.plan.site} crashed in round {server_round} (faults.kind=crash)")
    if faults.kind == "exit":
        os._exit(17)
    time.sleep(faults.stall_s)  # stall
    return call_next(msg, context)
