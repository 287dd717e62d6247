"""The local trainer of each privacy mode: how a site turns one round's data into an update.

Looked up by `privacy.name`, so the ClientApp has no branch on it: sample-level DP-SGD
replaces the training loop and adds its privacy record to the reply; site-level DP
(dp_fedavg) acts at the server, so its sites train as without privacy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Context

from clients.dp_sgd import PrivacyConfigError, train_private
from clients.site_data import SiteData
from clients.trainer import TrainResult, train_local
from federated.core.config.schema import ExperimentConfig
from federated.core.models import MultiMedModel
from federated.core.protocol import PRIVACY_RECORD
from federated.core.registry import Registry
from strategies.client_side import GradientHook, Objective


@dataclass(frozen=True)
class LocalJob:
    """One round of local training at a site."""

    model: MultiMedModel
    data: SiteData
    cfg: ExperimentConfig
    seed: int
    context: Context  # the site's state across rounds (e.g. its DP-SGD accountants)
    server_round: int
    hooks: tuple[GradientHook, ...] = ()  # the strategy's gradient corrections
    objective: Objective | None = None  # the strategy's loss, where it changes it (FedSR, risk objectives)


@dataclass(frozen=True)
class Trained:
    """What a local trainer did, and the records it adds to the training reply."""

    result: TrainResult
    records: dict[str, ConfigRecord] = field(default_factory=dict)


LocalTrainer = Callable[[LocalJob], Trained]
LOCAL_TRAINERS: Registry[LocalTrainer] = Registry("privacy mode")


@LOCAL_TRAINERS.register("none")
def plain(job: LocalJob) -> Trained:
    return Trained(train_local(job.model, job.data, job.cfg.train, job.seed, job.hooks, job.objective))


LOCAL_TRAINERS.add("dp_fedavg", plain)  # site-level DP clips and adds noise at the server


@LOCAL_TRAINERS.register("dp_sgd")
def dp_sgd(job: LocalJob) -> Trained:
    """DP-SGD; its report (the site's cumulative epsilon, whether its budget stopped it) goes with
    every reply, also when the budget stops the site."""
    if job.objective is not None:  # the strategy's settings refuse dp_sgd first; this guards the trainer
        raise PrivacyConfigError(
            f"strategy={job.cfg.strategy.name} changes the training objective, which DP-SGD's per-sample "
            "clipping does not support"
        )
    result, report = train_private(job.model, job.data, job.cfg, job.seed, job.context, job.server_round, job.hooks)
    return Trained(result, {PRIVACY_RECORD: ConfigRecord(report)})
