"""`multimed-fl sites show`: the site plan, as a table, a Parquet file and a heatmap."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from federated.app.commands import Subparsers
from federated.core.config import load_config
from federated.core.protocol import Role


def add_parser(sub: Subparsers) -> None:
    sites = sub.add_parser("sites", help="inspect the site plan")
    sites_sub = sites.add_subparsers(dest="sites_command", required=True)
    add_show_parser(sites_sub)


def add_show_parser(sites_sub: Subparsers) -> None:
    sites_show = sites_sub.add_parser("show", help="print the site plan; write sites.parquet and a heatmap")
    sites_show.add_argument("--out", required=True)
    sites_show.add_argument("overrides", nargs="*", metavar="key=value")
    sites_show.set_defaults(func=cmd_sites_show)


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
