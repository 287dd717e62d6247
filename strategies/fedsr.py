"""FedSR (Nguyen, Torr, Lim, NeurIPS 2022): two regularisers on the representation at every site.

Paper: "FedSR: A Simple and Effective Domain Generalization Method for Federated Learning".
Each site minimises its task loss plus (Sec. 3, Eq. 5-6 and the objective of Sec. 3.3)

    L2R = alpha_l2  * E_x ||z||_2^2                            (Eq. 5, squared norm as in the paper)
    CMI = alpha_cmi * E_{x,y} KL( p(z|x) || r(z|y) )           (Eq. 6, the bound on I(x; z | y))

on the representation z. Here z is the output of the MultiMed model's fusion block (the pooled,
layer-normed vector [B, dim] every task head reads, federated/core/models/fusion.py), captured
by a forward hook on `model.fusion` registered in `before_train` and removed in `after_train`.

What is implemented for the CMI term. The model is deterministic, z = f(x): with p(z|x) a point
mass the KL to a Gaussian is infinite (degenerate). We take the paper's probabilistic
representation with a FIXED small variance, p(z|x) = N(f(x), sigma^2 I) (sigma^2 =
`strategy.z_variance`), and r(z|y) = N(mu_y, diag(s_y^2)); the KL is then exact in closed form:

    KL_i = 1/2 * sum_d [ (sigma^2 + (f_d(x_i) - mu_{y_i,d})^2) / s_{y_i,d}^2 + log(s_{y_i,d}^2 / sigma^2) - 1 ]

i.e. the Gaussian negative log-likelihood of f(x) under r(z|y) up to terms constant in z. Its
gradient w.r.t. the model is (f(x) - mu_y) / s_y^2: it pulls each class's representations to a
class mean shared by all sites. CMI is the mean of KL_i over the batch's samples with a valid
class label (labels outside [0, C) do not count; none -> 0).

r(z|y) exists for class tasks (binary: 2 classes 0/1, multiclass, closed_set: one Gaussian per
class of the task). Multilabel, regression and per-residue tasks get L2R only: they have no single
class y to condition on (and per-residue labels belong to residues, not to the pooled z).

Departure: how r(z|y) is learned. In the paper r's means and scales are parameters trained by SGD
with the model and averaged by FedAvg. The site trainer builds its optimiser from
model.parameters() only, so r is instead updated in closed form, which is its exact minimiser
for the CMI term: for fixed z, the Gaussian minimising E_i KL(N(f(x_i), sigma^2 I) || r) over a
class's samples is the moment match, mean = mean_i f(x_i), variance = var_i f(x_i) + sigma^2
(`batch_reference`). Each step the site first moves its r towards that batch estimate with a
running (exponential) average of rate `strategy.reference_momentum` per class present in the
batch (a class never seen takes the batch estimate), then takes the model step on the objective
with r held fixed (detached): alternating minimisation instead of the paper's joint SGD. Since
s^2 >= sigma^2, sigma^2 is also r's variance floor (no division by a zero variance).

r is shared, not per site: the server sends the current reference with every round (record
`fedsr-reference`), each site starts its round from it and returns its updated r with the class
frequencies of the samples it trained on (record `fedsr-statistics`), and the server pools them
per task and class by moment matching the mixture of the sites' Gaussians (`pool_reference`),
weighting site i's class c by freq_ic x (its examples of the task, from its `trained` record):

    w_ic = freq_ic * n_i,t ; mu_c = sum_i w_ic mu_ic / W_c ; s_c^2 = sum_i w_ic (s_ic^2 + (mu_ic - mu_c)^2) / W_c

Shared because the point of CMI is a class-conditional representation that is the same in every
domain: per-site references would let each site's classes settle at their own places. This is the
paper's choice (r is part of the global model) with moment matching instead of a plain average of
the scale parameters (it makes the pooled r the Gaussian fit of all sites' class-conditional z).
The pooled reference is server state across rounds (`STATE`, saved in checkpoints); the site keeps
nothing in its Context: it never needs r from an earlier round that the server does not send.

Per parameter group: the model is averaged per group over the sites that trained it (modality-
aware FedAvg, `groupwise_weighted_mean`). The regularisers act on z, so their gradients reach the
fusion block and the site's encoders, not the heads. The reference of task t belongs with
`head/<task>`: only sites that trained that head send (and may send) its statistics, it is pooled
over those sites only, and a class that no site reported this round keeps its previous reference;
a task nobody has trained yet has none (its sites start from their own first batch).

Refused with privacy=dp_sgd: the objective is no longer a mean of per-sample losses that DP-SGD's
per-sample clipping computes (and the reference statistics would leave the site unprotected).
privacy=dp_fedavg needs strategy=fedavg, so it is refused by the config loader already.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from torch.utils.hooks import RemovableHandle

from federated.core.arrays import pack_arrays, record_to_numpy
from federated.core.compute import model_device
from federated.core.config.schema import ExperimentConfig, StrategyConfig, StrategySettings
from federated.core.models import MultiMedModel
from federated.core.targets import BINARY, CLASS_TARGETS
from strategies.base import Arrays, MultiMedStrategy, Update
from strategies.client_side import ClientAlgorithm, ClientRound, Record, SiteRound
from strategies.registry import register_strategy
from strategies.secure_sums import SecureSupport

REFERENCE_RECORD = "fedsr-reference"  # server -> site: the pooled r(z|y), arrays stat_key(task, MEAN|VAR|KNOWN)
STATISTICS_RECORD = "fedsr-statistics"  # site -> server: its r after the round, stat_key(task, MEAN|VAR|FREQ)
MEAN, VAR, KNOWN, FREQ = "mean", "var", "known", "freq"  # the parts of a task's statistics
STAT_SEP = "/"  # an array's key in those records: "<task>/<part>"


def stat_key(task: str, part: str) -> str:
    """The key of one part of a task's statistics in REFERENCE_RECORD or STATISTICS_RECORD."""
    return f"{task}{STAT_SEP}{part}"


FREQ_TOLERANCE = 1e-4  # a site's class frequencies of one task must sum to 1 within this

TorchReference = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # mean [C, D], var [C, D], known [C]


@dataclass(frozen=True)
class FedSRSettings(StrategySettings):
    alpha_l2: float = 0.01  # weight of L2R (paper default)
    alpha_cmi: float = 0.001  # weight of CMI (paper default)
    z_variance: float = 0.01  # sigma^2 of p(z|x) = N(f(x), sigma^2 I); r's variance floor
    reference_momentum: float = 0.1  # rate of a site's running update of r(z|y), per step

    def __post_init__(self) -> None:
        for key in ("alpha_l2", "alpha_cmi"):
            value = getattr(self, key)
            self.require(key, math.isfinite(value) and value >= 0.0, "must be finite and >= 0")
        self.require("z_variance", math.isfinite(self.z_variance) and self.z_variance > 0.0, "must be finite and > 0")
        self.require("reference_momentum", 0.0 < self.reference_momentum <= 1.0, "must be in (0, 1]")

    def experiment_checks(self, cfg: ExperimentConfig) -> list[tuple[str, bool, str]]:
        return [
            (
                "privacy.name",
                cfg.privacy.name != "dp_sgd",
                "must not be dp_sgd with strategy=fedsr (FedSR adds regularisers to the training objective, "
                "which DP-SGD's per-sample clipping does not support)",
            )
        ]


# --- the maths -----------------------------------------------------------------------------


def l2_regulariser(z: torch.Tensor) -> torch.Tensor:
    """L2R without its weight: the batch mean of ||z_i||_2^2 (z: [B, D])."""
    return z.float().pow(2).sum(dim=1).mean()


def cmi_regulariser(
    z: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, z_variance: float
) -> torch.Tensor:
    """CMI without its weight: the batch mean of KL(N(z_i, sigma^2 I) || N(mean_y, diag var_y)) over
    the samples whose label is a class of `mean` ([C, D]); 0 when there is none. r is not
    differentiated (its closed-form update replaces its gradient step)."""
    z = z.float()
    labels = labels.long()
    ok = (labels >= 0) & (labels < mean.shape[0])
    if not bool(ok.any()):
        return z.sum() * 0.0  # keeps the graph (and the device)
    zs, y = z[ok], labels[ok]
    mu, s2 = mean.detach()[y], var.detach()[y]
    kl = 0.5 * ((z_variance + (zs - mu) ** 2) / s2 + torch.log(s2 / z_variance) - 1.0).sum(dim=1)
    return kl.mean()


@torch.no_grad()
def batch_reference(
    z: torch.Tensor, labels: torch.Tensor, n_classes: int, z_variance: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The r minimising the batch's CMI, per class: (mean [C, D], var [C, D], count [C]) with
    mean = mean_i z_i, var = (population) var_i z_i + sigma^2 over the class's samples; rows of
    classes absent from the batch are 0 (count 0)."""
    z = z.detach().float()
    labels = labels.long()
    ok = (labels >= 0) & (labels < n_classes)
    zs, y = z[ok], labels[ok]
    count = torch.zeros(n_classes, device=z.device).index_add_(0, y, torch.ones_like(y, dtype=torch.float32))
    total = torch.zeros(n_classes, z.shape[1], device=z.device).index_add_(0, y, zs)
    mean = total / count.clamp(min=1.0)[:, None]
    sq = torch.zeros_like(total).index_add_(0, y, (zs - mean[y]) ** 2)
    var = sq / count.clamp(min=1.0)[:, None] + z_variance
    return mean, var * (count > 0)[:, None], count


@torch.no_grad()
def update_reference(
    reference: TorchReference, z: torch.Tensor, labels: torch.Tensor, momentum: float, z_variance: float
) -> TorchReference:
    """One running update of r from a batch: for each class in the batch, r <- (1 - m) r + m r_batch
    (mean and variance), or r_batch for a class not known before; other classes unchanged."""
    mean, var, known = reference
    b_mean, b_var, count = batch_reference(z, labels, mean.shape[0], z_variance)
    seen = count > 0
    rate = torch.where(known > 0, torch.full_like(count, momentum), torch.ones_like(count))
    rate = (rate * seen)[:, None]
    return (1 - rate) * mean + rate * b_mean, (1 - rate) * var + rate * b_var, torch.maximum(known, seen.float())


def pool_reference(
    previous: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    sites: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    weights: list[float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One task's pooled r from the sites that trained it: sites[i] = (mean [C, D], var [C, D],
    freq [C]), weights[i] = its examples of the task. Per class c, with w_ic = freq_ic * weights[i]
    and W_c = sum_i w_ic > 0: mu_c = sum_i w_ic mu_ic / W_c and s_c^2 = sum_i w_ic (s_ic^2 +
    (mu_ic - mu_c)^2) / W_c (the moment match of the sites' mixture). A class with W_c = 0 keeps
    `previous` (mean 0, var 1 and known 0 without one: values no site reads). Returns (mean,
    var, known)."""
    if not sites or len(sites) != len(weights):
        raise ValueError(f"pool_reference: {len(sites)} sites with {len(weights)} weights")
    shape = sites[0][0].shape
    if any(m.shape != shape or v.shape != shape or f.shape != shape[:1] for m, v, f in sites):
        raise ValueError("pool_reference: the sites' references differ in shape")
    if previous is None:
        previous = (np.zeros(shape), np.ones(shape), np.zeros(shape[0]))
    w = np.stack([f * float(n) for (_, _, f), n in zip(sites, weights, strict=True)])  # [S, C]
    means = np.stack([m for m, _, _ in sites]).astype(np.float64)  # [S, C, D]
    variances = np.stack([v for _, v, _ in sites]).astype(np.float64)
    total = w.sum(axis=0)  # [C]
    has = total > 0
    share = np.divide(w, total, out=np.zeros_like(w), where=has)[..., None]  # [S, C, 1]
    mean = (share * means).sum(axis=0)
    var = (share * (variances + (means - mean) ** 2)).sum(axis=0)
    return (
        np.where(has[:, None], mean, previous[0]),
        np.where(has[:, None], var, previous[1]),
        np.where(has, 1.0, previous[2]),
    )


def n_classes_of(target: str, classes: tuple[str, ...]) -> int | None:
    """The number of Gaussians r(z|y) has for a task, None for a task without one."""
    if target not in CLASS_TARGETS:
        return None
    return 2 if target == BINARY else len(classes)


# --- site side -----------------------------------------------------------------------------


class FusionCapture:
    """Forward hook on the fusion block: keeps the output of the latest forward pass (with its
    graph) until the objective takes it."""

    def __init__(self) -> None:
        self.z: torch.Tensor | None = None

    def __call__(self, module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
        self.z = output

    def take(self) -> torch.Tensor:
        if self.z is None:
            raise RuntimeError("strategy=fedsr: no fusion output captured since the last step's objective")
        z, self.z = self.z, None
        return z


class FedSRRound(ClientRound):
    """One round at a site: the regularised objective, then the site's r and class frequencies."""

    def __init__(
        self,
        model: MultiMedModel,
        settings: FedSRSettings,
        reference: dict[str, TorchReference],
        capture: FusionCapture,
        handle: RemovableHandle,
    ) -> None:
        super().__init__(changes_objective=True)
        self.model, self.settings, self.reference = model, settings, reference
        self.capture, self.handle = capture, handle
        self.counts: dict[str, torch.Tensor] = {}  # task -> samples per class this round

    def regularisers(self, task: str, z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """alpha_l2 * L2R + alpha_cmi * CMI of the batch (CMI for class tasks only), after the
        running update of the task's r with the batch."""
        s = self.settings
        extra = s.alpha_l2 * l2_regulariser(z)
        spec = self.model.schema.task(task)
        n_classes = n_classes_of(spec.target, spec.classes)
        if n_classes is None:
            return extra
        labels = targets.reshape(-1).long()
        if task not in self.reference:
            zeros = torch.zeros(n_classes, z.shape[1], device=z.device)
            self.reference[task] = (zeros, torch.ones_like(zeros), torch.zeros(n_classes, device=z.device))
        self.reference[task] = update_reference(self.reference[task], z, labels, s.reference_momentum, s.z_variance)
        count = batch_reference(z, labels, n_classes, s.z_variance)[2]
        self.counts[task] = self.counts.get(task, torch.zeros_like(count)) + count
        mean, var, _ = self.reference[task]
        return extra + s.alpha_cmi * cmi_regulariser(z, labels, mean, var, s.z_variance)

    def objective(self, task: str, loss: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss + self.regularisers(task, self.capture.take(), targets)

    def after_train(self, steps: int) -> dict[str, Record]:
        self.handle.remove()
        out: dict[str, np.ndarray] = {}
        for task, count in self.counts.items():
            total = float(count.sum())
            if total <= 0:
                continue
            mean, var, _ = self.reference[task]
            out[stat_key(task, MEAN)] = mean.cpu().numpy().astype(np.float32)
            out[stat_key(task, VAR)] = var.cpu().numpy().astype(np.float32)
            out[stat_key(task, FREQ)] = (count / total).cpu().numpy().astype(np.float32)
        return {STATISTICS_RECORD: pack_arrays(out)}


class FedSRClient(ClientAlgorithm):
    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        self.settings = cfg.settings_as(FedSRSettings)
        self.handle: RemovableHandle | None = None  # the hook of the round in progress

    def before_train(self, site: SiteRound) -> ClientRound:
        if self.handle is not None:  # a round that failed before after_train: never two hooks
            self.handle.remove()
        record = site.content.array_records.get(REFERENCE_RECORD)
        if record is None:
            raise ValueError(f"strategy=fedsr: the training message has no '{REFERENCE_RECORD}' record")
        device = model_device(site.model)
        sent = {
            k: torch.tensor(np.array(v), dtype=torch.float32, device=device) for k, v in record_to_numpy(record).items()
        }
        reference = {
            task: (sent[stat_key(task, MEAN)], sent[stat_key(task, VAR)], sent[stat_key(task, KNOWN)])
            for task in {k.rpartition(STAT_SEP)[0] for k in sent}
        }
        capture = FusionCapture()
        self.handle = site.model.fusion.register_forward_hook(capture)
        return FedSRRound(site.model, self.settings, reference, capture, self.handle)


# --- server side ---------------------------------------------------------------------------


@register_strategy("fedsr", FedSRSettings, client=FedSRClient)
class FedSR(MultiMedStrategy):
    SECURE = SecureSupport.refused("sends its representation statistics beside the update, which would travel unmasked")
    STATE = ("reference",)

    def __init__(self, cfg: StrategyConfig, n_train_sites: int) -> None:
        super().__init__(cfg, n_train_sites)
        self.settings = cfg.settings_as(FedSRSettings)
        self.reference: Arrays | None = None  # stat_key(task, MEAN|VAR|KNOWN): the pooled r(z|y)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        record = pack_arrays(self.reference or {})
        for m in messages:
            m.content[REFERENCE_RECORD] = record
        return messages

    def parse(self, msg: Message, current: Arrays) -> Update | str:
        parsed = super().parse(msg, current)
        if isinstance(parsed, str):
            return parsed
        record = msg.content.array_records.get(STATISTICS_RECORD)
        if record is None:
            return f"no '{STATISTICS_RECORD}' record (FedSR sites must send their r(z|y))"
        try:
            stats = record_to_numpy(record)
        except ValueError as e:
            return f"{STATISTICS_RECORD}: {e}"
        dim = current["fusion.norm.weight"].shape[0] if "fusion.norm.weight" in current else None
        reason = check_statistics(stats, parsed.group_examples, self.reference or {}, dim)
        return f"{STATISTICS_RECORD}: {reason}" if reason else parsed

    def aggregate_updates(self, current: Arrays, updates: list[Update]) -> Arrays:
        new = super().aggregate_updates(current, updates)
        reference = dict(self.reference or {})
        per_task: dict[str, list[tuple[Mapping[str, np.ndarray], float]]] = {}
        for u in updates:
            stats = record_to_numpy(u.message.content.array_records[STATISTICS_RECORD])
            for task in _tasks(stats):
                per_task.setdefault(task, []).append((stats, u.group_examples[f"head/{task}"]))
        for task, sent in sorted(per_task.items()):
            previous = _triple(reference, task, KNOWN) if stat_key(task, MEAN) in reference else None
            mean, var, known = pool_reference(previous, [_triple(s, task, FREQ) for s, _ in sent], [n for _, n in sent])
            reference.update({stat_key(task, MEAN): mean, stat_key(task, VAR): var, stat_key(task, KNOWN): known})
        self.reference = {k: np.asarray(v, dtype=np.float32) for k, v in reference.items()}
        return new


def _tasks(stats: Mapping[str, np.ndarray]) -> list[str]:
    return sorted({k.rpartition(STAT_SEP)[0] for k in stats})


def _triple(arrays: Mapping[str, np.ndarray], task: str, third: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return arrays[stat_key(task, MEAN)], arrays[stat_key(task, VAR)], arrays[stat_key(task, third)]


def check_statistics(
    stats: Mapping[str, np.ndarray],
    group_examples: Mapping[str, float],
    reference: Mapping[str, np.ndarray],
    dim: int | None,
) -> str | None:
    """Why a site's r statistics are unusable, if they are: each task needs mean and var [C, D]
    (D the fusion width, C the reference's classes once there is one), var > 0 and freq [C] in
    [0, 1] summing to 1, all finite, and only for a task whose head the site trained."""
    for key in stats:
        task, _, part = key.rpartition(STAT_SEP)
        if not task or part not in (MEAN, VAR, FREQ):
            return f"unexpected array {key!r}"
    for task in _tasks(stats):
        if group_examples.get(f"head/{task}", 0) <= 0:
            return f"statistics for task {task!r}, whose head the site did not train"
        missing = [p for p in (MEAN, VAR, FREQ) if stat_key(task, p) not in stats]
        if missing:
            return f"task {task!r} lacks {missing}"
        mean, var, freq = _triple(stats, task, FREQ)
        if mean.ndim != 2 or var.shape != mean.shape or freq.shape != mean.shape[:1]:
            return f"task {task!r}: shapes {mean.shape}, {var.shape}, {freq.shape} are not [C, D], [C, D], [C]"
        if dim is not None and mean.shape[1] != dim:
            return f"task {task!r}: width {mean.shape[1]}, not the fusion width {dim}"
        known = reference.get(stat_key(task, MEAN))
        if known is not None and known.shape != mean.shape:
            return f"task {task!r}: shape {mean.shape}, not the reference's {known.shape}"
        if not all(np.isfinite(a).all() for a in (mean, var, freq)):
            return f"task {task!r}: non-finite values"
        if (var <= 0).any() or (freq < 0).any() or (freq > 1).any() or abs(float(freq.sum()) - 1.0) > FREQ_TOLERANCE:
            return f"task {task!r}: variances must be > 0 and frequencies in [0, 1] summing to 1"
    return None
