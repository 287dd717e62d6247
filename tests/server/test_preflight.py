"""Every refusal of federated/server/preflight.py, reached by every way a run comes in.

`multimed-fl run`, the Python API and studies go through federated/app/runner.py; `flwr run .` and
`deploy submit` through the ServerApp (driven here over the in-process grid, as `flwr run` calls it).
Each refusal comes before a round trains: before_run's before anything is written into the run
folder, after_handshake's right after the sites answered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from clients.client_app import app as client_app
from federated.app import api, runner
from federated.app.runner import run_experiment
from federated.app.studies.runner import run_one
from federated.core.config import ConfigError, ExperimentConfig, config_to_yaml, load_config
from federated.core.protocol import CONFIG_KEY, CORPUS_KEY, OUT_DIR_KEY
from federated.core.state_key import KEY_ENV, StateKeyError, load_key
from federated.data.format import Corpus
from federated.engines.inprocess import InProcessGrid
from federated.server import preflight, server_app
from federated.server.site_agreement import FederationError
from partitions import plan_sites

N_SITES = 10  # scale=smoke's plan: site_00..site_07 train, site_08 and site_09 are held out

# (id, overrides, error, message): each refusal before_run makes
BEFORE_RUN = [
    ("device", ["engine.device=mps"], ConfigError, r"engine.device=mps: this machine has no Apple MPS device"),
    (
        "secure_aggregation",
        ["secure_aggregation=secaggplus", "strategy=krum"],
        ConfigError,
        r"secure_aggregation=secaggplus cannot run strategy=krum",
    ),
    ("model_name", ["model.name=vit"], ConfigError, r"model.name: unknown"),
    ("model_memory", ["model.dim=65536", "model.heads=1"], ConfigError, r"model.dim=65536: the model needs about"),
    ("init_weights", ["model.init_weights=/nonexistent/w.npz"], ConfigError, r"/nonexistent/w.npz"),
    (
        "attack_sites",
        ["attack.kind=sign_flip", "attack.sites=[site_08]"],
        ConfigError,
        r"attack.sites names sites that are not training sites in this run's plan: site_08",
    ),
    (
        "fault_sites",
        ["faults.kind=crash", "faults.sites=[site_42]"],
        ConfigError,
        r"faults.sites names sites that are not training sites in this run's plan: site_42",
    ),
    (
        "n_byzantine",
        ["strategy=krum", "strategy.n_byzantine=8"],
        ConfigError,
        r"strategy.n_byzantine=8: assumes at least as many Byzantine sites as this plan has training sites \(8\)",
    ),
    (
        "local_groups",
        ["strategy=fedper", "strategy.local_groups=[encoder/nothing]"],
        ConfigError,
        r"strategy.local_groups names parameter groups no site of this plan has: encoder/nothing",
    ),
    ("adapt_held_out", ["ood.adapt=tent", "sites.held_out=[]"], ConfigError, r"ood.adapt=tent: this run holds out no"),
    ("adapt_model", ["ood.adapt=bn_stats"], ConfigError, r"ood.adapt=bn_stats: the model has no BatchNorm layer"),
]
# one refusal of each check that needs the corpus schema or the plan (check_model, check_plan_names,
# check_adaptation): a server that sees no corpus makes them after the handshake
AFTER_HANDSHAKE = ("model_memory", "local_groups", "adapt_held_out")


def _cfg(smoke_corpus: Path, overrides: list[str]) -> ExperimentConfig:
    return load_config(["scale=smoke", f"corpus.path={smoke_corpus}", *overrides])


def _serve(cfg: ExperimentConfig, corpus: Path, out: Path, nodes: Sequence[int] = range(N_SITES)) -> None:
    """The ServerApp as `flwr run` (and so `deploy submit`) calls it, over the in-process grid, with
    a node for each of the plan's site indices in `nodes`."""
    run_config: dict[str, bool | float | int | str] = {
        CONFIG_KEY: config_to_yaml(cfg),
        CORPUS_KEY: str(corpus),
        OUT_DIR_KEY: str(out),
    }
    grid = InProcessGrid(client_app, [{"partition-id": i} for i in nodes], run_config)
    server_app.app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))


def _skip_where_the_device_exists(overrides: list[str]) -> None:
    import torch

    if "engine.device=mps" in overrides and torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")


def _written(out: Path) -> list[str]:
    """What a refused run left in its folder (the lock's folder is removed with the lock)."""
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


@pytest.fixture
def unusable_key(tmp_path, monkeypatch):
    """A state key others can read: refused, with the fix, by every run that checkpoints."""
    key = tmp_path / "key" / "state.key"
    monkeypatch.setenv(KEY_ENV, str(key))
    load_key()
    key.chmod(0o644)
    return key


@pytest.mark.parametrize(("overrides", "error", "message"), [r[1:] for r in BEFORE_RUN], ids=[r[0] for r in BEFORE_RUN])
def test_before_run_refuses_through_the_runner(smoke_corpus, tmp_path, overrides, error, message):
    _skip_where_the_device_exists(overrides)
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        run_experiment(_cfg(smoke_corpus, overrides), out, progress=False)
    assert _written(out) == []


@pytest.mark.parametrize(("overrides", "error", "message"), [r[1:] for r in BEFORE_RUN], ids=[r[0] for r in BEFORE_RUN])
def test_before_run_refuses_through_the_server_app(smoke_corpus, tmp_path, overrides, error, message):
    _skip_where_the_device_exists(overrides)
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        _serve(_cfg(smoke_corpus, overrides), smoke_corpus, out)
    assert _written(out) == []  # refused before config.yaml, as `multimed-fl run` is


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [r[1:] for r in BEFORE_RUN if r[0] in AFTER_HANDSHAKE],
    ids=[r[0] for r in BEFORE_RUN if r[0] in AFTER_HANDSHAKE],
)
def test_a_server_without_the_corpus_refuses_after_the_handshake(
    smoke_corpus, tmp_path, monkeypatch, overrides, error, message
):
    """A deployment's server holds no data: the model and plan checks run on the schema the sites
    agree on and on the sites that answered, before any round."""
    cfg = _cfg(smoke_corpus, overrides)
    n_sites = len(plan_sites(Corpus.open(smoke_corpus), cfg))
    monkeypatch.setattr(server_app, "local_plan", lambda cfg, path: None)
    checked: list[int] = []
    after = preflight.after_handshake
    monkeypatch.setattr("federated.server.loop.after_handshake", lambda c, p: checked.append(len(p)) or after(c, p))
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        _serve(cfg, smoke_corpus, out, nodes=range(n_sites))
    assert checked == [n_sites]  # refused in after_handshake, with every site's answer
    assert "metrics.parquet" not in _written(out) and "summary.json" not in _written(out)


def test_an_unusable_state_key_is_refused_by_both_paths(smoke_corpus, tmp_path, unusable_key):
    cfg = _cfg(smoke_corpus, ["engine.checkpoint_every=1"])
    message = rf"state key {unusable_key} is readable or writable by others"
    with pytest.raises(StateKeyError, match=message):
        run_experiment(cfg, tmp_path / "a", progress=False)
    with pytest.raises(StateKeyError, match=message):
        _serve(cfg, smoke_corpus, tmp_path / "b")
    assert _written(tmp_path / "a") == _written(tmp_path / "b") == []


def test_a_config_built_in_python_is_checked_by_both_paths(smoke_corpus, tmp_path):
    """dataclasses.replace skips the loader's checks: the runner runs them again (before_run), and
    the ServerApp reads the config back from YAML, which runs them."""
    cfg = _cfg(smoke_corpus, [])
    bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, optimizer="rmsprop"))
    with pytest.raises(ConfigError, match=r"train.optimizer must be one of: adam, sgd \(got 'rmsprop'\)"):
        run_experiment(bad, tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match=r"train.optimizer must be one of: adam, sgd \(got 'rmsprop'\)"):
        _serve(bad, smoke_corpus, tmp_path / "b")
    assert _written(tmp_path / "a") == _written(tmp_path / "b") == []


def test_sites_of_another_version_are_refused_after_the_handshake_by_both_paths(smoke_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr("federated.server.site_agreement.__version__", "0.0.0-server")
    cfg = _cfg(smoke_corpus, [])
    message = r"handshake: sites run other multimed-fl versions than the server's 0.0.0-server"
    with pytest.raises(FederationError, match=message):
        run_experiment(cfg, tmp_path / "a", progress=False)
    with pytest.raises(FederationError, match=message):
        _serve(cfg, smoke_corpus, tmp_path / "b")


def test_no_training_site_in_the_handshake_is_refused_by_the_server_app(smoke_corpus, tmp_path):
    """Only the two held-out sites connect. (The runner's engines start every planned site, and a
    plan always has a training site, so through them this refusal cannot be reached.)"""
    cfg = _cfg(smoke_corpus, ["engine.expected_sites=2"])
    with pytest.raises(FederationError, match="^no training sites answered the handshake$"):
        _serve(cfg, smoke_corpus, tmp_path / "out", nodes=(8, 9))
    assert "metrics.parquet" not in _written(tmp_path / "out")


# --- every entry point reaches before_run -------------------------------------------------------


@pytest.fixture
def spy(monkeypatch):
    """before_run, recorded and then refusing (so that nothing runs): who called it, with what."""
    calls: list[tuple[ExperimentConfig, bool, int | None]] = []

    def refuse(cfg, schema, sites=None, *, sites_here):
        calls.append((cfg, sites_here, None if sites is None else len(sites() if callable(sites) else sites)))
        raise ConfigError("refused by the spy")

    monkeypatch.setattr(runner, "before_run", refuse)
    monkeypatch.setattr(server_app, "before_run", refuse)
    return calls


def test_every_entry_point_runs_before_run(smoke_corpus, tmp_path, spy):
    from federated.app.cli import main

    overrides = ["scale=smoke", f"corpus.path={smoke_corpus}"]
    assert main(["run", "--out", str(tmp_path / "cli"), *overrides]) != 0  # multimed-fl run
    with pytest.raises(ConfigError, match="refused by the spy"):
        api.run(overrides, tmp_path / "api")  # the Python API
    outcome = run_one(("r0", overrides, str(tmp_path / "study")))  # one run of a study
    assert outcome.summary is None and "refused by the spy" in outcome.error
    with pytest.raises(ConfigError, match="refused by the spy"):
        _serve(_cfg(smoke_corpus, []), smoke_corpus, tmp_path / "flwr")  # flwr run . / deploy submit
    assert [(sites_here, n) for _, sites_here, n in spy] == [(True, N_SITES)] * 4
    assert all(cfg.corpus.path == str(smoke_corpus) for cfg, _, _ in spy)
