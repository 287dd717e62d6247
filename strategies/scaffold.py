"""SCAFFOLD (Karimireddy et al. 2020): control variates correct each site's client drift.

Server: it sends its control variate c with the model; sites return their model y_i and the
change of their own control variate. Per parameter group, over the |S| sites that trained it
(N = all training sites), `aggregation.scaffold_server_step` moves
x <- x + global_lr * mean_i(y_i - x) and c <- c + (|S| / N) * mean_i(delta c_i); c is kept
across rounds (saved in checkpoints).

Site (option II): c_site lives in the site's Flower Context across rounds. Each step corrects
the gradient by (c_server - c_site); after K local SGD steps at learning rate lr the site sets
c_site+ = c_site - c_server + (x - y) / (K * lr) on the parameters it trained, and sends the
change c_site+ - c_site back with its model. The control variates assume plain SGD steps, so
the strategy needs train.optimizer=sgd and train.momentum=0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid

from federated.core.arrays import pack_arrays, record_to_numpy, record_to_torch
from federated.core.compute import model_device
from federated.core.config.schema import ExperimentConfig, StrategyConfig, StrategySettings
from federated.core.models import MultiMedModel, group_of
from strategies.aggregation import scaffold_server_step
from strategies.base import Arrays, MultiMedStrategy, Update
from strategies.client_side import ClientAlgorithm, ClientRound, Record, SiteRound
from strategies.registry import register_strategy
from strategies.secure_sums import SecureSupport
from strategies.validation import validate_update

CONTROL_RECORD = "control"  # train message record (server -> site): the server's control variate
CONTROL_DELTA_RECORD = "control-delta"  # train reply record (site -> server): the change of its control variate
CONTROL_STATE = "scaffold-control"  # the site's control variate, in its Context.state


@dataclass(frozen=True)
class ScaffoldSettings(StrategySettings):
    global_lr: float = 1.0  # server step size on the mean model change

    def __post_init__(self) -> None:
        self.require("global_lr", math.isfinite(self.global_lr) and self.global_lr > 0.0, "must be finite and > 0")

    def experiment_checks(self, cfg: ExperimentConfig) -> list[tuple[str, bool, str]]:
        return [
            (
                "train.optimizer",
                cfg.train.optimizer == "sgd",
                "must be sgd with strategy=scaffold (its control variates assume SGD steps)",
            ),
            # Measured: SCAFFOLD with momentum 0.9 diverged to NaN by round 7-11 on every seed.
            (
                "train.momentum",
                cfg.train.momentum == 0.0,
                "must be 0 with strategy=scaffold (its control variates assume plain SGD steps)",
            ),
        ]


# --- site side -----------------------------------------------------------------------------


class ControlVariateCorrection:
    """g <- g - c_site + c_server on every trained parameter."""

    def __init__(self, correction: Mapping[str, torch.Tensor]) -> None:
        self.correction = correction  # c_server - c_site, per parameter name

    def after_backward(self, model: MultiMedModel) -> None:
        for name, p in model.named_parameters():
            if p.requires_grad and p.grad is not None:
                p.grad.add_(self.correction[name])


class SiteControl:
    """A site's control variate c_site, kept in its Context, against the server's c."""

    def __init__(
        self, context: Context, server_control: dict[str, torch.Tensor], device: torch.device | None = None
    ) -> None:
        """Both variates on the model's device (`device`; None keeps them where they are)."""
        self.context = context
        self.server = {k: v.to(device) for k, v in server_control.items()} if device else server_control
        record = context.state.array_records.get(CONTROL_STATE)
        self.site = (
            {k: v.to(device) if device else v for k, v in record.to_torch_state_dict().items()}
            if record is not None
            else {k: torch.zeros_like(v) for k, v in self.server.items()}
        )

    def correction(self) -> ControlVariateCorrection:
        return ControlVariateCorrection({k: self.server[k] - self.site[k] for k in self.server})

    def update(
        self, model: MultiMedModel, start: Mapping[str, torch.Tensor], steps: int, lr: float
    ) -> dict[str, torch.Tensor]:
        """Store the new c_site; return its change (zero for parameters the site did not train)."""
        delta = {k: torch.zeros_like(v) for k, v in self.site.items()}
        if steps > 0:
            for name, p in model.named_parameters():
                if p.requires_grad:
                    new = self.site[name] - self.server[name] + (start[name] - p.detach()) / (steps * lr)
                    delta[name] = new - self.site[name]
                    self.site[name] = new
        self.context.state[CONTROL_STATE] = ArrayRecord({k: v.clone() for k, v in self.site.items()})
        return delta


class ScaffoldRound(ClientRound):
    def __init__(self, site: SiteRound, control: SiteControl) -> None:
        super().__init__(hooks=(control.correction(),))
        self.site, self.control = site, control

    def after_train(self, steps: int) -> dict[str, Record]:
        site = self.site
        delta = self.control.update(site.model, site.start, steps, site.train.lr)
        return {CONTROL_DELTA_RECORD: pack_arrays(delta)}


class ScaffoldClient(ClientAlgorithm):
    def before_train(self, site: SiteRound) -> ClientRound:
        record = site.content.array_records.get(CONTROL_RECORD)
        if record is None:
            raise ValueError(
                f"strategy=scaffold: the training message has no '{CONTROL_RECORD}' record "
                "(the server's control variate)"
            )
        return ScaffoldRound(site, SiteControl(site.context, record_to_torch(record), model_device(site.model)))


# --- server side ---------------------------------------------------------------------------


@register_strategy("scaffold", ScaffoldSettings, client=ScaffoldClient)
class Scaffold(MultiMedStrategy):
    SECURE = SecureSupport.refused("sends control-variate differences beside the update, which would travel unmasked")
    STATE = ("control",)

    def __init__(self, cfg: StrategyConfig, n_train_sites: int) -> None:
        super().__init__(cfg, n_train_sites)
        self.settings = cfg.settings_as(ScaffoldSettings)
        self.n_sites = n_train_sites
        self.control: Arrays | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.control is None:
            self.control = {k: np.zeros_like(a) for k, a in record_to_numpy(arrays).items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        record = pack_arrays(self.control)
        for m in messages:
            m.content[CONTROL_RECORD] = record
        return messages

    def parse(self, msg: Message, current: Arrays) -> Update | str:
        parsed = super().parse(msg, current)
        if isinstance(parsed, str):
            return parsed
        record = msg.content.array_records.get(CONTROL_DELTA_RECORD)
        if record is None:
            return f"no '{CONTROL_DELTA_RECORD}' record (SCAFFOLD sites must send their control change)"
        reason = validate_update(record_to_numpy(record), current, parsed.num_examples, None)
        return f"control change: {reason}" if reason else parsed

    def aggregate_updates(self, current: Arrays, updates: list[Update]) -> Arrays:
        """scaffold_server_step per parameter group, over the sites that trained the group."""
        assert self.control is not None
        control = self.control
        deltas = [record_to_numpy(u.message.content.array_records[CONTROL_DELTA_RECORD]) for u in updates]
        new_x: Arrays = {}
        new_c: Arrays = {}
        for group, keys in _keys_by_group(current).items():
            trainers = [i for i, u in enumerate(updates) if u.group_examples.get(group, 0) > 0]
            models = [updates[i].arrays for i in trainers]
            x, c = self._group_step(
                _subset(current, keys), _subset(control, keys), models, [deltas[i] for i in trainers]
            )
            new_x.update(x)
            new_c.update(c)
        self.control = new_c
        return new_x

    def _group_step(
        self, current: Arrays, control: Arrays, models: list[Arrays], deltas: list[Arrays]
    ) -> tuple[Arrays, Arrays]:
        """One group's new model and control (`current`, `control`: that group's arrays) from the
        sites that trained it. A group nobody trained keeps both: a mean over no site is
        undefined, and a site that did not train a group sent back an untouched copy."""
        if not models:
            return current, control
        return scaffold_server_step(
            current,
            [_subset(y, current) for y in models],
            control,
            [_subset(dc, current) for dc in deltas],
            n_total_clients=self.n_sites,
            global_lr=self.settings.global_lr,
        )


def _keys_by_group(arrays: Arrays) -> dict[str, list[str]]:
    """Parameter names per group, in model order: SCAFFOLD steps each group over its own trainers."""
    by_group: dict[str, list[str]] = {}
    for key in arrays:
        by_group.setdefault(group_of(key), []).append(key)
    return by_group


def _subset(arrays: Arrays, keys: Iterable[str]) -> Arrays:
    """The arrays of one parameter group."""
    return {k: arrays[k] for k in keys}
