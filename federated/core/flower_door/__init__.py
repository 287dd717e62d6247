"""One door to Flower's internals: every import of flwr.supercore, flwr.superlink, flwr.supernode,
flwr.proto and flwr.server.superlink, every replacement of Flower's code and every write of a
private field of a Flower object happens in this package, and nowhere else (an import-linter
contract in pyproject.toml keeps it so). The rest of the framework calls the functions below.

Each replacement is guarded on the exact signature (and source lines) it relies on, and stays
inert where they differ, saying once what differed and what is lost; with the environment
variable MULTIMED_FL_STOCK_FLOWER=1 none is applied (Flower runs as shipped). CONTRIBUTING.md
("Upgrading Flower: a checklist") lists every private thing touched here and its Flower file.

Cheap to import (no flwr until a function is called), and it imports nothing of the project,
so the deployment scripts can load it by path (federated/engines/deployment/clientapp_worker.py).
"""

from __future__ import annotations

from .guards import (
    STOCK_FLOWER_ENV,
    FlowerInternalsChanged,
    Target,
    forget_said,
    replace_all,
    stock_flower,
)
from .objects import (
    SERVER_NOISE_HOOK,
    add_server_noise,
    check_server_noise_hook,
    claim_task_identity,
    empty_run,
    error_reply,
    is_superlink_grid,
    max_array_chunk_size,
    private_key_from_bytes,
    public_key_from_bytes,
    set_message_id,
    set_run_id,
    set_src_node_id,
)
from .runtime import (
    acquire_clientapp_task,
    heartbeat_sender,
    is_load_error,
    load_clientapp,
    pull_task_input,
    push_reply,
    push_task_output,
    runtime_client,
    send_task_heartbeat,
    watch_parent,
)
from .serverapp import REPLY_PULLS, REPLY_PULLS_LOST, patch_reply_object_pulls
from .superlink import (
    LOST as SUPERLINK_LOST,
)
from .superlink import (
    batch_traffic,
    cache_node_keys,
    explain_activation_refusals,
    keep_objects_in_memory,
    run_flower_superlink,
    running_statuses,
    sqlite_database,
    sweep_tokens_at_most_every,
    wrap_check_abort,
)
from .supernode import SUPERNODE_TIMERS, SUPERNODE_TIMERS_LOST, patch_supernode_loop, run_flower_supernode

# Every group of replacements, and what Flower does where it is not applied (stock Flower).
WHAT_STOCK_LOSES: dict[str, str] = {
    SUPERNODE_TIMERS: SUPERNODE_TIMERS_LOST,
    **SUPERLINK_LOST,
    REPLY_PULLS: REPLY_PULLS_LOST,
}

__all__ = [
    "SERVER_NOISE_HOOK",
    "STOCK_FLOWER_ENV",
    "WHAT_STOCK_LOSES",
    "FlowerInternalsChanged",
    "Target",
    "acquire_clientapp_task",
    "add_server_noise",
    "batch_traffic",
    "cache_node_keys",
    "check_server_noise_hook",
    "claim_task_identity",
    "empty_run",
    "error_reply",
    "explain_activation_refusals",
    "forget_said",
    "heartbeat_sender",
    "is_load_error",
    "is_superlink_grid",
    "keep_objects_in_memory",
    "load_clientapp",
    "max_array_chunk_size",
    "patch_reply_object_pulls",
    "patch_supernode_loop",
    "private_key_from_bytes",
    "public_key_from_bytes",
    "pull_task_input",
    "push_reply",
    "push_task_output",
    "replace_all",
    "run_flower_superlink",
    "run_flower_supernode",
    "running_statuses",
    "runtime_client",
    "send_task_heartbeat",
    "set_message_id",
    "set_run_id",
    "set_src_node_id",
    "sqlite_database",
    "stock_flower",
    "sweep_tokens_at_most_every",
    "watch_parent",
    "wrap_check_abort",
]
