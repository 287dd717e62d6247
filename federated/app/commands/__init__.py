"""One module per `multimed-fl` command: its parser function beside its handler.

Each module's `add_parser(sub)` adds its command (and, for a command group, each of its
subcommands through one parser function apiece) to the top-level subparsers and sets the
handler; `federated.app.cli.build_parser` only assembles them, in the order `--help` lists them.
"""

from __future__ import annotations

import argparse
from typing import TypeAlias

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
