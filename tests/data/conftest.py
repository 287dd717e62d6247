"""Ingest-test fixtures: write a spec in the test's folder, expect an ingest to fail cleanly."""

from __future__ import annotations

import pytest

from federated.data.ingest import IngestError
from federated.data.ingest.spec import run_spec


@pytest.fixture
def expect_failure(tmp_path):
    """expect_failure(spec_body, match): the ingest raises IngestError matching `match`, and
    neither the corpus folder nor a temporary `.corpus*` folder is left behind."""

    def check(spec_body: str, match: str) -> None:
        spec, out = tmp_path / "spec.yaml", tmp_path / "corpus"
        spec.write_text(spec_body)
        with pytest.raises(IngestError, match=match):
            run_spec(spec, out)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".corpus")]

    return check
