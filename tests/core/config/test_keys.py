"""Every config key documented from one source each (keys.py), and allowed values declared once (values.py)."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from clients.attacks import DEFAULT_FACTORS
from federated.core.config import ConfigError, load_config
from federated.core.config.keys import KeyDoc, config_keys, field_comment
from federated.core.config.schema import (
    STRATEGY_SETTINGS,
    AttackConfig,
    ExperimentConfig,
    StrategyConfig,
    StrategySettings,
    TrainConfig,
)
from federated.core.config.values import allowed_values, one_of


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint) and not issubclass(hint, StrategySettings):
            keys += _leaf_keys(hint, f"{prefix}{f.name}.")
        elif f.name != "settings":
            keys.append(f"{prefix}{f.name}")
    return keys


def test_every_key_of_the_schema_and_of_every_strategy_is_documented():
    docs = config_keys()
    common = [d.key for d in docs if not d.strategy]
    assert common == _leaf_keys(ExperimentConfig)
    for name, cls in STRATEGY_SETTINGS.items():
        own = [d.key for d in docs if d.strategy == name]
        assert own == [f"strategy.{f.name}" for f in dataclasses.fields(cls)], name


def test_a_key_doc_reads_type_default_allowed_values_and_the_comment():
    docs = {(d.key, d.strategy): d for d in config_keys()}
    assert docs["train.optimizer", ""] == KeyDoc(
        "train.optimizer", "str", "adam", ("adam", "sgd"), "the sites' optimiser"
    )
    epsilon = docs["privacy.target_epsilon", ""]
    assert (epsilon.type, epsilon.default, epsilon.allowed) == ("float | None", "null", None)
    assert epsilon.meaning.startswith("Target epsilon over the planned rounds")  # the comment above the field
    assert docs["train.momentum", ""].meaning == "SGD's momentum (train.optimizer=sgd only)"  # the comment beside it
    assert docs["sites.held_out", ""].default == "[eye_clinic, neuro_clinic]"
    assert docs["corpus.cache_dir", ""].default == "''"
    # a subclass that only changes a default keeps its base class's comment
    assert docs["strategy.local_norms", "fedbn"].default == "true"
    assert docs["strategy.local_norms", "fedbn"].meaning == docs["strategy.local_norms", "fedper"].meaning != ""


def test_every_key_has_a_meaning():
    """The configuration reference shows each key's meaning: a field added without a comment fails here."""
    import strategies  # noqa: F401  (registers every strategy's settings)

    docs = config_keys()
    assert any(d.key == "strategy.server_lr" and d.strategy == "fedadam" for d in docs)
    assert [(d.key, d.strategy) for d in docs if not d.meaning.strip()] == []


def test_the_attack_kinds_are_those_the_sites_implement():
    """schema.py once listed 5 attack kinds where the loader accepted 8: one declaration now."""
    assert set(allowed_values(AttackConfig, "kind") or ()) == {"none", *DEFAULT_FACTORS}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.optimizer=rmsprop", r"^train.optimizer must be one of: adam, sgd \(got 'rmsprop'\)$"),
        ("attack.kind=meteor", r"attack.kind must be one of: none, sign_flip, scale, nan, inflate_count, "),
        ("engine.device=cuda:x", r"^engine.device must be one of: auto, cpu, cuda, cuda:N, mps \(got 'cuda:x'\)$"),
        ("strategy.weighting=size", r"^strategy.weighting=size: must be one of: examples, uniform$"),
    ],
)
def test_a_value_outside_the_declared_ones_is_refused_with_them(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([override])


def test_every_declared_value_is_accepted():
    for f in dataclasses.fields(TrainConfig):
        for value in f.metadata.get("allowed", ()):
            assert getattr(load_config([f"train.{f.name}={value}"]).train, f.name) == value
    assert load_config(["engine.device=cuda:3"]).engine.device == "cuda:3"  # a form the pattern admits


def test_a_strategy_setting_declared_with_one_of_is_checked_by_the_config():
    @dataclasses.dataclass(frozen=True)
    class Settings(StrategySettings):
        mode: str = one_of("a", "b")  # the first is the default

    assert StrategyConfig(settings=Settings()).settings_as(Settings).mode == "a"
    with pytest.raises(ConfigError, match=r"^strategy.mode=c: must be one of: a, b$"):
        StrategyConfig(settings=Settings(mode="c"))
    assert [d for d in config_keys({"mine": Settings}) if d.strategy] == [
        KeyDoc("strategy.mode", "str", "a", ("a", "b"), "the first is the default", "mine")
    ]
    assert field_comment(Settings, "mode") == "the first is the default"
