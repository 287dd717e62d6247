"""`multimed-fl deploy demo|certificates|submit`: the apps as a real Flower deployment."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from federated.app.commands import Subparsers
from federated.core.config import ExperimentConfig, load_config


def add_parser(sub: Subparsers) -> None:
    deploy = sub.add_parser("deploy", help="run the apps as a real Flower deployment (SuperLink, SuperNodes)")
    deploy_sub = deploy.add_subparsers(dest="deploy_command", required=True)
    add_demo_parser(deploy_sub)
    add_certificates_parser(deploy_sub)
    add_submit_parser(deploy_sub)


def add_demo_parser(deploy_sub: Subparsers) -> None:
    demo = deploy_sub.add_parser(
        "demo",
        help="SuperLink with TLS + SuperNode auth and one SuperNode per site on this machine "
        "(loopback); runs the experiment with `flwr run` and writes its outputs to --out",
    )
    demo.add_argument("--sites", type=int, required=True, help="number of sites (SuperNodes)")
    demo.add_argument("--out", required=True, help="output folder; logs and keys go to OUT/deploy")
    demo.add_argument(
        "--clientapp",
        choices=["worker", "subprocess"],
        default=None,
        help="worker: one long-lived ClientApp process per SuperNode (default); "
        "subprocess: Flower's one ClientApp process per message (the default with --stock-flower)",
    )
    demo.add_argument("--superlink-port", type=int, default=0, help="SuperLink port (default: a free one)")
    demo.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run")
    demo.add_argument(
        "--in-memory",
        action="store_true",
        help="the SuperLink keeps its state in memory, not in OUT/deploy/superlink.db (faster rounds; "
        "a restarted SuperLink would know no nodes or runs)",
    )
    demo.add_argument(
        "--stock-flower",
        action="store_true",
        help="Flower's own SuperLink and SuperNodes, nothing of Flower patched in any process (slower; "
        "what is lost is said first); the same as MULTIMED_FL_STOCK_FLOWER=1",
    )
    demo.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides (default plan: random_mix of --sites sites, one held out)",
    )
    demo.set_defaults(func=cmd_deploy_demo)


def cmd_deploy_demo(args: argparse.Namespace) -> int:
    from federated.core.config import config_from_yaml
    from federated.engines.deployment import deploy_demo
    from federated.server.run_folder import check_out_dir

    def say(line: str) -> None:
        print(f"[deploy] {line}", flush=True)

    check_out_dir(Path(args.out), overwrite=False)  # what the ServerApp would refuse, before anything starts
    try:
        result = deploy_demo(
            args.sites,
            args.out,
            args.overrides,
            clientapp=args.clientapp,
            superlink_port=args.superlink_port,
            timeout_s=args.timeout,
            superlink_database=not args.in_memory,
            stock_flower=True if args.stock_flower else None,  # None: as MULTIMED_FL_STOCK_FLOWER says
            say=say,
        )
    except KeyboardInterrupt:
        print("multimed-fl: deploy interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    problems = [str(p) for p in result.summary.get("problems", [])]
    for line in problems:
        say(f"incomplete scores: {line}")
    cfg = config_from_yaml((Path(result.out_dir) / "config.yaml").read_text())
    return 1 if problems and not cfg.engine.allow_site_failures else 0


def add_certificates_parser(deploy_sub: Subparsers) -> None:
    certs = deploy_sub.add_parser(
        "certificates",
        help="a CA and a SuperLink TLS certificate for the names hospitals dial (for a coordinator without a CA)",
    )
    certs.add_argument("--out", required=True, help="folder for ca.crt, ca.key, server.pem, server.key")
    certs.add_argument(
        "--host", required=True, action="append", help="a name or IP the hospitals dial (repeat for more)"
    )
    certs.add_argument("--days", type=int, default=365, help="validity in days")
    certs.set_defaults(func=cmd_deploy_certificates)


def cmd_deploy_certificates(args: argparse.Namespace) -> int:
    from federated.engines.deployment import DeploymentError
    from federated.engines.pki import write_server_pki

    out = Path(args.out)
    existing = [n for n in ("ca.crt", "ca.key", "server.pem", "server.key") if (out / n).exists()]
    if existing:  # hospitals may already trust this CA: never replace it silently
        raise DeploymentError(f"{out} already holds {', '.join(existing)}; choose another --out or remove them")
    pki = write_server_pki(out, args.host, days=args.days)
    print(f"CA certificate (send to every hospital): {pki.ca_cert}")
    print(f"SuperLink certificate for {', '.join(args.host)}: {pki.server_cert} (key {pki.server_key})")
    print(f"CA key (keep it offline; it signs certificates hospitals trust): {pki.ca_key}")
    return 0


def add_submit_parser(deploy_sub: Subparsers) -> None:
    submit = deploy_sub.add_parser(
        "submit",
        help="submit a run to a running SuperLink, wait until it ends, exit 1 unless it completed with complete scores",
    )
    submit.add_argument("--connection", required=True, help="a [superlink.NAME] connection in $FLWR_HOME/config.toml")
    submit.add_argument("--out-dir", help="output folder, on the SuperLink's machine")
    submit.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR from its last checkpoint")
    submit.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds to wait for the run")
    submit.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    submit.set_defaults(func=cmd_deploy_submit)


def _check_resumed_privacy(out_dir: Path, cfg: ExperimentConfig, say: Callable[[str], None]) -> None:
    """deploy submit --resume, best effort: where the submitter can authenticate the checkpoint (it
    holds the ServerApp's state key), a config.yaml whose privacy or secure-aggregation settings
    differ from those the run trained with is refused before anything is submitted, naming each key.
    Where it cannot (the SuperLink runs as a service user with its own key, or the checkpoint is not
    readable here) the check is left to the ServerApp, which holds the key and names the keys."""
    from federated.server.checkpoint import CHECKPOINT_FILE, CheckpointAuthError, check_resume, load_checkpoint

    if not (out_dir / CHECKPOINT_FILE).is_file():
        return
    try:
        ckpt = load_checkpoint(out_dir)
    except (CheckpointAuthError, OSError) as e:
        say(f"the checkpoint cannot be checked here ({e}); the ServerApp checks the resumed settings")
        return
    check_resume(ckpt, cfg, out_dir, f"{out_dir / 'config.yaml'}")


def cmd_deploy_submit(args: argparse.Namespace) -> int:
    from federated.app.api import load_summary
    from federated.app.runner import RunError
    from federated.core.config import config_from_yaml, config_to_yaml
    from federated.engines.deployment import submit_and_wait
    from federated.server.outputs import exit_code, print_report

    if args.resume and (args.out_dir or args.overrides):
        raise RunError("--resume DIR continues the run in DIR with its own config; give no --out-dir or overrides")
    if not args.resume and not args.out_dir:
        raise RunError("deploy submit needs --out-dir DIR (or --resume DIR)")
    out_dir = args.resume or args.out_dir
    if args.resume:  # the sites read the run config's config: it must be the interrupted run's own
        own = Path(args.resume) / "config.yaml"
        if not own.is_file():
            raise RunError(f"--resume {args.resume}: {own} is not readable here; run this on the SuperLink's machine")
        resumed = config_from_yaml(own.read_text())
        _check_resumed_privacy(Path(args.resume), resumed, lambda line: print(f"[deploy] {line}", flush=True))
        config_yaml = config_to_yaml(resumed)
    else:
        config_yaml = config_to_yaml(load_config(args.overrides))
    result = submit_and_wait(
        args.connection,
        out_dir,
        config_yaml,
        resume=bool(args.resume),
        timeout_s=args.timeout,
        say=lambda line: print(f"[deploy] {line}", flush=True),
    )
    if not result.completed:
        return 1
    out = Path(out_dir)
    if not (out / "summary.json").is_file():  # the ServerApp ran on another machine
        print(f"[deploy] run {result.run_id} completed; its outputs are in {out_dir} on the SuperLink's machine")
        return 0
    summary = load_summary(out)
    print_report(summary, out, Console())
    cfg = config_from_yaml((out / "config.yaml").read_text())
    return exit_code(summary, cfg.engine.allow_site_failures)
