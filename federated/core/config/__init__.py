"""Typed experiment configuration: the schema dataclasses (schema.py), conf/ + key=value merged into
them (merge.py, strategy_section.py), their checks (checks.py), YAML out and back (serialisation.py),
and every key documented (keys.py)."""

from federated.core.config.merge import load_config
from federated.core.config.schema import (
    ConfigError,
    CorpusConfig,
    EngineConfig,
    ExperimentConfig,
    ModelConfig,
    PrivacyConfig,
    SitesConfig,
    StrategyConfig,
    TrainConfig,
)
from federated.core.config.serialisation import config_from_yaml, config_to_yaml

__all__ = [
    "ConfigError",
    "CorpusConfig",
    "EngineConfig",
    "ExperimentConfig",
    "ModelConfig",
    "PrivacyConfig",
    "SitesConfig",
    "StrategyConfig",
    "TrainConfig",
    "config_from_yaml",
    "config_to_yaml",
    "load_config",
]
