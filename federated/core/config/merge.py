"""Build an ExperimentConfig from conf/ and `key=value` overrides.

    group=name         select conf/<group>/<name>.yaml for that section (or, for `scale`,
                       a preset merged over the whole config)
    section.field=v    set one field (values parse as YAML: 3, 0.1, true, [a, b])
    field=v            set a top-level field (seed, rounds)

Order: schema defaults < conf/config.yaml < selected group files < scale preset < field
overrides. OmegaConf does the typed merge (its strategy section typed for the chosen strategy:
strategy_section.py); this module turns its errors into messages that name the key and list the
valid choices, and hands the result to the checks (checks.py).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from federated.core.config.checks import validate
from federated.core.config.schema import DEFAULT_STRATEGY, ConfigError, ExperimentConfig
from federated.core.config.strategy_section import build, experiment_schema, not_a_setting, readers, schema_node
from federated.core.literal import MARK, interpolation_in, refusal
from federated.core.resources import shipped_dir

SECTION_GROUPS = ("corpus", "sites", "model", "strategy", "privacy", "engine", "secure_aggregation")
PRESET_GROUP = "scale"
GROUPS = (*SECTION_GROUPS, PRESET_GROUP)


def conf_dir() -> Path:
    """$MULTIMED_FL_CONF, else the conf/ that shipped with the package (a clone's conf/ when the
    install is editable): see federated/core/resources.py."""
    env = os.environ.get("MULTIMED_FL_CONF")
    return Path(env) if env else shipped_dir("_conf")


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
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def merge_into(base: DictConfig, other: Any, where: str, strategy: str) -> DictConfig:
    """base <- other; OmegaConf's errors become ConfigErrors that say where and name the key."""
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]  # merging two DictConfigs gives one
    except ConfigKeyError as e:
        key = e.full_key or "?"
        section, _, setting = key.partition(".")
        if section == "strategy" and readers(setting):
            raise ConfigError(f"{where}: {not_a_setting(strategy, setting)}") from None
        valid = _keys_at(key, experiment_schema(strategy))
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
    cfg = schema_node(strategy)
    for group, body in bodies.items():
        cfg = merge_into(cfg, {group: body}, f"conf/{group}/{selected[group]}.yaml", strategy)
    cfg = merge_into(cfg, top, "conf/config.yaml", strategy)
    scale = selected.get(PRESET_GROUP)
    if scale:
        cfg = merge_into(cfg, _group_file(root, PRESET_GROUP, scale), f"conf/scale/{scale}.yaml", strategy)
        cfg.scale = scale
    if cli_fields:
        try:
            dotlist = OmegaConf.from_dotlist(cli_fields)
        except OmegaConfBaseException as e:
            raise ConfigError(f"cannot parse overrides {cli_fields}: {e}") from None
        cfg = merge_into(cfg, dotlist, "command line", strategy)
    result = build(cfg, strategy)
    validate(result)
    return result
