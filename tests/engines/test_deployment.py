"""Deployment over loopback: the demo PKI, a TLS + SuperNode-auth SuperLink, SuperNodes that
must be refused, and `multimed-fl deploy demo` end to end (federated/engines/pki.py,
federated/engines/deployment/)."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import re
import shutil
import socket
import ssl
import stat
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

from federated.app.cli import main
from federated.app.runner import run_experiment
from federated.core.config import config_from_yaml
from federated.engines.deployment import (
    DeploymentError,
    LoopbackFederation,
    check_binaries,
    demo_overrides,
    deploy_demo,
    free_port,
    pid_alive,
    run_config_toml,
)
from federated.engines.pki import write_demo_pki

# ------------------------------------------------------------------------------- pki.py ----


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return write_demo_pki(tmp_path_factory.mktemp("pki") / "pki", 2)


def _handshake(pki, hostname: str) -> None:
    """A TLS handshake in memory: the SuperLink's cert and key against a client trusting ca.crt."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    client_ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end, out, peer in (("client", client, c_out, s_in), ("server", server, s_out, c_in)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            if data := out.read():
                peer.write(data)
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def test_server_certificate_chains_to_the_ca_and_names_loopback(pki):
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    _handshake(pki, "127.0.0.1")  # what SuperNodes and the flwr CLI dial
    _handshake(pki, "localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(pki, "superlink.example.org")


def test_node_keys_load_as_flower_loads_them_and_secrets_are_0600(pki):
    for key in pki.nodes:
        private = load_ssh_private_key(key.private.read_bytes(), None)  # flower-supernode
        public = load_ssh_public_key(key.public.read_bytes())  # flwr supernode register
        assert isinstance(private, ec.EllipticCurvePrivateKey) and uses_nist_ec_curve(public)
        assert key.public.read_text().startswith("ecdsa-sha2-nistp384 ")
        assert private.public_key().public_numbers() == public.public_numbers()
    assert pki.nodes[0].public.read_bytes() != pki.nodes[1].public.read_bytes()
    for secret in (pki.ca_key, pki.server_key, *(k.private for k in pki.nodes)):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert stat.S_IMODE(pki.dir.stat().st_mode) == 0o700


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="no ssh-keygen")
def test_ssh_keygen_keys_are_the_same_format(tmp_path):
    """The README tells hospitals to make their key with ssh-keygen: same formats as ours."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(tmp_path / "k")], check=True)
    assert isinstance(load_ssh_private_key((tmp_path / "k").read_bytes(), None), ec.EllipticCurvePrivateKey)
    assert uses_nist_ec_curve(load_ssh_public_key((tmp_path / "k.pub").read_bytes()))


# ------------------------------------------------------------------ process management ----


def test_managed_process_stops_its_descendants_and_kills_what_ignores_sigterm(tmp_path):
    import time

    from federated.engines.deployment import ManagedProcess, stop_all

    polite = ManagedProcess("polite", ["sh", "-c", "sleep 300 & sleep 300 & wait"], tmp_path / "p.log")
    stubborn = ManagedProcess("stubborn", ["sh", "-c", "trap '' TERM; sleep 300 & wait; sleep 300"], tmp_path / "s.log")
    try:
        polite.start()
        stubborn.start()
        time.sleep(0.5)  # let the shells fork their sleeps
        polite.note_descendants()
        stubborn.note_descendants()
        assert len(polite.seen) == 3 and len(stubborn.seen) == 2
    finally:
        stop_all([polite, stubborn], grace_s=1.0)
    for p in (polite, stubborn):
        assert p.leftovers() == [] and not p.alive()
    assert polite.returncode == -15  # SIGTERM did it
    assert stubborn.returncode == -9  # SIGKILL after the grace period


def test_a_binary_that_does_not_exist_is_named(tmp_path):
    from federated.engines.deployment import ManagedProcess

    with pytest.raises(DeploymentError, match="cannot start ghost"):
        ManagedProcess("ghost", [str(tmp_path / "no-such-binary")], tmp_path / "g.log").start()


# ------------------------------------------------------------- demo config and user errors ----


def test_demo_overrides_default_plan_and_expected_sites():
    assert demo_overrides(3, ["scale=smoke"]) == [
        "scale=smoke",
        "sites.planner=random_mix",
        "sites.n_sites=3",
        "sites.holdout=random",
        "sites.holdout_k=1",
        "sites.zero_shot=true",
        "engine.expected_sites=3",
    ]
    mine = ["sites.planner=random_mix", "sites.n_sites=4"]
    assert demo_overrides(4, mine) == [*mine, "engine.expected_sites=4"]
    with pytest.raises(DeploymentError, match="contradicts --sites 3"):
        demo_overrides(3, ["engine.expected_sites=2"])


def test_run_config_toml_keeps_the_yaml_byte_for_byte():
    import tomllib

    for text in ("seed: 0\nname: 'x'\n", "a: \"'''\"\n"):  # the second cannot be a ''' literal
        parsed = tomllib.loads(run_config_toml(text, "/c", "/o 'x'"))
        assert parsed == {"multimed-config": text, "corpus-path": "/c", "out-dir": "/o 'x'"}


def test_outputs_inside_the_app_folder_must_be_git_ignored():
    from federated.engines.deployment import _check_out_dir, app_dir

    root = app_dir()
    _check_out_dir(root / "runs" / "demo", root)  # runs/ is in .gitignore
    _check_out_dir(root.parent / "elsewhere", root)
    with pytest.raises(DeploymentError, match="would pack its files into the app bundle"):
        _check_out_dir(root / "demo-out", root)


def test_missing_flower_binaries_are_named(tmp_path):
    with pytest.raises(DeploymentError, match="flower-superlink.*flwr-clientapp"):
        check_binaries({"PATH": str(tmp_path)})


def test_free_ports_lie_below_the_range_outgoing_connections_draw_from():
    from federated.engines.deployment.environment import _ephemeral_range

    lo, hi = _ephemeral_range()
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1
    for port in ports:
        assert not lo <= port <= hi or lo <= 21000, (port, lo, hi)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))  # and nobody holds it


def test_deploy_refuses_bad_sites_busy_port_and_a_plan_of_another_size(tmp_path, capsys):
    assert main(["deploy", "demo", "--sites", "0", "--out", str(tmp_path / "a")]) == 2
    assert "--sites must be between 1 and" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert (
            main(
                [
                    "deploy",
                    "demo",
                    "--sites",
                    "3",
                    "--out",
                    str(tmp_path / "b"),
                    "--superlink-port",
                    str(port),
                    "scale=smoke",
                ]
            )
            == 2
        )
        assert f"port {port} on 127.0.0.1 for the SuperLink is busy" in capsys.readouterr().err
    # the default archetype plan has 10 sites
    assert main(["deploy", "demo", "--sites", "3", "--out", str(tmp_path / "c"), "scale=smoke", "sites=default"]) == 2
    err = capsys.readouterr().err
    assert "the site plan has 10 sites" in err and "but --sites is 3" in err
    assert not (tmp_path / "c" / "deploy").exists()  # nothing was started


@pytest.mark.parametrize(
    ("flags", "stock_flower", "clientapp"),
    [
        ([], None, None),  # None, None: deploy_demo decides (our worker; stock under MULTIMED_FL_STOCK_FLOWER)
        (["--stock-flower"], True, None),
        (["--stock-flower", "--clientapp", "worker"], True, "worker"),
        (["--clientapp", "subprocess"], None, "subprocess"),
    ],
)
def test_deploy_demo_passes_stock_flower_and_clientapp_on(tmp_path, monkeypatch, flags, stock_flower, clientapp):
    """`--stock-flower` reaches deploy_demo as stock_flower=True, and --clientapp's default is
    deploy_demo's own (None), so the stock switch gets Flower's flwr-clientapp by default."""
    from federated.core.config import config_to_yaml, load_config
    from federated.engines import deployment

    seen: dict[str, object] = {}

    def fake_demo(n_sites, out_dir, overrides, **kwargs):
        seen.update(kwargs, n_sites=n_sites, overrides=list(overrides))
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "config.yaml").write_text(config_to_yaml(load_config(["scale=smoke"])))
        return deployment.DemoResult(tmp_path / "out", "1", "finished:completed", {}, 0.0, {}, {})

    monkeypatch.setattr(deployment, "deploy_demo", fake_demo)
    assert main(["deploy", "demo", "--sites", "3", "--out", str(tmp_path / "out"), *flags, "scale=smoke"]) == 0
    assert (seen["stock_flower"], seen["clientapp"]) == (stock_flower, clientapp)
    assert (seen["n_sites"], seen["overrides"]) == (3, ["scale=smoke"])


# ------------------------------------------------------------ refused SuperNodes (slow) ----


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    """A SuperLink with TLS and SuperNode auth; node_00 registered, node_01 not."""
    with LoopbackFederation(tmp_path_factory.mktemp("superlink"), n_keys=2, grace_s=5) as fed:
        fed.start_superlink()
        fed.register(fed.pki.nodes[0], "site_00")
        yield fed
    for pid, start in fed.started_pids().items():
        assert not pid_alive(pid, start), f"process {pid} outlived the federation"


def _refused(fed: LoopbackFederation, handle, *messages: str) -> None:
    rc = handle.node.wait(120)
    assert rc is not None, f"{handle.name} still runs after 120 s:\n{handle.node.log_tail()}"
    assert rc != 0
    log = " ".join(handle.node.log_text().split())
    for message in messages:
        assert message in log, f"{message!r} not in the log of {handle.name}:\n{handle.node.log_tail()}"
    assert fed.superlink.alive()
    assert fed.online_nodes() == []


@pytest.mark.slow
def test_supernode_without_tls_is_refused(superlink):
    # A SuperNode retries a failing connection forever by default; with a limit it gives up
    # and exits, so the refusal shows as an exit code and a message.
    handle = superlink.start_supernode(
        "insecure", None, {"site": "site_00"}, clientapp=None, insecure=True, extra=["--max-retries", "3"]
    )
    _refused(
        superlink,
        handle,
        "Failed to initialize the connection to the SuperLink",
        "Server disconnected without sending a response",
    )


@pytest.mark.slow
def test_supernode_with_an_unregistered_key_is_refused(superlink):
    handle = superlink.start_supernode(
        "stranger", superlink.pki.nodes[1], {"site": "site_01"}, clientapp=None, extra=["--max-retries", "3"]
    )
    from federated.engines.deployment.flower_services import NOT_REGISTERED

    _refused(
        superlink,
        handle,
        "Failed to initialize the connection to the SuperLink",
        "[code: 2004] Failed to activate SuperNode.",
        NOT_REGISTERED,  # issue 28: the hospital is told the cause, not only Flower's line
    )
    assert "No SuperNode found with the given public key" in superlink.superlink.log_text()


@pytest.mark.slow
def test_against_flower_s_own_superlink_the_refused_supernode_explains_both_causes(tmp_path):
    """Flower's `flower-superlink` says only "[code: 2004] Failed to activate SuperNode"; our
    SuperNode adds both causes and how to tell them apart (issue 28)."""
    from federated.engines.deployment.flower_services import BOTH_CAUSES

    with LoopbackFederation(tmp_path / "stock", n_keys=1, grace_s=5, flower_superlink=True) as fed:
        fed.start_superlink()
        handle = fed.start_supernode(
            "stranger", fed.pki.nodes[0], {"site": "site_00"}, clientapp=None, extra=["--max-retries", "3"]
        )
        _refused(fed, handle, "[code: 2004] Failed to activate SuperNode.", BOTH_CAUSES)
        assert "multimed-fl: this SuperNode's public key" not in handle.node.log_text()


@pytest.mark.slow
def test_a_supernode_whose_port_was_taken_starts_again_on_another(superlink, monkeypatch):
    # free_port checks a port, the SuperNode binds it a moment later: another process can
    # take it in between (CI saw "SuperNode Runtime HTTP API failed to start").
    from federated.engines.deployment import federation

    superlink.nodes.clear()  # the refused SuperNodes above have exited
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind((superlink.host, 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        monkeypatch.setattr(federation, "free_port", lambda host: next(ports, None) or free_port(host))
        superlink.start_supernode("site_00", superlink.pki.nodes[0], {"site": "site_00"}, clientapp=None)
        try:
            assert len(superlink.wait_online(1, timeout_s=120)) == 1
            (handle,) = [h for h in superlink.nodes if h.name == "site_00"]
            assert handle.port != taken and handle.node.alive()
        finally:
            for h in list(superlink.nodes):
                h.node.stop(grace_s=5)
                superlink.nodes.remove(h)


# ----------------------------------------------------------------------- the demo (slow) ----


@pytest.mark.slow
def test_demo_with_three_supernodes_over_tls(tmp_path):
    out = tmp_path / "demo"
    lines: list[str] = []
    result = deploy_demo(3, out, ["scale=smoke", "rounds=1"], say=lines.append, timeout_s=900, grace_s=5)
    assert result.status == "finished:completed"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 1
    assert sorted(s["site"] for s in summary["per_site"]) == ["site_00", "site_01", "site_02"]
    assert {s["role"] for s in summary["per_site"]} == {"train", "held_out"}
    for name in ("metrics.parquet", "config.yaml", "tensorboard"):
        assert (out / name).exists(), name
    assert "expected_sites: 3" in (out / "config.yaml").read_text()
    logs = out / "deploy" / "logs"
    assert {p.name for p in logs.iterdir()} >= {
        "superlink.log",
        "supernode-site_00.log",
        "clientapp-site_02.log",
        "run.log",
    }
    assert stat.S_IMODE((out / "deploy" / "pki" / "node_00").stat().st_mode) == 0o600
    text = "\n".join(lines)
    assert "started SuperLink on https://127.0.0.1:" in text and "3 SuperNodes online" in text
    assert f"run {result.run_id}: finished:completed" in text
    # every process it started (SuperLink, SuperNodes, ClientApp workers, SuperExecs,
    # ServerApp) is gone
    assert len(result.pids) >= 7
    alive = [pid for pid, start in result.pids.items() if pid_alive(pid, start)]
    assert alive == [], f"still running: {alive}"
    _same_scores_in_process(out, summary, tmp_path / "inprocess")


@pytest.mark.slow
def test_demo_on_stock_flower_completes_with_complete_scores(tmp_path):
    """The switch (MULTIMED_FL_STOCK_FLOWER=1, here stock_flower=True): Flower's own
    flower-superlink, flower-supernode and flwr-clientapp, nothing of Flower patched in any
    process (the ServerApp's reply pulls included); the demo completes and scores as in-process."""
    from federated.core import flower_door

    out = tmp_path / "stock"
    lines: list[str] = []
    result = deploy_demo(
        3, out, ["scale=smoke", "rounds=1"], say=lines.append, timeout_s=1500, grace_s=5, stock_flower=True
    )
    assert result.status == "finished:completed"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and not summary.get("problems")
    assert sorted(s["site"] for s in summary["per_site"]) == ["site_00", "site_01", "site_02"]
    assert all(isinstance(s["score"], float) for s in summary["per_site"])
    text = "\n".join(lines)
    assert f"stock Flower ({flower_door.STOCK_FLOWER_ENV}=1)" in text
    assert all(group in text for group in flower_door.WHAT_STOCK_LOSES)  # what is lost, said
    logs = out / "deploy" / "logs"
    assert not list(logs.glob("clientapp-*.log"))  # Flower's flwr-clientapp, not our worker
    assert "superlink: with --database" not in (logs / "superlink.log").read_text()
    run_log = (logs / "run.log").read_text()
    assert f"the ServerApp's reply-object pulls not applied ({flower_door.STOCK_FLOWER_ENV}=1" in run_log
    alive = [pid for pid, start in result.pids.items() if pid_alive(pid, start)]
    assert alive == [], f"still running: {alive}"
    _same_scores_in_process(out, summary, tmp_path / "inprocess")


def _same_scores_in_process(out, summary, inprocess_out):
    """Site-local deployment: each SuperNode was given only its own corpus folder (no site's node
    config names another's), and the same experiment in-process on the same folders scores the
    same to 1e-6."""
    sites = out / "deploy" / "sites"
    assert sorted(p.name for p in sites.iterdir()) == ["site_00", "site_01", "site_02"]
    for site in ("site_00", "site_01", "site_02"):
        log = (out / "deploy" / "logs" / f"supernode-{site}.log").read_text()
        others = [s for s in ("site_00", "site_01", "site_02") if s != site]
        assert not any(str(sites / other) in log for other in others)
    cfg = config_from_yaml((out / "config.yaml").read_text())
    assert cfg.sites.planner == "site_local"
    cfg = dataclasses.replace(
        cfg,
        corpus=dataclasses.replace(cfg.corpus, site_corpora=str(sites)),
        engine=dataclasses.replace(cfg.engine, name="inprocess", expected_sites=0),
    )
    local = run_experiment(cfg, inprocess_out, progress=False).to_dict()
    assert local.get("target_scales", {}).keys() == summary.get("target_scales", {}).keys()
    for task, scale in summary.get("target_scales", {}).items():
        assert local["target_scales"][task] == pytest.approx(scale, abs=1e-9)
    by_site = {r["site"]: r for r in local["per_site"]}
    for row in summary["per_site"]:
        theirs = by_site[row["site"]]
        assert theirs["role"] == row["role"]
        for task, metrics in row["per_task"].items():
            for name, value in metrics.items():
                assert theirs["per_task"][task][name] == pytest.approx(value, abs=1e-6, nan_ok=True), (
                    row["site"],
                    task,
                    name,
                )


def test_a_failed_pull_is_not_charged_to_the_push():
    from federated.engines.deployment.clientapp_worker import _stage_times

    assert _stage_times(10.0, None, None, 12.5) == "pull failed after 2.50 s"
    assert _stage_times(10.0, 10.5, None, 12.0) == "pull 0.50 s, app failed after 1.50 s"
    assert _stage_times(10.0, 10.5, 11.0, 11.25) == "pull 0.50 s, app 0.50 s, push 0.25 s"


def test_the_supernode_launcher_shortens_flower_s_fixed_timers_only(monkeypatch):
    from flwr.supernode import start_client_internal as loop

    from federated.engines.deployment.flower_services import shorten_flower_timers, supernode_argv

    monkeypatch.setattr(loop, "time", loop.time)  # restored after the test
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    slept: list[float] = []
    monkeypatch.setattr("time.sleep", slept.append)
    assert shorten_flower_timers(0.2)
    for seconds in (3, 0.5, 1.25):
        loop.time.sleep(seconds)
    assert slept == [0.2, 0.05, 1.25]  # idle poll and reply check shortened; any other wait as it was
    assert loop.time.monotonic is __import__("time").monotonic
    assert loop.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 0.5}
    argv = supernode_argv()
    assert argv[2:] == ["supernode", "--idle-poll-s", "0.2", "--"] and argv[1].endswith("flower_services.py")


def _site_local_run(out, overrides):
    """The demo's plan for 3 sites split into one corpus folder per site under out/deploy/sites, and
    its site-local run config: (plans, folders, run_config path, the first training site)."""
    import numpy as np

    from federated.core.config import config_to_yaml
    from federated.data.format import Corpus
    from federated.data.split import split_corpus
    from federated.engines.deployment.demo import _demo_plan, site_local_config

    cfg, corpus_path, plans = _demo_plan(3, overrides)
    rows = {p.site: np.concatenate([p.train_rows, p.test_rows]) for p in plans}
    folders = split_corpus(Corpus.open(corpus_path), rows, out / "deploy" / "sites")
    run_config = out / "deploy" / "run_config.toml"
    run_config.write_text(run_config_toml(config_to_yaml(site_local_config(cfg, plans)), "", str(out)))
    return plans, folders, run_config, next(p.site for p in plans if p.role == "train")


@pytest.mark.slow
def test_a_supernode_killed_mid_run_and_restarted_rejoins(tmp_path):
    """Chaos: a training site's SuperNode and ClientApp worker are killed after its second
    training message and started again with the same key and folder. With engine.round_timeout_s
    the rounds go on without it (each failure recorded against it). Flower's SuperLink refuses to
    activate the same node again until its old session has missed two heartbeats (2 x 30 s), so
    the restart is retried, as a service manager would (Restart=on-failure); once back, the site
    trains and is evaluated again under the same node id and site name."""
    import signal
    import time

    from federated.engines.deployment.demo import _start_sites, app_dir

    out = tmp_path / "chaos"
    deploy = out / "deploy"
    rounds = 30
    plans, folders, run_config, victim = _site_local_run(
        out, ["scale=smoke", f"rounds={rounds}", "engine.round_timeout_s=10"]
    )
    fed = LoopbackFederation(deploy, 3, grace_s=5)
    deadline = time.monotonic() + 900
    try:
        fed.start_superlink()
        _start_sites(fed, plans, folders, out, "worker", lambda line: None)
        run_id = fed.submit(app_dir(), run_config)
        log = deploy / "logs" / f"clientapp-{victim}.log"
        while log.read_text().count("train message: completed") < 2:
            assert time.monotonic() < deadline, "the victim never trained twice"
            time.sleep(0.5)
        handle = next(h for h in fed.nodes if h.name == victim)
        handle.node.signal(signal.SIGKILL)
        assert handle.worker is not None
        handle.worker.stop(grace_s=1)
        handle.node.wait(10)
        fed.nodes.remove(handle)
        key = fed.pki.nodes[[p.site for p in plans].index(victim)]
        node_config = {"site": victim, "corpus-path": str(folders[victim]), "state-dir": str(out / "site_state")}
        while True:  # until the SuperLink lets the node activate again
            restarted = fed.start_supernode(victim, key, node_config)
            time.sleep(8)
            if restarted.node.alive():
                break
            fed.nodes.remove(restarted)
            if restarted.worker is not None:
                restarted.worker.stop(grace_s=1)
            assert time.monotonic() < deadline, "the SuperNode never activated again"
        while not (status := str(fed.run_info(run_id).get("status", ""))).startswith("finished:"):
            assert time.monotonic() < deadline, f"run still {status}"
            time.sleep(2)
        assert status == "finished:completed", fed.run_info(run_id).get("status-details")
    finally:
        fed.close()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == rounds
    failed = sorted(int(r) for r, reasons in summary["failures"].items() if any(victim in k for k in reasons))
    assert failed, summary["failures"]  # the kill is recorded, against the victim
    assert failed[-1] < rounds, failed  # and it answered again before the end
    assert next(r for r in summary["per_site"] if r["site"] == victim)["per_task"]


@pytest.mark.slow
def test_a_run_interrupted_by_a_superlink_restart_resumes_from_its_checkpoint(tmp_path):
    # The SuperLink killed mid-run (its ServerApp with it) and started again on its database: the
    # SuperNodes reconnect by themselves, the interrupted run is marked failed once it misses its
    # heartbeats, and a run submitted with `resume = true` continues it from the last checkpoint.
    import time

    import numpy as np

    from federated.core.config import config_to_yaml
    from federated.data.format import Corpus
    from federated.data.split import split_corpus
    from federated.engines.deployment.demo import _demo_plan, _start_sites, app_dir, site_local_config

    out, rounds = tmp_path / "restart", 8
    deploy = out / "deploy"
    overrides = ["scale=smoke", f"rounds={rounds}", "engine.round_timeout_s=20", "engine.checkpoint_every=1"]
    cfg, corpus_path, plans = _demo_plan(3, overrides)
    rows = {p.site: np.concatenate([p.train_rows, p.test_rows]) for p in plans}
    folders = split_corpus(Corpus.open(corpus_path), rows, deploy / "sites")
    cfg = site_local_config(cfg, plans)
    first, again = deploy / "run_config.toml", deploy / "resume.toml"
    first.write_text(run_config_toml(config_to_yaml(cfg), "", str(out)))
    again.write_text(run_config_toml(config_to_yaml(cfg), "", str(out), resume=True))
    deadline = time.monotonic() + 600
    with LoopbackFederation(deploy, 3, grace_s=5) as fed:
        fed.start_superlink()
        _start_sites(fed, plans, folders, out, "worker", lambda line: None)
        interrupted = fed.submit(app_dir(), first)
        while not (out / "checkpoint.npz").exists():
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.5)
        fed.stop_superlink(kill=True)
        fed.start_superlink()
        while not (status := str(fed.run_info(interrupted).get("status", ""))).startswith("finished:"):
            assert time.monotonic() < deadline, f"the interrupted run is still {status}"
            time.sleep(2)
        assert status == "finished:failed"
        assert not (out / "summary.json").exists()
        resumed = fed.wait_run(fed.submit(app_dir(), again), timeout_s=deadline - time.monotonic(), poll_s=2)
        assert resumed.completed, resumed.details
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == rounds
    assert 1 <= summary["resumed_from_round"] < rounds
    assert [h["round"] for h in summary["history"]] == list(range(rounds + 1))


# A ClientApp worker that dies between the two halves of pushing its train reply number DIE_AT:
# the header reaches its SuperNode (which forwards it to the SuperLink at once), the objects never
# do. Killing the SuperNode then leaves what a SuperNode killed while sending its reply leaves: a
# reply header on the SuperLink whose content never arrives. Flower's ServerApp pull retries its
# objects until the SuperLink's push session expires (OBJECT_PUSH_SESSION_TTL_SECONDS, 180 s), the
# ~180 s stall of the hand-run deployment.
_DYING_WORKER = """
import importlib.util, os, signal, sys
from flwr.supernode.runtime import run_clientapp

path, address, die_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = importlib.util.spec_from_file_location("clientapp_worker", path)
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)
real_push_message, trains = run_clientapp.push_message, [0]

def die(*args, **kwargs):
    print("dying between the reply's header and its objects", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

def push_message(client, message, context):
    if message.metadata.message_type == "train":
        trains[0] += 1
        if trains[0] == die_at:
            run_clientapp.push_objects = die
    return real_push_message(client, message, context)

run_clientapp.push_message = push_message
worker.clientapp_worker(address)
"""


def _round_bounds(run_log: str) -> list[datetime.datetime]:
    """When each round's exchange began (the ServerApp's "configure_train" lines, timestamped to
    the second), then when the ServerApp finished: the bounds of every round in the run's log."""
    stamp = r"(\d\d/\d\d/\d{4} \d\d:\d\d:\d\d):\w+:"
    lines = re.findall(stamp + r"(configure_train|ServerApp finished running)", run_log)
    return [datetime.datetime.strptime(t, "%m/%d/%Y %H:%M:%S") for t, _ in lines]


@pytest.mark.slow
def test_a_supernode_killed_while_sending_its_reply_ends_the_round_within_the_timeout(tmp_path):
    """Issue 28: engine.round_timeout_s bounds a round whose SuperNode is killed while sending its
    train reply (header on the SuperLink, content never). At smoke size with a 20 s timeout (the
    issue's figure is 60 s at round 7), rounds 3 and 4 (the node is not marked offline before its
    heartbeats lapse) each end within 20 + 10 s, timed by the ServerApp's own log (the start of
    each round's exchange, and its end); the run completes and the victim's failure names the
    timeout. Before, round 3 lasted until the SuperLink dropped the upload session: ~180 s."""
    import signal
    import sys
    import time

    from federated.engines.deployment import ManagedProcess, worker_argv
    from federated.engines.deployment.demo import app_dir

    timeout_s, die_at, rounds = 20, 3, 4
    out = tmp_path / "killed"
    deploy = out / "deploy"
    overrides = ["scale=smoke", f"rounds={rounds}", f"engine.round_timeout_s={timeout_s}"]
    plans, folders, run_config, victim = _site_local_run(out, overrides)
    deadline = time.monotonic() + 900
    with LoopbackFederation(deploy, 3, grace_s=5) as fed:
        fed.start_superlink()
        for plan, key in zip(plans, fed.pki.nodes, strict=True):
            fed.register(key, plan.site)
        for plan, key in zip(plans, fed.pki.nodes, strict=True):
            node_config = {"site": plan.site, "corpus-path": str(folders[plan.site])}
            mode = None if plan.site == victim else "worker"
            handle = fed.start_supernode(plan.site, key, node_config, clientapp=mode)
            if plan.site == victim:
                argv = [sys.executable, "-c", _DYING_WORKER, worker_argv("")[1], f"{fed.host}:{handle.port}"]
                handle.worker = fed._track(
                    ManagedProcess(
                        f"clientapp-{victim}", [*argv, str(die_at)], fed.logs / f"clientapp-{victim}.log", fed.env
                    )
                )
        fed.wait_online(3)
        run_id = fed.submit(app_dir(), run_config)
        node = next(h for h in fed.nodes if h.name == victim)
        while node.worker is not None and node.worker.alive():
            assert time.monotonic() < deadline, "the victim's worker never died"
            time.sleep(0.2)
        while node.node.log_text().count("Sending: train message") < die_at:
            assert time.monotonic() < deadline, "the victim's SuperNode never forwarded the reply header"
            time.sleep(0.1)
        time.sleep(1.0)  # the header is on the SuperLink; now the SuperNode is killed, as by hand
        node.node.signal(signal.SIGKILL)
        asked = 0.0  # `flwr ls` costs ~1.5 CPU-s: ask every 5 s, or once summary.json is there
        status = ""
        while not status.startswith("finished:"):
            assert time.monotonic() < deadline, f"run still {status}"
            if time.monotonic() - asked >= 5 or (out / "summary.json").exists():
                status, asked = str(fed.run_info(run_id).get("status", "")), time.monotonic()
            time.sleep(0.2)
        details = fed.run_info(run_id).get("status-details")
        run_log = fed.cli.run_log(run_id)
    (deploy / "logs" / "run.log").write_text(run_log)
    bounds = _round_bounds(run_log)  # round 1 .. rounds, then the end (with the last evaluation)
    assert len(bounds) == rounds + 1, run_log[-3000:]
    lengths = {r: (bounds[r] - bounds[r - 1]).total_seconds() for r in range(1, rounds + 1)}
    print("round lengths (s):", lengths)
    for r in range(die_at, rounds + 1):  # before: round 3 ~180 s (the SuperLink's push-session TTL)
        assert lengths[r] <= timeout_s + 10, lengths
    assert status == "finished:completed", details
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == rounds
    reasons = summary["failures"][str(die_at)]
    assert f"within the round's {timeout_s} s (engine.round_timeout_s" in reasons[f"train:{victim}"], reasons
