"""`multimed-fl models`: the architectures `model.name` chooses from."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from federated.app.commands import Subparsers


def add_parser(sub: Subparsers) -> None:
    models = sub.add_parser("models", help="list the model architectures (model.name=NAME)")
    models.set_defaults(func=cmd_models)


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
