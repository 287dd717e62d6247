"""What every other part of the deployment stands on: its error type, the loopback host,
the environment Flower processes run in (private FLWR_HOME, this venv's console scripts),
the check that Flower's binaries are there, and TCP ports (pick a free one, refuse a busy one)."""

from __future__ import annotations

import os
import random
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path

from federated.engines.deployment.clientapp_worker import venv_bin

HOST = "127.0.0.1"
FLOWER_BINARIES = (
    "flwr",
    "flower-superlink",
    "flower-supernode",
    "flower-superexec",
    "flwr-serverapp",
    "flwr-clientapp",
)


class DeploymentError(RuntimeError):
    """The deployment cannot start or did not finish; the message names the cause and the log."""


def flower_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: a private FLWR_HOME, no telemetry, no update check,
    no runtime `uv sync` of the app's dependencies, and this venv's bin first on PATH (the
    SuperLink and SuperNodes start `flower-superexec`, `flwr-serverapp`, ... by name)."""
    env = dict(os.environ if base is None else base)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PYTHONUNBUFFERED="1",
    )
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
            "brings flwr[simulation]>=1.42,<1.43 and its console scripts."
        )
    return {k: str(v) for k, v in found.items()}


def _ephemeral_range() -> tuple[int, int]:
    """The ports the OS hands out as the source of outgoing connections (Linux's
    ip_local_port_range; the IANA range elsewhere)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 49152, 65535


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now, outside the OS's ephemeral range.

    A port the OS picked with bind(0) comes from the ephemeral range, so between our check
    and the server's bind any outgoing connection on this machine (gRPC, the `flwr` CLI) may
    take it as its source port, and the server fails to start. Ports below that range are
    only ever taken by a process that asks for them by number."""
    lo, _ = _ephemeral_range()
    candidates = list(range(20000, lo)) if lo > 21000 else []
    random.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
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
            raise DeploymentError(
                f"port {port} on {host} for the {what} is busy ({e.strerror}); pick another port, or 0 for a free one"
            ) from None


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0
