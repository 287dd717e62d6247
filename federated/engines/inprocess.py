"""The in-process engine: a Flower Grid that hands each message to the ClientApp directly.

No Ray, no SuperLink, no serialisation: the fastest way to run the same ClientApp and
ServerApp code, and the engine tests use. Each node keeps its own Context across rounds, as
a SuperNode would. A ClientApp exception becomes an error reply, as on a real SuperNode.
"""

from __future__ import annotations

import logging
import threading
import traceback
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.grid import Grid

from clients.client_app import app as client_app
from federated.core import flower_door
from federated.core.config import config_to_yaml
from federated.core.config.schema import ExperimentConfig
from federated.core.protocol import (
    CONFIG_KEY,
    CORPUS_KEY,
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    SITE_STATE_DIR,
    STATE_DIR_KEY,
)
from federated.server.callbacks import Callback
from federated.server.checkpoint import Checkpoint
from federated.server.loop import run_federation
from federated.server.records import FederationResult

if TYPE_CHECKING:
    from federated.core.flower_door.objects import Run

CLIENT_APP_RAISED_EXCEPTION = 2  # Flower's error code for "ClientApp raised an exception"
FIRST_NODE_ID = SUPERLINK_NODE_ID + 1


def claim_server_identity(run_id: int) -> None:
    """Flower stamps new messages with the process's task identity; a SuperLink-launched
    ServerApp sets it at start-up (flwr.server.compat.app does the same), so we do too."""
    flower_door.claim_task_identity(1, run_id, SUPERLINK_NODE_ID)


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp, node_configs: list[dict], run_config: dict, run_id: int = 1) -> None:
        self.client_app = client_app
        self._run = flower_door.empty_run(run_id)
        claim_server_identity(run_id)
        # Node ids in plan order, clear of Flower's SuperLink id (1 in flwr 1.42).
        self._contexts = {
            FIRST_NODE_ID + i: Context(
                run_id=run_id,
                node_id=FIRST_NODE_ID + i,
                node_config=dict(nc),
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i, nc in enumerate(node_configs)
        }
        self._replies: dict[str, Message] = {}
        self._locks = {node: threading.Lock() for node in self._contexts}
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self._contexts)), thread_name_prefix="site")

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def context(self, node_id: int) -> Context:
        return self._contexts[node_id]

    def _stamp(self, msg: Message) -> str:
        if msg.metadata.dst_node_id not in self._contexts:
            raise ValueError(f"message to unknown node {msg.metadata.dst_node_id}")
        # Flower's own InMemoryGrid assigns message ids the same way (a SuperLink would).
        msg_id = str(uuid.uuid4())
        flower_door.set_message_id(msg, msg_id)
        flower_door.set_run_id(msg, self._run.run_id)
        return msg_id

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg_id = self._stamp(msg)
            self._replies[msg_id] = self._deliver(msg)
            ids.append(msg_id)
        return ids

    def _deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        with self._locks[node]:  # a straggler's next message waits for its last one
            try:
                return self.client_app(msg, self._contexts[node])
            except Exception as e:  # a crashing site must not crash the server
                reason = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"
                return Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Without a timeout, sites run one after another (fastest on few cores). With one,
        every site runs in its own thread and the replies that are in at the deadline are
        returned; a late reply is discarded, as a SuperLink discards an expired one."""
        if timeout is None:
            return list(self.pull_messages(self.push_messages(messages)))
        messages = list(messages)
        for msg in messages:
            self._stamp(msg)
        futures = [self._pool.submit(self._deliver, msg) for msg in messages]
        done, late = wait(futures, timeout=timeout)
        if late:
            logging.getLogger(__name__).warning(
                "%d of %d replies missed the %.1f s timeout and are discarded", len(late), len(futures), timeout
            )
        return [f.result() for f in futures if f in done]


def run_inprocess(
    cfg: ExperimentConfig,
    corpus_path: Path,
    n_sites: int,
    callbacks: Sequence[Callback],
    out_dir: Path | None = None,
    resume: Checkpoint | None = None,
) -> FederationResult:
    run_config = {CONFIG_KEY: config_to_yaml(cfg), CORPUS_KEY: str(corpus_path)}
    if out_dir is not None:
        run_config[STATE_DIR_KEY] = str(Path(out_dir) / SITE_STATE_DIR)
    node_configs = [{PARTITION_ID_KEY: i, NUM_PARTITIONS_KEY: n_sites} for i in range(n_sites)]
    grid = InProcessGrid(client_app, node_configs, run_config)
    return run_federation(grid, cfg, callbacks, checkpoint_dir=out_dir, resume=resume)
