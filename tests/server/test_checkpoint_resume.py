"""Checkpoints and --resume: a run killed mid-way and resumed ends where an uninterrupted one does."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import pickle  # only to write files the loader must refuse
import random
import zipfile

import numpy as np
import pandas as pd
import pytest

from federated.app.cli import main
from federated.app.runner import run_experiment
from federated.core.config import load_config
from federated.core.corpus_schema import CorpusSchema, Modality, Task
from federated.core.protocol import Role
from federated.server.callbacks import Callback
from federated.server.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from federated.server.evaluation import SiteEvaluation, SiteProfile
from federated.server.records import RoundRecord, TrainStats
from federated.server.results import GroupScores, RoundSummary, WorstSite
from strategies.aggregation import ServerOptState

# Server-optimiser moments (fedadam), site DP-SGD ledgers and label skew all carry state.
OVERRIDES = [
    "scale=smoke",
    "rounds=4",
    "engine.checkpoint_every=2",
    "strategy=fedadam",
    "privacy=dp_sgd",
    "privacy.target_epsilon=5",
    "strategy.fraction_train=0.75",
]


class Killed(Exception):
    pass


class KillAfter(Callback):
    def __init__(self, rnd: int) -> None:
        self.rnd = rnd

    def on_round_end(self, record) -> None:
        if record.round == self.rnd:
            raise Killed(f"killed after round {self.rnd}")


def _final(out):
    with np.load(out / "final_model.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.slow
def test_resume_ends_with_the_uninterrupted_model_and_epsilon(tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["run", "--out", str(full), "--no-progress", *OVERRIDES]) == 0
    # a crash after round 3: the last checkpoint is round 2
    import federated.app.runner as runner

    original = runner.MetricsTable
    monkeypatch.setattr(runner, "MetricsTable", lambda path: _Both(original(path), KillAfter(3)))
    with pytest.raises(Killed):
        run_experiment(load_config(OVERRIDES), cut, progress=False)
    monkeypatch.setattr(runner, "MetricsTable", original)
    assert load_checkpoint(cut).round == 2 and not (cut / "summary.json").exists()
    assert main(["run", "--resume", str(cut), "--no-progress"]) == 0

    a, b = _final(full), _final(cut)
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, cut))
    assert sb["resumed_from_round"] == 2 and sb["rounds_completed"] == 4
    assert {s: p["epsilon"] for s, p in sa["privacy"].items()} == pytest.approx(
        {s: p["epsilon"] for s, p in sb["privacy"].items()}, abs=1e-12
    )
    assert sa["final"] == sb["final"]
    ma, mb = (pd.read_parquet(d / "metrics.parquet") for d in (full, cut))
    assert sorted(mb["round"].unique()) == [0, 1, 2, 3, 4]
    key = ["round", "site", "task", "metric"]
    joined = ma.merge(mb, on=key, suffixes=("_a", "_b"))
    assert len(joined) == len(ma) == len(mb)
    assert np.allclose(joined["value_a"], joined["value_b"], equal_nan=True)


class _Both(Callback):
    def __init__(self, table, killer) -> None:
        self.table, self.killer = table, killer

    def on_resume(self, records) -> None:
        self.table.on_resume(records)

    def on_round_end(self, record) -> None:
        self.table.on_round_end(record)
        self.killer.on_round_end(record)

    def on_end(self, result) -> None:
        self.table.on_end(result)


def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "checkpoint.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"bad/checkpoint.npz is not a MultiMed-FL checkpoint"):
        load_checkpoint(bad)
    capsys.readouterr()
    assert main(["run", "--resume", str(bad), "rounds=3"]) == 2
    assert main(["run", "--resume", str(bad)]) == 2
    assert "bad/checkpoint.npz is not a MultiMed-FL checkpoint" in capsys.readouterr().err


# The schema a site's handshake profile carries (what the server builds the model for).
ICU = CorpusSchema(
    {"ehr": Modality("ehr", "vector", (12,))},
    {"mortality": Task("mortality", ("ehr",), "binary", ("auroc", "accuracy"), ("alive", "dead"))},
)


def _checkpoint() -> Checkpoint:
    """A checkpoint holding every kind of value resume relies on: NaN scores, a personal summary,
    server-optimiser moments, site-level DP's numpy RNG state and Python's RNG state."""
    profile = SiteProfile("site_a", Role.TRAIN, "icu", ["ehr"], ["mortality"], 10, 5, "h1", schema=ICU)
    nan_scores = GroupScores(math.nan, {"mortality": math.nan})
    summary = RoundSummary(
        GroupScores(0.25, {"mortality": 0.25}),
        nan_scores,
        math.nan,
        ["mortality"],
        WorstSite("site_a", Role.TRAIN, 0.25),
        GroupScores(0.5, {}),
    )
    evaluation = SiteEvaluation(profile, {"mortality": {"score": 0.25, "n": 5.0}}, {"mortality": {"score": 0.5}})
    record = RoundRecord(
        1,
        [evaluation],
        summary,
        train={"site_a": TrainStats(0.7, 10.0, 3.0)},
        failures={"evaluate:site_b": "boom"},
        rejections={"site_c": "update not finite"},
        privacy={"site_a": {"epsilon": math.inf, "delta": 1e-5, "steps": np.int64(3)}},
        train_s=0.125,
    )
    initial = RoundRecord(0, [evaluation], dataclasses.replace(summary, id_personal=None, worst_site=None))
    rng = np.random.RandomState(7)
    moments = ServerOptState({"w": np.arange(3.0)}, {"w": np.full(3, 1e-6)}, 4)
    random.seed(11)
    return Checkpoint(
        round=1,
        arrays={"encoder/ehr.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.array([3])},
        strategy_state={"inner": {"state": moments}, "history": [(1.1, 1.0, 2)], "numpy_rng": rng.get_state()},
        python_rng=random.getstate(),
        initial=initial,
        history=[record],
        config_yaml="seed: 1\n",
    )


def test_a_checkpoint_reads_back_exactly_without_pickle(tmp_path):
    ckpt = _checkpoint()
    path = save_checkpoint(tmp_path, ckpt)
    assert path.name == "checkpoint.npz" and b"pickle" not in path.read_bytes()
    back = load_checkpoint(tmp_path)
    assert back.round == 1 and back.config_yaml == ckpt.config_yaml and back.version == 3
    assert {k: (a.dtype, a.tolist()) for k, a in back.arrays.items()} == {
        k: (a.dtype, a.tolist()) for k, a in ckpt.arrays.items()
    }
    assert back.python_rng == ckpt.python_rng
    random.setstate(back.python_rng)
    assert random.random() == (random.seed(11), random.random())[1]
    state = back.strategy_state
    assert isinstance(state["inner"]["state"], ServerOptState) and state["inner"]["state"].step == 4
    assert state["inner"]["state"].v["w"].tolist() == [1e-6] * 3
    assert state["history"] == [(1.1, 1.0, 2)]
    rng = np.random.RandomState()
    rng.set_state(state["numpy_rng"])
    assert rng.random_sample() == np.random.RandomState(7).random_sample()
    # the summaries (NaN included) and round records, as their JSON form shows them
    assert back.history[0].summary.to_dict().__repr__() == ckpt.history[0].summary.to_dict().__repr__()
    assert back.initial.summary.to_dict().__repr__() == ckpt.initial.summary.to_dict().__repr__()
    rec, orig = back.history[0], ckpt.history[0]
    assert rec.evaluations[0].profile == orig.evaluations[0].profile and rec.evaluations[0].profile.role is Role.TRAIN
    assert rec.evaluations[0].profile.schema == ICU  # compare=False: the profile's == does not look at it
    assert (rec.train, rec.failures, rec.rejections, rec.train_s) == (
        orig.train,
        orig.failures,
        orig.rejections,
        orig.train_s,
    )
    assert rec.privacy == {"site_a": {"epsilon": math.inf, "delta": 1e-5, "steps": 3}}


def _rewrite_member(path, name: str, data: bytes) -> None:
    """Replace one member of an npz (zip) file, keeping the others."""
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members[name] = data
    with zipfile.ZipFile(path, "w") as z:
        for n, body in members.items():
            z.writestr(n, body)


def _npy(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, values, allow_pickle=False)
    return buf.getvalue()


def test_a_changed_foreign_or_other_version_checkpoint_is_refused_by_name(tmp_path):
    path = save_checkpoint(tmp_path, _checkpoint())
    good = path.read_bytes()
    # one weight changed after writing
    _rewrite_member(path, "a0.npy", _npy(np.zeros((2, 3), dtype=np.float32)))
    with pytest.raises(CheckpointError, match=r"checkpoint.npz is not authenticated by this user's key"):
        load_checkpoint(tmp_path)
    # another format version
    path.write_bytes(good)
    meta = json.loads(np.load(path)["meta"].tobytes())
    _rewrite_member(path, "meta.npy", _npy(np.frombuffer(json.dumps({**meta, "version": 9}).encode(), np.uint8)))
    with pytest.raises(CheckpointError, match=r"checkpoint.npz: MultiMed-FL checkpoint version 9 unsupported"):
        load_checkpoint(tmp_path)
    # an npz that is not a checkpoint (e.g. a final model copied here)
    np.savez(path, w=np.ones(3))
    with pytest.raises(CheckpointError, match=r"checkpoint.npz is not a MultiMed-FL checkpoint \(no 'multimed-fl/"):
        load_checkpoint(tmp_path)
    # an object array (which only pickle could read) is never unpickled
    with zipfile.ZipFile(path, "w") as z:
        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        z.writestr("meta.npy", buf.getvalue())
    with pytest.raises(CheckpointError, match=r"checkpoint.npz is not a MultiMed-FL checkpoint: unreadable"):
        load_checkpoint(tmp_path)
    # a file of the earlier pickle format is named and left unopened
    path.unlink()
    (tmp_path / "checkpoint.pkl").write_bytes(pickle.dumps({"round": 2}))
    with pytest.raises(CheckpointError, match=r"checkpoint.pkl is a pickle checkpoint of an earlier release"):
        load_checkpoint(tmp_path)


def test_a_checkpoint_refuses_types_it_may_not_hold(tmp_path):
    @dataclasses.dataclass
    class Foreign:
        x: int = 1

    with pytest.raises(TypeError, match=r"strategy_state.thing: a set cannot be stored"):
        save_checkpoint(tmp_path, dataclasses.replace(_checkpoint(), strategy_state={"thing": {1}}))
    save_checkpoint(tmp_path, dataclasses.replace(_checkpoint(), strategy_state={"thing": Foreign()}))
    with pytest.raises(CheckpointError, match=r"checkpoint.npz is not a MultiMed-FL checkpoint: .*'Foreign'"):
        load_checkpoint(tmp_path)
