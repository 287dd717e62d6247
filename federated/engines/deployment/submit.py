"""`multimed-fl deploy submit`: a run submitted to a running SuperLink (the coordinator of a
real deployment), waited for, and judged.

`flwr run` returns at once and exits 0 even when the run then fails; a researcher needs the
opposite: one command that ends when the run ends and fails when it failed. The run config is
written to a temporary file outside the app folder (`flwr run APP` packs the app folder, so a
file written there would enter the app bundle), and the app folder is this checkout.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from federated.core.protocol import CONFIG_KEY, CORPUS_KEY, OUT_DIR_KEY, RESUME_KEY
from federated.engines.deployment.clientapp_worker import venv_bin
from federated.engines.deployment.environment import DeploymentError, check_binaries
from federated.engines.deployment.flwr_cli import FlwrCli, RunResult


def run_config_toml(config_yaml: str, corpus_path: str, out_dir: str, resume: bool = False) -> str:
    """The `flwr run --run-config FILE.toml` text: the resolved YAML as a ''' literal
    (byte-for-byte), or as an escaped basic string if it contains '''."""
    import tomllib

    if "'''" in config_yaml or any(ord(c) < 32 and c not in "\t\n" for c in config_yaml):
        value = json.dumps(config_yaml)  # a JSON string is a valid TOML basic string
    else:
        value = "'''\n" + config_yaml + "'''"
    text = f"{CONFIG_KEY} = {value}\n{CORPUS_KEY} = {json.dumps(corpus_path)}\n{OUT_DIR_KEY} = {json.dumps(out_dir)}\n"
    if resume:
        text += f"{RESUME_KEY} = true\n"
    parsed = tomllib.loads(text)
    assert parsed[CONFIG_KEY] == config_yaml and parsed[OUT_DIR_KEY] == out_dir
    return text


def app_dir() -> Path:
    """The Flower app folder (the repository root with pyproject.toml's [tool.flwr.app])."""
    root = Path(__file__).resolve().parents[3]  # federated/engines/deployment/submit.py
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text():
        raise DeploymentError(
            f"{root} is not the multimed-fl app folder (no pyproject.toml with "
            "[tool.flwr.app]); deploy needs a source checkout (pip install -e .)"
        )
    return root


def user_flwr(connection: str) -> FlwrCli:
    """The `flwr` CLI of this environment against the user's own connection (their FLWR_HOME)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(venv_bin()), env.get("PATH", "")])
    return FlwrCli(check_binaries(env)["flwr"], connection, env, Path.cwd())


def submit_and_wait(
    connection: str,
    out_dir: str,
    config_yaml: str,
    resume: bool = False,
    timeout_s: float = 24 * 3600.0,
    poll_s: float = 15.0,
    say: Callable[[str], None] = lambda s: None,
) -> RunResult:
    """Submit the run (or, resume=True, the continuation of the run in out_dir), wait until it
    is finished, and return how it finished. out_dir is a path on the machine that runs the
    ServerApp (the SuperLink's)."""
    cli = user_flwr(connection)
    with tempfile.TemporaryDirectory(prefix="multimed-submit-") as tmp:
        run_config = Path(tmp) / "run_config.toml"
        run_config.write_text(run_config_toml(config_yaml, "", out_dir, resume=resume))
        run_id = cli.submit(app_dir(), run_config)
    say(f"submitted run {run_id} to `{connection}`" + (f", resuming {out_dir}" if resume else ""))
    summary = Path(out_dir) / "summary.json"  # where the ServerApp runs on this machine: written last
    result = cli.wait(
        run_id, timeout_s, on_status=lambda s: say(f"run {run_id}: {s}"), poll_s=poll_s, finished_hint=summary.exists
    )
    if not result.completed:
        tail = "\n".join(cli.run_log(run_id).strip().splitlines()[-15:])
        say(f"run {run_id} ended {result.status}: {result.details or 'no details'}\n{tail}")
    return result
