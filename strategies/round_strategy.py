"""What the round loop (federated/server/) may call on a strategy, and nothing more.

Every registered strategy (strategies/base.py's MultiMedStrategy) satisfies it, and so does the
site-level DP wrapper (strategies/site_dp.py), which forwards each member to the strategy it
wraps; mypy checks both against this Protocol, so a member the loop starts to use must be added
here, and so to the wrapper, or the type check fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from federated.core.config.schema import StrategyConfig
from strategies.secure_sums import Layout, SecureSupport
from strategies.validation import Rejection


class RoundStrategy(Protocol):
    """A strategy as the round loop sees it: told who the sites are, asked to configure and
    aggregate each round (from the replies, or under secure aggregation from the masked sum), read
    for what it refused, and saved in checkpoints."""

    @property
    def SECURE(self) -> SecureSupport:  # the strategy class's declaration (a ClassVar)
        """Whether it aggregates masked sums, and of which layout (strategies/secure_sums.py)."""
        ...

    @property
    def cfg(self) -> StrategyConfig:
        """The settings it aggregates with (site-level DP: the wrapped strategy's, weighting uniform)."""
        ...

    @property
    def declared_examples(self) -> Mapping[int, int]:
        """node -> the n_train its site declared in the handshake (training sites)."""
        ...

    @property
    def allowed_groups(self) -> Mapping[int, frozenset[str]]:
        """node -> the parameter groups of the modalities and tasks its site declared."""
        ...

    @property
    def handshake_problems(self) -> Mapping[int, str]:
        """node -> why every update of it is refused, from what it declared (know_sites)."""
        ...

    @property
    def last_rejections(self) -> Sequence[Rejection]:
        """The updates refused in the last aggregated round, and why."""
        ...

    @property
    def last_update_norms(self) -> Mapping[str, tuple[float, float | None]]:
        """site -> (L2 norm, ratio to the round's median) of each update screened in the last round."""
        ...

    def know_sites(
        self,
        node_sites: Mapping[int, str],
        declared_examples: Mapping[int, int],
        declared_data: Mapping[int, tuple[Sequence[str], Sequence[str]]] | None = None,
    ) -> None:
        """After the handshake: which node is which site, and what each declared it holds."""
        ...

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The round's train messages, to the sites it samples from `grid`."""
        ...

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new model from the round's train replies (None: nothing to aggregate, round skipped)."""
        ...

    def aggregate_masked_sum(
        self, server_round: int, summed: np.ndarray, layout: Layout, min_weight: float, n_sites: int
    ) -> ArrayRecord | None:
        """Secure aggregation: the new model from the unmasked sum of `n_sites` sites' vectors."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Its state across rounds, for a checkpoint."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's state."""
        ...
