"""Shared fixtures: a private corpus cache per test session, and a tiny synthetic corpus."""

from __future__ import annotations

import pytest

import strategies  # noqa: F401  (registers every strategy's settings with the config loader)


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
