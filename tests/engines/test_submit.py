"""`multimed-fl deploy certificates` and `deploy submit`'s checks, and the ServerApp's resume of a
deployed run (which config it continues with). The submit itself, against a real SuperLink, runs
in test_multihost_guide.py and test_deployment.py (slow)."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path

import pytest
from cryptography import x509

from federated.app.cli import main
from federated.core.config import config_to_yaml, load_config
from federated.core.config.protected import protected_settings
from federated.engines.deployment import run_config_toml
from federated.server.checkpoint import Checkpoint
from federated.server.evaluation import summarize
from federated.server.records import RoundRecord
from federated.server.run_folder import RunFolderError
from federated.server.server_app import _resumed_config


def test_a_resume_run_config_says_so_and_keeps_the_config_byte_for_byte() -> None:
    text = config_to_yaml(load_config(["rounds=7"]))
    parsed = tomllib.loads(run_config_toml(text, "", "/srv/runs/a", resume=True))
    assert parsed == {"multimed-config": text, "corpus-path": "", "out-dir": "/srv/runs/a", "resume": True}
    assert "resume" not in tomllib.loads(run_config_toml(text, "", "/srv/runs/a"))


def test_certificates_name_the_hosts_and_never_replace_a_ca(tmp_path: Path, capsys) -> None:
    out = tmp_path / "pki"
    assert main(["deploy", "certificates", "--out", str(out), "--host", "coord.example.org", "--host", "10.0.0.5"]) == 0
    cert = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coord.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    assert (out / "ca.key").stat().st_mode & 0o777 == 0o600
    ca = (out / "ca.crt").read_bytes()
    capsys.readouterr()
    assert main(["deploy", "certificates", "--out", str(out), "--host", "other"]) == 2
    assert "already holds ca.crt, ca.key, server.pem, server.key" in capsys.readouterr().err
    assert (out / "ca.crt").read_bytes() == ca


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--resume", "r", "--out-dir", "o"], "give no --out-dir or overrides"),
        (["--resume", "r", "rounds=3"], "give no --out-dir or overrides"),
        ([], "needs --out-dir DIR (or --resume DIR)"),
        (["--resume", "{tmp}/gone"], "gone/config.yaml is not readable here"),
    ],
)
def test_submit_refuses_what_cannot_be_submitted_before_calling_flwr(tmp_path, capsys, args, message) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["deploy", "submit", "--connection", "nowhere", *args]) == 2
    assert message in capsys.readouterr().err


def test_a_deployed_resume_continues_with_the_interrupted_run_s_config_only(tmp_path: Path) -> None:
    own = config_to_yaml(load_config(["rounds=7"]))
    # a checkpoint of round 1 that recorded the privacy settings it trained with (checkpoint.check_resume)
    trained = RoundRecord(1, [], summarize([]), trained_with=protected_settings(load_config(["rounds=7"])))
    checkpoint = Checkpoint(1, {}, {}, None, RoundRecord(0, [], summarize([])), [trained], own)
    assert _resumed_config(own, checkpoint, tmp_path).rounds == 7
    with pytest.raises(RunFolderError, match="not the config of the run being resumed"):
        _resumed_config(config_to_yaml(load_config(["rounds=8"])), checkpoint, tmp_path)
    with pytest.raises(RunFolderError, match="is empty"):
        _resumed_config("", checkpoint, tmp_path)


def test_waiting_asks_flower_rarely_until_the_summary_says_the_run_ended(monkeypatch, tmp_path: Path) -> None:
    # Each `flwr ls` is a Python start (~1.5 CPU-s) competing with the run it watches.
    from federated.engines.deployment import flwr_cli

    monkeypatch.setattr(flwr_cli, "HINTED_POLL_S", 0.0)
    cli = flwr_cli.FlwrCli("flwr", "c", {}, tmp_path)
    asked: list[str] = []
    summary = tmp_path / "summary.json"

    def run_info(run_id: str) -> dict[str, str]:
        asked.append(run_id)
        return {"status": "finished:completed" if summary.exists() else "running"}

    monkeypatch.setattr(cli, "run_info", run_info)
    ticks = iter(range(10**6))

    def each_poll() -> None:  # the run ends after a few half-second ticks
        if next(ticks) == 3:
            summary.write_text("{}")

    result = cli.wait("7", timeout_s=60, poll_s=3600, each_poll=each_poll, finished_hint=summary.exists)
    assert result.completed and asked == ["7", "7"]  # once at the start, once when the summary appeared
