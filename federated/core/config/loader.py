"""Build an ExperimentConfig from conf/ and `key=value` overrides.

    group=name         select conf/<group>/<name>.yaml for that section (or, for `scale`,
                       a preset merged over the whole config)
    section.field=v    set one field (values parse as YAML: 3, 0.1, true, [a, b])
    field=v            set a top-level field (seed, rounds)

Order: schema defaults < conf/config.yaml < selected group files < scale preset < field
overrides. OmegaConf does the typed merge; this module turns its errors into messages that
name the key and list the valid choices.

The strategy section is flat in conf/ and on the command line (strategy.fraction_train,
strategy.proximal_mu) but two things inside: the common StrategyConfig and the settings class the
chosen strategy registered (federated.core.config.schema.STRATEGY_SETTINGS, filled by the
strategies package). OmegaConf merges into a schema whose strategy section holds exactly the
chosen strategy's keys, so another strategy's setting is refused by name, at the layer that set
it; the loader then splits the section into StrategyConfig(settings=...).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from federated.core.config.schema import (
    DEFAULT_STRATEGY,
    DEVICE_CHOICES,
    OOD_ADAPT_METHODS,
    PRECISION_NAMES,
    SECURE_AGGREGATION_MODES,
    STRATEGY_SETTINGS,
    ConfigError,
    ExperimentConfig,
    SecureAggregationConfig,
    StrategyConfig,
    StrategySettings,
    valid_device_spec,
)
from federated.core.literal import MARK, interpolation_at, interpolation_in, refusal
from federated.core.resources import shipped_dir

ATTACK_KINDS = ("none", "sign_flip", "scale", "nan", "inflate_count", "inflate_handshake", "undeclared_group", "huge")
HOLDOUT_MODES = ("listed", "named", "random", "archetype")  # partitions/holdout.py
PRIVACY_MODES = ("none", "dp_sgd", "dp_fedavg")
FAULT_KINDS = ("none", "crash", "stall", "exit")
SECTION_GROUPS = ("corpus", "sites", "model", "strategy", "privacy", "engine", "secure_aggregation")
PRESET_GROUP = "scale"
GROUPS = (*SECTION_GROUPS, PRESET_GROUP)
# The strategy keys every strategy reads, beside its own settings.
COMMON_STRATEGY_KEYS = tuple(f.name for f in dataclasses.fields(StrategyConfig) if f.name != "settings")


def conf_dir() -> Path:
    """$MULTIMED_FL_CONF, else the conf/ that shipped with the package (a clone's conf/ when the
    install is editable): see federated/core/resources.py."""
    env = os.environ.get("MULTIMED_FL_CONF")
    return Path(env) if env else shipped_dir("_conf")


PREPROCESS_STATISTICS = ("federated", "per_site", "pooled")


def group_choices(group: str, root: Path | None = None) -> list[str]:
    folder = (root or conf_dir()) / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _read_yaml(path: Path) -> DictConfig:
    try:
        data = OmegaConf.load(path)
    except OmegaConfBaseException as e:  # pragma: no cover - parse errors are rare
        raise ConfigError(f"{path}: {e}") from None
    except Exception as e:  # yaml.YAMLError and friends
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"{path} must hold a mapping of keys to values")
    key = interpolation_in(OmegaConf.to_container(data, resolve=False))
    if key is not None:  # $MULTIMED_FL_CONF may point at a user's own conf/
        raise ConfigError(f"{path}: {refusal(key)}")
    return data


def _valid_keys(node: Any) -> list[str]:
    if dataclasses.is_dataclass(node):
        return [f.name for f in dataclasses.fields(node)]
    return []


def _keys_at(path: str, schema: type) -> list[str]:
    """The valid keys of the section that holds dotted `path` (for error messages)."""
    node: Any = schema
    for part in path.split(".")[:-1]:
        if not dataclasses.is_dataclass(node):
            return []
        hints = typing.get_type_hints(node)
        if part not in hints:
            return []
        node = hints[part]
    return _valid_keys(node)


def _merge(base: DictConfig, other: Any, where: str, strategy: str) -> DictConfig:
    """base <- other; OmegaConf's errors become ConfigErrors that say where and name the key."""
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]  # merging two DictConfigs gives one
    except ConfigKeyError as e:
        key = e.full_key or "?"
        section, _, setting = key.partition(".")
        if section == "strategy" and _readers(setting):
            raise ConfigError(f"{where}: {_not_a_setting(strategy, setting)}") from None
        valid = _keys_at(key, _experiment_schema(strategy))
        hint = f"; valid keys here: {', '.join(valid)}" if valid else ""
        raise ConfigError(f"{where}: unknown key {key!r}{hint}") from None
    except ValidationError as e:
        reason = str(e.msg).splitlines()[0]
        raise ConfigError(f"{where}: wrong value for {e.full_key!r}: {reason}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {getattr(e, 'full_key', '')} {e}") from None


def _parse_overrides(overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    groups: dict[str, str] = {}
    fields: list[str] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        if MARK in item:  # checked before OmegaConf sees it: `${oc.env:HOME}` would read the environment
            raise ConfigError(f"command line: {refusal(key)}")
        if key in GROUPS:
            groups[key] = value.strip()
        else:
            fields.append(f"{key}={value}")
    return groups, fields


def strategy_settings_class(name: str) -> type[StrategySettings]:
    """The settings class strategy `name` registered (ConfigError if it registered none)."""
    if name not in STRATEGY_SETTINGS:
        registered = ", ".join(STRATEGY_SETTINGS.names()) or "none; importing the strategies package registers them"
        raise ConfigError(f"strategy {name!r} is not registered (registered: {registered})")
    return STRATEGY_SETTINGS.get(name)


def _own_keys(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(strategy_settings_class(name))]


def _readers(key: str) -> list[str]:
    """The registered strategies that have a setting called `key`."""
    return [name for name in STRATEGY_SETTINGS if key in _own_keys(name)]


def _not_a_setting(strategy: str, key: str) -> str:
    readers = _readers(key)
    settable = [k for k in (*COMMON_STRATEGY_KEYS, *_own_keys(strategy)) if k != "name"]
    text = f"strategy.{key} is not a setting of strategy {strategy!r} (its settings: {', '.join(settable)})"
    return text + (f"; {key} is read by: {', '.join(readers)}" if readers else "")


def _copy_field(f: dataclasses.Field[Any], default: Any = dataclasses.MISSING) -> Any:
    """A field spec for make_dataclass with f's default (or `default`)."""
    if default is not dataclasses.MISSING:
        return dataclasses.field(default=default)
    if f.default is not dataclasses.MISSING:
        return dataclasses.field(default=f.default)
    return dataclasses.field(default_factory=f.default_factory)


@cache
def _strategy_section(name: str) -> type:
    """The strategy section as OmegaConf types it for strategy `name`: the common keys, then its own."""
    settings_cls = strategy_settings_class(name)
    specs: list[tuple[str, Any, Any]] = []
    for cls in (StrategyConfig, settings_cls):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if cls is StrategyConfig and f.name == "settings":
                continue
            default = name if cls is StrategyConfig and f.name == "name" else dataclasses.MISSING
            specs.append((f.name, hints[f.name], _copy_field(f, default)))
    return dataclasses.make_dataclass(f"{name}_section", specs)


@cache
def _experiment_schema(strategy: str) -> type:
    """ExperimentConfig as OmegaConf merges it: its strategy section typed for `strategy`."""
    hints = typing.get_type_hints(ExperimentConfig)
    section = _strategy_section(strategy)
    specs = [
        (f.name, section, dataclasses.field(default_factory=section))
        if f.name == "strategy"
        else (f.name, hints[f.name], _copy_field(f))
        for f in dataclasses.fields(ExperimentConfig)
    ]
    return dataclasses.make_dataclass("ExperimentSchema", specs)


def _schema(strategy: str) -> DictConfig:
    cfg = OmegaConf.structured(_experiment_schema(strategy))
    OmegaConf.set_readonly(cfg, False)
    return cfg


def strategy_config(name: str, values: Mapping[str, Any]) -> StrategyConfig:
    """A StrategyConfig from a flat strategy section (keys as conf/ spells them): the common keys
    go to StrategyConfig, the rest to the strategy's settings class; a key it does not read is
    refused by name. Both dataclasses check their values on construction."""
    settings_cls = strategy_settings_class(name)
    own = set(_own_keys(name))
    common: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    for key, value in values.items():
        if key in COMMON_STRATEGY_KEYS:
            common[key] = value
        elif key in own:
            settings[key] = value
        else:
            raise ConfigError(_not_a_setting(name, key))
    if common.setdefault("name", name) != name:
        raise ConfigError(
            f"strategy.name={common['name']}: choose a strategy with strategy={common['name']}, "
            "which also reads its conf/strategy file"
        )
    return StrategyConfig(**common, settings=settings_cls(**settings))


def _build(cfg: DictConfig, strategy: str) -> ExperimentConfig:
    """The merged config as an ExperimentConfig, its flat strategy section split in two."""
    merged: Any = OmegaConf.to_object(cfg)  # an instance of _experiment_schema(strategy)
    section = merged.strategy
    sections = {f.name: getattr(merged, f.name) for f in dataclasses.fields(ExperimentConfig)}
    sections["strategy"] = strategy_config(
        strategy, {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    )
    return ExperimentConfig(**sections)


def load_config(overrides: list[str] | tuple[str, ...] = (), root: Path | None = None) -> ExperimentConfig:
    """Resolve conf/ plus overrides into a validated ExperimentConfig."""
    root = root or conf_dir()
    if not (root / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in {root} (set MULTIMED_FL_CONF to the conf/ folder)")
    top = OmegaConf.to_container(_read_yaml(root / "config.yaml"))
    assert isinstance(top, dict)
    selected: dict[str, str] = dict(top.pop("defaults", {}) or {})
    cli_groups, cli_fields = _parse_overrides(list(overrides))
    selected.update(cli_groups)

    bodies: dict[str, dict[str, Any]] = {}
    for group in SECTION_GROUPS:
        if group in selected:
            bodies[group] = _group_file(root, group, selected[group])
            bodies[group]["name"] = selected[group]
    strategy = selected.get("strategy", DEFAULT_STRATEGY)
    cfg = _schema(strategy)
    for group, body in bodies.items():
        cfg = _merge(cfg, {group: body}, f"conf/{group}/{selected[group]}.yaml", strategy)
    cfg = _merge(cfg, top, "conf/config.yaml", strategy)
    scale = selected.get(PRESET_GROUP)
    if scale:
        cfg = _merge(cfg, _group_file(root, PRESET_GROUP, scale), f"conf/scale/{scale}.yaml", strategy)
        cfg.scale = scale
    if cli_fields:
        try:
            dotlist = OmegaConf.from_dotlist(cli_fields)
        except OmegaConfBaseException as e:
            raise ConfigError(f"cannot parse overrides {cli_fields}: {e}") from None
        cfg = _merge(cfg, dotlist, "command line", strategy)
    result = _build(cfg, strategy)
    validate(result)
    return result


def _group_file(root: Path, group: str, name: str) -> dict[str, Any]:
    """conf/<group>/<name>.yaml, where `name` must be one of the names of the files there: a name
    is never a path (`scale=../scale/smoke`, `corpus=ingest/real_mini` are refused)."""
    choices = group_choices(group, root)
    if name not in choices:
        raise ConfigError(f"unknown {group} {name!r}; choices: {', '.join(choices) or '(none)'}")
    path = root / group / f"{name}.yaml"
    body = OmegaConf.to_container(_read_yaml(path))
    assert isinstance(body, dict)
    return {str(k): v for k, v in body.items()}


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
        ("model.missing", cfg.model.missing in ("mask", "zeros"), "must be one of: mask, zeros"),
        ("train.local_epochs", cfg.train.local_epochs >= 1, "must be >= 1"),
        ("train.batch_size", cfg.train.batch_size >= 1, "must be >= 1"),
        ("train.lr", cfg.train.lr > 0, "must be > 0"),
        ("train.optimizer", cfg.train.optimizer in ("adam", "sgd"), "must be one of: adam, sgd"),
        ("train.momentum", 0.0 <= cfg.train.momentum < 1.0, "must be in [0, 1)"),
        ("train.weight_decay", cfg.train.weight_decay >= 0.0, "must be >= 0"),
        ("train.max_steps_per_round", cfg.train.max_steps_per_round >= 0, "must be >= 0"),
        ("train.precision", cfg.train.precision in PRECISION_NAMES, f"must be one of: {', '.join(PRECISION_NAMES)}"),
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
        ("sites.holdout", cfg.sites.holdout in HOLDOUT_MODES, f"must be one of: {', '.join(HOLDOUT_MODES)}"),
        ("sites.holdout_k", cfg.sites.holdout_k >= 0, "must be >= 0"),
        ("sites.min_site_size", cfg.sites.min_site_size >= 1, "must be >= 1"),
        ("sites.n_sites", cfg.sites.n_sites >= 2, "must be >= 2"),
        ("sites.tasks_per_site", cfg.sites.tasks_per_site >= 1, "must be >= 1"),
        ("sites.min_overlap", cfg.sites.min_overlap >= 1, "must be >= 1"),
        ("privacy.name", cfg.privacy.name in PRIVACY_MODES, f"must be one of: {', '.join(PRIVACY_MODES)}"),
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
        ("privacy.accountant", cfg.privacy.accountant in ("rdp", "prv"), "must be one of: rdp, prv"),
        (
            "privacy.grad_sample_mode",
            cfg.privacy.grad_sample_mode in ("ew", "hooks", "functorch"),
            "must be one of: ew, hooks, functorch",
        ),
        # Flower's site-level DP noise is sigma*C/n: right only for an unweighted mean of all n
        # clipped updates, which plain fedavg (privacy=dp_fedavg makes it unweighted) computes.
        (
            "strategy.name",
            cfg.privacy.name != "dp_fedavg" or cfg.strategy.name == "fedavg",
            "must be fedavg with privacy=dp_fedavg (its noise is calibrated for an unweighted mean "
            "over every sampled site)",
        ),
        ("engine.device", valid_device_spec(cfg.engine.device), f"must be one of: {DEVICE_CHOICES}"),
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
        (
            "engine.on_incompatible_site",
            cfg.engine.on_incompatible_site in ("fail", "exclude"),
            "must be one of: fail, exclude",
        ),
        *site_local_checks(cfg),
        (
            "preprocess.statistics",
            cfg.preprocess.statistics in PREPROCESS_STATISTICS,
            f"must be one of: {', '.join(PREPROCESS_STATISTICS)}",
        ),
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
        ("ood.adapt", cfg.ood.adapt in OOD_ADAPT_METHODS, f"must be one of: {', '.join(OOD_ADAPT_METHODS)}"),
        ("ood.adapt_steps", cfg.ood.adapt_steps >= 1, "must be >= 1"),
        ("ood.adapt_lr", math.isfinite(cfg.ood.adapt_lr) and cfg.ood.adapt_lr > 0, "must be finite and > 0"),
        ("ood.adapt_batch_size", cfg.ood.adapt_batch_size >= 1, "must be >= 1"),
        *secure_aggregation_checks(cfg),
        ("attack.kind", cfg.attack.kind in ATTACK_KINDS, f"must be one of: {', '.join(ATTACK_KINDS)}"),
        ("attack.factor", cfg.attack.factor >= 0, "must be >= 0"),
        ("faults.kind", cfg.faults.kind in FAULT_KINDS, f"must be one of: {', '.join(FAULT_KINDS)}"),
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
    aggregate masked sums is the strategies' to say (strategies/secure_sums.py)."""
    sa = cfg.secure_aggregation
    checks = [
        (
            "secure_aggregation.name",
            sa.name in SECURE_AGGREGATION_MODES,
            f"must be one of: {', '.join(SECURE_AGGREGATION_MODES)}",
        ),
    ]
    if sa.name == "none":
        return checks
    return [
        *checks,
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


def config_to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML, its strategy section flat as conf/ spells it (what a run writes
    to config.yaml and sends to its sites; config_from_yaml reads it back)."""
    name = cfg.strategy.name
    settings_cls = strategy_settings_class(name)
    if type(cfg.strategy.settings) is not settings_cls:
        raise ConfigError(
            f"strategy {name!r} carries {type(cfg.strategy.settings).__name__} settings, "
            f"not its registered {settings_cls.__name__}"
        )
    flat = {k: getattr(cfg.strategy, k) for k in COMMON_STRATEGY_KEYS}
    flat.update({f.name: getattr(cfg.strategy.settings, f.name) for f in dataclasses.fields(settings_cls)})
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ExperimentConfig)}
    sections["strategy"] = _strategy_section(name)(**flat)
    return OmegaConf.to_yaml(OmegaConf.structured(_experiment_schema(name)(**sections)))


def config_from_yaml(text: str) -> ExperimentConfig:
    """Rebuild a config from `config_to_yaml` output (how it travels to ClientApps, and how a run
    folder's config is read back). No resolver or interpolation runs: a `${...}` is refused."""
    import yaml

    try:
        data = OmegaConf.create(text)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"a serialised config is not valid YAML: {e}") from None
    if not isinstance(data, DictConfig):
        raise ConfigError("a serialised config must be a mapping of sections")
    found = interpolation_at(OmegaConf.to_container(data, resolve=False))
    if found is not None:  # e.g. `${oc.env:VAR}`, which would read the reader's environment
        raise ConfigError(
            f"{found[0]}: interpolation {found[1]!r} is not allowed in a serialised config "
            "(configs that travel or are read back from a run folder are taken literally; nothing is resolved)"
        )
    strategy = str(OmegaConf.select(data, "strategy.name", default=DEFAULT_STRATEGY))
    cfg = _merge(_schema(strategy), data, "serialised config", strategy)
    result = _build(cfg, strategy)
    validate(result)
    return result
