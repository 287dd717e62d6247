"""--resume continues a run only on the corpus it started on (issue 14, item 4)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from federated.app.runner import RunError, run_experiment
from federated.core.config import load_config
from federated.data.format import Corpus
from federated.server.preflight import check_same_corpus
from federated.server.run_folder import CORPUS_RECORD


@pytest.fixture
def corpus(smoke_corpus, tmp_path) -> Path:
    return Path(shutil.copytree(smoke_corpus, tmp_path / "corpus"))


def _flip_one_binary_label(corpus: Path) -> None:
    """A relabelled sample: still a valid corpus (Corpus.open accepts it), but not the same data."""
    target = corpus / "targets" / "breast_cancer_classification.npy"
    labels = np.load(target)
    labels[0] = 1 - labels[0]
    np.save(target, labels)


def test_a_run_records_its_corpus_and_a_changed_corpus_is_named(corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / CORPUS_RECORD).write_text(json.dumps({"path": str(corpus), "fingerprint": Corpus.open(corpus).fingerprint}))
    check_same_corpus(out, Corpus.open(corpus))  # the same corpus: fine
    _flip_one_binary_label(corpus)
    with pytest.raises(RunError, match=r"the corpus changed since this run started: .*corpus.json"):
        check_same_corpus(out, Corpus.open(corpus))


def test_a_run_folder_without_its_corpus_record_cannot_resume(corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(RunError, match=r"corpus.json: cannot tell which corpus this run started on"):
        check_same_corpus(out, Corpus.open(corpus))
    (out / CORPUS_RECORD).write_text("not json")
    with pytest.raises(RunError, match=r"corpus.json: cannot tell which corpus"):
        check_same_corpus(out, Corpus.open(corpus))


@pytest.mark.slow
def test_resume_refuses_a_changed_corpus_and_continues_on_the_same_one(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(["scale=smoke", f"corpus.path={corpus}", "rounds=2", "engine.checkpoint_every=1"])
    first = run_experiment(cfg, out, progress=False)
    recorded = json.loads((out / CORPUS_RECORD).read_text())
    assert recorded["fingerprint"] == Corpus.open(corpus).fingerprint
    (out / "summary.json").unlink()  # as if the run had stopped after its last checkpoint
    saved = (corpus / "targets" / "breast_cancer_classification.npy").read_bytes()
    _flip_one_binary_label(corpus)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(RunError, match="the corpus changed since this run started"):
        run_experiment(None, out, progress=False, resume=True)
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written or removed
    (corpus / "targets" / "breast_cancer_classification.npy").write_bytes(saved)
    resumed = run_experiment(None, out, progress=False, resume=True)
    assert resumed.final.id.score == first.final.id.score
