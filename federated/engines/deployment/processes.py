"""Child processes the deployment owns: `ManagedProcess` (a child with its log file, in its
own session) and `stop_all` (SIGTERM by PID, SIGKILL after a grace period, every descendant
included), found through /proc; plus `sigterm_as_interrupt`, so that `finally` blocks stop
them when we are terminated ourselves."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from federated.engines.deployment.environment import DeploymentError

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) from /proc, or None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may contain spaces
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
        fields = raw[raw.rindex(")") + 2 :].split()
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

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name, self.argv, self.log_path = name, [str(a) for a in argv], Path(log_path)
        self.env, self.cwd = dict(env) if env is not None else None, cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self.seen: dict[int, int] = {}  # pid -> start time of every process of ours we saw
        self._log: Any = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - open for the process's lifetime; closed by close_log()
        self._log.write(f"$ {' '.join(self.argv)}\n".encode())
        self._log.flush()
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # Ctrl-C reaches us only
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
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
        return [pid for pid, start in self.seen.items() if pid_alive(pid, None if start < 0 else start)]

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
