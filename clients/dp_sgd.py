"""Sample-level DP-SGD at a site (Opacus), with an accountant that lives as long as the site.

The usual recipe (Flower's Opacus example) builds a new PrivacyEngine every round, so the
epsilon it reports is one round's. Here each site keeps one Opacus accountant per task in its
Flower Context across rounds (and in checkpoints): the epsilon it reports is cumulative.

Records are samples; each sample belongs to one task, and a task's steps touch only its own
samples, so the site's epsilon is the largest of its tasks' (parallel composition). Batches are
Poisson samples with rate q_t = batch_size / N_t, as the RDP analysis assumes (a fixed-size
shuffled batch would not match it); an empty draw still takes a noise-only step.

Noise: with `privacy.target_epsilon` the noise multiplier of each task is calibrated once, for
the planned rounds (Opacus' get_noise_multiplier); with `privacy.noise_multiplier` it is fixed.
Before each round the site checks that the round's steps keep every task within the budget
(`target_epsilon`); if not, it stops training for good, keeps evaluating, and says so.

Per-sample gradients: Opacus, mode `privacy.grad_sample_mode`. "ew" (PyTorch's ExpandedWeights)
by default: every mode is exact for this model (tests/clients/test_dp_sgd.py compares each with
one-sample batches) and ew was the fastest, 1.96x a non-private step against 2.32x for hooks
and 3.46x for functorch (experiments/bench/dp_step.py): hooks mode also computes the ordinary
batch gradient that DP-SGD then throws away.
Parameter groups a batch's task does not use are switched off for that step, because Opacus
refuses trainable parameters without per-sample gradients.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord, Context, RecordDict
from opacus import GradSampleModule
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleModuleExpandedWeights
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator

from clients.site_data import SiteData, TaskSplit
from clients.trainer import TrainResult, group_examples, make_optimizer, task_loss
from federated.core.compute import autocast, model_device
from federated.core.config.schema import ExperimentConfig, PrivacyConfig
from federated.core.corpus_schema import Task
from federated.core.models import MultiMedModel, group_of
from federated.core.targets import IGNORE_LABEL, PER_RESIDUE
from strategies.client_side import GradientHook

STATE_KEY = "dp-sgd-accountants"
EPS_TOLERANCE = 1e-6  # float slack when comparing a spent epsilon with the budget


class PrivacyConfigError(ValueError):
    """A model or setting DP-SGD cannot work with; the message says what to change."""


def per_sample_loss(task: Task, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The batch mean of per-sample losses. The per-residue task averages over each sample's
    own residues first: a batch-wide average would scale each sample's gradient by the other
    samples' lengths and break the clipping bound."""
    if task.target == PER_RESIDUE:
        tok = F.cross_entropy(output.transpose(1, 2), target, ignore_index=IGNORE_LABEL, reduction="none")
        return (tok.sum(1) / (target != IGNORE_LABEL).sum(1).clamp(min=1)).mean()
    return task_loss(task, output, target)


def check_model(model: torch.nn.Module) -> None:
    """Refuse what per-sample gradients cannot handle (BatchNorm mixes samples in a batch)."""
    model.train()  # the validator also refuses a model in eval mode
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise PrivacyConfigError(
            "the model cannot be trained with DP-SGD: "
            + "; ".join(str(e) for e in errors)
            + " (use GroupNorm or LayerNorm instead of BatchNorm)"
        )


@dataclass
class TaskPlan:
    """One task's share of a round: its sampling rate, steps and noise."""

    n: int
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float = 0.0


@dataclass
class PrivacyLedger:
    """The site's accountants (one per task) and whether its budget stopped it."""

    history: dict[str, list] = field(default_factory=dict)  # task -> Opacus accountant history
    noise: dict[str, float] = field(default_factory=dict)  # task -> calibrated sigma
    stopped_round: int = 0  # the round the budget stopped training; 0 = still training

    def accountant(self, task: str, kind: str) -> IAccountant:
        acc = create_accountant(kind)
        acc.history = [tuple(h) for h in self.history.get(task, [])]
        return acc

    def epsilon(self, task: str, cfg: PrivacyConfig, extra: tuple[float, float, int] | None = None) -> float:
        acc = self.accountant(task, cfg.accountant)
        if extra is not None and extra[2] > 0:
            acc.history.append(extra)
        if any(h[0] == 0 for h in acc.history):
            return float("inf")  # a step without noise has no guarantee
        return float(acc.get_epsilon(cfg.delta)) if acc.history else 0.0

    def record(self, plans: dict[str, TaskPlan], taken: dict[str, int]) -> None:
        """Add a round's steps to each task's Opacus history of (sigma, q, steps) entries; a round
        with the same sigma and q as the last entry extends it, so the history stays short."""
        for task, tp in plans.items():
            hist = self.history.setdefault(task, [])
            if hist and hist[-1][0] == tp.noise_multiplier and hist[-1][1] == tp.sample_rate:
                hist[-1][2] += taken[task]
            elif taken[task]:
                hist.append([tp.noise_multiplier, tp.sample_rate, taken[task]])

    def save(self, context: Context) -> None:
        context.state[STATE_KEY] = ConfigRecord(
            {"ledger": json.dumps({"history": self.history, "noise": self.noise, "stopped_round": self.stopped_round})}
        )

    @classmethod
    def load(cls, context: Context) -> PrivacyLedger:
        return cls.from_state(context.state)

    @classmethod
    def from_state(cls, state: RecordDict) -> PrivacyLedger:
        record = state.config_records.get(STATE_KEY)
        if record is None:
            return cls()
        raw = json.loads(str(record["ledger"]))
        return cls(raw["history"], raw["noise"], int(raw["stopped_round"]))

    def spent(self, cfg: PrivacyConfig) -> float:
        """The site's epsilon: the largest of its tasks' (parallel composition); 0 before any step."""
        return max((self.epsilon(task, cfg) for task in self.history), default=0.0)


def keep_highest_ledger(restored: RecordDict, others: Sequence[RecordDict], cfg: PrivacyConfig) -> float | None:
    """A site's DP ledger never goes back: when one of the `others` states the site holds (its
    in-memory state, other saved rounds) has spent more epsilon than `restored`, that ledger
    replaces the restored one (a budget that stopped training stays stopped). Returns the epsilon
    kept when it replaced the ledger, else None. A server that names an earlier round to restore
    thus rolls back the model state, never the privacy spent."""
    own = PrivacyLedger.from_state(restored).spent(cfg)
    best, best_eps = None, own
    for state in others:
        if STATE_KEY in state.config_records:
            eps = PrivacyLedger.from_state(state).spent(cfg)
            if eps > best_eps + EPS_TOLERANCE:
                best, best_eps = state, eps
    if best is None:
        return None
    restored[STATE_KEY] = best.config_records[STATE_KEY]
    return best_eps


def task_plans(data: SiteData, cfg: ExperimentConfig) -> dict[str, TaskPlan]:
    """Per task: Poisson rate B/N and the steps of one round (epochs x N/B, capped as the
    non-private trainer caps them)."""
    plans = {}
    for task in data.plan.tasks:
        split = data.split(task, "train")
        if split is None:
            continue
        n = len(split)
        q = min(1.0, cfg.train.batch_size / n)
        steps = cfg.train.local_epochs * max(1, round(1 / q))
        if cfg.train.max_steps_per_round:
            steps = min(steps, cfg.train.max_steps_per_round)
        plans[task] = TaskPlan(n, q, steps)
    return plans


def calibrate(plans: dict[str, TaskPlan], cfg: ExperimentConfig, ledger: PrivacyLedger) -> None:
    """Noise per task, decided once (the first round) and kept in the ledger."""
    p = cfg.privacy
    for task, tp in plans.items():
        if task not in ledger.noise:
            if p.noise_multiplier is not None:
                ledger.noise[task] = float(p.noise_multiplier)
            else:
                ledger.noise[task] = float(
                    get_noise_multiplier(
                        target_epsilon=p.target_epsilon,
                        target_delta=p.delta,
                        sample_rate=tp.sample_rate,
                        steps=tp.steps_per_round * cfg.rounds,
                        accountant=p.accountant,
                        epsilon_tolerance=0.01,
                    )
                )
        tp.noise_multiplier = ledger.noise[task]


def budget_allows(plans: dict[str, TaskPlan], cfg: PrivacyConfig, ledger: PrivacyLedger) -> bool:
    if cfg.target_epsilon is None:
        return True
    return all(
        ledger.epsilon(t, cfg, (tp.noise_multiplier, tp.sample_rate, tp.steps_per_round))
        <= cfg.target_epsilon + EPS_TOLERANCE
        for t, tp in plans.items()
    )


def privacy_report(plans: dict[str, TaskPlan], cfg: PrivacyConfig, ledger: PrivacyLedger) -> dict:
    steps = {t: int(sum(h[2] for h in ledger.history.get(t, []))) for t in plans}
    eps = {t: ledger.epsilon(t, cfg) for t in plans}
    return {
        "mechanism": "dp_sgd (sample-level)",
        "epsilon": max(eps.values(), default=0.0),
        "delta": cfg.delta,
        "accountant": cfg.accountant,
        "max_grad_norm": cfg.max_grad_norm,
        "tasks": list(plans),
        "epsilon_per_task": [eps[t] for t in plans],
        "noise_multiplier": [plans[t].noise_multiplier for t in plans],
        "sample_rate": [plans[t].sample_rate for t in plans],
        "steps": [steps[t] for t in plans],
        "stopped_by_budget": ledger.stopped_round > 0,
        "stopped_round": ledger.stopped_round,
        "budget_epsilon": cfg.target_epsilon if cfg.target_epsilon is not None else -1.0,
    }


class BatchFirst(torch.nn.Module):
    """The model with a batch-sized tensor first: ExpandedWeights ("ew" mode) reads the batch
    size from the first positional argument, and ours is the task name."""

    def __init__(self, model: MultiMedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, anchor: torch.Tensor, task: str, inputs: dict, present: dict) -> torch.Tensor:
        return self.model(task, inputs, present)


def per_sample_module(model: MultiMedModel, mode: str) -> AbstractGradSampleModule:
    """Opacus' per-sample-gradient wrapper in the configured mode (see experiments/bench/dp_step.py)."""
    if mode == "ew":
        return GradSampleModuleExpandedWeights(BatchFirst(model), batch_first=True, loss_reduction="mean")
    return GradSampleModule(model, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch")


def private_gradient(
    gsm: AbstractGradSampleModule,
    optimizer: DPOptimizer,
    task: Task,
    batch: TaskSplit | None,
    precision: str = "fp32",
) -> torch.Tensor | None:
    """Leave the privatised gradient in p.grad: per-sample gradients clipped to
    max_grad_norm, summed, plus N(0, (sigma * C)^2) noise, divided by the expected batch size.
    batch=None (an empty Poisson draw) is a noise-only step. Returns the batch loss (on the
    device). Under bf16 autocast some per-sample gradients come out in bf16; they are cast to
    the parameter's fp32 before Opacus clips them, so the norms, the clipping bound and the
    noise are all fp32 arithmetic on the values that are summed."""
    optimizer.zero_grad(set_to_none=True)
    for p in gsm.parameters():  # also those switched off this step (zero_grad skips them)
        p.grad_sample = None
    loss = None
    if batch is not None:
        with warnings.catch_warnings():  # harmless: hooks on a first layer whose inputs need no
            warnings.filterwarnings("ignore", message="Full backward hook is firing")  # grad;
            warnings.filterwarnings("ignore", message="In CPU autocast")  # functorch's autocast probe
            with autocast(batch.targets.device, precision):
                if isinstance(gsm, GradSampleModuleExpandedWeights):
                    output = gsm(batch.targets, task.name, batch.inputs, batch.present)
                else:
                    output = gsm(task.name, batch.inputs, batch.present)
                out = per_sample_loss(task, output, batch.targets)
            out.backward()
        loss = out.detach()
        for p in optimizer.params:
            if isinstance(getattr(p, "grad_sample", None), torch.Tensor) and p.grad_sample.dtype != p.dtype:
                p.grad_sample = p.grad_sample.to(p.dtype)
    else:
        for p in optimizer.params:
            p.grad_sample = p.new_zeros((0, *p.shape))
    optimizer.pre_step()  # clip, accumulate, add noise, scale (Opacus)
    return loss


def train_private(
    model: MultiMedModel,
    data: SiteData,
    cfg: ExperimentConfig,
    seed: int,
    context: Context,
    server_round: int,
    hooks: tuple[GradientHook, ...] = (),
) -> tuple[TrainResult, dict]:
    """One round of DP-SGD at the site; returns the training result and the privacy report.
    A site whose budget is spent returns a result with zero examples and leaves the model as is."""
    check_model(model)
    ledger = PrivacyLedger.load(context)
    plans = task_plans(data, cfg)
    calibrate(plans, cfg, ledger)
    if ledger.stopped_round or not budget_allows(plans, cfg.privacy, ledger):
        ledger.stopped_round = ledger.stopped_round or server_round
        ledger.save(context)
        return TrainResult(0, 0, math.nan, {}), privacy_report(plans, cfg.privacy, ledger)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)  # Poisson draws: on the host, the same on every device
    device = model_device(model)
    site_groups = set(model.train_only(data.plan.modalities, data.plan.tasks))  # before wrapping
    trainable = [p for p in model.parameters() if p.requires_grad]
    gsm = per_sample_module(model, cfg.privacy.grad_sample_mode)
    optimizer = dp_optimizer(trainable, next(iter(plans.values())), cfg, seed, device)
    order = step_order(plans, gen)
    losses, taken = [], {t: 0 for t in plans}
    model.train()
    try:
        for task in order:
            tp = plans[task]
            use_task_groups(model, task, site_groups)
            split = data.split(task, "train")
            assert split is not None
            optimizer.noise_multiplier = tp.noise_multiplier
            optimizer.expected_batch_size = max(1, round(tp.sample_rate * tp.n))
            batch = poisson_batch(split, tp.sample_rate, gen)
            loss = private_gradient(
                gsm,
                optimizer,
                data.schema.task(task),
                batch.to(device) if batch is not None else None,
                cfg.train.precision,
            )
            if loss is not None:
                losses.append(loss)
            for hook in hooks:  # FedProx / SCAFFOLD corrections act on the privatised gradient
                hook.after_backward(model)
            optimizer.original_optimizer.step()
            taken[task] += 1
    finally:
        gsm.to_standard_module()
        model.train_only(data.plan.modalities, data.plan.tasks)
    ledger.record(plans, taken)
    ledger.save(context)
    result = TrainResult(
        num_examples=data.n("train"),
        steps=len(order),
        mean_loss=float(torch.stack(losses).cpu().double().mean()) if losses else math.nan,
        group_examples=group_examples(data),
    )
    return result, privacy_report(plans, cfg.privacy, ledger)


def dp_optimizer(
    trainable: list[torch.nn.Parameter], first: TaskPlan, cfg: ExperimentConfig, seed: int, device: torch.device
) -> DPOptimizer:
    """Opacus' clipping-and-noise optimizer around the configured one. Its sigma and expected
    batch size are set again before each step (tasks differ in both); its noise comes from its
    own generator on the parameters' device, so noise draws and batch draws are separate streams."""
    return DPOptimizer(
        make_optimizer(trainable, cfg.train),
        noise_multiplier=first.noise_multiplier,
        max_grad_norm=cfg.privacy.max_grad_norm,
        expected_batch_size=cfg.train.batch_size,
        generator=torch.Generator(device=device).manual_seed(seed + 1),
    )


def step_order(plans: dict[str, TaskPlan], gen: torch.Generator) -> list[str]:
    """The task of each step of the round: every task's planned steps, interleaved by a random
    permutation that depends on the seed only, never on the data."""
    schedule = [t for t, tp in plans.items() for _ in range(tp.steps_per_round)]
    return [schedule[i] for i in torch.randperm(len(schedule), generator=gen).tolist()]


def use_task_groups(model: MultiMedModel, task: str, site_groups: set[str]) -> None:
    """Make trainable only the site's groups that `task` uses (its encoders, fusion, its head):
    Opacus refuses a trainable parameter that gets no per-sample gradient in a step."""
    keep = {"fusion", f"head/{task}"} | {f"encoder/{m}" for m in model.schema.task(task).inputs}
    for name, p in model.named_parameters():
        p.requires_grad_(group_of(name) in site_groups and group_of(name) in keep)


def poisson_batch(split: TaskSplit, sample_rate: float, gen: torch.Generator) -> TaskSplit | None:
    """Each sample drawn independently with probability q, as the RDP analysis assumes; None
    for an empty draw, which private_gradient turns into a noise-only step."""
    idx = (torch.rand(len(split), generator=gen) < sample_rate).nonzero().flatten()
    return split.take(idx) if len(idx) else None
