"""Shared fixtures: a private corpus cache per test session, and a tiny synthetic corpus; how many
pytest-xdist workers the tiers get, and one torch thread per test process."""

from __future__ import annotations

import os
import re

import pytest

# The fast tier runs in parallel (pyproject's addopts: -n auto --dist worksteal): at most this many
# workers, as each holds torch, Flower and a federation's sites in memory (about 1.3 GB at its peak).
MAX_WORKERS = 8


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per CPU this process may use, up to MAX_WORKERS, for the default tier;
    none (serial) when the command line selects other tests with -m, as `-m slow` does: the slow
    tier's Ray clusters, SuperLinks and demo deployments each use every core and start services on
    ports, so they run one at a time. An explicit `-n N` on the command line overrides both."""
    if re.search(r"(?<!not )\bslow\b", " ".join((config.option.markexpr or "").split())):
        return 0  # the expression selects slow tests
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_WORKERS, cpus))


def _xdist_controller(config: pytest.Config) -> bool:
    """The process that hands tests to xdist workers and runs none itself."""
    distributing = config.getoption("dist", "no") != "no" and bool(config.getoption("tx", None))
    return distributing and not hasattr(config, "workerinput") and not config.getoption("collectonly")


def pytest_configure(config: pytest.Config) -> None:
    """In every process that runs tests (each xdist worker, or the one serial process; the controller
    needs neither, and skipping them saves it seconds of imports): every strategy's settings
    registered with the config loader, and one torch thread, so that workers do not oversubscribe
    the cores and a test's numbers do not depend on how many ran beside it (a run sets
    engine.torch_threads, 1 by default, for its process anyway)."""
    if _xdist_controller(config):
        return
    import torch

    import strategies  # noqa: F401

    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Never write into the user's ~/.cache during tests."""
    import os

    os.environ["MULTIMED_FL_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session", autouse=True)
def _private_state_key(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Never create or use the user's own state key (~/.config/multimed-fl/state.key) during tests:
    every state file of the session, subprocesses' included (they inherit the environment), is
    authenticated with a key created on first use in a temporary folder."""
    import os

    os.environ["MULTIMED_FL_STATE_KEY"] = str(tmp_path_factory.mktemp("state-key") / "state.key")


@pytest.fixture(scope="session")
def smoke_corpus(tmp_path_factory: pytest.TempPathFactory):
    """The scale=smoke synthetic corpus, built once per session."""
    from federated.data.synthetic import GeneratorConfig, build_synthetic_corpus

    path = tmp_path_factory.mktemp("corpus") / "smoke"
    return build_synthetic_corpus(path, GeneratorConfig(samples_per_task_site=20))


@pytest.fixture
def tiny_frames():
    """write_corpus's smallest input: a two-sample cell_type corpus as (manifest, arrays, targets).
    A factory, so each call gives fresh frames a test may change."""
    import numpy as np
    import pandas as pd

    def make():
        manifest = pd.DataFrame(
            {
                "sample_id": ["a", "b"],
                "dataset": ["d", "d"],
                "task": ["cell_type", "cell_type"],
                "patient_id": ["p1", "p2"],
                "origin_site": ["s0", "s1"],
                "split": ["train", "test"],
                "label": [0.0, 1.0],
                "target_row": [0, 1],
                "idx_scrna": [0, 1],
            }
        )
        arrays = {"scrna": np.zeros((2, 256), dtype=np.float32)}
        return manifest, arrays, {"cell_type": np.array([0, 1], dtype=np.int64)}

    return make
