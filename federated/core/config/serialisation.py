"""A resolved config to YAML and back: what a run writes to config.yaml and sends to its sites.

Nothing is resolved on the way back: a `${...}` (which would read the reader's environment, e.g.
`${oc.env:VAR}`) is refused, and the config read back is checked as one loaded from conf/ is.
"""

from __future__ import annotations

import dataclasses

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from federated.core.config.checks import validate
from federated.core.config.merge import merge_into
from federated.core.config.schema import DEFAULT_STRATEGY, ConfigError, ExperimentConfig
from federated.core.config.strategy_section import build, experiment_schema, flat_section, schema_node
from federated.core.literal import interpolation_at


def config_to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML, its strategy section flat as conf/ spells it (config_from_yaml
    reads it back)."""
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ExperimentConfig)}
    sections["strategy"] = flat_section(cfg)
    return OmegaConf.to_yaml(OmegaConf.structured(experiment_schema(cfg.strategy.name)(**sections)))


def config_from_yaml(text: str) -> ExperimentConfig:
    """Rebuild a config from `config_to_yaml` output (how it travels to ClientApps, and how a run
    folder's config is read back). No resolver or interpolation runs: a `${...}` is refused."""
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
    result = build(merge_into(schema_node(strategy), data, "serialised config", strategy), strategy)
    validate(result)
    return result
