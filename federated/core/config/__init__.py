"""Typed experiment configuration: schema dataclasses and the conf/ + key=value loader."""

from federated.core.config.loader import ConfigError, config_from_yaml, config_to_yaml, load_config
from federated.core.config.schema import (
    CorpusConfig,
    EngineConfig,
    ExperimentConfig,
    ModelConfig,
    PrivacyConfig,
    SitesConfig,
    StrategyConfig,
    TrainConfig,
)

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
