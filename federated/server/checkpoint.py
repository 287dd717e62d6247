"""Server checkpoints: everything the server needs to continue a run where it stopped.

A checkpoint holds the global model, the strategy's state (server-optimiser moments, SCAFFOLD's
server control, site-level DP's accountant), the round, the RNG states that decide later
rounds (Python's, which Flower's node sampling uses), and the round records so far (so the
summary and metrics of a resumed run cover every round).

What a site keeps across rounds (its DP-SGD accountants, SCAFFOLD control variate, personal
parameters) is not the server's to hold: each site saves its own state next to its data
(clients/site_state.py) at every checkpoint round, and on resume the handshake tells it which
round to restore. A real hospital's privacy ledger thus never leaves the hospital.

Format: DIR/checkpoint.npz, arrays plus JSON without pickle (federated/core/statefile.py: read
with allow_pickle=False, versioned, a sha256 of the content checked on load), written atomically.
The loader refuses, by file name, anything else: a `checkpoint.pkl` of an earlier release is never
opened (a pickle runs code when read), a foreign or edited file is "not a MultiMed-FL checkpoint"
or a "hash mismatch", another format version is "unsupported". Version 3: the first without pickle.

Saving is a callback (Checkpointer) that the round loop calls like any other side effect.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from federated.core.arrays import pack_arrays, record_to_numpy
from federated.core.config.loader import config_to_yaml
from federated.core.config.schema import ExperimentConfig
from federated.core.corpus_schema import CorpusSchema, Modality, Task
from federated.core.protocol import Role
from federated.core.statefile import StateFileError, read_state_file, write_state_file
from federated.server.callbacks import Callback, ServerState
from federated.server.evaluation import SiteEvaluation, SiteProfile
from federated.server.records import RoundRecord, TrainStats
from federated.server.results import GroupScores, RoundSummary, WorstSite
from strategies.aggregation import ServerOptState

CHECKPOINT_FILE = "checkpoint.npz"
LEGACY_PICKLE_FILE = "checkpoint.pkl"  # releases before version 3; never loaded
FORMAT_VERSION = 3
KIND = "checkpoint"
# The only types a checkpoint may hold besides JSON values, tuples and arrays: round records,
# their summaries, and the strategies' state (server-optimiser moments).
STATE_TYPES: dict[str, type] = {
    t.__name__: t
    for t in (
        RoundRecord,
        TrainStats,
        SiteEvaluation,
        SiteProfile,
        CorpusSchema,  # a profile's schema (checked again by its own __post_init__ when read)
        Modality,
        Task,
        RoundSummary,
        GroupScores,
        WorstSite,
        Role,
        ServerOptState,
    )
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says why."""


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, Any]  # parameter name -> numpy array
    strategy_state: dict[str, Any]
    python_rng: Any  # random.getstate(): a tuple of ints, stored as JSON
    initial: RoundRecord
    history: list[RoundRecord]
    config_yaml: str
    version: int = FORMAT_VERSION

    def array_record(self) -> ArrayRecord:
        return pack_arrays(self.arrays)


def save_checkpoint(out_dir: Path, ckpt: Checkpoint) -> Path:
    """Write DIR/checkpoint.npz atomically: a crash mid-write leaves the previous checkpoint."""
    state = {f.name: getattr(ckpt, f.name) for f in dataclasses.fields(ckpt) if f.name != "version"}
    return write_state_file(Path(out_dir) / CHECKPOINT_FILE, KIND, FORMAT_VERSION, state)


def load_checkpoint(out_dir: Path) -> Checkpoint:
    """The checkpoint in DIR; CheckpointError naming the file and saying why when there is none or
    it cannot be used. Nothing in DIR is unpickled."""
    path = Path(out_dir) / CHECKPOINT_FILE
    legacy = Path(out_dir) / LEGACY_PICKLE_FILE
    if not path.is_file():
        if legacy.exists():
            raise CheckpointError(
                f"{legacy} is a pickle checkpoint of an earlier release: it is not loaded (a pickle runs code "
                f"when read) and this run cannot be resumed; start it again"
            )
        raise CheckpointError(f"{path} does not exist: nothing to resume (was engine.checkpoint_every > 0?)")
    try:
        state = read_state_file(path, KIND, FORMAT_VERSION, STATE_TYPES)
        ckpt = Checkpoint(**state, version=FORMAT_VERSION)
    except StateFileError as e:
        raise CheckpointError(str(e)) from None
    except TypeError as e:  # fields missing or unknown
        raise CheckpointError(f"{path} is not a MultiMed-FL checkpoint: {e}") from None
    _check(path, ckpt)
    return ckpt


def _check(path: Path, ckpt: Checkpoint) -> None:
    """The types resume relies on, so a well-formed but wrong file fails here, naming itself."""
    ok = (
        isinstance(ckpt.round, int)
        and isinstance(ckpt.arrays, dict)
        and all(isinstance(a, np.ndarray) for a in ckpt.arrays.values())
        and isinstance(ckpt.strategy_state, dict)
        and isinstance(ckpt.initial, RoundRecord)
        and isinstance(ckpt.history, list)
        and all(isinstance(r, RoundRecord) for r in ckpt.history)
        and isinstance(ckpt.config_yaml, str)
    )
    if not ok:
        raise CheckpointError(f"{path} is not a MultiMed-FL checkpoint (its fields have the wrong types)")


def python_rng_state() -> Any:
    return random.getstate()


def restore_python_rng(state: Any) -> None:
    random.setstate(state)


class Checkpointer(Callback):
    """Saves the server's state to DIR every `every` rounds and after the last round."""

    def __init__(self, out_dir: Path, every: int) -> None:
        self.out_dir, self.every = Path(out_dir), every
        self.rounds, self.config_yaml = 0, ""

    def on_start(self, cfg: ExperimentConfig, profiles: list[SiteProfile]) -> None:
        self.rounds, self.config_yaml = cfg.rounds, config_to_yaml(cfg)

    def on_server_state(self, state: ServerState) -> None:
        if state.round % self.every and state.round != self.rounds:
            return
        save_checkpoint(
            self.out_dir,
            Checkpoint(
                round=state.round,
                arrays={k: a.copy() for k, a in record_to_numpy(state.arrays).items()},
                strategy_state=state.strategy.state_dict(),
                python_rng=python_rng_state() if state.python_rng is None else state.python_rng,
                initial=state.initial,
                history=state.history,
                config_yaml=self.config_yaml,
            ),
        )


def checkpointers(cfg: ExperimentConfig, out_dir: Path | None) -> list[Callback]:
    """The run's checkpoint callback: none without a folder or with engine.checkpoint_every = 0."""
    every = cfg.engine.checkpoint_every
    return [Checkpointer(out_dir, every)] if out_dir is not None and every else []
