"""Local training and evaluation of the global model on one site's data.

Each step takes a batch of one task (tasks interleaved in a seeded random order), so a site
with several tasks trains its shared encoders and fusion on all of them every epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from clients.site_data import SiteData
from federated.core.compute import autocast, grad_scaler, model_device
from federated.core.config.schema import TrainConfig
from federated.core.metrics import task_metrics, unit_score
from federated.core.models import MultiMedModel
from federated.core.multimed import (
    BINARY,
    CLOSED_SET,
    IGNORE_LABEL,
    MULTICLASS,
    MULTILABEL,
    PER_RESIDUE,
    REGRESSION,
    Task,
)
from strategies.client_side import GradientHook, Objective


def task_loss(task: Task, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    kind = task.target
    if kind in (MULTICLASS, CLOSED_SET):
        return F.cross_entropy(output, target)
    if kind == BINARY:
        return F.binary_cross_entropy_with_logits(output, target.float())
    if kind == MULTILABEL:
        return F.binary_cross_entropy_with_logits(output, target.float())
    if kind == REGRESSION:
        return F.mse_loss(output, target)
    if kind == PER_RESIDUE:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1), ignore_index=IGNORE_LABEL)
    raise ValueError(f"no loss for target type {kind!r}")


@dataclass(frozen=True)
class TrainResult:
    num_examples: int
    steps: int
    mean_loss: float
    # Examples behind each trained parameter group (what a modality-aware strategy weights by).
    group_examples: dict[str, int]


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train_local(
    model: MultiMedModel,
    data: SiteData,
    cfg: TrainConfig,
    seed: int,
    hooks: tuple[GradientHook, ...] = (),
    objective: Objective | None = None,
) -> TrainResult:
    """One round of local steps on the model's device, in cfg.precision. Losses stay on the
    device until the round ends (a per-step .item() would make the host wait for every step)."""
    torch.manual_seed(seed)  # dropout and any other torch randomness (every device's generator)
    gen = torch.Generator().manual_seed(seed)  # batch order: on the host, the same on every device
    device = model_device(model)
    model.train_only(data.plan.modalities, data.plan.tasks)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    scaler = grad_scaler(device, cfg.precision)
    model.train()
    batches: list[tuple[str, torch.Tensor]] = []
    for _ in range(cfg.local_epochs):
        for task in data.plan.tasks:
            split = data.split(task, "train")
            if split is None:
                continue
            perm = torch.randperm(len(split), generator=gen)
            batches += [(task, idx) for idx in perm.split(cfg.batch_size)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    if cfg.max_steps_per_round:
        order = order[: cfg.max_steps_per_round]
    losses: list[torch.Tensor] = []
    steps = 0
    for i in order:
        task, idx = batches[i]
        batch = data.split(task, "train").take(idx).to(device)  # type: ignore[union-attr]  # from existing splits
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, cfg.precision):
            loss = task_loss(data.schema.task(task), model(task, batch.inputs, batch.present), batch.targets)
            if objective is not None:
                loss = objective(task, loss, batch.targets)
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # the hooks add unscaled terms to the gradients
        for hook in hooks:
            hook.after_backward(model)
        steps += scaled_step(scaler, optimizer)
        losses.append(loss.detach())
    return TrainResult(
        num_examples=data.n("train"),
        steps=steps,
        mean_loss=float(torch.stack(losses).cpu().double().mean()) if losses else math.nan,
        group_examples=group_examples(data),
    )


@torch.no_grad()
def mean_train_loss(model: MultiMedModel, data: SiteData, precision: str = "fp32", batch_size: int = 256) -> float:
    """The model's loss on the site's training data, averaged over samples (all tasks)."""
    model.eval()
    device = model_device(model)
    total, n = torch.zeros((), dtype=torch.float32, device=device), 0
    for task in data.plan.tasks:
        part = data.split(task, "train")
        if part is None:
            continue
        for idx in torch.arange(len(part)).split(batch_size):
            b = part.take(idx).to(device)
            with autocast(device, precision):
                loss = task_loss(data.schema.task(task), model(task, b.inputs, b.present), b.targets)
            total += loss.float() * len(idx)
            n += len(idx)
    return float(total) / n if n else math.nan  # one host read, as in train_local


def scaled_step(scaler: torch.amp.GradScaler | None, optimizer: torch.optim.Optimizer) -> int:
    """Take the optimiser step; 1 if it was taken. fp16's scaler skips a step whose gradients
    overflowed (and then lowers its scale), so such a step is not counted (SCAFFOLD divides by it)."""
    if scaler is None:
        optimizer.step()
        return 1
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return int(scaler.get_scale() >= before)


def group_examples(data: SiteData) -> dict[str, int]:
    """Training examples per parameter group: a task's examples count for its head, for the
    encoder of each modality they actually carry, and for the fusion block."""
    counts: dict[str, int] = {}
    for task in data.plan.tasks:
        split = data.split(task, "train")
        if split is None:
            continue
        for group, n in [(f"head/{task}", len(split)), ("fusion", len(split))] + [
            (f"encoder/{m}", int(p.sum())) for m, p in split.present.items()
        ]:
            if n:
                counts[group] = counts.get(group, 0) + n
    return dict(sorted(counts.items()))


class NonFiniteOutputError(ValueError):
    """The model's outputs hold NaN or infinity: any score computed from them would be made up."""


def check_finite_outputs(site: str, task: str, out: np.ndarray) -> None:
    """Refuse to score a diverged model: the site's evaluation fails (the server records it as the
    site's error for the round) instead of reporting a plausible score of clipped outputs."""
    bad = int(out.size - np.count_nonzero(np.isfinite(out)))
    if bad:
        raise NonFiniteOutputError(
            f"site {site}, task {task}: {bad} of {out.size} model outputs are not finite (NaN or infinite); "
            "the global model diverged, so no score is reported"
        )


@torch.no_grad()
def evaluate_site(
    model: MultiMedModel, data: SiteData, split: str = "test", batch_size: int = 256, precision: str = "fp32"
) -> dict[str, dict[str, float]]:
    """Per task: every metric of the task, its [0, 1] score, and the sample count; the model runs
    on its device, in the precision it trains in."""
    model.eval()
    device = model_device(model)
    results: dict[str, dict[str, float]] = {}
    for task in data.plan.tasks:
        part = data.split(task, split)
        if part is None:
            continue
        outputs = []
        for idx in torch.arange(len(part)).split(batch_size):
            b = part.take(idx).to(device)
            with autocast(device, precision):
                outputs.append(model(task, b.inputs, b.present).float())
        out = torch.cat(outputs).cpu().numpy()
        check_finite_outputs(data.plan.site, task, out)
        target = part.targets.numpy()
        scale = data.scales[task]
        spec = data.schema.task(task)
        if spec.target == REGRESSION:
            out = out * scale.std + scale.mean
            target = target * scale.std + scale.mean
        metrics = task_metrics(spec, out, target)
        metrics["score"] = unit_score(spec, metrics, scale.mad)
        metrics["n"] = float(len(part))
        results[task] = metrics
    return results
