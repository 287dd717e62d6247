"""Shared fixtures: a private corpus cache per test session, and a tiny synthetic corpus."""

from __future__ import annotations

import pytest

import strategies  # noqa: F401  (registers every strategy's settings with the config loader)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Never write into the user's ~/.cache during tests."""
    import os

    os.environ["MULTIMED_FL_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def smoke_corpus(tmp_path_factory: pytest.TempPathFactory):
    """The scale=smoke synthetic corpus, built once per session."""
    from federated.data.synthetic import GeneratorConfig, build_synthetic_corpus

    path = tmp_path_factory.mktemp("corpus") / "smoke"
    return build_synthetic_corpus(path, GeneratorConfig(samples_per_task_site=20))
