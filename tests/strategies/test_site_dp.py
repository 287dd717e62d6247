"""Site-level DP's wrapper (strategies/site_dp.py): what it forwards, and the check it leaves to the config."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from federated.core.config import ConfigError, config_from_yaml, config_to_yaml, load_config
from strategies.fedavg import FedAvg
from strategies.round_strategy import RoundStrategy
from strategies.site_dp import SiteLevelDP, build_private_strategy

DP = ["privacy=dp_fedavg", "privacy.noise_multiplier=1.0"]


def test_the_config_refuses_site_level_dp_with_any_strategy_but_fedavg_however_it_is_read():
    """build_private_strategy no longer repeats this check: every way a config is built refuses it."""
    with pytest.raises(ConfigError, match=r"strategy.name.*must be fedavg with privacy=dp_fedavg"):
        load_config([*DP, "strategy=modality_fedavg"])
    text = OmegaConf.create(config_to_yaml(load_config([*DP, "strategy=fedavg"])))
    text.strategy.name = "modality_fedavg"  # the same settings class as fedavg's: only the name differs
    with pytest.raises(ConfigError, match=r"strategy.name.*must be fedavg with privacy=dp_fedavg"):
        config_from_yaml(OmegaConf.to_yaml(text))


def test_the_wrapper_forwards_exactly_what_the_round_loop_reads():
    private = build_private_strategy(load_config([*DP, "strategy=fedavg"]), 3)
    assert isinstance(private, SiteLevelDP) and isinstance(private.strategy, FedAvg)
    private.know_sites({1: "a", 2: "b", 3: "c"}, {1: 10, 2: 10, 3: 10_000}, {1: (["ct"], ["disease_classification"])})
    inner = private.strategy
    assert private.declared_examples == inner.declared_examples == {1: 10, 2: 10, 3: 10_000}
    assert private.allowed_groups == inner.allowed_groups and 1 in private.allowed_groups
    assert private.handshake_problems == inner.handshake_problems and 3 in private.handshake_problems
    assert private.SECURE == FedAvg.SECURE and private.cfg.weighting == "uniform"  # the inner's, made uniform
    assert private.last_rejections is inner.last_rejections and private.last_update_norms is inner.last_update_norms
    # every member of the interface is the wrapper's own, none reached through a fallback
    members = [m for m in vars(RoundStrategy) if not m.startswith("_")]
    assert members and all(m in vars(SiteLevelDP) or hasattr(SiteLevelDP, m) for m in members)
    with pytest.raises(AttributeError):
        private.site_names  # noqa: B018  (the inner's, outside the interface: no longer forwarded)
