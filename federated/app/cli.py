"""`multimed-fl`: run experiments and manage corpora from the command line."""

from __future__ import annotations

import argparse
import logging
import sys

from federated.app.commands import bench, config, corpus, deploy, models, run, sites, stats, study
from federated.core.config import ConfigError
from federated.core.corpus_schema import SchemaError
from federated.core.models.init_weights import WeightsFileError
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
    from federated.server.run_folder import RunFolderError
    from federated.server.site_agreement import FederationError
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


def build_parser() -> argparse.ArgumentParser:
    """The whole `multimed-fl` parser: each command's parser function (federated/app/commands/), in
    the order `--help` lists them. The CLI reference of the docs is generated from it."""
    parser = argparse.ArgumentParser(prog="multimed-fl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (run, study, models, bench, deploy, stats, config, sites, corpus):
        command.add_parser(sub)
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
