"""The long-lived ClientApp worker: one process per SuperNode that claims and runs its
ClientApp tasks, instead of Flower's one `flwr-clientapp` process per message.

This file is its own module because it is started as a script, by path (`worker_argv`):
it must import nothing of the project (stdlib at the top, flwr inside functions) but Flower's
door, which it loads by path (`flower_door`), so it cannot import its sibling modules either;
`venv_bin` lives here for that reason and the rest of the package imports it from here.
`python -m federated.engines.deployment` ends up here too (its __main__.py), and `main` then
restarts the process as this script.

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
Inside the worker the app itself takes 0.1-0.3 s per evaluate and 1-3 s per train (6 s for
the first message: project import and site plan). The rest of each message used to be Flower
moving the ~2 MB model as 331 objects (an Array and a chunk per tensor, one HTTPS request each,
with 1-10 s retry back-offs): 13-28 s per message. Since the model travels as one packed
buffer (federated/core/arrays.py) a model message is 7 objects and its pull takes 0.1-1 s; what
is left is Flower's fixed timers, which flower_services.py shortens for the SuperNodes we start.

The worker runs one app bundle (FAB) per process: a task of another bundle is handed to
`flwr-clientapp` and the worker then restarts itself (same PID), as it does after an app that
failed to load, so no module of an old bundle is ever mixed with a new one.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any


def venv_bin() -> Path:
    """The folder of this interpreter's console scripts (the venv's bin)."""
    return Path(sys.executable).parent


def flower_door() -> ModuleType:
    """federated/core/flower_door, every call into Flower's internals: imported as usual where
    this module is part of the package; where it runs as a script, loaded by path under a private
    name, so that still no module of the project is loaded before the ClientApp's bundle is (the
    door imports nothing of the project). flower_services.py, which loads no ClientApp, imports it
    as federated.core.flower_door (with only the two empty package modules above it)."""
    if __package__:
        from federated.core import flower_door as door

        return door
    name = "_multimed_fl_flower_door"
    if name not in sys.modules:
        folder = Path(__file__).resolve().parents[2] / "core" / "flower_door"
        spec = importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        assert spec is not None and spec.loader is not None, folder
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_door = flower_door()


def clientapp_worker(
    runtime_api_address: str, parent_pid: int | None = None, poll_s: float = 0.2, preload: Sequence[str] = ()
) -> None:
    """Claim and run ClientApp tasks of one SuperNode (`flower-supernode --isolation process`)
    in this process, one at a time, forever. Each task goes through the same steps as
    `flwr-clientapp` (flwr/supernode/runtime/run_clientapp.py): pull message + Context + FAB,
    install the FAB, load the ClientApp (cached per FAB), call it, push the reply and the
    Context. Errors become error replies, as there. Plain HTTP to the SuperNode's local Runtime
    API, like the SuperExec a SuperNode starts itself."""
    import httpx

    if parent_pid is not None:
        _door.watch_parent(parent_pid)  # SIGINT to us when our SuperNode is gone
    client, _ = _door.runtime_client(runtime_api_address, "SuperExec")
    apps: dict[str, Any] = {}  # FAB hash -> its loaded ClientApp (one FAB per process)
    print(f"clientapp worker (pid {os.getpid()}) serving {runtime_api_address}", flush=True)
    try:
        while True:
            try:
                task = _door.acquire_clientapp_task(client)
            except httpx.HTTPError as e:  # the SuperNode is starting (or stopping)
                print(f"runtime API not reachable ({e.__class__.__name__}); retrying", flush=True)
                time.sleep(1.0)
                continue
            if task is None:
                time.sleep(poll_s)
                continue
            token, fab_hash = task
            if apps and fab_hash and fab_hash not in apps:
                # Another app bundle (new code): its modules would clash with the loaded ones.
                # Flower's own flwr-clientapp handles this task; then start afresh (same PID).
                print(
                    f"new app bundle {fab_hash[:8]}: this task runs in flwr-clientapp, then the worker restarts",
                    flush=True,
                )
                subprocess.run(
                    [
                        shutil.which("flwr-clientapp") or str(venv_bin() / "flwr-clientapp"),
                        "--insecure",
                        "--runtime-api-address",
                        runtime_api_address,
                        "--token",
                        token,
                    ],
                    check=False,
                )
                client.close()
                os.execv(sys.executable, worker_argv(runtime_api_address, parent_pid, preload))
            elif not _run_clientapp_task(runtime_api_address, token, apps):
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

    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus

    t0 = time.perf_counter()
    t_pulled: float | None = None  # None: the pull did not finish (its time is not the push's)
    t_ran: float | None = None
    client, retry = _door.runtime_client(runtime_api_address, "flwr-clientapp", token)
    lost = []

    def heartbeat() -> bool:  # unlike Flower's, a refused heartbeat must not SIGINT the worker
        try:
            if not _door.send_task_heartbeat(client):
                lost.append(True)
            return True
        except Exception:  # transport trouble: let HeartbeatSender retry
            return False

    beat = _door.heartbeat_sender(heartbeat)
    message = context = reply = None
    load_failed = False
    sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        beat.start()
        message, context, run, fab = _pull_task_input(client)
        t_pulled = time.perf_counter()
        if fab.hash_str not in apps:
            load_failed = True
            apps[fab.hash_str], app_path = _door.load_clientapp(fab, run)
            load_failed = False
            print(f"loaded the ClientApp of {run.fab_id} {run.fab_version} from {app_path}", flush=True)
        reply = apps[fab.hash_str](message=message, context=context)
        t_ran = time.perf_counter()
        sub_status, details = SubStatus.COMPLETED, ""
    except Exception as ex:
        code, reason = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(ex)}:<'{ex}'>"
        if _door.is_load_error(ex):
            code, reason = (
                ErrorCode.LOAD_CLIENT_APP_EXCEPTION,
                "An exception was raised when attempting to load `ClientApp`",
            )
        traceback.print_exc()
        details = reason
        if message is not None:
            reply = Message(Error(code=code, reason=reason), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None and not lost:
                _door.push_reply(client, reply, context)
        except Exception:
            traceback.print_exc()
            sub_status, details = SubStatus.FAILED, "failed to push the reply"
        retry.max_tries = 1  # the outcome is pushed once, as flwr-clientapp does
        _door.push_task_output(client, context, sub_status, details)
        if beat.is_running:
            beat.stop()
        client.close()
    kind = message.metadata.message_type if message is not None else "?"
    t1 = time.perf_counter()
    print(f"{kind} message: {sub_status} in {t1 - t0:.2f} s ({_stage_times(t0, t_pulled, t_ran, t1)})", flush=True)
    return not load_failed


def _stage_times(t0: float, t_pulled: float | None, t_ran: float | None, t1: float) -> str:
    """Where a message's time went; a stage that did not finish is named as failed, so a failed
    pull's wait is not charged to the push."""
    if t_pulled is None:
        return f"pull failed after {t1 - t0:.2f} s"
    if t_ran is None:
        return f"pull {t_pulled - t0:.2f} s, app failed after {t1 - t_pulled:.2f} s"
    return f"pull {t_pulled - t0:.2f} s, app {t_ran - t_pulled:.2f} s, push {t1 - t_ran:.2f} s"


# Retries of a message's objects that its SuperNode is still pulling from the SuperLink: initial,
# cap (seconds). The worker claims a task as soon as the SuperNode has the message header, so it
# nearly always asks for the model before the SuperNode has it; each retry is one local HTTP call
# of a few ms. Profiled in a deployed round, a 0.5 s cap left the model on the SuperNode for up to
# 0.4 s (pull 0.9 s of an evaluate message that took 1 s).
TASK_OBJECT_BACKOFF_S = (0.02, 0.1)
# How long the worker waits for a message's objects, in all: bounded well below Flower's 2 h, since
# a message of a run that ended meanwhile (a SuperLink restarted mid-round) never completes, and the
# worker must be free for the next run's messages.
TASK_PULL_MAX_TIME_S = 120.0


def _pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
    """flwr's run_clientapp.pull_task_input, polling the SuperNode's object store on
    TASK_OBJECT_BACKOFF_S instead of backing off 1 s -> 10 s: the task exists as soon as the
    SuperNode has the message header, and its content (the model) arrives after it. It gives up
    after TASK_PULL_MAX_TIME_S, not on a try count that short waits use up sooner."""
    initial, cap = TASK_OBJECT_BACKOFF_S
    return _door.pull_task_input(client, initial, cap, TASK_PULL_MAX_TIME_S)


WORKER_PRELOAD = ("torch",)  # third-party, imported at worker start instead of in the first message


def worker_argv(
    runtime_api_address: str, parent_pid: int | None = None, preload: Sequence[str] = WORKER_PRELOAD
) -> list[str]:
    """The command of a ClientApp worker. It runs this file as a script, so the process
    imports nothing of the project before loading the ClientApp from the run's app bundle
    (FAB), as `flwr-clientapp` does; with `-m` the checkout's packages would load first."""
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "clientapp-worker",
        "--runtime-api-address",
        runtime_api_address,
    ]
    argv += ["--parent-pid", str(parent_pid)] if parent_pid is not None else []
    return argv + [a for m in preload for a in ("--preload", m)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m federated.engines.deployment",
        description="run a SuperNode's ClientApp tasks in this long-lived process "
        "(flower-supernode --isolation process)",
    )
    parser.add_argument("command", choices=["clientapp-worker"])
    parser.add_argument(
        "--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT (its --host/--port)"
    )
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the SuperNode) exits")
    parser.add_argument(
        "--preload",
        action="append",
        default=[],
        metavar="MODULE",
        help="import this (third-party) module at start, e.g. torch",
    )
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
