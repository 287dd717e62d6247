"""engine=ray's resources and cluster address, as they reach ray.init and Flower (no Ray started:
the run against a Ray head is in test_ray_engine.py, slow)."""

from __future__ import annotations

import pytest

from federated.core.config import ConfigError, load_config
from federated.engines.ray_engine import ray_init_args


def test_a_ray_started_here_is_sized_and_a_running_cluster_is_joined_as_it_is(monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    here = ray_init_args(load_config(["engine=ray", "engine.ray_cpus=3"]))
    assert here["num_cpus"] == 3 and here["address"] == "local"  # never a cluster `ray start` left behind
    joined = ray_init_args(load_config(["engine=ray", "engine.ray_address=10.0.0.7:6379"]))
    assert joined["address"] == "10.0.0.7:6379" and "num_cpus" not in joined and "num_gpus" not in joined
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # ray.init reads it too: num_cpus would then be refused
    assert "num_cpus" not in ray_init_args(load_config(["engine=ray"]))
    assert ray_init_args(load_config(["engine=ray"]))["address"] == "auto"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["engine.cpus_per_site=0"], "engine.cpus_per_site"),
        (["engine.gpus_per_site=-0.5"], "engine.gpus_per_site"),
        (["engine.ray_cpus=-1"], "engine.ray_cpus"),
        (["engine.ray_cpus=4", "engine.ray_address=auto"], "cannot be set with engine.ray_address"),
    ],
)
def test_impossible_ray_resources_are_refused_by_key(override, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(["engine=ray", *override])


def test_fractional_gpus_per_site_reach_flower_s_client_resources(monkeypatch) -> None:
    from federated.engines import ray_engine

    seen = {}

    def fake_run_simulation(server_app, client_app, num_supernodes, backend_name, backend_config) -> None:
        seen.update(backend_config["client_resources"])

    monkeypatch.setattr("flwr.simulation.run_simulation", fake_run_simulation)
    cfg = load_config(["engine=ray", "engine.gpus_per_site=0.25", "engine.cpus_per_site=2"])
    with pytest.raises(RuntimeError, match="without a result"):
        ray_engine.run_ray(cfg, ".", 3, [])
    assert seen["num_gpus"] == 0.25 and seen["num_cpus"] == 2
