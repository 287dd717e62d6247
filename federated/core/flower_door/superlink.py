"""The SuperLink's internals: its SQL state (flwr/server/superlink/linkstate/sql_linkstate.py,
flwr/supercore/corestate/sql_corestate.py), the object store it is given (flwr/superlink/main.py),
two Fleet handlers (flwr/superlink/servicer/fleet/fleet_handlers.py), and Flower's own
`flower-superlink` entry point. Each function replaces one group of Flower's code, guarded; the
policy (what to cache, for how long) is the caller's."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from .guards import Target, replace_all, source_of

SQL_LINKSTATE = "flwr.server.superlink.linkstate.sql_linkstate"
SQL_LINKSTATE_SOURCE = "flwr/server/superlink/linkstate/sql_linkstate.py"
FLEET = "flwr.superlink.servicer.fleet.fleet_handlers"
FLEET_SOURCE = "flwr/superlink/servicer/fleet/fleet_handlers.py"

FACTORIES = Target(
    "flwr.superlink.main",
    "get_objectstore_linkstate_factories",
    ("database", "federation_manager"),
    "flwr/superlink/main.py (from flwr/superlink/config_loader.py)",
)
LINKSTATE_FACTORY = Target(
    "flwr.server.superlink.linkstate",
    "LinkStateFactory.__init__",
    ("self", "database", "federation_manager", "objectstore_factory"),
    "flwr/server/superlink/linkstate/linkstate_factory.py",
)
OBJECTSTORE_FACTORY = Target(
    "flwr.supercore.object_store",
    "ObjectStoreFactory.__init__",
    ("self", "database"),
    "flwr/supercore/object_store/object_store_factory.py",
)
TOKEN_SWEEP = Target(
    "flwr.supercore.corestate.sql_corestate",
    "SqlCoreState._cleanup_expired_task_tokens",
    ("self",),
    "flwr/supercore/corestate/sql_corestate.py",
)
NODE_BY_KEY = Target(
    SQL_LINKSTATE, "SqlLinkState.get_node_id_by_public_key", ("self", "public_key"), SQL_LINKSTATE_SOURCE
)
CREATE_NODE = Target(
    SQL_LINKSTATE,
    "SqlLinkState.create_node",
    ("self", "owner_aid", "owner_name", "public_key", "heartbeat_interval", "location", "name"),
    SQL_LINKSTATE_SOURCE,
)
DELETE_NODE = Target(SQL_LINKSTATE, "SqlLinkState.delete_node", ("self", "owner_aid", "node_id"), SQL_LINKSTATE_SOURCE)
STORE_TRAFFIC = Target(
    SQL_LINKSTATE, "SqlLinkState.store_traffic", ("self", "run_id", "bytes_sent", "bytes_recv"), SQL_LINKSTATE_SOURCE
)
RUN_INFO = Target(
    SQL_LINKSTATE,
    "SqlLinkState.get_run_info",
    ("self", "run_ids", "statuses", "flwr_aids", "federation_ids", "order_by", "ascending", "limit", "skip"),
    SQL_LINKSTATE_SOURCE,
)
CHECK_ABORT = Target(FLEET, "check_abort", ("run_id", "abort_status_list", "state"), FLEET_SOURCE)
ACTIVATE_NODE = Target(FLEET, "activate_node", ("request", "state"), FLEET_SOURCE)
FLOWER_ERROR = Target(
    "flwr.supercore.error.base",
    "FlowerError.__init__",
    ("self", "code", "message", "public_details"),
    "flwr/supercore/error/base.py",
)
NODE_INFO = Target(
    "flwr.server.superlink.linkstate.linkstate",
    "LinkState.get_node_info",
    ("self", "node_ids", "owner_aids", "statuses"),
    "flwr/server/superlink/linkstate/linkstate.py",
)

OBJECTS_IN_MEMORY = "the SuperLink's message objects in memory"
TOKEN_SWEEP_GROUP = "the SuperLink's token sweep at most once a second"
NODE_KEYS = "the SuperLink's node keys in memory"
TRAFFIC = "the SuperLink's byte counts written once a second"
RUN_STATUS = "the SuperLink's running runs in memory"
REFUSAL_REASONS = "the SuperLink's refusal reasons"
# What a SuperLink without each group does instead (said when the group is not applied).
LOST = {
    OBJECTS_IN_MEMORY: "message objects go through the SQLite database",
    TOKEN_SWEEP_GROUP: "expired task tokens are swept on every ServerApp and Fleet request",
    NODE_KEYS: "every SuperNode request looks its key up in SQLite",
    TRAFFIC: "every SuperNode request updates the run's byte counts in SQLite",
    RUN_STATUS: "every SuperNode request looks its run's status up in SQLite",
    REFUSAL_REASONS: 'a refused SuperNode is told only "[code: 2004] Failed to activate SuperNode.", not why',
}


def sqlite_database(state: Any) -> str | None:
    """The SQLite database of a SuperLink state (one SuperLink per file: this process is its only
    writer), or None for any other backend, or where the state does not say."""
    if getattr(state, "database_backend", None) != "sqlite":
        return None
    url = getattr(state, "database_url", None)
    return url if isinstance(url, str) else None


def keep_objects_in_memory() -> bool:
    """A SuperLink with an SQLite `--database` keeps message objects in Flower's in-memory object
    store under its SQL link state (nodes, runs and messages stay in the file). Guarded: the
    factories function and the two factories' constructors; False where not applied."""
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink import config_loader
    from flwr.superlink import main as superlink_main

    def make(factories: Any) -> Any:
        def objects_in_memory(database: str, federation_manager: Any) -> tuple[Any, Any]:
            objects, state = factories(database, federation_manager)
            if type(objects) is not ObjectStoreFactory or objects.database == ObjectStoreFactory().database:
                return objects, state  # another backend's store, or already in memory: as Flower makes it
            in_memory = ObjectStoreFactory()
            return in_memory, LinkStateFactory(database, federation_manager, in_memory)

        return objects_in_memory

    def same_function() -> list[str]:
        if superlink_main.get_objectstore_linkstate_factories is not config_loader.get_objectstore_linkstate_factories:
            return ["flwr.superlink.main.get_objectstore_linkstate_factories is not config_loader's"]
        return []

    changes = {FACTORIES: make, LINKSTATE_FACTORY: None, OBJECTSTORE_FACTORY: None}
    return replace_all(OBJECTS_IN_MEMORY, LOST[OBJECTS_IN_MEMORY], changes, also=same_function)


def sweep_tokens_at_most_every(seconds: float, clock: Callable[[], float] = time.monotonic) -> bool:
    """Flower's expired-token sweep, run on every run-status and task lookup, runs at most once
    per `seconds` per state. Guarded: the sweep's signature; False where not applied."""

    def make(sweep: Any) -> Any:
        def sweep_at_most_every(self: Any) -> None:
            now = clock()
            if now - self.__dict__.get("_multimed_last_sweep", float("-inf")) >= seconds:
                self.__dict__["_multimed_last_sweep"] = now  # our own field on Flower's state
                sweep(self)

        return sweep_at_most_every

    return replace_all(TOKEN_SWEEP_GROUP, LOST[TOKEN_SWEEP_GROUP], {TOKEN_SWEEP: make})


def cache_node_keys(lookup: Callable[[Any, Any, bytes], int | None], writing: Callable[[Any], Any]) -> bool:
    """SqlLinkState's node lookup by public key becomes `lookup(real, state, key)`, and its node
    writes (create_node, delete_node) `writing(real)`, together or not at all (a cache that
    misses a write would authenticate a deleted key). Guarded: the three signatures."""

    def make_lookup(real: Any) -> Any:
        def node_id_by_key(self: Any, public_key: bytes) -> int | None:
            return lookup(real, self, public_key)

        return node_id_by_key

    changes = {NODE_BY_KEY: make_lookup, CREATE_NODE: writing, DELETE_NODE: writing}
    return replace_all(NODE_KEYS, LOST[NODE_KEYS], changes)


def batch_traffic(store: Callable[[Any], Callable[..., None]], reading: Callable[[Any], Any]) -> bool:
    """SqlLinkState.store_traffic becomes `store(real)`, called as (state, run_id, *, bytes_sent,
    bytes_recv), and its reader get_run_info `reading(real)`, together (counts held back must be
    written before a read). Guarded: both signatures; False where not applied."""

    def make_store(real: Any) -> Any:
        write = store(real)

        def store_traffic(self: Any, run_id: int, *, bytes_sent: int, bytes_recv: int) -> None:
            write(self, run_id, bytes_sent=bytes_sent, bytes_recv=bytes_recv)

        return store_traffic

    return replace_all(TRAFFIC, LOST[TRAFFIC], {STORE_TRAFFIC: make_store, RUN_INFO: reading})


def running_statuses() -> frozenset[str]:
    """The run statuses every Fleet handler aborts on: a run not in them is running."""
    from flwr.common.constant import Status

    return frozenset({Status.PENDING, Status.STARTING, Status.FINISHED})


def wrap_check_abort(make: Callable[[Any], Any]) -> bool:
    """The Fleet handlers' check_abort(run_id, abort_status_list, state) becomes `make(real)`.
    Guarded: its signature, and it being flwr/server/superlink/utils.py's; False where not applied."""
    from flwr.server.superlink import utils as superlink_utils
    from flwr.superlink.servicer.fleet import fleet_handlers

    def same_function() -> list[str]:
        if fleet_handlers.check_abort is not superlink_utils.check_abort:
            return ["fleet_handlers.check_abort is not flwr.server.superlink.utils.check_abort"]
        return []

    return replace_all(RUN_STATUS, LOST[RUN_STATUS], {CHECK_ABORT: make}, also=same_function)


def explain_activation_refusals(details: Callable[[int | None, str], str]) -> bool:
    """The SuperLink's refusal to activate a SuperNode (FLEET_NODE_ACTIVATION_FAILED, 2004) carries
    `details(node_id or None, node status)` as its public details, which the SuperNode prints.
    Guarded: activate_node's, FlowerError's and get_node_info's signatures and the error code in
    activate_node's source; False where not applied."""
    from flwr.supercore.error.base import ApiErrorCode, FlowerError

    def make(real: Any) -> Any:
        def activate_node(request: Any, state: Any) -> Any:
            try:
                return real(request=request, state=state)
            except FlowerError as e:
                if e.code != ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED or e.public_details is not None:
                    raise
                node_id = state.get_node_id_by_public_key(request.public_key)
                info = list(state.get_node_info(node_ids=[node_id])) if node_id is not None else []
                status = str(info[0].status) if info else ""
                raise FlowerError(e.code, e.message, public_details=details(node_id, status)) from e

        return activate_node

    def refuses_with_2004() -> list[str]:
        from flwr.superlink.servicer.fleet import fleet_handlers

        if "FLEET_NODE_ACTIVATION_FAILED" not in source_of(fleet_handlers.activate_node):
            return ["activate_node does not raise FLEET_NODE_ACTIVATION_FAILED"]
        return []

    changes = {ACTIVATE_NODE: make, FLOWER_ERROR: None, NODE_INFO: None}
    return replace_all(REFUSAL_REASONS, LOST[REFUSAL_REASONS], changes, also=refuses_with_2004)


def run_flower_superlink(flower_args: Sequence[str]) -> None:
    """Flower's own `flower-superlink` entry point, in this process, with these arguments."""
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *flower_args]
    flower_superlink()
