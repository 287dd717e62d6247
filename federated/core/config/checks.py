"""The config's checks: the ranges and combinations the type system cannot express, each naming
its key. The values a str setting accepts are declared beside its field (values.one_of) and checked
here from that declaration; a strategy's own settings check themselves on construction (their
dataclass's __post_init__) and add what they need of other sections (experiment_checks).

`validate` runs on every config the loader builds or reads back; federated/server/preflight.py runs it
again before a run (a config built in Python, or changed with dataclasses.replace, is held to it too).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from federated.core.config.schema import (
    ConfigError,
    ExperimentConfig,
    SecureAggregationConfig,
    StrategyConfig,
    StrategySettings,
)
from federated.core.config.values import allowed_checks

# numpy's SeedSequence refuses negative seeds and torch.manual_seed anything beyond 64 bits; a seed
# must also fit the int64 columns it is written to (metrics.parquet, studies' tables).
SEED_LIMIT = 2**63


def _float_fields(node: Any, prefix: str) -> list[tuple[str, float]]:
    """Every float setting under `node` (a config dataclass), keyed as a user types it. A strategy's
    own settings are flat under `strategy.` as on the command line."""
    found: list[tuple[str, float]] = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if isinstance(value, StrategySettings):
            found += _float_fields(value, prefix)
        elif dataclasses.is_dataclass(value):
            found += _float_fields(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            found.append((f"{prefix}{f.name}", value))
    return found


def _check_finite(cfg: ExperimentConfig) -> None:
    """NaN or infinity in any float setting fails here, naming the key, instead of a round later
    (or as a silently meaningless run: target_epsilon=inf gave noise multiplier 10)."""
    for key, value in _float_fields(cfg, ""):
        if math.isfinite(value):
            continue
        if key == "privacy.target_epsilon" and value > 0:
            raise ConfigError(
                f"privacy.target_epsilon={value}: an infinite epsilon is no privacy at all; use privacy=none"
            )
        raise ConfigError(f"{key}={value}: must be a finite number")


def validate(cfg: ExperimentConfig) -> None:
    """Range checks the type system cannot express; each names its key. (The strategy section
    checks itself on construction: StrategyConfig and each strategy's settings dataclass.)"""
    _check_finite(cfg)
    checks = [
        *declared_values_checks(cfg),
        ("seed", 0 <= cfg.seed < SEED_LIMIT, "must be in [0, 2**63) (numpy and torch random generators' range)"),
        (
            "corpus.seed",
            0 <= cfg.corpus.seed < SEED_LIMIT,
            "must be in [0, 2**63) (numpy and torch random generators' range)",
        ),
        ("rounds", cfg.rounds >= 1, "must be >= 1"),
        ("corpus.samples_per_task_site", cfg.corpus.samples_per_task_site >= 5, "must be >= 5"),
        ("corpus.n_origin_sites", cfg.corpus.n_origin_sites >= 1, "must be >= 1"),
        ("corpus.test_fraction", 0.0 < cfg.corpus.test_fraction < 1.0, "must be in (0, 1)"),
        ("corpus.origin_shift_severity", cfg.corpus.origin_shift_severity >= 0.0, "must be >= 0"),
        ("model.heads", cfg.model.heads >= 1, "must be >= 1"),
        (
            "model.dim",
            cfg.model.dim >= 4 and cfg.model.heads >= 1 and cfg.model.dim % cfg.model.heads == 0,
            "must be >= 4 and divisible by model.heads",
        ),
        ("model.tokens_per_modality", cfg.model.tokens_per_modality >= 1, "must be >= 1"),
        ("model.fusion_layers", cfg.model.fusion_layers >= 0, "must be >= 0"),
        ("model.dropout", 0.0 <= cfg.model.dropout < 1.0, "must be in [0, 1)"),
        ("train.local_epochs", cfg.train.local_epochs >= 1, "must be >= 1"),
        ("train.batch_size", cfg.train.batch_size >= 1, "must be >= 1"),
        ("train.lr", cfg.train.lr > 0, "must be > 0"),
        ("train.momentum", 0.0 <= cfg.train.momentum < 1.0, "must be in [0, 1)"),
        ("train.weight_decay", cfg.train.weight_decay >= 0.0, "must be >= 0"),
        ("train.max_steps_per_round", cfg.train.max_steps_per_round >= 0, "must be >= 0"),
        *precision_privacy_checks(cfg),
        ("sites.train", len(cfg.sites.train) >= 1, "needs at least one training site"),
        ("sites.label_skew_alpha", cfg.sites.label_skew_alpha >= 0, "must be > 0 (or 0 for no skew)"),
        ("sites.quantity_skew_sigma", cfg.sites.quantity_skew_sigma >= 0, "must be > 0 (or 0 for none)"),
        ("sites.min_samples", cfg.sites.min_samples >= 1, "must be >= 1"),
        ("sites.missing_site_rate", 0.0 <= cfg.sites.missing_site_rate <= 1.0, "must be in [0, 1]"),
        ("sites.label_noise_rate", 0.0 <= cfg.sites.label_noise_rate <= 1.0, "must be in [0, 1]"),
        ("sites.missing_sample_rate", 0.0 <= cfg.sites.missing_sample_rate <= 1.0, "must be in [0, 1]"),
        ("sites.label_skew_classes", cfg.sites.label_skew_classes >= 0, "must be >= 1 (or 0 for none)"),
        ("sites.load_shift_severity", cfg.sites.load_shift_severity >= 0.0, "must be >= 0"),
        ("sites.holdout_k", cfg.sites.holdout_k >= 0, "must be >= 0"),
        ("sites.min_site_size", cfg.sites.min_site_size >= 1, "must be >= 1"),
        ("sites.n_sites", cfg.sites.n_sites >= 2, "must be >= 2"),
        ("sites.tasks_per_site", cfg.sites.tasks_per_site >= 1, "must be >= 1"),
        ("sites.min_overlap", cfg.sites.min_overlap >= 1, "must be >= 1"),
        (
            "privacy.target_epsilon",
            cfg.privacy.name == "none"
            or cfg.privacy.target_epsilon is not None
            or cfg.privacy.noise_multiplier is not None,
            "or privacy.noise_multiplier must be set with differential privacy on",
        ),
        ("privacy.target_epsilon", cfg.privacy.target_epsilon is None or cfg.privacy.target_epsilon > 0, "must be > 0"),
        (
            "privacy.noise_multiplier",
            cfg.privacy.noise_multiplier is None or cfg.privacy.noise_multiplier >= 0,
            "must be >= 0",
        ),
        ("privacy.delta", 0.0 < cfg.privacy.delta < 1.0, "must be in (0, 1)"),
        ("privacy.max_grad_norm", cfg.privacy.max_grad_norm > 0, "must be > 0"),
        ("privacy.clipping_norm", cfg.privacy.clipping_norm > 0, "must be > 0"),
        # Flower's site-level DP noise is sigma*C/n: right only for an unweighted mean of all n
        # clipped updates, which plain fedavg (privacy=dp_fedavg makes it unweighted) computes.
        (
            "strategy.name",
            cfg.privacy.name != "dp_fedavg" or cfg.strategy.name == "fedavg",
            "must be fedavg with privacy=dp_fedavg (its noise is calibrated for an unweighted mean "
            "over every sampled site)",
        ),
        # Ray hides every GPU from an actor that reserves none (CUDA_VISIBLE_DEVICES is set empty)
        (
            "engine.gpus_per_site",
            not (cfg.engine.name == "ray" and cfg.engine.device.startswith("cuda") and cfg.engine.gpus_per_site == 0),
            f"must be > 0 with engine=ray and engine.device={cfg.engine.device}: Ray shows a site no GPU "
            "unless it reserves a share of one (0.25: four sites per GPU)",
        ),
        ("engine.torch_threads", cfg.engine.torch_threads >= 0, "must be >= 0"),
        ("engine.checkpoint_every", cfg.engine.checkpoint_every >= 0, "must be >= 0 (0 = off)"),
        ("engine.round_timeout_s", cfg.engine.round_timeout_s >= 0, "must be >= 0 (0 = wait for all)"),
        ("engine.expected_sites", cfg.engine.expected_sites >= 0, "must be >= 0"),
        ("engine.handshake_timeout_s", cfg.engine.handshake_timeout_s > 0, "must be > 0"),
        ("engine.ray_cpus", cfg.engine.ray_cpus >= 0, "must be >= 0 (0 = all of this machine's)"),
        ("engine.cpus_per_site", cfg.engine.cpus_per_site > 0, "must be > 0 (Ray needs a share of a CPU per site)"),
        ("engine.gpus_per_site", cfg.engine.gpus_per_site >= 0, "must be >= 0 (0.25: four sites share a GPU)"),
        (
            "engine.ray_cpus",
            not (cfg.engine.ray_cpus and cfg.engine.ray_address),
            "cannot be set with engine.ray_address: a running cluster has the CPUs its nodes gave it",
        ),
        *site_local_checks(cfg),
        (
            "preprocess.statistics",
            not (cfg.preprocess.statistics == "pooled" and cfg.sites.planner == "site_local"),
            "pooled needs every row in one place (simulation); site-local runs use federated or per_site",
        ),
        ("preprocess.min_count", cfg.preprocess.min_count >= 1, "must be >= 1"),
        (
            "preprocess.epsilon",
            math.isfinite(cfg.preprocess.epsilon) and cfg.preprocess.epsilon >= 0,
            "must be finite and >= 0 (0: no noise)",
        ),
        (
            "preprocess.epsilon",
            not (cfg.preprocess.epsilon > 0 and cfg.preprocess.statistics != "federated"),
            "noise is for statistics that leave a site: set preprocess.statistics=federated",
        ),
        ("ood.adapt_steps", cfg.ood.adapt_steps >= 1, "must be >= 1"),
        ("ood.adapt_lr", math.isfinite(cfg.ood.adapt_lr) and cfg.ood.adapt_lr > 0, "must be finite and > 0"),
        ("ood.adapt_batch_size", cfg.ood.adapt_batch_size >= 1, "must be >= 1"),
        *secure_aggregation_checks(cfg),
        ("attack.factor", cfg.attack.factor >= 0, "must be >= 0"),
        ("faults.stall_s", cfg.faults.stall_s >= 0, "must be >= 0"),
        # exit kills the process the site runs in: in-process, that is the whole run
        (
            "faults.kind",
            cfg.faults.kind != "exit" or cfg.engine.name != "inprocess",
            "exit needs an engine with one process per site (engine=ray); use crash in-process",
        ),
        # what the chosen strategy needs of other sections (e.g. SCAFFOLD: plain SGD)
        *cfg.strategy.settings.experiment_checks(cfg),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"{key} {why} (got {_get(cfg, key)!r})")


def declared_values_checks(cfg: ExperimentConfig) -> list[tuple[str, bool, str]]:
    """Each section's settings that declare their values (values.one_of): in them, or refused with
    the declared list. The strategy section checks its own on construction (StrategyConfig)."""
    return [
        (f"{f.name}.{key}", ok, why)
        for f in dataclasses.fields(cfg)
        if dataclasses.is_dataclass(section := getattr(cfg, f.name)) and f.name != "strategy"
        for key, ok, why in allowed_checks(section)
    ]


def precision_privacy_checks(cfg: ExperimentConfig) -> list[tuple[str, bool, str]]:
    """Mixed precision with sample-level DP: only where the clipping bound still holds exactly."""
    if cfg.privacy.name != "dp_sgd":
        return []
    return [
        (
            "train.precision",
            cfg.train.precision != "fp16",
            "cannot be fp16 with privacy=dp_sgd: fp16 needs loss scaling, which multiplies every per-sample "
            "gradient before Opacus clips it (the clipping bound would apply to scaled gradients), and a step "
            "the scaler skips on overflow would still be charged to the privacy accountant; use bf16 or fp32",
        ),
        (
            "train.precision",
            cfg.train.precision != "bf16" or cfg.privacy.grad_sample_mode != "ew",
            "cannot be bf16 with privacy.grad_sample_mode=ew: PyTorch's ExpandedWeights computes per-sample "
            "gradients in the weights' dtype and fails on autocast's bf16 activations; use "
            "privacy.grad_sample_mode=hooks or functorch (their per-sample gradients are clipped in fp32)",
        ),
    ]


def secure_aggregation_checks(cfg: ExperimentConfig) -> list[tuple[str, bool, str]]:
    """SecAgg+'s own ranges (Flower's rules) and what it cannot compose with. Which strategies can
    aggregate masked sums is the strategies' to say (each class's SECURE, strategies/secure_support.py)."""
    sa = cfg.secure_aggregation
    if sa.name == "none":
        return []
    return [
        ("secure_aggregation.clipping_range", sa.clipping_range > 0, "must be > 0"),
        (
            "secure_aggregation.quantization_range",
            0 <= sa.quantization_range < 2**31,
            "must be 0 (the finest the field allows) or in [1, 2**31) (Flower's stochastic rounding casts to int32)",
        ),
        (
            "secure_aggregation.min_sites_per_group",
            sa.min_sites_per_group >= 2,
            "must be >= 2: the sum of one site's update is that update",
        ),
        (
            "secure_aggregation.modulus_range",
            sa.modulus_range > sa.quantization_range and sa.modulus_range & (sa.modulus_range - 1) == 0,
            "must be a power of 2 above secure_aggregation.quantization_range",
        ),
        (
            "secure_aggregation.modulus_range",
            sa.modulus_range <= 2**32,
            "must be <= 2**32 (masked sums are int64: a sum of sites' vectors must not overflow)",
        ),
        (
            "secure_aggregation.num_shares",
            0 < sa.num_shares <= 1 or (sa.num_shares > 2 and float(sa.num_shares).is_integer()),
            "must be a fraction in (0, 1] of the round's sites or a whole number > 2",
        ),
        *reconstruction_threshold_checks(sa),
        (
            "strategy.max_update_norm_ratio",
            # the default is not applied there (the run's log says so); a ratio the user chose is refused
            cfg.strategy.max_update_norm_ratio in (0, StrategyConfig.max_update_norm_ratio),
            "cannot be set with secure_aggregation=secaggplus: it compares each update with the round's median, "
            f"which the server never sees (the default, {StrategyConfig.max_update_norm_ratio:g}, is not applied "
            "there); strategy.max_update_norm is checked by each site on its own",
        ),
        # Updates of individual sites are what attacks and faults act on; the server cannot see them
        (
            "attack.kind",
            cfg.attack.kind in ("none", "inflate_handshake"),
            "cannot be simulated with secure_aggregation=secaggplus except inflate_handshake: the server "
            "sees only the sum of masked updates, so no update could be screened (run attacks without it)",
        ),
    ]


def reconstruction_threshold_checks(sa: SecureAggregationConfig) -> list[tuple[str, bool, str]]:
    """The shares that recover a site's secrets must be more than half of its shares: Flower's mod
    answers whatever unmask lists it is sent, so with half or fewer a server could ask some
    neighbours for a site's mask-seed shares and the others for its key shares, recover both, and
    unmask that site's update alone. A fraction (1 = every share, Flower's reading) or a count."""
    t, shares = sa.reconstruction_threshold, sa.num_shares
    why = (
        "must be more than half of the shares (a fraction in (0.5, 1], or a count above num_shares / 2): with "
        "half or fewer, a server could ask some of a site's neighbours for its mask-seed shares and the others "
        "for its key shares, recover both and unmask that site's update alone"
    )
    if t <= 1:
        return [("secure_aggregation.reconstruction_threshold", 0.5 < t <= 1, why)]
    key = "secure_aggregation.reconstruction_threshold"
    return [
        (key, float(t).is_integer(), "must be a fraction in (0.5, 1] of num_shares or a whole number of shares"),
        (
            key,
            shares > 1,
            "as a whole number needs a whole-number secure_aggregation.num_shares: with a fraction, the round's "
            "share count is known only at run time, and a fixed count could be half of it or fewer; use a "
            "fraction in (0.5, 1]",
        ),
        (key, shares <= 1 or t > shares / 2, why),
        (key, shares <= 1 or t < shares, "must be less than num_shares (Flower's rule: one site may drop)"),
    ]


# Planner steps that change what a site holds: a simulation can, a hospital's data is what it is.
SIMULATION_ONLY = {
    "sites.label_skew_alpha": "skews labels by dropping a site's rows",
    "sites.label_skew_classes": "drops a site's classes",
    "sites.quantity_skew_sigma": "resizes sites",
    "sites.label_noise_rate": "corrupts labels",
    "sites.missing_site_rate": "hides a site's modalities",
    "sites.missing_sample_rate": "hides samples' modalities",
    "sites.load_shift_severity": "adds a simulated scanner shift",
    "sites.pooled": "pools every site's rows in one place",
    "sites.unimodal": "drops modalities a site holds",
}


def simulation_only_settings(cfg: ExperimentConfig) -> list[str]:
    """The SIMULATION_ONLY settings this config turns on."""
    return [key for key in SIMULATION_ONLY if _get(cfg, key)]


def site_local_checks(cfg: ExperimentConfig) -> list[tuple[str, bool, str]]:
    """sites.planner=site_local: each site is its own corpus, so the steps that reshape a site's
    data in simulation are refused by name, with what they would do."""
    if cfg.sites.planner != "site_local":
        return []
    return [
        (key, not _get(cfg, key), f"is simulation-only ({why}); with sites.planner=site_local a site is its own data")
        for key, why in SIMULATION_ONLY.items()
    ]


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg
