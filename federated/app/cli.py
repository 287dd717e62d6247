"""`multimed-fl`: run experiments and manage corpora from the command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from federated.core.config import ConfigError, ExperimentConfig, config_to_yaml, load_config
from federated.core.corpus_schema import SchemaError, Task
from federated.core.models.init_weights import WeightsFileError
from federated.core.protocol import Role
from federated.core.registry import UnknownNameError
from federated.core.state_key import StateKeyError
from federated.core.statefile import StateFileError
from federated.data.format import CorpusFormatError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    CorpusFormatError,
    SchemaError,
    UnknownNameError,
    WeightsFileError,
    StateFileError,  # a state file that cannot be read back or authenticated
    StateKeyError,  # a state key others can read, checked before a checkpointing run trains
)


def _user_errors() -> tuple[type[BaseException], ...]:
    from clients.site_runtime import SiteConfigError
    from federated.app.runner import RunError
    from federated.app.studies.spec import StudyError
    from federated.data.ingest import IngestError
    from federated.engines.deployment import DeploymentError
    from federated.engines.pki import KeyWriteError
    from federated.server.checkpoint import CheckpointError
    from federated.server.federation import FederationError
    from federated.server.run_folder import RunFolderError
    from partitions import PlanError
    from strategies import TooFewValidReplies

    return (
        *USER_ERRORS,
        PlanError,
        RunError,
        RunFolderError,
        FederationError,
        SiteConfigError,
        TooFewValidReplies,
        CheckpointError,
        DeploymentError,
        KeyWriteError,
        StudyError,
        IngestError,
    )


def _quiet_flower() -> None:
    """Flower logs every round at INFO; our progress bar and tables say it better."""
    import flwr.common.logger  # noqa: F401  (sets the flwr logger's level on import)

    logging.getLogger("flwr").setLevel(logging.WARNING)


def cmd_run(args: argparse.Namespace) -> int:
    from federated.app.runner import RunError, run_experiment
    from federated.core.config import config_from_yaml
    from federated.server.outputs import exit_code, print_report

    console = Console()
    if args.resume:
        if args.overrides or args.out:
            raise RunError(
                "--resume DIR continues the run in DIR with its own config.yaml; "
                "give neither --out nor key=value overrides"
            )
        out, cfg = args.resume, None
    elif not args.out:
        raise RunError("run needs --out DIR (or --resume DIR to continue a checkpointed run)")
    else:
        out, cfg = args.out, load_config(args.overrides)
    summary = run_experiment(
        cfg,
        out,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        console=Console(stderr=True),
        resume=bool(args.resume),
    )
    print_report(summary, Path(out), console)
    if cfg is None:  # resumed: the run's own config decides
        cfg = config_from_yaml((Path(out) / "config.yaml").read_text())
    code = exit_code(summary, cfg.engine.allow_site_failures)
    if code:
        console.print(
            f"exit code {code}: the summary is written, but its scores miss what is listed above "
            "(engine.allow_site_failures=true accepts that)",
            markup=False,
        )
    return code


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


def cmd_stats(args: argparse.Namespace) -> int:
    """A federated pre-flight profile of the sites (federated/app/stats.py), in simulation or, with
    --connection, as a statistics-only run on a running SuperLink."""
    from federated.app.runner import RunError
    from federated.app.stats import run_stats, submit_stats, summary_lines

    cfg = load_config(args.overrides)
    out = Path(args.out)
    if not args.connection:
        for line in summary_lines(run_stats(cfg, out, overwrite=args.overwrite), out):
            print(line)
        return 0
    if args.overwrite:
        raise RunError("stats --connection: the ServerApp never replaces a profile; choose a new --out")
    completed = submit_stats(
        args.connection, args.out, cfg, timeout_s=args.timeout, say=lambda line: print(f"[stats] {line}", flush=True)
    )
    if not completed:
        return 1
    if (out / "stats.json").is_file():
        import json

        for line in summary_lines(json.loads((out / "stats.json").read_text()), out):
            print(line)
    else:  # the ServerApp ran on another machine
        print(f"[stats] completed; the profile is in {args.out} on the SuperLink's machine")
    return 0


def cmd_sites_show(args: argparse.Namespace) -> int:
    from federated.core.io import atomic_write
    from federated.data.cache import prepare_corpus
    from federated.data.format import Corpus
    from partitions import plan_sites
    from partitions.report import plan_frame, write_heatmap

    cfg = load_config(args.overrides)
    corpus = Corpus.open(prepare_corpus(cfg.corpus))
    frame = plan_frame(corpus, plan_sites(corpus, cfg), cfg)
    table = Table(title=f"Site plan ({cfg.sites.planner}, {len(frame)} sites)")
    for col in (
        "site",
        "role",
        "archetype",
        "origin",
        "modalities",
        "tasks",
        "n_train",
        "n_test",
        "label mix",
        "site shift",
    ):
        table.add_column(col)
    for r in frame.itertuples():
        table.add_row(
            r.site,
            Role(r.role).label,
            r.archetype,
            r.origin_site,
            ", ".join(r.modalities),
            ", ".join(r.tasks),
            str(r.n_train),
            str(r.n_test),
            r.label_mix,
            r.site_shift or "-",
        )
    Console(width=200).print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "sites.parquet", lambda tmp: frame.to_parquet(tmp, index=False))
    write_heatmap(frame, out / "sites_heatmap.png", corpus.schema)
    print(f"wrote {out / 'sites.parquet'} and {out / 'sites_heatmap.png'}")
    return 0


def _classes_or_unit(task: Task) -> str:
    if not task.classes:
        return task.unit or "-"
    shown = ", ".join(task.classes[:4])
    return shown + (f", ... ({len(task.classes)})" if len(task.classes) > 4 else "")


def cmd_config_show(args: argparse.Namespace) -> int:
    print(config_to_yaml(load_config(args.overrides)), end="")
    return 0


def cmd_corpus_build(args: argparse.Namespace) -> int:
    from federated.data.cache import generator_config
    from federated.data.synthetic import build_synthetic_corpus

    cfg = load_config(args.overrides)
    path = build_synthetic_corpus(Path(args.out), generator_config(cfg.corpus), overwrite=args.overwrite)
    print(f"wrote synthetic corpus to {path}")
    return cmd_corpus_info(argparse.Namespace(dir=str(path)))


def cmd_corpus_ingest(args: argparse.Namespace) -> int:
    from federated.data.ingest.spec import run_spec

    path, skipped = run_spec(args.spec, args.out, overwrite=args.overwrite, data_root=args.data_root)
    print(f"wrote {path}" + (f" ({len(skipped)} items skipped, listed in spec.json provenance)" if skipped else ""))
    return cmd_corpus_info(argparse.Namespace(dir=str(path)))


def cmd_corpus_dictionary(args: argparse.Namespace) -> int:
    """Draft a data dictionary from a table, for a person to edit and a coordinator to send out."""
    from federated.data.ingest import IngestError, Problems
    from federated.data.ingest.dictionary import write_draft
    from federated.data.ingest.tabular import open_table

    table = Path(args.table)
    frame = open_table(table, Problems("stop"))
    if frame is None:  # Problems("stop") raises first; kept for the type checker
        raise IngestError(f"{table}: unreadable table")
    named = (args.label_column, args.site_column, args.patient_column, args.split_column, *args.exclude)
    exclude = {c for c in named if c}
    out, body, left_out = write_draft(table, Path(args.out), frame, exclude, overwrite=args.overwrite)
    kinds = [c["type"] for c in body["columns"].values()]
    print(
        f"wrote a draft data dictionary to {out}: {kinds.count('numeric')} numeric and "
        f"{kinds.count('categorical')} categorical columns"
        + (f"; left out {len(left_out)} (listed in its comments)" if left_out else "")
        + ". Edit it (units, plausible ranges, every hospital's levels, missing codes) before it is sent out."
    )
    return 0


def cmd_corpus_split(args: argparse.Namespace) -> int:
    """One corpus per site of a plan (by default one per origin site), each with only its rows."""
    import numpy as np

    from federated.core.config.loader import simulation_only_settings
    from federated.data.format import Corpus
    from federated.data.split import split_corpus
    from partitions import plan_sites

    keys = {o.split("=", 1)[0] for o in args.overrides}
    cfg = load_config([*([] if "sites.planner" in keys else ["sites.planner=natural"]), *args.overrides])
    reshaping = simulation_only_settings(cfg)
    if reshaping:
        raise ConfigError(f"corpus split writes each site's rows as stored; {', '.join(reshaping)} would be lost")
    corpus = Corpus.open(args.dir)
    plans = plan_sites(corpus, cfg)
    rows = {p.site: np.concatenate([p.train_rows, p.test_rows]) for p in plans}
    written = split_corpus(corpus, rows, args.out, overwrite=args.overwrite)
    for p in plans:
        print(f"{written[p.site]}: {len(rows[p.site])} samples of {p.origin_site} ({', '.join(p.tasks)})")
    return 0


def cmd_corpus_info(args: argparse.Namespace) -> int:
    from federated.data.format import Corpus

    corpus = Corpus.open(args.dir)
    spec, m = corpus.spec, corpus.manifest
    console = Console()
    console.print(
        f"[bold]{spec['name']}[/bold] at {corpus.path} (schema v{spec['schema_version']}): "
        f"{spec['n_samples']} samples, {len(spec['tasks'])} tasks, "
        f"{len(spec['modalities'])} modalities, {len(spec['origin_sites'])} origin sites"
    )
    mods = Table(title="modalities")
    for col in ("modality", "shape", "dtype", "samples"):
        mods.add_column(col)
    for name, s in spec["modalities"].items():
        mods.add_row(name, "x".join(map(str, s["shape"])), s["dtype"], str(s["n"]))
    console.print(mods)
    tasks = Table(title="tasks")
    for col in ("task", "inputs", "target", "classes / unit", "metrics", "train", "test", "sites"):
        tasks.add_column(col, no_wrap=col == "task", overflow="fold")
    for name in corpus.tasks:
        rows = m[m["task"] == name]
        t = corpus.schema.task(name)
        tasks.add_row(
            name,
            "+".join(t.inputs),
            t.target,
            _classes_or_unit(t),
            ", ".join(t.metrics),
            str(int((rows["split"] == "train").sum())),
            str(int((rows["split"] == "test").sum())),
            str(rows["origin_site"].nunique()),
        )
    console.print(tasks)
    prov = spec.get("provenance", {})
    if "sources" not in prov:  # synthetic: the generator's settings
        console.print(f"provenance: {prov.get('generator', prov)}")
        return 0
    console.print(f"ingested with {prov.get('ingest_spec')} from {prov.get('data_root')}")
    for source, notes in zip(prov["sources"], prov.get("notes", [{}] * len(prov["sources"])), strict=True):
        extra = "".join(f", {k}: {len(v) if isinstance(v, list) else v}" for k, v in notes.items())
        console.print(f"  {source['task']} <- {source['adapter']} {source.get('path', '')}{extra}")
    skipped = prov.get("skipped", [])
    if skipped:
        console.print(
            f"{len(skipped)} item(s) skipped (listed in spec.json provenance.skipped); first: "
            f"{skipped[0]['item']}: {skipped[0]['reason']}"
        )
    return 0


def cmd_corpus_check(args: argparse.Namespace) -> int:
    """Every check of the corpus format, the full-data scans included; exit 1 when any fails."""
    from federated.data.checks import check_corpus
    from federated.data.format import Corpus

    problems = check_corpus(args.dir)
    for problem in problems:
        print(f"multimed-fl: corpus problem: {problem}", file=sys.stderr)
    if problems:
        print(f"multimed-fl: {args.dir}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    corpus = Corpus.open(args.dir)
    print(f"{args.dir}: ok ({corpus.spec['n_samples']} samples); fingerprint {corpus.fingerprint}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from federated.app.studies.study import run_study

    df = run_study(args.name, Path(args.out), quick=args.quick, processes=args.processes, overrides=args.overrides)
    print((Path(args.out) / "summary.md").read_text(), end="")
    return 1 if df["error"].astype(bool).any() else 0


def cmd_models(args: argparse.Namespace) -> int:
    """The architectures `model.name` chooses from."""
    from federated.core.models import ARCHITECTURES

    table = Table(title="Models (model.name=NAME)")
    table.add_column("name")
    table.add_column("encoders")
    for name in ARCHITECTURES.names():
        table.add_row(name, ARCHITECTURES.get(name).description)
    Console(width=160).print(table)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from federated.app.bench import run_benchmarks

    results = run_benchmarks(Path(args.out), quick=args.quick, names=args.only or None)
    return 1 if any("error" in r for r in results.values()) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimed-fl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one federated experiment and write its outputs to --out")
    run.add_argument("--out", help="output folder")
    run.add_argument(
        "--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint (engine.checkpoint_every)"
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="run in an --out that holds an earlier run or other files: the earlier run's files are replaced, "
        "files multimed-fl did not write are left untouched",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides: group=name (e.g. scale=smoke) or a.b=value"
    )
    run.set_defaults(func=cmd_run)

    study = sub.add_parser("study", help="run a study (a grid of runs over seeds) and write its report")
    study.add_argument("name", help="a study in experiments/studies/ (e.g. leave_one_site_out) or a YAML path")
    study.add_argument("--out", required=True, help="output folder (an interrupted study resumes here)")
    study.add_argument("--quick", action="store_true", help="the study's small variant (minutes)")
    study.add_argument("--processes", type=int, default=None, help="runs in parallel (default: the study's, 2)")
    study.add_argument("overrides", nargs="*", help="key=value settings added to every run (e.g. corpus.path=DIR)")
    study.set_defaults(func=cmd_study)

    models = sub.add_parser("models", help="list the model architectures (model.name=NAME)")
    models.set_defaults(func=cmd_models)

    bench = sub.add_parser("bench", help="run every benchmark in experiments/bench/; write bench.json and bench.md")
    bench.add_argument("--out", required=True)
    bench.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    bench.add_argument("--only", nargs="*", help="only these benchmarks")
    bench.set_defaults(func=cmd_bench)

    deploy = sub.add_parser("deploy", help="run the apps as a real Flower deployment (SuperLink, SuperNodes)")
    deploy_sub = deploy.add_subparsers(dest="deploy_command", required=True)
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
        default="worker",
        help="worker: one long-lived ClientApp process per SuperNode (default); "
        "subprocess: Flower's one ClientApp process per message",
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
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides (default plan: random_mix of --sites sites, one held out)",
    )
    demo.set_defaults(func=cmd_deploy_demo)
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

    stats = sub.add_parser(
        "stats",
        help="profile the sites before training (counts, label mix, missingness, quantiles, histograms; "
        "small cells suppressed): stats.json, report.md and plots in --out",
    )
    stats.add_argument("--out", required=True, help="output folder (with --connection: on the SuperLink's machine)")
    stats.add_argument("--overwrite", action="store_true", help="replace an earlier profile in --out")
    stats.add_argument(
        "--connection",
        help="a [superlink.NAME] connection in $FLWR_HOME/config.toml: run the profile on that deployment "
        "(a statistics-only run), not in simulation",
    )
    stats.add_argument("--timeout", type=float, default=3600.0, help="with --connection: seconds to wait for the run")
    stats.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, as for run (corpus.path, sites.planner...)"
    )
    stats.set_defaults(func=cmd_stats)

    config = sub.add_parser("config", help="inspect the resolved configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the resolved config as YAML")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    show.set_defaults(func=cmd_config_show)

    sites = sub.add_parser("sites", help="inspect the site plan")
    sites_sub = sites.add_subparsers(dest="sites_command", required=True)
    sites_show = sites_sub.add_parser("show", help="print the site plan; write sites.parquet and a heatmap")
    sites_show.add_argument("--out", required=True)
    sites_show.add_argument("overrides", nargs="*", metavar="key=value")
    sites_show.set_defaults(func=cmd_sites_show)

    corpus = sub.add_parser("corpus", help="build or inspect corpora")
    corpus_sub = corpus.add_subparsers(dest="corpus_command", required=True)
    build = corpus_sub.add_parser("build", help="build the synthetic MultiMed corpus")
    build.add_argument("--out", required=True)
    build.add_argument("--overwrite", action="store_true")
    build.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. corpus.samples_per_task_site=200 corpus.seed=3"
    )
    build.set_defaults(func=cmd_corpus_build)
    ingest = corpus_sub.add_parser("ingest", help="turn datasets in their own formats into a corpus")
    ingest.add_argument("spec", help="an ingest spec (YAML): sources and their adapters")
    ingest.add_argument("--out", required=True, help="the corpus folder to write (atomically)")
    ingest.add_argument("--overwrite", action="store_true")
    ingest.add_argument(
        "--data-root",
        default=None,
        help="the folder the sources' paths are relative to and must lie in (default: the spec's folder, "
        "or its data_root inside it); nothing outside it is read",
    )
    ingest.set_defaults(func=cmd_corpus_ingest)
    dictionary = corpus_sub.add_parser(
        "dictionary",
        help="draft a data dictionary (types, units, ranges, levels, reference levels) from a table, to edit",
    )
    dictionary.add_argument("table", help="a CSV or Parquet table")
    dictionary.add_argument("--out", required=True, help="the dictionary to write (YAML)")
    dictionary.add_argument("--label-column", default=None, help="a column that is not a feature (the label)")
    dictionary.add_argument("--site-column", default=None, help="a column that is not a feature (the hospital)")
    dictionary.add_argument("--patient-column", default=None, help="a column that is not a feature (patient ids)")
    dictionary.add_argument(
        "--split-column", default=None, help="a column that is not a feature (the table's train/test side)"
    )
    dictionary.add_argument(
        "--exclude",
        nargs="+",
        action="extend",
        default=[],
        metavar="COL",
        help="other columns that are not features (dates, free text, outcomes that would leak the label)",
    )
    dictionary.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    dictionary.set_defaults(func=cmd_corpus_dictionary)
    info = corpus_sub.add_parser("info", help="describe a corpus folder")
    info.add_argument("dir")
    info.set_defaults(func=cmd_corpus_info)
    check = corpus_sub.add_parser(
        "check", help="check a corpus folder against its spec (files, shapes, labels, values); exit 1 on a problem"
    )
    check.add_argument("dir")
    check.set_defaults(func=cmd_corpus_check)
    split = corpus_sub.add_parser(
        "split",
        help="write one corpus per planned site (OUT/<site>/, only that site's rows): the site corpora of "
        "site-local mode (sites.planner=site_local with corpus.site_corpora=OUT)",
    )
    split.add_argument("dir", help="the corpus to split")
    split.add_argument("--out", required=True, help="a new folder for the site corpora")
    split.add_argument("--overwrite", action="store_true")
    split.add_argument(
        "overrides", nargs="*", metavar="key=value", help="the plan to split by (default: sites.planner=natural)"
    )
    split.set_defaults(func=cmd_corpus_split)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting key=value positionals at the first flag; take the rest too.
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    _quiet_flower()
    try:
        return int(args.func(args))
    except _user_errors() as e:
        print(f"multimed-fl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
