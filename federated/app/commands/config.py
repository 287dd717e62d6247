"""`multimed-fl config show`: the resolved configuration."""

from __future__ import annotations

import argparse

from federated.app.commands import Subparsers
from federated.core.config import config_to_yaml, load_config


def add_parser(sub: Subparsers) -> None:
    config = sub.add_parser("config", help="inspect the resolved configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    add_show_parser(config_sub)


def add_show_parser(config_sub: Subparsers) -> None:
    show = config_sub.add_parser("show", help="print the resolved config as YAML")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    show.set_defaults(func=cmd_config_show)


def cmd_config_show(args: argparse.Namespace) -> int:
    print(config_to_yaml(load_config(args.overrides)), end="")
    return 0
