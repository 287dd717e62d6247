"""`multimed-fl corpus info|check`: describe a corpus folder, or check it against its spec."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from federated.app.commands import Subparsers
from federated.core.corpus_schema import Task


def add_info_parser(corpus_sub: Subparsers) -> None:
    info = corpus_sub.add_parser("info", help="describe a corpus folder")
    info.add_argument("dir")
    info.set_defaults(func=cmd_corpus_info)


def _classes_or_unit(task: Task) -> str:
    if not task.classes:
        return task.unit or "-"
    shown = ", ".join(task.classes[:4])
    return shown + (f", ... ({len(task.classes)})" if len(task.classes) > 4 else "")


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


def add_check_parser(corpus_sub: Subparsers) -> None:
    check = corpus_sub.add_parser(
        "check", help="check a corpus folder against its spec (files, shapes, labels, values); exit 1 on a problem"
    )
    check.add_argument("dir")
    check.set_defaults(func=cmd_corpus_check)


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
