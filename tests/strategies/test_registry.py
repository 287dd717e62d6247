"""The strategy registry: conf files and registered strategies agree; each settings class checks itself."""

from __future__ import annotations

import dataclasses
import math

import pytest
from omegaconf import OmegaConf

from federated.core.config import ConfigError, load_config
from federated.core.config.merge import conf_dir, group_choices
from federated.core.config.schema import STRATEGY_SETTINGS, StrategyConfig, StrategySettings
from federated.core.config.strategy_section import COMMON_STRATEGY_KEYS
from strategies import STRATEGIES, MultiMedStrategy, build_strategy, register_strategy
from strategies.fedopt import FedOptSettings
from strategies.fedprox import FedProxSettings
from strategies.personalisation import PersonalSettings
from strategies.robust import KrumSettings, TrimmedMeanSettings
from strategies.scaffold import ScaffoldSettings


def test_every_conf_file_names_a_registered_strategy_and_every_strategy_has_one():
    assert sorted(STRATEGIES.names()) == group_choices("strategy")
    assert sorted(STRATEGY_SETTINGS.names()) == sorted(STRATEGIES.names())


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_each_conf_file_sets_only_what_its_strategy_reads(name):
    body = OmegaConf.to_container(OmegaConf.load(conf_dir() / "strategy" / f"{name}.yaml"))
    assert isinstance(body, dict)
    own = {f.name for f in dataclasses.fields(STRATEGIES.get(name).settings)}
    assert set(body) <= own | set(COMMON_STRATEGY_KEYS), sorted(set(body) - own - set(COMMON_STRATEGY_KEYS))


def _default(field: dataclasses.Field) -> object:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _same(value: object, default: object) -> bool:
    """YAML's value equals the dataclass default: lists as tuples, and a bool or a str only as one."""
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(default, list):
        default = tuple(default)
    if isinstance(default, (bool, str)) or isinstance(value, (bool, str)):
        return type(value) is type(default) and value == default
    return value == default


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_each_conf_value_is_its_dataclass_default(name):
    """A default is written twice (the conf file a user reads, the dataclass Python callers get):
    every value in conf/strategy/<name>.yaml must be the field's default, common keys included."""
    body = OmegaConf.to_container(OmegaConf.load(conf_dir() / "strategy" / f"{name}.yaml"))
    assert isinstance(body, dict)
    fields = {
        f.name: f for f in (*dataclasses.fields(StrategyConfig), *dataclasses.fields(STRATEGIES.get(name).settings))
    }
    differ = {k: (v, _default(fields[k])) for k, v in body.items() if not _same(v, _default(fields[k]))}
    assert not differ, f"conf/strategy/{name}.yaml: key -> (conf value, dataclass default): {differ}"


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_the_loaded_settings_are_the_dataclass_defaults(name):
    """What `strategy=<name>` loads (conf/config.yaml and the strategy's file merged) is the settings
    class's default instance and StrategyConfig's default common keys."""
    sgd = ["train.optimizer=sgd", "train.momentum=0"]  # what scaffold, qffl and fedrex require
    loaded = load_config([f"strategy={name}", *sgd]).strategy
    assert loaded.settings == STRATEGIES.get(name).settings()
    assert dataclasses.replace(loaded, settings=StrategySettings()) == StrategyConfig(name=name)


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_each_strategy_builds_from_its_default_settings(name):
    spec = STRATEGIES.get(name)
    strategy = build_strategy(StrategyConfig(name=name, settings=spec.settings()), n_train_sites=5)  # Krum f=1: 2f + 3
    assert isinstance(strategy, MultiMedStrategy)


@pytest.mark.parametrize(
    "cls, values, pattern",
    [
        (FedProxSettings, {"proximal_mu": -0.1}, r"^strategy.proximal_mu=-0.1: must be finite and >= 0$"),
        (FedProxSettings, {"proximal_mu": math.inf}, r"^strategy.proximal_mu=inf: must be finite and >= 0$"),
        (FedOptSettings, {"server_lr": 0.0}, r"^strategy.server_lr=0.0: must be finite and > 0$"),
        (FedOptSettings, {"server_lr": math.nan}, r"^strategy.server_lr=nan: must be finite and > 0$"),
        (FedOptSettings, {"beta1": 1.0}, r"^strategy.beta1=1.0: must be in \[0, 1\)$"),
        (FedOptSettings, {"beta2": -0.5}, r"^strategy.beta2=-0.5: must be in \[0, 1\)$"),
        (FedOptSettings, {"tau": math.inf}, r"^strategy.tau=inf: must be finite and > 0$"),
        (TrimmedMeanSettings, {"trim_fraction": 0.6}, r"^strategy.trim_fraction=0.6: must be in \[0, 0.5\)$"),
        (TrimmedMeanSettings, {"trim_fraction": math.nan}, r"^strategy.trim_fraction=nan: must be in \[0, 0.5\)$"),
        (KrumSettings, {"n_byzantine": -1}, r"^strategy.n_byzantine=-1: must be >= 0$"),
        (KrumSettings, {"krum_selected": 0}, r"^strategy.krum_selected=0: must be >= 1$"),
        (ScaffoldSettings, {"global_lr": -1.0}, r"^strategy.global_lr=-1.0: must be finite and > 0$"),
        (
            PersonalSettings,
            {"local_groups": ["head/", ""]},
            r"^strategy.local_groups=\['head/', ''\]: must be non-empty",
        ),
    ],
)
def test_settings_refuse_bad_values_naming_the_key(cls, values, pattern):
    with pytest.raises(ConfigError, match=pattern):
        cls(**values)


def test_register_refuses_settings_that_shadow_a_common_key():
    @dataclasses.dataclass(frozen=True)
    class Shadowing(StrategySettings):
        fraction_train: float = 0.5

    with pytest.raises(ValueError, match=r"settings \['fraction_train'\] clash with StrategyConfig's own keys"):
        register_strategy("shadowing", Shadowing)
    assert "shadowing" not in STRATEGIES and "shadowing" not in STRATEGY_SETTINGS


def test_a_strategy_refuses_settings_of_another():
    with pytest.raises(TypeError, match="strategy 'fedprox' reads FedProxSettings, got KrumSettings"):
        build_strategy(StrategyConfig(name="fedprox", settings=KrumSettings()), n_train_sites=3)
