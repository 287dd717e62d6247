"""The strategy section, flat in conf/ and on the command line, two things inside.

`strategy.fraction_train` and `strategy.proximal_mu` are both keys of one section, but the first is
the common StrategyConfig's and the second the settings class the chosen strategy registered
(federated.core.config.schema.STRATEGY_SETTINGS, filled by the strategies package). OmegaConf merges
into a schema whose strategy section holds exactly the chosen strategy's keys, so another strategy's
setting is refused by name, at the layer that set it; `build` then splits the section into
StrategyConfig(settings=...).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any

from omegaconf import DictConfig, OmegaConf

from federated.core.config.schema import (
    STRATEGY_SETTINGS,
    ConfigError,
    ExperimentConfig,
    StrategyConfig,
    StrategySettings,
)

# The strategy keys every strategy reads, beside its own settings.
COMMON_STRATEGY_KEYS = tuple(f.name for f in dataclasses.fields(StrategyConfig) if f.name != "settings")


def strategy_settings_class(name: str) -> type[StrategySettings]:
    """The settings class strategy `name` registered (ConfigError if it registered none)."""
    if name not in STRATEGY_SETTINGS:
        registered = ", ".join(STRATEGY_SETTINGS.names()) or "none; importing the strategies package registers them"
        raise ConfigError(f"strategy {name!r} is not registered (registered: {registered})")
    return STRATEGY_SETTINGS.get(name)


def _own_keys(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(strategy_settings_class(name))]


def readers(key: str) -> list[str]:
    """The registered strategies that have a setting called `key`."""
    return [name for name in STRATEGY_SETTINGS if key in _own_keys(name)]


def not_a_setting(strategy: str, key: str) -> str:
    """Why strategy.`key` is refused for `strategy`: its settings, and who reads `key` instead."""
    who = readers(key)
    settable = [k for k in (*COMMON_STRATEGY_KEYS, *_own_keys(strategy)) if k != "name"]
    text = f"strategy.{key} is not a setting of strategy {strategy!r} (its settings: {', '.join(settable)})"
    return text + (f"; {key} is read by: {', '.join(who)}" if who else "")


def _copy_field(f: dataclasses.Field[Any], default: Any = dataclasses.MISSING) -> Any:
    """A field spec for make_dataclass with f's default (or `default`)."""
    if default is not dataclasses.MISSING:
        return dataclasses.field(default=default)
    if f.default is not dataclasses.MISSING:
        return dataclasses.field(default=f.default)
    return dataclasses.field(default_factory=f.default_factory)


@cache
def strategy_section(name: str) -> type:
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
def experiment_schema(strategy: str) -> type:
    """ExperimentConfig as OmegaConf merges it: its strategy section typed for `strategy`."""
    hints = typing.get_type_hints(ExperimentConfig)
    section = strategy_section(strategy)
    specs = [
        (f.name, section, dataclasses.field(default_factory=section))
        if f.name == "strategy"
        else (f.name, hints[f.name], _copy_field(f))
        for f in dataclasses.fields(ExperimentConfig)
    ]
    return dataclasses.make_dataclass("ExperimentSchema", specs)


def schema_node(strategy: str) -> DictConfig:
    """A writable OmegaConf node of experiment_schema(strategy), holding its defaults."""
    cfg = OmegaConf.structured(experiment_schema(strategy))
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
            raise ConfigError(not_a_setting(name, key))
    if common.setdefault("name", name) != name:
        raise ConfigError(
            f"strategy.name={common['name']}: choose a strategy with strategy={common['name']}, "
            "which also reads its conf/strategy file"
        )
    return StrategyConfig(**common, settings=settings_cls(**settings))


def build(cfg: DictConfig, strategy: str) -> ExperimentConfig:
    """The merged config as an ExperimentConfig, its flat strategy section split in two."""
    merged: Any = OmegaConf.to_object(cfg)  # an instance of experiment_schema(strategy)
    section = merged.strategy
    sections = {f.name: getattr(merged, f.name) for f in dataclasses.fields(ExperimentConfig)}
    sections["strategy"] = strategy_config(
        strategy, {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    )
    return ExperimentConfig(**sections)


def flat_section(cfg: ExperimentConfig) -> Any:
    """cfg's strategy section as strategy_section(name) types it (the flat form conf/ spells)."""
    name = cfg.strategy.name
    settings_cls = strategy_settings_class(name)
    if type(cfg.strategy.settings) is not settings_cls:
        raise ConfigError(
            f"strategy {name!r} carries {type(cfg.strategy.settings).__name__} settings, "
            f"not its registered {settings_cls.__name__}"
        )
    flat = {k: getattr(cfg.strategy, k) for k in COMMON_STRATEGY_KEYS}
    flat.update({f.name: getattr(cfg.strategy.settings, f.name) for f in dataclasses.fields(settings_cls)})
    return strategy_section(name)(**flat)
