"""The site side of a strategy: what a site does around its local training for one algorithm.

A strategy that needs client-side work registers a ClientAlgorithm with its server side
(strategies/registry.py): FedProx's proximal term, SCAFFOLD's control variates, FedBN/FedPer's
parameters kept at the site. The ClientApp (clients/client_app.py) calls these hooks for
whatever strategy runs and never branches on its name; the base class does nothing, which is
what a server-only strategy needs.

One training round at a site:

    round = algorithm.before_train(SiteRound(...))   the model holds the global weights
    local training with round.hooks and               (the trainer of the privacy mode)
      round.objective(task, loss, targets)            each step's loss, before backward
    records = round.after_train(steps)                extra records for the reply

and at evaluation, `load_personal` puts the site's own parameters into the model to score its
personalised model. State that must outlive a round lives in the site's Flower Context (saved
with the site's checkpoints, clients/site_state.py), never in these objects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from federated.core.config.schema import StrategyConfig, TrainConfig
from federated.core.models import MultiMedModel

Record = ArrayRecord | ConfigRecord


# (task, the batch's task loss, the batch's targets) -> the loss to minimise
Objective = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]


class GradientHook(Protocol):
    """Changes gradients after backward, before the optimiser step (FedProx, SCAFFOLD)."""

    def after_backward(self, model: MultiMedModel) -> None: ...


@dataclass(frozen=True)
class SiteRound:
    """What the site side of a strategy sees of one training round."""

    model: MultiMedModel  # holds the round's global weights when the round starts
    start: Mapping[str, torch.Tensor]  # those global weights (read-only)
    content: RecordDict  # the server's training message: its config and algorithm records
    context: Context  # the site's Flower Context: its state across rounds
    train: TrainConfig
    # The model's mean loss on this site's training data as the model is now: called before
    # training, the received global model's (FedDG-GA's gap, q-FFL's and V-REx's risks); after
    # training, the site's local model's (FedDG-GA).
    training_loss: Callable[[], float] = field(default=lambda: float("nan"), compare=False)


@dataclass
class ClientRound:
    """One round of an algorithm at a site: hooks for local training, then records to send."""

    hooks: tuple[GradientHook, ...] = field(default=())
    # Whether objective() changes the loss: the DP-SGD trainer refuses a round that does, as its
    # per-sample clipping needs a loss that is a mean of per-sample losses it computes itself.
    changes_objective: bool = False

    def objective(self, task: str, loss: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss one local step minimises, from the batch's task loss (FedSR's regularisers,
        a risk reweighting); the task loss itself by default."""
        return loss

    def after_train(self, steps: int) -> dict[str, Record]:
        """Records to add to the training reply, after `steps` local steps."""
        return {}


class ClientAlgorithm:
    """The site side of a strategy. This base is the one every server-only strategy gets."""

    def __init__(self, cfg: StrategyConfig) -> None:
        self.cfg = cfg

    def before_train(self, site: SiteRound) -> ClientRound:
        """Prepare the model for local training; return the round's hooks and its after-step."""
        return ClientRound()

    def load_personal(self, model: MultiMedModel, context: Context) -> bool:
        """Put the site's own parameters into the model; False if there is no personal model."""
        return False
