"""Build an ExperimentConfig from conf/ and `key=value` overrides.

    group=name         select conf/<group>/<name>.yaml for that section (or, for `scale`,
                       a preset merged over the whole config)
    section.field=v    set one field (values parse as YAML: 3, 0.1, true, [a, b])
    field=v            set a top-level field (seed, rounds)

Order: schema defaults < conf/config.yaml < selected group files < scale preset < field
overrides. OmegaConf does the typed merge; this module turns its errors into messages that
name the key and list the valid choices.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from federated.core.config.schema import ExperimentConfig

ATTACK_KINDS = ("none", "sign_flip", "scale", "nan", "inflate_count")
HOLDOUT_MODES = ("listed", "named", "random", "archetype")  # partitions/holdout.py
PRIVACY_MODES = ("none", "dp_sgd", "dp_fedavg")
FAULT_KINDS = ("none", "crash", "stall", "exit")
SECTION_GROUPS = ("corpus", "sites", "model", "strategy", "privacy", "engine")
PRESET_GROUP = "scale"
GROUPS = (*SECTION_GROUPS, PRESET_GROUP)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


def conf_dir() -> Path:
    """conf/ at the repository root (the package is installed editable), or $MULTIMED_FL_CONF."""
    env = os.environ.get("MULTIMED_FL_CONF")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "conf"


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
    return data


def _valid_keys(node: Any) -> list[str]:
    if dataclasses.is_dataclass(node):
        return [f.name for f in dataclasses.fields(node)]
    return []


def _keys_at(path: str) -> list[str]:
    """The valid keys of the section that holds dotted `path` (for error messages)."""
    node: Any = ExperimentConfig
    for part in path.split(".")[:-1]:
        if not dataclasses.is_dataclass(node):
            return []
        hints = typing.get_type_hints(node)
        if part not in hints:
            return []
        node = hints[part]
    return _valid_keys(node)


def _merge(base: DictConfig, other: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except ConfigKeyError as e:
        key = e.full_key or "?"
        valid = _keys_at(key)
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
        if key in GROUPS:
            groups[key] = value.strip()
        else:
            fields.append(f"{key}={value}")
    return groups, fields


def _schema() -> DictConfig:
    cfg = OmegaConf.structured(ExperimentConfig)
    OmegaConf.set_readonly(cfg, False)
    return cfg


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

    cfg = _schema()
    for group in SECTION_GROUPS:
        if group in selected:
            body = _group_file(root, group, selected[group])
            body["name"] = selected[group]
            cfg = _merge(cfg, {group: body}, f"conf/{group}/{selected[group]}.yaml")
    cfg = _merge(cfg, top, "conf/config.yaml")
    scale = selected.get(PRESET_GROUP)
    if scale:
        cfg = _merge(cfg, _group_file(root, PRESET_GROUP, scale), f"conf/scale/{scale}.yaml")
        cfg.scale = scale
    if cli_fields:
        try:
            dotlist = OmegaConf.from_dotlist(cli_fields)
        except OmegaConfBaseException as e:
            raise ConfigError(f"cannot parse overrides {cli_fields}: {e}") from None
        cfg = _merge(cfg, dotlist, "command line")
    result = OmegaConf.to_object(cfg)
    assert isinstance(result, ExperimentConfig)
    validate(result)
    return result


def _group_file(root: Path, group: str, name: str) -> dict[str, Any]:
    path = root / group / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(group_choices(group, root)) or "(none)"
        raise ConfigError(f"unknown {group} {name!r}; choices: {choices}")
    body = OmegaConf.to_container(_read_yaml(path))
    assert isinstance(body, dict)
    return body


def validate(cfg: ExperimentConfig) -> None:
    """Range checks the type system cannot express; each names its key."""
    checks = [
        ("rounds", cfg.rounds >= 1, "must be >= 1"),
        ("corpus.samples_per_task_site", cfg.corpus.samples_per_task_site >= 5, "must be >= 5"),
        ("corpus.n_origin_sites", cfg.corpus.n_origin_sites >= 1, "must be >= 1"),
        ("corpus.test_fraction", 0.0 < cfg.corpus.test_fraction < 1.0, "must be in (0, 1)"),
        ("corpus.shift_severity", cfg.corpus.shift_severity >= 0.0, "must be >= 0"),
        ("model.dim", cfg.model.dim >= 4 and cfg.model.dim % cfg.model.heads == 0,
         "must be >= 4 and divisible by model.heads"),
        ("model.tokens_per_modality", cfg.model.tokens_per_modality >= 1, "must be >= 1"),
        ("model.fusion_layers", cfg.model.fusion_layers >= 0, "must be >= 0"),
        ("model.dropout", 0.0 <= cfg.model.dropout < 1.0, "must be in [0, 1)"),
        ("model.missing", cfg.model.missing in ("mask", "zeros"), "must be one of: mask, zeros"),
        ("train.local_epochs", cfg.train.local_epochs >= 1, "must be >= 1"),
        ("train.batch_size", cfg.train.batch_size >= 1, "must be >= 1"),
        ("train.lr", cfg.train.lr > 0, "must be > 0"),
        ("train.optimizer", cfg.train.optimizer in ("adam", "sgd"), "must be one of: adam, sgd"),
        ("train.max_steps_per_round", cfg.train.max_steps_per_round >= 0, "must be >= 0"),
        ("strategy.fraction_train", 0.0 < cfg.strategy.fraction_train <= 1.0, "must be in (0, 1]"),
        ("strategy.weighting", cfg.strategy.weighting in ("examples", "uniform"),
         "must be one of: examples, uniform"),
        ("strategy.min_train_sites", cfg.strategy.min_train_sites >= 1, "must be >= 1"),
        ("strategy.min_valid_replies", cfg.strategy.min_valid_replies >= 1, "must be >= 1"),
        ("strategy.on_too_few_valid", cfg.strategy.on_too_few_valid in ("fail", "skip"),
         "must be one of: fail, skip"),
        ("strategy.max_examples_factor", cfg.strategy.max_examples_factor >= 1.0, "must be >= 1"),
        ("strategy.proximal_mu", cfg.strategy.proximal_mu >= 0.0, "must be >= 0"),
        ("strategy.server_lr", cfg.strategy.server_lr > 0.0, "must be > 0"),
        ("strategy.beta1", 0.0 <= cfg.strategy.beta1 < 1.0, "must be in [0, 1)"),
        ("strategy.beta2", 0.0 <= cfg.strategy.beta2 < 1.0, "must be in [0, 1)"),
        ("strategy.tau", cfg.strategy.tau > 0.0, "must be > 0"),
        ("strategy.global_lr", cfg.strategy.global_lr > 0.0, "must be > 0"),
        ("strategy.trim_fraction", 0.0 <= cfg.strategy.trim_fraction < 0.5, "must be in [0, 0.5)"),
        ("strategy.n_byzantine", cfg.strategy.n_byzantine >= 0, "must be >= 0"),
        ("strategy.krum_selected", cfg.strategy.krum_selected >= 1, "must be >= 1"),
        ("sites.train", len(cfg.sites.train) >= 1, "needs at least one training site"),
        ("sites.label_skew_alpha", cfg.sites.label_skew_alpha >= 0, "must be > 0 (or 0 for no skew)"),
        ("sites.quantity_skew_sigma", cfg.sites.quantity_skew_sigma >= 0, "must be > 0 (or 0 for none)"),
        ("sites.min_samples", cfg.sites.min_samples >= 1, "must be >= 1"),
        ("sites.missing_site_rate", 0.0 <= cfg.sites.missing_site_rate <= 1.0, "must be in [0, 1]"),
        ("sites.label_noise_rate", 0.0 <= cfg.sites.label_noise_rate <= 1.0, "must be in [0, 1]"),
        ("sites.missing_sample_rate", 0.0 <= cfg.sites.missing_sample_rate <= 1.0, "must be in [0, 1]"),
        ("sites.label_skew_classes", cfg.sites.label_skew_classes >= 0, "must be >= 1 (or 0 for none)"),
        ("sites.shift_severity", cfg.sites.shift_severity >= 0.0, "must be >= 0"),
        ("sites.holdout", cfg.sites.holdout in HOLDOUT_MODES, f"must be one of: {', '.join(HOLDOUT_MODES)}"),
        ("sites.holdout_k", cfg.sites.holdout_k >= 0, "must be >= 0"),
        ("sites.min_site_size", cfg.sites.min_site_size >= 1, "must be >= 1"),
        ("sites.n_sites", cfg.sites.n_sites >= 2, "must be >= 2"),
        ("sites.tasks_per_site", cfg.sites.tasks_per_site >= 1, "must be >= 1"),
        ("sites.min_overlap", cfg.sites.min_overlap >= 1, "must be >= 1"),
        ("privacy.name", cfg.privacy.name in PRIVACY_MODES, f"must be one of: {', '.join(PRIVACY_MODES)}"),
        ("privacy.target_epsilon", cfg.privacy.name == "none" or cfg.privacy.target_epsilon is not None
         or cfg.privacy.noise_multiplier is not None,
         "or privacy.noise_multiplier must be set with differential privacy on"),
        ("privacy.target_epsilon", cfg.privacy.target_epsilon is None or cfg.privacy.target_epsilon > 0,
         "must be > 0"),
        ("privacy.noise_multiplier", cfg.privacy.noise_multiplier is None or cfg.privacy.noise_multiplier >= 0,
         "must be >= 0"),
        ("privacy.delta", 0.0 < cfg.privacy.delta < 1.0, "must be in (0, 1)"),
        ("privacy.max_grad_norm", cfg.privacy.max_grad_norm > 0, "must be > 0"),
        ("privacy.clipping_norm", cfg.privacy.clipping_norm > 0, "must be > 0"),
        ("privacy.accountant", cfg.privacy.accountant in ("rdp", "prv"), "must be one of: rdp, prv"),
        ("privacy.grad_sample_mode", cfg.privacy.grad_sample_mode in ("ew", "hooks", "functorch"),
         "must be one of: ew, hooks, functorch"),
        # Flower's site-level DP noise is sigma*C/n: right only for an unweighted mean of all n
        # clipped updates, which plain fedavg (privacy=dp_fedavg makes it unweighted) computes.
        ("strategy.name", cfg.privacy.name != "dp_fedavg" or cfg.strategy.name == "fedavg",
         "must be fedavg with privacy=dp_fedavg (its noise is calibrated for an unweighted mean "
         "over every sampled site)"),
        ("engine.torch_threads", cfg.engine.torch_threads >= 0, "must be >= 0"),
        ("engine.checkpoint_every", cfg.engine.checkpoint_every >= 0, "must be >= 0 (0 = off)"),
        ("engine.round_timeout_s", cfg.engine.round_timeout_s >= 0, "must be >= 0 (0 = wait for all)"),
        ("engine.expected_sites", cfg.engine.expected_sites >= 0, "must be >= 0"),
        ("engine.handshake_timeout_s", cfg.engine.handshake_timeout_s > 0, "must be > 0"),
        ("attack.kind", cfg.attack.kind in ATTACK_KINDS, f"must be one of: {', '.join(ATTACK_KINDS)}"),
        ("attack.factor", cfg.attack.factor >= 0, "must be >= 0"),
        ("faults.kind", cfg.faults.kind in FAULT_KINDS, f"must be one of: {', '.join(FAULT_KINDS)}"),
        ("faults.stall_s", cfg.faults.stall_s >= 0, "must be >= 0"),
        # exit kills the process the site runs in: in-process, that is the whole run
        ("faults.kind", cfg.faults.kind != "exit" or cfg.engine.name != "inprocess",
         "exit needs an engine with one process per site (engine=ray); use crash in-process"),
        ("train.optimizer", cfg.strategy.name != "scaffold" or cfg.train.optimizer == "sgd",
         "must be sgd with strategy=scaffold (its control variates assume SGD steps)"),
        # Measured: SCAFFOLD with momentum 0.9 diverged to NaN by round 7-11 on every seed.
        ("train.momentum", cfg.strategy.name != "scaffold" or cfg.train.momentum == 0.0,
         "must be 0 with strategy=scaffold (its control variates assume plain SGD steps)"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"{key} {why} (got {_get(cfg, key)!r})")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_yaml(text: str) -> ExperimentConfig:
    """Rebuild a config from `config_to_yaml` output (how it travels to ClientApps)."""
    cfg = _merge(_schema(), OmegaConf.create(text), "serialised config")
    result = OmegaConf.to_object(cfg)
    assert isinstance(result, ExperimentConfig)
    validate(result)
    return result
