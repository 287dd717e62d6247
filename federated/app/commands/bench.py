"""`multimed-fl bench`: every benchmark in experiments/bench/ (federated/app/bench.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from federated.app.commands import Subparsers


def add_parser(sub: Subparsers) -> None:
    bench = sub.add_parser("bench", help="run every benchmark in experiments/bench/; write bench.json and bench.md")
    bench.add_argument("--out", required=True)
    bench.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    bench.add_argument("--only", nargs="*", help="only these benchmarks")
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from federated.app.bench import run_benchmarks

    results = run_benchmarks(Path(args.out), quick=args.quick, names=args.only or None)
    return 1 if any("error" in r for r in results.values()) else 0
