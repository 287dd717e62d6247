"""Find or build the corpus a run needs: a given folder, or the synthetic corpus, cached by config."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from federated.core.config.schema import CorpusConfig
from federated.data.format import Corpus, CorpusFormatError, remove_stale_builds


def cache_root(cfg: CorpusConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("MULTIMED_FL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "multimed-fl"


def generator_config(cfg: CorpusConfig):  # -> GeneratorConfig
    from federated.data.synthetic import GeneratorConfig

    return GeneratorConfig(
        seed=cfg.seed,
        n_origin_sites=cfg.n_origin_sites,
        samples_per_task_site=cfg.samples_per_task_site,
        test_fraction=cfg.test_fraction,
        origin_shift_severity=cfg.origin_shift_severity,
    )


def prepare_corpus(cfg: CorpusConfig) -> Path:
    """The corpus folder for this config, opened once to validate it."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
        Corpus.open(path)
        return path
    if cfg.name != "synthetic":
        raise CorpusFormatError(
            f"corpus {cfg.name!r} has no corpus.path; set corpus.path=DIR to an ingested corpus folder"
        )
    from federated.data.synthetic import build_synthetic_corpus

    gen = generator_config(cfg)
    key = hashlib.sha256(json.dumps(asdict(gen), sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root(cfg) / "corpora" / f"synthetic-{key}"
    remove_stale_builds(path, any_name=True)  # leftovers of builds killed before their rename
    if not path.exists():
        try:
            build_synthetic_corpus(path, gen)
        except CorpusFormatError:
            if not path.exists():  # not a concurrent build of the same corpus: a real error
                raise
    Corpus.open(path)
    return path
