"""A real Flower deployment on this machine: SuperLink with TLS and SuperNode authentication,
one SuperNode per site, the experiment submitted with `flwr run` (`multimed-fl deploy demo`).

Pieces, usable on their own (tests start a SuperLink and misbehaving SuperNodes with them):

- `ManagedProcess`: a child process with its log file, started in its own session, stopped
  with SIGTERM by PID, then SIGKILL after a grace period, together with every descendant it
  spawned (the SuperLink's SuperExec and ServerApp, a SuperNode's SuperExec and ClientApps).
- `LoopbackFederation`: a context manager owning a demo PKI, a private FLWR_HOME, the
  SuperLink, SuperNodes and their ClientApp workers; leaving it stops all of them.
- `deploy_demo`: the whole demo flow; `clientapp_worker`: the long-lived ClientApp process.

The ClientApp process. By default (`--isolation subprocess`) a SuperNode's SuperExec starts
one `flwr-clientapp` process per message; that process pulls the message, loads the app,
handles one message and exits (flwr/supernode/runtime/run_clientapp.py ends in flwr_exit),
so every message pays a Python start, the torch import and the site-plan rebuild. Flower 1.42
has no option to keep it (its "warm executors" exist only for agent/model/connector tasks
on Kubernetes). With `flower-supernode --isolation process` the SuperNode starts no SuperExec
and waits for one to claim its tasks over its Runtime API (AcquireTask); `clientapp_worker`
is such a claimer that runs each ClientApp task in its own long-lived process, with the same
calls flwr-clientapp makes (pull task input, run the app, push the reply and the Context), so
the ClientApp module, its per-process SiteRuntime cache and torch stay loaded across messages.
Measured (`multimed-fl deploy demo --sites 3 scale=smoke rounds=1`, 11 messages, on a 2-core
box with another experiment using about one core; Flower's own `clientapp-seconds`, from a
message handed to the ClientApp to its reply):
  --clientapp subprocess (Flower's default)  34.4 s per message, run 228 s, demo 274 s
  --clientapp worker (this module)           23.4 s per message, run 165 s, demo 208 s
Inside the worker the app itself takes 0.1-0.3 s per evaluate and 2-3 s per train (6 s for
the first message: project import and site plan). The rest of each message is Flower moving
the ~2 MB model (247 objects, one HTTP request each) from the SuperLink to the SuperNode:
the task is created when the message header arrives, before its content. That transfer, not
the ClientApp process, is what a deployment of this project waits on.

The worker runs one app bundle (FAB) per process: a task of another bundle is handed to
`flwr-clientapp` and the worker then restarts itself (same PID), as it does after an app that
failed to load, so no module of an old bundle is ever mixed with a new one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily: the ClientApp worker runs this file with no project imports
    from federated.engines.pki import DemoPKI, NodeKey

HOST = "127.0.0.1"
CONNECTION = "multimed-demo"
FLOWER_BINARIES = ("flwr", "flower-superlink", "flower-supernode", "flower-superexec",
                   "flwr-serverapp", "flwr-clientapp")
CLIENTAPP_MODES = ("worker", "subprocess")
MAX_SITES = 32
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class DeploymentError(RuntimeError):
    """The deployment cannot start or did not finish; the message names the cause and the log."""


# ---------------------------------------------------------------- environment and ports ----

def venv_bin() -> Path:
    """The folder of this interpreter's console scripts (the venv's bin)."""
    return Path(sys.executable).parent


def flower_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: a private FLWR_HOME, no telemetry, no update check,
    no runtime `uv sync` of the app's dependencies, and this venv's bin first on PATH (the
    SuperLink and SuperNodes start `flower-superexec`, `flwr-serverapp`, ... by name)."""
    env = dict(os.environ if base is None else base)
    env.update(FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(venv_bin()), env.get("PATH", "")])
    return env


def check_binaries(env: Mapping[str, str]) -> dict[str, str]:
    """The path of each Flower binary on env's PATH; a clear error if any is missing."""
    found = {name: shutil.which(name, path=env.get("PATH")) for name in FLOWER_BINARIES}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise DeploymentError(
            f"Flower binaries not found on PATH ({venv_bin()} first): {', '.join(missing)}. "
            "Install this project into the environment you run from (pip install -e .), which "
            "brings flwr[simulation]>=1.42,<1.43 and its console scripts.")
    return {k: str(v) for k, v in found.items()}


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now (the OS picks it: bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port_free(host: str, port: int, what: str) -> None:
    if not 1 <= port <= 65535:
        raise DeploymentError(f"port {port} for the {what} is not a TCP port (1-65535, or 0 for a free one)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise DeploymentError(f"port {port} on {host} for the {what} is busy ({e.strerror}); "
                                  "pick another port, or 0 for a free one") from None


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


# ----------------------------------------------------------------------------- processes ----

def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) from /proc, or None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # the command name may contain spaces
    return int(fields[1]), int(fields[19])


def _descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live descendant of pid (Linux /proc; [] elsewhere)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").glob("[0-9]*") if Path("/proc").is_dir() else ():
        stat = _proc_stat(int(entry.name))
        if stat is not None:
            children.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether that process still runs (a zombie does not; a reused PID does not count)."""
    stat_path = Path(f"/proc/{pid}/stat")
    if stat_path.parent.is_dir():
        try:
            raw = stat_path.read_text()
        except OSError:
            return False
        fields = raw[raw.rindex(")") + 2:].split()
        return fields[0] != "Z" and (start_time is None or int(fields[19]) == start_time)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM if the process that started it dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class ManagedProcess:
    """A child process with a log file; `stop()` (also on leaving a `with`) ends it and its
    descendants: SIGTERM by PID, SIGKILL after `grace_s`."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name, self.argv, self.log_path = name, [str(a) for a in argv], Path(log_path)
        self.env, self.cwd = dict(env) if env is not None else None, cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self.seen: dict[int, int] = {}  # pid -> start time of every process of ours we saw
        self._log: Any = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._log.write(f"$ {' '.join(self.argv)}\n".encode())
        self._log.flush()
        try:
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.cwd, start_new_session=True,  # Ctrl-C reaches us only
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        except OSError as e:
            self._log.close()
            raise DeploymentError(f"cannot start {self.name} ({self.argv[0]}): {e}") from None
        stat = _proc_stat(self.popen.pid)
        self.seen[self.popen.pid] = stat[1] if stat else -1
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was not started"
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if still running after timeout seconds."""
        assert self.popen is not None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_text(self) -> str:
        try:
            return _ANSI.sub("", self.log_path.read_text(errors="replace"))
        except OSError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().rstrip().splitlines()[-lines:])

    def note_descendants(self) -> None:
        if self.alive():
            self.seen.update(_descendants(self.pid))

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def leftovers(self) -> list[int]:
        return [pid for pid, start in self.seen.items()
                if pid_alive(pid, None if start < 0 else start)]

    def kill_leftovers(self) -> None:
        """SIGKILL whatever of ours still runs: the PID, its process group, seen descendants."""
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # the group we created (start_new_session)
        for pid in self.leftovers():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def close_log(self) -> None:
        if self._log is not None and not self._log.closed:
            self._log.close()

    def stop(self, grace_s: float = 10.0) -> None:
        stop_all([self], grace_s)

    def __enter__(self) -> ManagedProcess:
        return self.start() if self.popen is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid={self.popen.pid if self.popen else None})"


def stop_all(processes: Sequence[ManagedProcess], grace_s: float = 10.0) -> None:
    """SIGTERM each process (in the given order) by PID, wait up to grace_s for all, then
    SIGKILL what is left of each, descendants included, and reap them."""
    started = [p for p in processes if p.popen is not None]
    for p in started:
        p.note_descendants()
    for p in started:
        p.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in started:
        if p.alive():
            p.wait(max(0.0, deadline - time.monotonic()))
    # descendants that outlive their parent (e.g. a ClientApp finishing its message)
    while time.monotonic() < deadline and any(p.leftovers() for p in started):
        time.sleep(0.2)
    for p in started:
        p.kill_leftovers()
        if p.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(5)
        p.close_log()
    deadline = time.monotonic() + 5.0  # SIGKILL is delivered asynchronously
    while time.monotonic() < deadline and any(p.leftovers() for p in started):
        time.sleep(0.05)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while inside (main thread only), so the cleanup in
    `finally` blocks runs when someone terminates us."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------ the federation ----

@dataclass
class SuperNodeHandle:
    name: str
    port: int
    node: ManagedProcess
    worker: ManagedProcess | None = None


@dataclass
class RunResult:
    run_id: str
    status: str
    details: str
    info: dict[str, Any] = field(default_factory=dict)


class LoopbackFederation:
    """A SuperLink (TLS + SuperNode auth) and SuperNodes on this machine, all owned here.

    Layout under `workdir`: pki/ (keys and certificates), flwr_home/ (FLWR_HOME with the
    connection `multimed-demo`), logs/ (one log per process), superlink.db.
    """

    def __init__(self, workdir: str | Path, n_keys: int, host: str = HOST, superlink_port: int = 0,
                 say: Callable[[str], None] = lambda s: None, grace_s: float = 10.0) -> None:
        self.dir = Path(workdir).resolve()
        self.host, self.say, self.grace_s = host, say, grace_s
        self.logs = self.dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.dir / "flwr_home"
        self.env = flower_env(self.flwr_home)
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
            f"root-certificates = {json.dumps(str(self.pki.ca_cert))}\n")

    def flwr(self, *args: str, timeout: float = 120.0, check: bool = True,
             cwd: Path | None = None, polling: bool = False) -> subprocess.CompletedProcess[str]:
        """Run the flwr CLI against our connection. polling=True: at low CPU priority (each
        call is a Python start, ~1.5 CPU-s, that must not slow the run it watches)."""
        argv = [self.binaries["flwr"], *args]
        try:
            res = subprocess.run(argv, env=self.env, cwd=cwd or self.dir, capture_output=True,
                                 text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                                 preexec_fn=(lambda: os.nice(10)) if polling and hasattr(os, "nice") else None)
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"`flwr {' '.join(args)}` did not answer within {timeout:.0f} s") from None
        with open(self.logs / "flwr-cli.log", "a") as log:
            log.write(f"$ flwr {' '.join(args)}\n[exit {res.returncode}]\n{res.stdout}{res.stderr}\n")
        if check and res.returncode != 0:
            raise DeploymentError(f"`flwr {' '.join(args)}` failed (exit {res.returncode}): "
                                  f"{_ANSI.sub('', (res.stdout + res.stderr).strip())[-2000:]}")
        return res

    def flwr_json(self, *args: str, timeout: float = 120.0, polling: bool = False) -> dict[str, Any]:
        res = self.flwr(*args, "--format", "json", timeout=timeout, check=False, polling=polling)
        try:
            data = json.loads(res.stdout)
        except json.JSONDecodeError:
            raise DeploymentError(f"`flwr {' '.join(args)}` gave no JSON (exit {res.returncode}): "
                                  f"{_ANSI.sub('', (res.stdout + res.stderr).strip())[-2000:]}") from None
        if not data.get("success", False):
            raise DeploymentError(f"`flwr {' '.join(args)}` failed: "
                                  f"{data.get('error-message', data)}")
        return data

    # -- SuperLink
    def start_superlink(self, timeout_s: float = 120.0) -> ManagedProcess:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.superlink = self._track(ManagedProcess("superlink", [
            self.binaries["flower-superlink"],
            "--ssl-ca-certfile", self.pki.ca_cert, "--ssl-certfile", self.pki.server_cert,
            "--ssl-keyfile", self.pki.server_key, "--enable-supernode-auth",
            "--host", self.host, "--port", str(self.port), "--database", self.dir / "superlink.db",
        ], self.logs / "superlink.log", self.env, self.dir))
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.superlink.alive():
                text = self.superlink.log_text()
                if "address already in use" in text.lower() or "errno 98" in text.lower():
                    raise DeploymentError(f"the SuperLink cannot listen on {self.address}: the port "
                                          f"is busy (log: {self.superlink.log_path})")
                raise DeploymentError(f"the SuperLink exited with code {self.superlink.returncode}: "
                                      f"{self.superlink.log_tail()}\n(log: {self.superlink.log_path})")
            if _port_open(self.host, self.port) and "Uvicorn running" in self.superlink.log_text():
                break
            if time.monotonic() > deadline:
                raise DeploymentError(f"the SuperLink did not listen on {self.address} within "
                                      f"{timeout_s:.0f} s (log: {self.superlink.log_path})")
            time.sleep(0.3)
        self.note_descendants()
        self.say(f"started SuperLink on https://{self.address} (TLS, SuperNode auth on, "
                 f"pid {self.superlink.pid})")
        return self.superlink

    def register(self, key: NodeKey, name: str) -> None:
        """Register a SuperNode's public key (`flwr supernode register`)."""
        self.flwr("supernode", "register", str(key.public), CONNECTION, "--name", name)

    def online_nodes(self) -> list[dict[str, Any]]:
        data = self.flwr_json("supernode", "ls", CONNECTION, polling=True)
        return [n for n in data.get("nodes", []) if n.get("status") == "online"]

    # -- SuperNodes
    def start_supernode(self, name: str, key: NodeKey | None, node_config: Mapping[str, Any],
                        clientapp: str | None = "worker", insecure: bool = False,
                        extra: Sequence[str] = ()) -> SuperNodeHandle:
        """A SuperNode for one site. clientapp="worker": `--isolation process` plus our
        long-lived ClientApp worker; "subprocess": Flower's one process per message;
        None: `--isolation process` and no ClientApp process at all (tests, or bring your own)."""
        if clientapp is not None and clientapp not in CLIENTAPP_MODES:
            raise DeploymentError(f"clientapp must be one of {', '.join(CLIENTAPP_MODES)} "
                                  f"(got {clientapp!r})")
        self.logs.mkdir(parents=True, exist_ok=True)
        port = free_port(self.host)
        argv: list[Any] = [self.binaries["flower-supernode"], "--superlink", self.address]
        argv += ["--insecure"] if insecure else ["--root-certificates", self.pki.ca_cert]
        if key is not None:
            argv += ["--auth-supernode-private-key", key.private]
        argv += ["--node-config", node_config_string(node_config), "--host", self.host,
                 "--port", str(port), "--isolation", "subprocess" if clientapp == "subprocess" else "process",
                 *extra]
        node = self._track(ManagedProcess(f"supernode-{name}", argv, self.logs / f"supernode-{name}.log",
                                          self.env, self.dir))
        handle = SuperNodeHandle(name, port, node)
        if clientapp == "worker":
            handle.worker = self._track(ManagedProcess(
                f"clientapp-{name}", worker_argv(f"{self.host}:{port}", node.pid),
                self.logs / f"clientapp-{name}.log", self.env, self.dir))
        self.nodes.append(handle)
        return handle

    def wait_online(self, n: int, timeout_s: float = 180.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while True:
            dead = [h.node for h in self.nodes if not h.node.alive()]
            dead += [h.worker for h in self.nodes if h.worker is not None and not h.worker.alive()]
            if dead:
                p = dead[0]
                raise DeploymentError(f"{p.name} exited with code {p.returncode}: {p.log_tail()}\n"
                                      f"(log: {p.log_path})")
            online = self.online_nodes()
            if len(online) >= n:
                self.note_descendants()
                return online
            if time.monotonic() > deadline:
                raise DeploymentError(f"only {len(online)} of {n} SuperNodes came online within "
                                      f"{timeout_s:.0f} s (logs: {self.logs})")
            time.sleep(1.0)

    def supervise(self) -> None:
        """Fail if the SuperLink or a SuperNode exited; restart a ClientApp worker that exited
        (a site whose app called exit, say), as Flower starts a fresh ClientApp process for
        every message."""
        for p in [self.superlink, *(h.node for h in self.nodes)]:
            if p is not None and not p.alive():
                raise DeploymentError(f"{p.name} exited with code {p.returncode}: {p.log_tail()}\n"
                                      f"(log: {p.log_path})")
        for h in self.nodes:
            if h.worker is not None and not h.worker.alive():
                old = h.worker
                old.close_log()
                self.say(f"{old.name} exited with code {old.returncode}; restarting it")
                h.worker = self._track(ManagedProcess(old.name, old.argv, old.log_path, old.env, old.cwd))

    # -- runs
    def submit(self, app_dir: Path, run_config: Path) -> str:
        data = self.flwr_json("run", str(app_dir), CONNECTION, "--run-config", str(run_config),
                              timeout=300.0)
        return str(data["run-id"])

    def run_info(self, run_id: str) -> dict[str, Any]:
        runs = self.flwr_json("ls", CONNECTION, "--run-id", run_id, polling=True).get("runs", [])
        if not runs:
            raise DeploymentError(f"the SuperLink does not know run {run_id}")
        return dict(runs[0])

    def wait_run(self, run_id: str, timeout_s: float,
                 on_status: Callable[[str], None] = lambda s: None, poll_s: float = 5.0) -> RunResult:
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            self.supervise()
            info = self.run_info(run_id)
            status = str(info.get("status", ""))
            if status != last:
                on_status(status)
                last = status
            if status.startswith("finished:"):
                return RunResult(run_id, status, str(info.get("status-details", "")), info)
            self.note_descendants()
            if time.monotonic() > deadline:
                with contextlib.suppress(DeploymentError):
                    self.flwr("stop", run_id, CONNECTION, timeout=60, check=False)
                raise DeploymentError(f"run {run_id} did not finish within {timeout_s:.0f} s "
                                      f"(last status {status!r}); stopped it")
            time.sleep(poll_s)

    def save_run_log(self, run_id: str, path: Path) -> None:
        with contextlib.suppress(DeploymentError):
            res = self.flwr("log", run_id, CONNECTION, "--show", timeout=60, check=False)
            path.write_text(_ANSI.sub("", res.stdout + res.stderr))


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
                raise DeploymentError(f"node config {k}={s!r}: values may not contain spaces or "
                                      "single quotes (flower-supernode --node-config)")
            parts.append(f"{k}='{s}'")
    return " ".join(parts)


def run_config_toml(config_yaml: str, corpus_path: str, out_dir: str) -> str:
    """The `flwr run --run-config FILE.toml` text: the resolved YAML as a ''' literal
    (byte-for-byte), or as an escaped basic string if it contains '''."""
    import tomllib

    if "'''" in config_yaml or any(ord(c) < 32 and c not in "\t\n" for c in config_yaml):
        value = json.dumps(config_yaml)  # a JSON string is a valid TOML basic string
    else:
        value = "'''\n" + config_yaml + "'''"
    text = (f"multimed-config = {value}\ncorpus-path = {json.dumps(corpus_path)}\n"
            f"out-dir = {json.dumps(out_dir)}\n")
    parsed = tomllib.loads(text)
    assert parsed["multimed-config"] == config_yaml and parsed["out-dir"] == out_dir
    return text


def app_dir() -> Path:
    """The Flower app folder (the repository root with pyproject.toml's [tool.flwr.app])."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text():
        raise DeploymentError(f"{root} is not the multimed-fl app folder (no pyproject.toml with "
                              "[tool.flwr.app]); deploy needs a source checkout (pip install -e .)")
    return root


def _check_out_dir(out: Path, root: Path) -> None:
    """Outputs inside the app folder would be packed into the app bundle by `flwr run`
    unless .gitignore excludes them (flwr honours .gitignore)."""
    try:
        rel = out.relative_to(root)
    except ValueError:
        return
    import pathspec

    gitignore = root / ".gitignore"
    lines = gitignore.read_text().splitlines() if gitignore.is_file() else []
    spec = pathspec.GitIgnoreSpec.from_lines(lines)
    if not spec.match_file(f"{rel.as_posix()}/deploy/x.toml"):
        raise DeploymentError(f"--out {out} is inside the app folder {root} and not git-ignored, "
                              "so `flwr run` would pack its files into the app bundle; use a folder "
                              "under runs/ or outside the repository")


# ------------------------------------------------------------------------------ the demo ----

def demo_overrides(n_sites: int, overrides: Sequence[str]) -> list[str]:
    """The user's overrides, plus a random-mix plan of n_sites (one held out) when they set
    no sites.* key, plus engine.expected_sites=n_sites."""
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    out = list(overrides)
    if not any(k == "sites" or k.startswith("sites.") for k in keys):
        out += ["sites.planner=random_mix", f"sites.n_sites={n_sites}", "sites.holdout=random",
                "sites.holdout_k=1", "sites.zero_shot=true"]
    for o in overrides:
        k, _, v = o.partition("=")
        if k.strip() == "engine.expected_sites" and v.strip() != str(n_sites):
            raise DeploymentError(f"engine.expected_sites={v.strip()} contradicts --sites {n_sites}")
    if "engine.expected_sites" not in keys:
        out.append(f"engine.expected_sites={n_sites}")
    return out


@dataclass
class DemoResult:
    out_dir: Path
    run_id: str
    status: str
    summary: dict[str, Any]
    wall_s: float
    pids: dict[int, int]  # every process the demo started (pid -> start time)
    seconds: dict[str, float]


def deploy_demo(n_sites: int, out_dir: str | Path, overrides: Sequence[str] = (),
                clientapp: str = "worker", superlink_port: int = 0, timeout_s: float = 3600.0,
                say: Callable[[str], None] = print, grace_s: float = 10.0) -> DemoResult:
    """Run one experiment as a TLS + node-auth deployment on loopback; outputs go to out_dir,
    logs and keys to out_dir/deploy. Every process started is stopped before returning."""
    from federated.config import config_to_yaml, load_config
    from federated.corpus.cache import prepare_corpus
    from federated.corpus.format import Corpus
    from partitions import plan_sites

    t0 = time.perf_counter()
    if not 1 <= n_sites <= MAX_SITES:
        raise DeploymentError(f"--sites must be between 1 and {MAX_SITES} (got {n_sites}): "
                              "each site is a SuperNode process on this machine")
    if clientapp not in CLIENTAPP_MODES:
        raise DeploymentError(f"--clientapp must be one of {', '.join(CLIENTAPP_MODES)} "
                              f"(got {clientapp!r})")
    if superlink_port:
        check_port_free(HOST, superlink_port, "SuperLink")
    root = app_dir()
    out = Path(out_dir).expanduser().resolve()
    _check_out_dir(out, root)
    if (out / "summary.json").exists():
        raise DeploymentError(f"{out} already holds a finished run (summary.json); choose another --out")
    check_binaries(flower_env(out / "deploy" / "flwr_home"))

    cfg = load_config(demo_overrides(n_sites, overrides))
    corpus_path = Path(prepare_corpus(cfg.corpus)).resolve()
    plans = plan_sites(Corpus.open(corpus_path), cfg)
    if len(plans) != n_sites:
        raise DeploymentError(f"the site plan has {len(plans)} sites ({', '.join(p.site for p in plans)}) "
                              f"but --sites is {n_sites}; make the plan's sites match (e.g. "
                              f"sites.n_sites={n_sites} with sites.planner=random_mix)")
    say(f"site plan: {', '.join(f'{p.site} ({p.role})' for p in plans)}; corpus {corpus_path}")

    deploy = out / "deploy"
    if deploy.exists():  # a previous, unfinished attempt: its keys and logs are stale
        shutil.rmtree(deploy)
    deploy.mkdir(parents=True)
    run_config = deploy / "run_config.toml"
    run_config.write_text(run_config_toml(config_to_yaml(cfg), str(corpus_path), str(out)))

    seconds: dict[str, float] = {}
    fed = LoopbackFederation(deploy, n_sites, superlink_port=superlink_port, say=say, grace_s=grace_s)
    try:
        with sigterm_as_interrupt():
            fed.start_superlink()
            seconds["superlink_s"] = time.perf_counter() - t0
            for plan, key in zip(plans, fed.pki.nodes):
                fed.register(key, plan.site)
            for plan, key in zip(plans, fed.pki.nodes):  # state-dir: as `multimed-fl run` lays it out
                fed.start_supernode(plan.site, key, {"site": plan.site, "corpus-path": str(corpus_path),
                                                     "state-dir": str(out / "site_state")},
                                    clientapp=clientapp)
            fed.wait_online(n_sites)
            seconds["nodes_online_s"] = time.perf_counter() - t0
            say(f"{n_sites} SuperNodes online ({'one long-lived ClientApp process each' if clientapp == 'worker' else 'one ClientApp process per message'})")
            run_id = fed.submit(root, run_config)
            t_submit = time.perf_counter()
            say(f"submitted run {run_id}")
            result = fed.wait_run(run_id, timeout_s, on_status=lambda s: say(f"run {run_id}: {s}"))
            seconds["run_s"] = time.perf_counter() - t_submit
            fed.save_run_log(run_id, deploy / "logs" / "run.log")
            if result.status != "finished:completed":
                raise DeploymentError(f"run {run_id} ended {result.status}: {result.details or 'no details'} "
                                      f"(logs: {deploy / 'logs'})")
            info = result.info
            for k in ("elapsed", "compute-time", "network-traffic"):
                if k in info:
                    say(f"run {run_id} {k}: {info[k]}")
    finally:
        fed.close()
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        raise DeploymentError(f"run {run_id} completed but wrote no {summary_path} "
                              f"(logs: {deploy / 'logs'})")
    summary = json.loads(summary_path.read_text())
    wall = time.perf_counter() - t0
    say(f"timing: SuperLink up at {seconds['superlink_s']:.0f} s, {n_sites} SuperNodes online at "
        f"{seconds['nodes_online_s']:.0f} s, run {seconds['run_s']:.0f} s, total {wall:.0f} s")
    say(f"outputs in {out} (summary.json, metrics.parquet, config.yaml, tensorboard/); "
        f"logs and keys in {deploy}")
    return DemoResult(out, run_id, result.status, summary, wall, fed.started_pids(), seconds)


# ------------------------------------------------------------------ the ClientApp worker ----

def clientapp_worker(runtime_api_address: str, parent_pid: int | None = None,
                     poll_s: float = 0.2, preload: Sequence[str] = ()) -> None:
    """Claim and run ClientApp tasks of one SuperNode (`flower-supernode --isolation process`)
    in this process, one at a time, forever. Each task goes through the same steps as
    `flwr-clientapp` (flwr/supernode/runtime/run_clientapp.py): pull message + Context + FAB,
    install the FAB, load the ClientApp (cached per FAB), call it, push the reply and the
    Context. Errors become error replies, as there. Plain HTTP to the SuperNode's local Runtime
    API, like the SuperExec a SuperNode starts itself."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)  # SIGINT to us when our SuperNode is gone
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker())
    apps: dict[str, Any] = {}  # FAB hash -> its loaded ClientApp (one FAB per process)
    print(f"clientapp worker (pid {os.getpid()}) serving {runtime_api_address}", flush=True)
    try:
        while True:
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except httpx.HTTPError as e:  # the SuperNode is starting (or stopping)
                print(f"runtime API not reachable ({e.__class__.__name__}); retrying", flush=True)
                time.sleep(1.0)
                continue
            if not (res.HasField("task") and res.token):
                time.sleep(poll_s)
            elif apps and res.task.fab_hash and res.task.fab_hash not in apps:
                # Another app bundle (new code): its modules would clash with the loaded ones.
                # Flower's own flwr-clientapp handles this task; then start afresh (same PID).
                print(f"new app bundle {res.task.fab_hash[:8]}: this task runs in flwr-clientapp, "
                      "then the worker restarts", flush=True)
                subprocess.run([shutil.which("flwr-clientapp") or str(venv_bin() / "flwr-clientapp"),
                                "--insecure", "--runtime-api-address", runtime_api_address,
                                "--token", res.token], check=False)
                client.close()
                os.execv(sys.executable, worker_argv(runtime_api_address, parent_pid, preload))
            elif not _run_clientapp_task(runtime_api_address, res.token, apps):
                # Loading the app failed half-way: its modules may sit in sys.modules; start afresh.
                print("the ClientApp did not load; the worker restarts", flush=True)
                client.close()
                os.execv(sys.executable, worker_argv(runtime_api_address, parent_pid, preload))
    except KeyboardInterrupt:
        print("clientapp worker stopped", flush=True)
    finally:
        client.close()


def _run_clientapp_task(runtime_api_address: str, token: str, apps: dict[str, Any]) -> bool:
    """Run one claimed task; False if loading its ClientApp failed (the process is unclean)."""
    import traceback

    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    t0 = t_pulled = t_ran = time.perf_counter()
    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry)
    lost = []

    def heartbeat() -> bool:  # unlike Flower's, a refused heartbeat must not SIGINT the worker
        try:
            if not client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success:
                lost.append(True)
            return True
        except Exception:  # transport trouble: let HeartbeatSender retry
            return False

    beat = HeartbeatSender(heartbeat)
    message = context = reply = None
    load_failed = False
    sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        beat.start()
        message, context, run, fab = _pull_task_input(client)
        t_pulled = time.perf_counter()
        if fab.hash_str not in apps:
            load_failed = True
            app_path = install_from_fab(fab.content, skip_prompt=True)
            apps[fab.hash_str] = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
                run.fab_id, run.fab_version, fab.hash_str)
            load_failed = False
            print(f"loaded the ClientApp of {run.fab_id} {run.fab_version} from {app_path}", flush=True)
        reply = apps[fab.hash_str](message=message, context=context)
        t_ran = time.perf_counter()
        sub_status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001 - becomes the error reply, as in flwr-clientapp
        code, reason = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(ex)}:<'{ex}'>"
        if isinstance(ex, LoadClientAppError):
            code, reason = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, \
                "An exception was raised when attempting to load `ClientApp`"
        traceback.print_exc()
        details = reason
        if message is not None:
            reply = Message(Error(code=code, reason=reason), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None and not lost:
                push_message(client, reply, context)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            sub_status, details = SubStatus.FAILED, "failed to push the reply"
        retry.max_tries = 1
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        if beat.is_running:
            beat.stop()
        client.close()
    kind = message.metadata.message_type if message is not None else "?"
    t1 = time.perf_counter()
    print(f"{kind} message: {sub_status} in {t1 - t0:.2f} s (pull {t_pulled - t0:.2f} s, "
          f"app {max(0.0, t_ran - t_pulled):.2f} s, push {t1 - max(t_ran, t_pulled):.2f} s)", flush=True)
    return not load_failed


def _pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
    """flwr's run_clientapp.pull_task_input, polling the SuperNode's object store every
    0.05-0.5 s instead of backing off 1 s -> 10 s: the task exists as soon as the SuperNode
    has the message header, and its content (the model, 247 objects) arrives after it."""
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf, make_pull_object_fn_protobuf)
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.app import Message

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id = res.task_id, res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=0.05, backoff_cap=0.5)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as flwr-clientapp does
    return message, context, run, fab


WORKER_PRELOAD = ("torch",)  # third-party, imported at worker start instead of in the first message


def worker_argv(runtime_api_address: str, parent_pid: int | None = None,
                preload: Sequence[str] = WORKER_PRELOAD) -> list[str]:
    """The command of a ClientApp worker. It runs this file as a script, so the process
    imports nothing of the project before loading the ClientApp from the run's app bundle
    (FAB), as `flwr-clientapp` does; with `-m` the checkout's packages would load first."""
    argv = [sys.executable, str(Path(__file__).resolve()), "clientapp-worker",
            "--runtime-api-address", runtime_api_address]
    argv += ["--parent-pid", str(parent_pid)] if parent_pid is not None else []
    return argv + [a for m in preload for a in ("--preload", m)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m federated.engines.deployment")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("clientapp-worker", help="run a SuperNode's ClientApp tasks in this "
                            "long-lived process (flower-supernode --isolation process)")
    worker.add_argument("--runtime-api-address", required=True,
                        help="the SuperNode's Runtime API, HOST:PORT (its --host/--port)")
    worker.add_argument("--parent-pid", type=int, help="exit when this process (the SuperNode) exits")
    worker.add_argument("--preload", action="append", default=[], metavar="MODULE",
                        help="import this (third-party) module at start, e.g. torch")
    args = parser.parse_args(argv)
    if "federated.engines" in sys.modules:  # started with -m: restart clean, as a script
        os.execv(sys.executable, worker_argv(args.runtime_api_address, args.parent_pid, args.preload))
    for module in args.preload:
        __import__(module)
    clientapp_worker(args.runtime_api_address, args.parent_pid, preload=args.preload)
    return 0


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # run as a script: its folder must not shadow top-level modules
    sys.exit(main())
