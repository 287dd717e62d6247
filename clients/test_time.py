"""Test-time adaptation at a held-out site: the global model adapted to the site's own inputs,
without a label (`ood.adapt`).

tent      TENT (Wang et al., ICLR 2021): minimise the entropy of the model's predictions on the
          site's unlabelled inputs, updating only the affine parameters (scale, shift) of the
          normalisation layers (LayerNorm, GroupNorm, BatchNorm); BatchNorm layers use the
          batch's statistics, as in the paper. Everything else stays frozen.
bn_stats  re-estimate BatchNorm's running mean and variance on the site's inputs (no gradient
          step). Only BatchNorm keeps statistics to re-estimate: LayerNorm and GroupNorm
          normalise each sample with its own, so a model without BatchNorm is refused.

What each method may change, and the refusal of a model with nothing to adapt, are in
federated/core/models/adaptable.py, which the server's preflight reads too.

The adapted model is a copy: the global model the site evaluates unadapted stays as it came.
Entropy is defined for what a model classifies (multiclass, closed-set, binary, multilabel,
per-residue); regression outputs have none, so a regression task is not adapted on (its
score is that of the adapted shared layers, which its head reads).

Written here because no well-kept library offers TENT for an arbitrary multi-task model; the
algorithm follows the paper's reference implementation (configure_model/collect_params/forward
and adapt), with the number of steps and the learning rate as settings.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from clients.site_data import SiteData, TaskSplit
from federated.core.compute import model_device
from federated.core.config.schema import OODConfig
from federated.core.corpus_schema import Task
from federated.core.models import MultiMedModel
from federated.core.models.adaptable import batch_norms, check_adaptable, norm_affine_parameters
from federated.core.targets import BINARY, CLOSED_SET, MULTICLASS, MULTILABEL, PER_RESIDUE

Batch = TypeVar("Batch")


def prediction_entropy(task: Task, output: torch.Tensor) -> torch.Tensor | None:
    """Mean entropy of the predictions on a batch, in nats; None for a regression output."""
    kind = task.target
    if kind in (MULTICLASS, CLOSED_SET):
        return softmax_entropy(output)
    if kind in (BINARY, MULTILABEL):
        p = torch.sigmoid(output.float())
        h = -(p * F.logsigmoid(output.float()) + (1 - p) * F.logsigmoid(-output.float()))
        return h.reshape(len(h), -1).sum(1).mean()  # multilabel: the labels' entropies add up
    if kind == PER_RESIDUE:
        return softmax_entropy(output.reshape(-1, output.shape[-1]))
    return None


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def tent(
    model: nn.Module,
    batches: Sequence[Batch],
    entropy: Callable[[nn.Module, Batch], torch.Tensor | None],
    steps: int,
    lr: float,
) -> nn.Module:
    """A copy of the model after `steps` Adam steps (the paper's optimiser) on the mean
    prediction entropy, cycling through `batches`; only normalisation affine parameters move."""
    adapted = copy.deepcopy(model)
    adapted.eval()  # dropout off: the predictions whose entropy is minimised are the ones scored
    for p in adapted.parameters():
        p.requires_grad_(False)
    params = [p for _, p in norm_affine_parameters(adapted)]
    for p in params:
        p.requires_grad_(True)
    for bn in batch_norms(adapted):  # the paper: BatchNorm normalises with the test batch's statistics
        bn.train()
        bn.track_running_stats = False
        bn.running_mean = bn.running_var = None
    optimizer = torch.optim.Adam(params, lr=lr)
    usable = list(batches)
    for i in range(steps if usable else 0):
        loss = entropy(adapted, usable[i % len(usable)])
        if loss is None:
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for p in adapted.parameters():
        p.requires_grad_(False)
    return adapted


@torch.no_grad()
def bn_stats(model: nn.Module, batches: Sequence[Batch], forward: Callable[[nn.Module, Batch], object]) -> nn.Module:
    """A copy of the model whose BatchNorm running statistics are those of `batches` (a
    cumulative average over them, not a moving one)."""
    adapted = copy.deepcopy(model)
    adapted.eval()
    for bn in batch_norms(adapted):
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
        bn.train()
    for batch in batches:
        forward(adapted, batch)
    adapted.eval()
    return adapted


def adapt_site_model(model: MultiMedModel, data: SiteData, cfg: OODConfig, seed: int) -> MultiMedModel:
    """The global model adapted to this site's test inputs (their labels unread), by cfg.adapt.
    Batches of cfg.adapt_batch_size, one task each, in a seeded random order."""
    check_adaptable(model, cfg.adapt)
    device = model_device(model)
    gen = torch.Generator().manual_seed(seed)
    batches: list[tuple[str, TaskSplit]] = []
    for task in data.plan.tasks:
        part = data.split(task, "test")
        if part is not None:
            batches += [
                (task, part.take(idx)) for idx in torch.randperm(len(part), generator=gen).split(cfg.adapt_batch_size)
            ]
    order = torch.randperm(len(batches), generator=gen).tolist()
    batches = [(batches[i][0], batches[i][1].to(device)) for i in order]
    schema = data.schema

    def forward(m: nn.Module, batch: tuple[str, TaskSplit]) -> torch.Tensor:
        task, b = batch
        return m(task, b.inputs, b.present)

    if cfg.adapt == "tent":
        adapted = tent(
            model,
            batches,
            lambda m, b: prediction_entropy(schema.task(b[0]), forward(m, b)),
            cfg.adapt_steps,
            cfg.adapt_lr,
        )
    elif cfg.adapt == "bn_stats":
        adapted = bn_stats(model, batches, forward)
    else:
        raise ValueError(f"ood.adapt={cfg.adapt!r} adapts nothing")
    assert isinstance(adapted, MultiMedModel)
    return adapted
