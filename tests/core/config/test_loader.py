import dataclasses

import pytest

from federated.core.config import ConfigError, ExperimentConfig, config_from_yaml, config_to_yaml, load_config


def test_defaults_load_into_typed_frozen_dataclasses():
    cfg = load_config()
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.strategy.name == "modality_fedavg" and cfg.engine.name == "inprocess" and cfg.scale == "default"
    assert len(cfg.sites.train) == 8 and len(cfg.sites.held_out) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rounds = 3  # frozen


def test_scale_smoke_and_field_overrides():
    cfg = load_config(["scale=smoke"])
    assert cfg.rounds == 2 and cfg.corpus.samples_per_task_site == 20 and cfg.scale == "smoke"
    cfg = load_config(["scale=smoke", "rounds=3", "train.lr=0.01", "sites.held_out=[eye_clinic]"])
    assert cfg.rounds == 3 and cfg.train.lr == 0.01 and cfg.sites.held_out == ["eye_clinic"]


def test_group_selection_sets_the_name():
    assert load_config(["strategy=fedavg"]).strategy.name == "fedavg"


@pytest.mark.parametrize("overrides, pattern", [
    (["colour=red"], r"unknown key 'colour'; valid keys here: seed, rounds"),
    (["strategy.mu=0.1"], r"unknown key .strategy.mu.; valid keys here: name, fraction_train"),
    (["strategy.on_too_few_valid=retry"], r"strategy.on_too_few_valid must be one of: fail, skip"),
    (["rounds=many"], r"wrong value for 'rounds'"),
    (["train.lr=fast"], r"wrong value for 'train.lr'"),
    (["strategy=fedfoo"], r"unknown strategy .fedfoo.; choices: fedadagrad, fedadam, fedavg"),
    (["strategy=scaffold"], r"train.optimizer must be sgd with strategy=scaffold"),
    (["strategy=scaffold", "train.optimizer=sgd"], r"train.momentum must be 0 with strategy=scaffold"),
    (["attack.kind=meteor"], r"attack.kind must be one of: none, sign_flip"),
    (["scale=huge"], r"unknown scale 'huge'; choices: default, smoke"),
    (["rounds=0"], r"rounds must be >= 1"),
    (["train.optimizer=rmsprop"], r"train.optimizer must be one of: adam, sgd"),
    (["rounds"], r"not of the form key=value"),
])
def test_bad_overrides_name_the_key(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides)


def test_yaml_round_trip_is_exact():
    cfg = load_config(["scale=smoke", "seed=7"])
    assert config_from_yaml(config_to_yaml(cfg)) == cfg


def test_bad_group_file_is_reported(tmp_path):
    (tmp_path / "strategy").mkdir()
    (tmp_path / "config.yaml").write_text("defaults:\n  strategy: broken\n")
    (tmp_path / "strategy" / "broken.yaml").write_text("fraction_train: lots\n")
    with pytest.raises(ConfigError, match=r"conf/strategy/broken.yaml: wrong value for 'strategy.fraction_train'"):
        load_config(root=tmp_path)
