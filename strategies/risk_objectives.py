"""Objectives that reweight risks: V-REx across sites (`fedrex`) and GroupDRO across a site's tasks
(`groupdro`). Both change each site's training loss by a scalar weight and aggregate as
modality_fedavg does (each parameter group averaged over the sites that trained it).

fedrex -- V-REx (Krueger et al., "Out-of-Distribution Generalization via Risk Extrapolation",
ICML 2021, Sec. 3, the variance penalty V-REx), with the sites as the training domains:

    minimise  J(w) = mean_k R_k(w) + beta * Var_k(R_k(w)),   Var = (1/n) sum_k (R_k - R̄)^2

over the n sites k, R̄ = mean_k R_k. Since sum_j (R_j - R̄) = 0, dR̄/dR_k contributes nothing to
dVar/dR_k, so

    dJ/dR_k = 1/n + 2 beta (R_k - R̄) / n = (1 + 2 beta (R_k - R̄)) / n
    grad_w J = sum_k (1/n) (1 + 2 beta (R_k - R̄)) grad_w R_k.

Each site therefore minimises its own risk times the constant weight a_k = 1 + 2 beta (R_k - R̄)
(held fixed during the round: it multiplies the gradient, it is not differentiated), and the
server's average supplies the 1/n. What crosses the wire: each site sends R_k, the mean training
loss of the global model it received (SiteRound.training_loss, computed before it trains), in its
reply (record `rex-risk`); the server keeps R̄, the unweighted mean of the accepted sites' R_k of
the round just aggregated (`mean_risk`, saved in checkpoints), and sends it and beta in the next
round's training config. `strategy.beta` = 0 is modality_fedavg.

Departures, and why. (1) R̄ lags one round: it is the previous global model's mean risk, while R_k
is the current model's (the exact R̄ of the current model would cost another round trip before
training); round 1 has no R̄ and trains with a_k = 1. (2) a_k is clipped at 0: V-REx's weights may
go negative (that is the "extrapolation"), but in one joint gradient step; here a negative weight
would make a site ascend its own risk for a whole round of local steps, without bound. (3) R̄ is
the plain mean of the sites' reports; a site that lies about its risk moves every site's weight
(sent risks must be finite and >= 0; no more can be checked).

Parameter groups: a site's weight scales its whole loss, so every group it trains; the variance
is over all sites that trained this round, whatever groups they hold, and a group trained by only
some sites is the (examples-weighted) mean of those sites' reweighted updates. A site's risk is its
mean loss over its own tasks, so sites holding different tasks compare losses of different tasks.

groupdro -- online GroupDRO (Sagawa, Koh, Hashimoto, Liang, "Distributionally Robust Neural
Networks for Group Shifts", ICLR 2020, Algorithm 1) over a site's tasks as the groups. The site
keeps weights q_t; each local step on a batch of task t

    q_t <- q_t * exp(eta * loss_t);  q <- q / sum_s q_s;  minimise (n_tasks * q_t) * loss_t

so uniform q is plain training (`strategy.dro_eta` = eta; eta = 0 is modality_fedavg). q is kept
as log-weights L_t = eta * (sum of task t's batch losses so far), q = softmax(L), which is the
same update without underflow, in the site's Context across rounds (saved with the site's state);
the server only sends eta. Departure: the site side does not know its task list before training,
so a task enters q when its first batch does (with L_t = 0, its value in Algorithm 1 until then)
and q and n_tasks run over the tasks seen so far; once every task has had a batch, normally within
the first steps of the first round, this is Algorithm 1 exactly. The factor n_tasks keeps the
loss scale of plain training (Algorithm 1 samples the group, so its step is q_g grad loss_g).

Parameter groups: q is per site and over that site's tasks only (no DRO across sites). A task
head head/<t> receives only task t's gradients, scaled by n_tasks * q_t; the encoders and fusion
get the q-weighted mixture. A site with one task always has weight 1 and trains plainly. Groups
are aggregated over the sites that trained them, as modality_fedavg does.

Both refuse privacy=dp_sgd: DP-SGD clips per-sample gradients of a loss it computes itself, which
a reweighted objective is not.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message

from federated.core.config.schema import ExperimentConfig, StrategyConfig, StrategySettings
from federated.core.protocol import CONFIG_RECORD, record_number
from strategies.base import Arrays, MultiMedStrategy, Update
from strategies.client_side import ClientAlgorithm, ClientRound, Record, SiteRound
from strategies.registry import register_strategy
from strategies.secure_sums import SecureSupport

log = logging.getLogger(__name__)

# Protocol keys of these strategies (server config keys, a reply record and its key, site state).
REX_BETA = "rex-beta"
REX_MEAN_RISK = "rex-mean-risk"  # absent before the first aggregated round
RISK_RECORD = "rex-risk"  # the site's reply: a ConfigRecord {RISK: R_k}
RISK = "risk"
DRO_ETA = "dro-eta"
DRO_STATE = "groupdro-weights"  # the site's Context: ConfigRecord {DRO_TASKS: [...], DRO_LOG_WEIGHTS: [...]}
DRO_TASKS = "tasks"
DRO_LOG_WEIGHTS = "log-weights"


def _refuse_dp_sgd(name: str, cfg: ExperimentConfig) -> list[tuple[str, bool, str]]:
    return [
        (
            "privacy.name",
            cfg.privacy.name != "dp_sgd",
            f"cannot be dp_sgd with strategy={name}: it reweights each site's training loss, and DP-SGD "
            "clips the per-sample gradients of a loss it computes itself",
        )
    ]


# --- maths -----------------------------------------------------------------------------------


def vrex_objective(risks: Sequence[float], beta: float) -> float:
    """V-REx's objective over domains: mean_k R_k + beta * Var_k(R_k) (population variance)."""
    r = np.asarray(risks, dtype=np.float64)
    if r.size == 0:
        raise ValueError("vrex_objective needs at least one risk")
    return float(r.mean() + beta * r.var())


def rex_risk_weight(risk: float, mean_risk: float, beta: float) -> float:
    """max(0, 1 + 2 beta (R_k - R̄)): n times dJ/dR_k of vrex_objective, clipped at 0 (a site's loss
    weight; the server's mean over the n sites supplies the 1/n)."""
    if not (math.isfinite(risk) and math.isfinite(mean_risk) and math.isfinite(beta)):
        raise ValueError(f"risk, mean risk and beta must be finite, got {risk}, {mean_risk}, {beta}")
    return max(0.0, 1.0 + 2.0 * beta * (risk - mean_risk))


def groupdro_step(
    log_weights: torch.Tensor, task: int, loss: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One online GroupDRO update over n tasks, in log space.

    Returns (L', n * q'_task) with L' = L + eta * loss at `task` and q' = softmax(L'), i.e.
    q_task <- q_task * exp(eta * loss) renormalised; the second value is the step's loss weight
    (1 for uniform q). `loss` is a scalar tensor, read without its gradient; nothing is in place.
    """
    step = torch.zeros_like(log_weights)
    step[task] = eta * loss.detach().to(log_weights.dtype)
    new = log_weights + step
    return new, len(new) * torch.softmax(new, dim=0)[task]


# --- fedrex ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FedRexSettings(StrategySettings):
    beta: float = 1.0  # weight of the variance of the sites' risks; 0 = modality_fedavg

    def __post_init__(self) -> None:
        self.require("beta", math.isfinite(self.beta) and self.beta >= 0.0, "must be finite and >= 0")

    def experiment_checks(self, cfg: ExperimentConfig) -> list[tuple[str, bool, str]]:
        # Measured: under Adam a 2-round smoke run scored exactly as modality_fedavg.
        adam = (
            "train.optimizer",
            cfg.train.optimizer == "sgd",
            "must be sgd with strategy=fedrex: it scales each site's loss by a constant for the round, "
            "and Adam divides every step by the gradients' running scale, so the weight would change nothing",
        )
        return [*_refuse_dp_sgd("fedrex", cfg), adam]


class RiskWeightedRound(ClientRound):
    """Every step's loss times the site's V-REx weight; the site's risk goes back with its model."""

    def __init__(self, risk: float, weight: float) -> None:
        super().__init__(changes_objective=True)
        self.risk, self.weight = risk, weight

    def objective(self, task: str, loss: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss * self.weight

    def after_train(self, steps: int) -> dict[str, Record]:
        return {RISK_RECORD: ConfigRecord({RISK: self.risk})}


class FedRexClient(ClientAlgorithm):
    """The site side: R_k of the received model, then a_k = max(0, 1 + 2 beta (R_k - R̄)) with the
    beta and R̄ the server sent (a_k = 1 while the server has no R̄ yet)."""

    def before_train(self, site: SiteRound) -> ClientRound:
        config = site.content.config_records[CONFIG_RECORD]
        if REX_BETA not in config:
            raise ValueError(f"strategy=fedrex: the training config has no '{REX_BETA}' (the server's beta)")
        beta = record_number(config, REX_BETA)
        risk = float(site.training_loss())
        weight = 1.0
        if REX_MEAN_RISK in config and math.isfinite(risk):  # a non-finite risk is refused by the server
            weight = rex_risk_weight(risk, record_number(config, REX_MEAN_RISK), beta)
        return RiskWeightedRound(risk, weight)


@register_strategy("fedrex", FedRexSettings, client=FedRexClient)
class FedRex(MultiMedStrategy):
    SECURE = SecureSupport.refused("reads each site's risk beside its update, which would travel unmasked")
    STATE = ("mean_risk",)

    def __init__(self, cfg: StrategyConfig, n_train_sites: int) -> None:
        super().__init__(cfg, n_train_sites)
        self.settings = cfg.settings_as(FedRexSettings)
        self.mean_risk: float | None = None  # R̄ of the last aggregated round

    def train_config(self, server_round: int) -> dict[str, float | int | str]:
        config: dict[str, float | int | str] = {REX_BETA: float(self.settings.beta)}
        if self.mean_risk is not None:
            config[REX_MEAN_RISK] = self.mean_risk
        return config

    def parse(self, msg: Message, current: Arrays) -> Update | str:
        parsed = super().parse(msg, current)
        if isinstance(parsed, str):
            return parsed
        record = msg.content.config_records.get(RISK_RECORD)
        value = None if record is None else record.get(RISK)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"no '{RISK}' number in a '{RISK_RECORD}' record (fedrex sites must send their risk)"
        if not (math.isfinite(value) and value >= 0.0):
            return f"risk {value} is not finite and >= 0"
        return parsed

    def aggregate_updates(self, current: Arrays, updates: list[Update]) -> Arrays:
        risks = [float(u.message.content.config_records[RISK_RECORD][RISK]) for u in updates]  # type: ignore[arg-type]  # checked in parse
        self.mean_risk = float(np.mean(risks))
        log.info(
            "round %d: sites' risks mean %.4g, variance %.4g (V-REx objective %.4g)",
            self.round,
            self.mean_risk,
            float(np.var(risks)),
            vrex_objective(risks, self.settings.beta),
        )
        return super().aggregate_updates(current, updates)


# --- groupdro --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupDROSettings(StrategySettings):
    dro_eta: float = 0.01  # step size of the task weights; 0 = modality_fedavg

    def __post_init__(self) -> None:
        self.require("dro_eta", math.isfinite(self.dro_eta) and self.dro_eta >= 0.0, "must be finite and >= 0")

    def experiment_checks(self, cfg: ExperimentConfig) -> list[tuple[str, bool, str]]:
        return _refuse_dp_sgd("groupdro", cfg)


class GroupDRORound(ClientRound):
    """Each step: the batch's task weight up by exp(eta * loss), the loss times n_tasks * q_task."""

    def __init__(self, context: Context, eta: float) -> None:
        super().__init__(changes_objective=True)
        self.context, self.eta = context, eta
        record = context.state.config_records.get(DRO_STATE)
        tasks = [] if record is None else record[DRO_TASKS]
        saved = [] if record is None else record[DRO_LOG_WEIGHTS]
        if not isinstance(tasks, list) or not isinstance(saved, list) or len(tasks) != len(saved):
            raise ValueError(f"site state '{DRO_STATE}': malformed (needs equal lists of tasks and log-weights)")
        self.tasks = [str(t) for t in tasks]
        self.saved = [float(x) for x in saved]
        self.log_weights: torch.Tensor | None = None  # on the loss's device, from the first step

    def objective(self, task: str, loss: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.log_weights is None:
            dtype = torch.float32 if loss.device.type == "mps" else torch.float64  # mps has no float64
            self.log_weights = torch.tensor(self.saved, dtype=dtype, device=loss.device)
        if task not in self.tasks:  # a task's first batch: it enters with L = 0, as if uniform from the start
            self.tasks.append(task)
            self.log_weights = torch.cat([self.log_weights, self.log_weights.new_zeros(1)])
        self.log_weights, weight = groupdro_step(self.log_weights, self.tasks.index(task), loss, self.eta)
        return loss * weight.to(loss.dtype)

    def after_train(self, steps: int) -> dict[str, Record]:
        values = self.saved if self.log_weights is None else [float(x) for x in self.log_weights.cpu()]
        if all(math.isfinite(x) for x in values):
            self.context.state[DRO_STATE] = ConfigRecord({DRO_TASKS: list(self.tasks), DRO_LOG_WEIGHTS: values})
        else:  # a non-finite loss: its update is refused by the server; keep the last good weights
            log.warning("groupdro: non-finite task weights after this round; the site keeps its previous ones")
        return {}


class GroupDROClient(ClientAlgorithm):
    def before_train(self, site: SiteRound) -> ClientRound:
        config = site.content.config_records[CONFIG_RECORD]
        if DRO_ETA not in config:
            raise ValueError(f"strategy=groupdro: the training config has no '{DRO_ETA}' (the server's eta)")
        return GroupDRORound(site.context, record_number(config, DRO_ETA))


@register_strategy("groupdro", GroupDROSettings, client=GroupDROClient)
class GroupDRO(MultiMedStrategy):
    """The server side is modality_fedavg's, and sends eta."""

    # Its server side is modality_fedavg's, but no secure run of it has been tested yet.
    SECURE = SecureSupport.refused("has not been tested on masked sums yet (its server side is modality_fedavg's)")

    def train_config(self, server_round: int) -> dict[str, float | int | str]:
        return {DRO_ETA: float(self.cfg.settings_as(GroupDROSettings).dro_eta)}
