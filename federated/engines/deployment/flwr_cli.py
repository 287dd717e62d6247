"""The `flwr` CLI against one SuperLink connection: what the demo and `multimed-fl deploy
submit` use to register nodes, submit a run, poll its status and read its log.

Flower's CLI is the supported way in (its Control API has no stable Python client); every call
is logged, JSON answers are parsed, and a failure raises naming the command and Flower's words.
`flwr run` returns at once and exits 0 even when the run then fails, so `wait` polls the run's
status until it is `finished:*` and the caller decides what a failed status means.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from federated.engines.deployment.environment import DeploymentError
from federated.engines.deployment.processes import _ANSI


@dataclass
class RunResult:
    run_id: str
    status: str
    details: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


HINTED_POLL_S = 2.0  # `flwr ls` at most this often once the run has probably ended


class FlwrCli:
    """`flwr` calls against `connection` (a [superlink.<name>] in $FLWR_HOME/config.toml)."""

    def __init__(
        self, binary: str, connection: str, env: Mapping[str, str], cwd: Path, log_path: Path | None = None
    ) -> None:
        self.binary, self.connection, self.env, self.cwd, self.log_path = binary, connection, dict(env), cwd, log_path

    def call(
        self, *args: str, timeout: float = 120.0, check: bool = True, polling: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run `flwr ARGS`. polling=True: at low CPU priority (each call is a Python start,
        ~1.5 CPU-s, that must not slow the run it watches)."""
        try:
            res = subprocess.run(
                [self.binary, *args],
                env=self.env,
                cwd=self.cwd,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                preexec_fn=(lambda: os.nice(10)) if polling and hasattr(os, "nice") else None,
            )
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"`flwr {' '.join(args)}` did not answer within {timeout:.0f} s") from None
        if self.log_path is not None:
            with open(self.log_path, "a") as log:
                log.write(f"$ flwr {' '.join(args)}\n[exit {res.returncode}]\n{res.stdout}{res.stderr}\n")
        if check and res.returncode != 0:
            raise DeploymentError(
                f"`flwr {' '.join(args)}` failed (exit {res.returncode}): "
                f"{_ANSI.sub('', (res.stdout + res.stderr).strip())[-2000:]}"
            )
        return res

    def json(self, *args: str, timeout: float = 120.0, polling: bool = False) -> dict[str, Any]:
        res = self.call(*args, "--format", "json", timeout=timeout, check=False, polling=polling)
        try:
            data = json.loads(res.stdout)
        except json.JSONDecodeError:
            raise DeploymentError(
                f"`flwr {' '.join(args)}` gave no JSON (exit {res.returncode}): "
                f"{_ANSI.sub('', (res.stdout + res.stderr).strip())[-2000:]}"
            ) from None
        if not isinstance(data, dict) or not data.get("success", False):
            message = data.get("error-message", data) if isinstance(data, dict) else data
            raise DeploymentError(f"`flwr {' '.join(args)}` failed: {message}")
        return data

    def register(self, public_key: Path, name: str) -> None:
        self.call("supernode", "register", str(public_key), self.connection, "--name", name)

    def online_nodes(self) -> list[dict[str, Any]]:
        data = self.json("supernode", "ls", self.connection, polling=True)
        return [n for n in data.get("nodes", []) if n.get("status") == "online"]

    def submit(self, app_dir: Path, run_config: Path) -> str:
        data = self.json("run", str(app_dir), self.connection, "--run-config", str(run_config), timeout=300.0)
        return str(data["run-id"])

    def run_info(self, run_id: str) -> dict[str, Any]:
        runs = self.json("ls", self.connection, "--run-id", run_id, polling=True).get("runs", [])
        if not runs:
            raise DeploymentError(f"the SuperLink does not know run {run_id}")
        return dict(runs[0])

    def wait(
        self,
        run_id: str,
        timeout_s: float,
        on_status: Callable[[str], None] = lambda s: None,
        poll_s: float = 5.0,
        each_poll: Callable[[], None] = lambda: None,
        finished_hint: Callable[[], bool] = lambda: False,
    ) -> RunResult:
        """Poll until the run is finished (any way); past timeout_s, stop it and raise.
        each_poll runs every 0.5 s (the demo checks its processes there). Each `flwr ls` is a
        Python start (~1.5 CPU-s) that competes with the run it watches, so it runs every poll_s,
        or at once when finished_hint() says the run has probably ended (its summary.json is there)."""
        deadline = time.monotonic() + timeout_s
        last, polled = None, -float("inf")
        while True:
            each_poll()
            since = time.monotonic() - polled
            if since >= poll_s or (since >= HINTED_POLL_S and finished_hint()):
                polled = time.monotonic()
                info = self.run_info(run_id)
                status = str(info.get("status", ""))
                if status != last:
                    on_status(status)
                    last = status
                if status.startswith("finished:"):
                    return RunResult(run_id, status, str(info.get("status-details", "")), info)
            if time.monotonic() > deadline:
                with contextlib.suppress(DeploymentError):
                    self.call("stop", run_id, self.connection, timeout=60, check=False)
                raise DeploymentError(
                    f"run {run_id} did not finish within {timeout_s:.0f} s (last status {last!r}); stopped it"
                )
            time.sleep(0.5)

    def run_log(self, run_id: str) -> str:
        """What the run's ServerApp logged (`flwr log --show`); empty if Flower has none."""
        with contextlib.suppress(DeploymentError):
            res = self.call("log", run_id, self.connection, "--show", timeout=60, check=False)
            return _ANSI.sub("", res.stdout + res.stderr)
        return ""
