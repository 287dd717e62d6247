import dataclasses

import pytest

from federated.core.config import ConfigError, ExperimentConfig, config_from_yaml, config_to_yaml, load_config
from federated.core.config.schema import StrategyConfig
from federated.core.config.strategy_section import strategy_config
from strategies import STRATEGIES
from strategies.fedprox import FedProxSettings
from strategies.robust import KrumSettings, TrimmedMeanSettings


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


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["colour=red"], r"unknown key 'colour'; valid keys here: seed, rounds"),
        (["strategy.mu=0.1"], r"unknown key .strategy.mu.; valid keys here: name, fraction_train"),
        (["strategy.on_too_few_valid=retry"], r"strategy.on_too_few_valid=retry: must be one of: fail, skip"),
        (["strategy.fraction_train=0"], r"strategy.fraction_train=0.0: must be in \(0, 1\]"),
        (
            ["strategy=trimmed_mean", "strategy.trim_fraction=0.6"],
            r"^strategy.trim_fraction=0.6: must be in \[0, 0.5\)$",
        ),
        (["strategy=fedprox", "strategy.proximal_mu=lots"], r"command line: wrong value for 'strategy.proximal_mu'"),
        (
            ["strategy=fedavg", "strategy.name=fedprox"],
            r"strategy.name=fedprox: choose a strategy with strategy=fedprox",
        ),
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
    ],
)
def test_bad_overrides_name_the_key(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides)


def test_yaml_round_trip_is_exact():
    cfg = load_config(["scale=smoke", "seed=7"])
    assert config_from_yaml(config_to_yaml(cfg)) == cfg


def test_bad_group_file_is_reported(tmp_path):
    (tmp_path / "strategy").mkdir()
    (tmp_path / "config.yaml").write_text("defaults:\n  strategy: fedavg\n")
    (tmp_path / "strategy" / "fedavg.yaml").write_text("fraction_train: lots\n")
    with pytest.raises(ConfigError, match=r"conf/strategy/fedavg.yaml: wrong value for 'strategy.fraction_train'"):
        load_config(root=tmp_path)


def test_a_setting_the_strategy_does_not_read_is_refused_by_name(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"^command line: strategy.proximal_mu is not a setting of strategy 'fedavg' "
        r"\(its settings: fraction_train, weighting, .*max_examples_factor[^)]*\); "
        r"proximal_mu is read by: fedprox$",
    ):
        load_config(["strategy=fedavg", "strategy.proximal_mu=0.1"])
    with pytest.raises(
        ConfigError,
        match=r"strategy.trim_fraction is not a setting of strategy 'krum' "
        r"\(its settings: .*groupwise, .*n_byzantine, krum_selected\)",
    ):
        load_config(["strategy=krum", "strategy.trim_fraction=0.25"])
    (tmp_path / "strategy").mkdir()
    (tmp_path / "config.yaml").write_text("defaults:\n  strategy: median\n")
    (tmp_path / "strategy" / "median.yaml").write_text("groupwise: true\nglobal_lr: 2.0\n")
    with pytest.raises(
        ConfigError,
        match=r"conf/strategy/median.yaml: strategy.global_lr is not a setting of "
        r"strategy 'median'.*read by: scaffold",
    ):
        load_config(root=tmp_path)
    text = config_to_yaml(load_config(["strategy=fedavg"])).replace("  name: fedavg\n", "  name: fedavg\n  tau: 0.1\n")
    with pytest.raises(ConfigError, match=r"serialised config: strategy.tau is not a setting of strategy 'fedavg'"):
        config_from_yaml(text)


def test_a_conf_file_without_a_registered_strategy_is_reported(tmp_path):
    (tmp_path / "strategy").mkdir()
    (tmp_path / "config.yaml").write_text("defaults:\n  strategy: fedfoo\n")
    (tmp_path / "strategy" / "fedfoo.yaml").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"strategy 'fedfoo' is not registered \(registered: fedavg"):
        load_config(root=tmp_path)


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_strategy_round_trips_with_typed_settings(name):
    sgd = ["train.optimizer=sgd", "train.momentum=0"] if name in ("scaffold", "fedrex", "qffl") else []
    cfg = load_config([f"strategy={name}", "scale=smoke", *sgd])
    assert cfg.strategy.name == name and type(cfg.strategy.settings) is STRATEGIES.get(name).settings
    text = config_to_yaml(cfg)
    assert config_from_yaml(text) == cfg
    assert "settings" not in text  # the section stays flat, as conf/ and the command line spell it


def test_settings_are_typed_and_reachable():
    cfg = load_config(["strategy=fedprox", "strategy.proximal_mu=0.1", "strategy.fraction_train=0.5"])
    assert cfg.strategy.fraction_train == 0.5 and cfg.strategy.settings_as(FedProxSettings).proximal_mu == 0.1
    krum = load_config(["strategy=krum", "strategy.krum_selected=6"]).strategy
    assert krum.settings_as(KrumSettings).krum_selected == 6
    with pytest.raises(TypeError, match="carries FedProxSettings, not the KrumSettings it reads"):
        cfg.strategy.settings_as(KrumSettings)


def test_common_strategy_settings_are_checked_on_construction():
    with pytest.raises(ConfigError, match=r"^strategy.min_valid_replies=0: must be >= 1$"):
        StrategyConfig(min_valid_replies=0)
    with pytest.raises(ConfigError, match=r"^strategy.weighting=by_size: must be one of: examples, uniform$"):
        StrategyConfig(weighting="by_size")


def test_strategy_config_splits_a_flat_section():
    cfg = strategy_config("trimmed_mean", {"min_train_sites": 3, "trim_fraction": 0.1})
    assert cfg.min_train_sites == 3 and cfg.settings == TrimmedMeanSettings(trim_fraction=0.1)
    with pytest.raises(ConfigError, match=r"strategy.krum_selected is not a setting of strategy 'trimmed_mean'"):
        strategy_config("trimmed_mean", {"krum_selected": 2})


def test_a_config_whose_settings_do_not_match_its_strategy_is_not_written():
    cfg = load_config(["strategy=fedprox"])
    wrong = dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy, settings=KrumSettings()))
    with pytest.raises(
        ConfigError, match="strategy 'fedprox' carries KrumSettings settings, not its registered FedProxSettings"
    ):
        config_to_yaml(wrong)
