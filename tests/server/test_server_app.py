"""The Flower ServerApp object (what `flwr run` starts) runs the same federation over any Grid."""

import json

from flwr.app import Context, RecordDict

from clients.client_app import app as client_app
from federated.core.config import config_to_yaml, load_config
from federated.engines.inprocess import InProcessGrid
from federated.server.server_app import app as server_app


def test_server_app_runs_a_federation_and_writes_outputs(smoke_corpus, tmp_path):
    cfg = load_config(["scale=smoke", "rounds=1"])
    run_config = {
        "multimed-config": config_to_yaml(cfg),
        "corpus-path": str(smoke_corpus),
        "out-dir": str(tmp_path / "out"),
    }
    grid = InProcessGrid(client_app, [{"partition-id": i} for i in range(10)], run_config)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and len(summary["per_site"]) == 10
    assert (tmp_path / "out" / "metrics.parquet").is_file()


def test_a_site_named_in_node_config(smoke_corpus):
    """Deployment: a SuperNode names its site instead of a partition id."""
    from clients.site_runtime import SiteConfigError, site_runtime

    cfg = load_config(["scale=smoke"])
    run_config = {"multimed-config": config_to_yaml(cfg), "corpus-path": str(smoke_corpus)}
    own = {"corpus-path": str(smoke_corpus)}  # deployment: the site's own data, from its node config
    assert site_runtime(run_config, {"site": "site_03", **own}).plan.archetype == "genomics_lab"
    try:
        site_runtime(run_config, {"site": "site_99", **own})
    except SiteConfigError as e:
        assert "site_99" in str(e) and "site_00" in str(e)
    else:
        raise AssertionError("an unknown site must be refused")
