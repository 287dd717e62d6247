"""`LoopbackFederation`: a SuperLink (TLS + SuperNode authentication) and SuperNodes on this
machine, with the demo PKI, a private FLWR_HOME and the `flwr` CLI against them; it starts,
watches and stops all of them, and submits and follows runs. Tests use it directly (a
SuperLink and misbehaving SuperNodes); `deploy_demo` (demo.py) drives it for a whole run."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from federated.core import flower_door
from federated.engines.deployment.clientapp_worker import worker_argv
from federated.engines.deployment.environment import (
    HOST,
    DeploymentError,
    _port_open,
    check_binaries,
    check_port_free,
    flower_env,
    free_port,
)
from federated.engines.deployment.flower_services import superlink_argv, supernode_argv
from federated.engines.deployment.flwr_cli import FlwrCli, RunResult
from federated.engines.deployment.processes import ManagedProcess, stop_all

if TYPE_CHECKING:  # annotations only; pki (cryptography) is imported when a federation is made
    from federated.engines.pki import DemoPKI, NodeKey

CONNECTION = "multimed-demo"
CLIENTAPP_MODES = ("worker", "subprocess")


@dataclass
class SuperNodeHandle:
    name: str
    port: int
    node: ManagedProcess
    worker: ManagedProcess | None = None
    restart: Callable[[], SuperNodeHandle] | None = None  # the same start, on a fresh port


class LoopbackFederation:
    """A SuperLink (TLS + SuperNode auth) and SuperNodes on this machine, all owned here.

    Layout under `workdir`: pki/ (keys and certificates), flwr_home/ (FLWR_HOME with the
    connection `multimed-demo`), logs/ (one log per process), superlink.db.
    """

    def __init__(
        self,
        workdir: str | Path,
        n_keys: int,
        host: str = HOST,
        superlink_port: int = 0,
        say: Callable[[str], None] = lambda s: None,
        grace_s: float = 10.0,
        database: bool = True,
        flower_superlink: bool = False,
        stock_flower: bool | None = None,
    ) -> None:
        """database: the SuperLink's state in superlink.db (else in memory); flower_superlink:
        start Flower's `flower-superlink` as it is, not flower_services' lightened one;
        stock_flower (None: as MULTIMED_FL_STOCK_FLOWER says): Flower's `flower-superlink` and
        `flower-supernode`, and every process of the deployment (the ServerApp and ClientApps
        included) with that variable set, so that nothing of Flower is patched anywhere."""
        self.dir = Path(workdir).resolve()
        self.host, self.say, self.grace_s, self.database = host, say, grace_s, database
        self.stock_flower = flower_door.stock_flower() if stock_flower is None else stock_flower
        self.flower_superlink = flower_superlink or self.stock_flower
        self.logs = self.dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.dir / "flwr_home"
        self.env = flower_env(self.flwr_home)
        self.env.pop(flower_door.STOCK_FLOWER_ENV, None)
        if self.stock_flower:
            self.env[flower_door.STOCK_FLOWER_ENV] = "1"
        self.binaries = check_binaries(self.env)
        if superlink_port:
            check_port_free(host, superlink_port, "SuperLink")
        self.port = superlink_port or free_port(host)
        self.address = f"{host}:{self.port}"
        from federated.engines.pki import write_demo_pki

        self.pki: DemoPKI = write_demo_pki(self.dir / "pki", n_keys)
        self.superlink: ManagedProcess | None = None
        self.nodes: list[SuperNodeHandle] = []
        self._processes: list[ManagedProcess] = []
        self._write_connection()
        self.cli = FlwrCli(self.binaries["flwr"], CONNECTION, self.env, self.dir, self.logs / "flwr-cli.log")

    # -- lifecycle
    def __enter__(self) -> LoopbackFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _track(self, p: ManagedProcess) -> ManagedProcess:
        self._processes.append(p)
        return p.start()

    @property
    def processes(self) -> list[ManagedProcess]:
        return list(self._processes)

    def started_pids(self) -> dict[int, int]:
        """pid -> start time of every process started here that we saw (descendants too)."""
        return {pid: st for p in self._processes for pid, st in p.seen.items()}

    def note_descendants(self) -> None:
        for p in self._processes:
            p.note_descendants()

    def close(self) -> None:
        """Stop workers and SuperNodes, then the SuperLink (SIGTERM, SIGKILL after grace)."""
        order = [p for p in reversed(self._processes) if p is not self.superlink]
        if self.superlink is not None:
            order.append(self.superlink)
        stop_all(order, self.grace_s)

    # -- the flwr CLI
    def _write_connection(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{self.address}"\n'
            f"root-certificates = {json.dumps(str(self.pki.ca_cert))}\n"
        )

    # -- SuperLink
    def start_superlink(self, timeout_s: float = 120.0) -> ManagedProcess:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.superlink = self._track(
            ManagedProcess(
                "superlink",
                [
                    *([self.binaries["flower-superlink"]] if self.flower_superlink else superlink_argv()),
                    "--ssl-ca-certfile",
                    str(self.pki.ca_cert),
                    "--ssl-certfile",
                    str(self.pki.server_cert),
                    "--ssl-keyfile",
                    str(self.pki.server_key),
                    "--enable-supernode-auth",
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                    *(["--database", str(self.dir / "superlink.db")] if self.database else []),
                ],
                self.logs / "superlink.log",
                self.env,
                self.dir,
            )
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.superlink.alive():
                text = self.superlink.log_text()
                if "address already in use" in text.lower() or "errno 98" in text.lower():
                    raise DeploymentError(
                        f"the SuperLink cannot listen on {self.address}: the port "
                        f"is busy (log: {self.superlink.log_path})"
                    )
                raise DeploymentError(
                    f"the SuperLink exited with code {self.superlink.returncode}: "
                    f"{self.superlink.log_tail()}\n(log: {self.superlink.log_path})"
                )
            if _port_open(self.host, self.port) and "Uvicorn running" in self.superlink.log_text():
                break
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"the SuperLink did not listen on {self.address} within "
                    f"{timeout_s:.0f} s (log: {self.superlink.log_path})"
                )
            time.sleep(0.3)
        self.note_descendants()
        self.say(f"started SuperLink on https://{self.address} (TLS, SuperNode auth on, pid {self.superlink.pid})")
        return self.superlink

    def stop_superlink(self, kill: bool = False) -> None:
        """Stop the SuperLink and what it started (its SuperExec, a running ServerApp): SIGTERM
        as a service manager stops it, or kill=True, SIGKILL as a crash does. Its database stays."""
        assert self.superlink is not None, "no SuperLink was started"
        self.superlink.note_descendants()
        if kill:
            self.superlink.signal(signal.SIGKILL)
        self.superlink.stop(self.grace_s)
        self.superlink.close_log()

    def register(self, key: NodeKey, name: str) -> None:
        """Register a SuperNode's public key (`flwr supernode register`)."""
        self.cli.register(key.public, name)

    def online_nodes(self) -> list[dict[str, Any]]:
        return self.cli.online_nodes()

    # -- SuperNodes
    def start_supernode(
        self,
        name: str,
        key: NodeKey | None,
        node_config: Mapping[str, Any],
        clientapp: str | None = "worker",
        insecure: bool = False,
        extra: Sequence[str] = (),
    ) -> SuperNodeHandle:
        """A SuperNode for one site. clientapp="worker": `--isolation process` plus our
        long-lived ClientApp worker; "subprocess": Flower's one process per message;
        None: `--isolation process` and no ClientApp process at all (tests, or bring your own)."""
        if clientapp is not None and clientapp not in CLIENTAPP_MODES:
            raise DeploymentError(f"clientapp must be one of {', '.join(CLIENTAPP_MODES)} (got {clientapp!r})")
        self.logs.mkdir(parents=True, exist_ok=True)
        port = free_port(self.host)
        supernode = [self.binaries["flower-supernode"]] if self.stock_flower else supernode_argv()
        argv: list[Any] = [*supernode, "--superlink", self.address]
        argv += ["--insecure"] if insecure else ["--root-certificates", self.pki.ca_cert]
        if key is not None:
            argv += ["--auth-supernode-private-key", key.private]
        argv += [
            "--node-config",
            node_config_string(node_config),
            "--host",
            self.host,
            "--port",
            str(port),
            "--isolation",
            "subprocess" if clientapp == "subprocess" else "process",
            *extra,
        ]
        node = self._track(
            ManagedProcess(f"supernode-{name}", argv, self.logs / f"supernode-{name}.log", self.env, self.dir)
        )
        handle = SuperNodeHandle(
            name, port, node, restart=lambda: self.start_supernode(name, key, node_config, clientapp, insecure, extra)
        )
        if clientapp == "worker":
            handle.worker = self._track(
                ManagedProcess(
                    f"clientapp-{name}",
                    worker_argv(f"{self.host}:{port}", node.pid),
                    self.logs / f"clientapp-{name}.log",
                    self.env,
                    self.dir,
                )
            )
        self.nodes.append(handle)
        return handle

    def wait_online(self, n: int, timeout_s: float = 180.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while True:
            for h in [h for h in self.nodes if not h.node.alive() and _lost_its_port(h.node) and h.restart]:
                self._restart_on_fresh_port(h)
            dead = [h.node for h in self.nodes if not h.node.alive()]
            dead += [h.worker for h in self.nodes if h.worker is not None and not h.worker.alive()]
            if dead:
                p = dead[0]
                raise DeploymentError(f"{p.name} exited with code {p.returncode}: {p.log_tail()}\n(log: {p.log_path})")
            online = self.online_nodes()
            if len(online) >= n:
                self.note_descendants()
                return online
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"only {len(online)} of {n} SuperNodes came online within {timeout_s:.0f} s (logs: {self.logs})"
                )
            time.sleep(1.0)

    def _restart_on_fresh_port(self, h: SuperNodeHandle) -> None:
        """Another process took the port chosen for this SuperNode before it could bind it;
        start it again on another (once: `restart` is not carried over)."""
        assert h.restart is not None
        self.nodes.remove(h)
        if h.worker is not None:
            h.worker.stop(grace_s=1)
        h.node.close_log()
        self.say(f"{h.node.name}: port {h.port} was taken before it could listen; starting it on another")
        fresh = h.restart()
        fresh.restart = None

    def supervise(self) -> None:
        """Fail if the SuperLink or a SuperNode exited; restart a ClientApp worker that exited
        (a site whose app called exit, say), as Flower starts a fresh ClientApp process for
        every message."""
        for p in [self.superlink, *(h.node for h in self.nodes)]:
            if p is not None and not p.alive():
                raise DeploymentError(f"{p.name} exited with code {p.returncode}: {p.log_tail()}\n(log: {p.log_path})")
        for h in self.nodes:
            if h.worker is not None and not h.worker.alive():
                old = h.worker
                old.close_log()
                self.say(f"{old.name} exited with code {old.returncode}; restarting it")
                h.worker = self._track(ManagedProcess(old.name, old.argv, old.log_path, old.env, old.cwd))

    # -- runs
    def submit(self, app_dir: Path, run_config: Path) -> str:
        return self.cli.submit(app_dir, run_config)

    def run_info(self, run_id: str) -> dict[str, Any]:
        return self.cli.run_info(run_id)

    def wait_run(
        self,
        run_id: str,
        timeout_s: float,
        on_status: Callable[[str], None] = lambda s: None,
        poll_s: float = 5.0,
        finished_hint: Callable[[], bool] = lambda: False,
    ) -> RunResult:
        """Wait for the run; a SuperLink or SuperNode that exits fails it at once (supervise)."""
        noted = [time.monotonic()]

        def check() -> None:
            self.supervise()
            if time.monotonic() - noted[0] >= 5.0:  # a /proc scan: not every half second
                self.note_descendants()
                noted[0] = time.monotonic()

        return self.cli.wait(run_id, timeout_s, on_status, poll_s, each_poll=check, finished_hint=finished_hint)

    def save_run_log(self, run_id: str, path: Path) -> None:
        path.write_text(self.cli.run_log(run_id))


def node_config_string(node_config: Mapping[str, Any]) -> str:
    """`--node-config` text: space-separated key=value pairs, strings single-quoted."""
    parts = []
    for k, v in node_config.items():
        if isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            parts.append(f"{k}={v}")
        else:
            s = str(v)
            if "'" in s or " " in s:
                raise DeploymentError(
                    f"node config {k}={s!r}: values may not contain spaces or "
                    "single quotes (flower-supernode --node-config)"
                )
            parts.append(f"{k}='{s}'")
    return " ".join(parts)


def _lost_its_port(p: ManagedProcess) -> bool:
    text = p.log_text().lower()
    return "address already in use" in text or "runtime http api failed to start" in text
