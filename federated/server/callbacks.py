"""Side effects of a run (progress, metrics tables, TensorBoard, checkpoints) as callbacks.

The round loop calls every callback's hooks in order; none of them changes the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from flwr.app import ArrayRecord

from federated.core.config.schema import ExperimentConfig
from federated.server.evaluation import SiteProfile
from federated.server.records import FederationResult, RoundRecord


class StatefulStrategy(Protocol):
    """A strategy whose state (server-optimiser moments, control variates, DP ledger) can be saved."""

    def state_dict(self) -> dict[str, Any]: ...


@dataclass
class ServerState:
    """Everything the server holds after a round: enough to continue the run from there."""

    round: int
    arrays: ArrayRecord
    strategy: StatefulStrategy
    initial: RoundRecord
    history: list[RoundRecord]
    # Python's RNG (Flower's node sampling) after the round; None: as it is now. Set where the
    # next round was configured before this state reached the callbacks (evaluate_with_train).
    python_rng: Any = None


@dataclass
class SavedStrategyState:
    """A strategy's state as it was at some point (a deep copy), for a ServerState handed to the
    callbacks after the live strategy has moved on."""

    state: dict[str, Any]

    def state_dict(self) -> dict[str, Any]:
        return self.state


class Callback:
    """Side effects of a run; every hook is optional."""

    def on_start(self, cfg: ExperimentConfig, profiles: list[SiteProfile]) -> None:
        """After the handshake, before round 0."""

    def on_resume(self, records: list[RoundRecord]) -> None:
        """A resumed run: the records of the rounds before the checkpoint."""

    def on_round_end(self, record: RoundRecord) -> None:
        """After each round's evaluation (round 0 too)."""

    def on_server_state(self, state: ServerState) -> None:
        """After every callback's on_round_end of a training round: the server's whole state."""

    def on_end(self, result: FederationResult) -> None:
        """After the last round."""
