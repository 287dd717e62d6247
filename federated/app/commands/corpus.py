"""`multimed-fl corpus build|ingest|dictionary|split`: write corpora (info and check: corpus_inspect.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from federated.app.commands import Subparsers, corpus_inspect
from federated.app.commands.corpus_inspect import cmd_corpus_info
from federated.core.config import ConfigError, load_config


def add_parser(sub: Subparsers) -> None:
    corpus = sub.add_parser("corpus", help="build or inspect corpora")
    corpus_sub = corpus.add_subparsers(dest="corpus_command", required=True)
    add_build_parser(corpus_sub)
    add_ingest_parser(corpus_sub)
    add_dictionary_parser(corpus_sub)
    corpus_inspect.add_info_parser(corpus_sub)
    corpus_inspect.add_check_parser(corpus_sub)
    add_split_parser(corpus_sub)


def add_build_parser(corpus_sub: Subparsers) -> None:
    build = corpus_sub.add_parser("build", help="build the synthetic MultiMed corpus")
    build.add_argument("--out", required=True)
    build.add_argument("--overwrite", action="store_true")
    build.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. corpus.samples_per_task_site=200 corpus.seed=3"
    )
    build.set_defaults(func=cmd_corpus_build)


def cmd_corpus_build(args: argparse.Namespace) -> int:
    from federated.data.cache import generator_config
    from federated.data.synthetic import build_synthetic_corpus

    cfg = load_config(args.overrides)
    path = build_synthetic_corpus(Path(args.out), generator_config(cfg.corpus), overwrite=args.overwrite)
    print(f"wrote synthetic corpus to {path}")
    return cmd_corpus_info(argparse.Namespace(dir=str(path)))


def add_ingest_parser(corpus_sub: Subparsers) -> None:
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


def cmd_corpus_ingest(args: argparse.Namespace) -> int:
    from federated.data.ingest.spec import run_spec

    path, skipped = run_spec(args.spec, args.out, overwrite=args.overwrite, data_root=args.data_root)
    print(f"wrote {path}" + (f" ({len(skipped)} items skipped, listed in spec.json provenance)" if skipped else ""))
    return cmd_corpus_info(argparse.Namespace(dir=str(path)))


def add_dictionary_parser(corpus_sub: Subparsers) -> None:
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


def add_split_parser(corpus_sub: Subparsers) -> None:
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


def cmd_corpus_split(args: argparse.Namespace) -> int:
    """One corpus per site of a plan (by default one per origin site), each with only its rows."""
    import numpy as np

    from federated.core.config.checks import simulation_only_settings
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
