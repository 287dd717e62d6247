"""Server checkpoints: everything the server needs to continue a run where it stopped.

A checkpoint holds the global model, the strategy's state (server-optimiser moments, SCAFFOLD's
server control, site-level DP's accountant), the round, the RNG states that decide later
rounds (Python's, which Flower's node sampling uses), the round records so far (so the
summary and metrics of a resumed run cover every round) and the feature statistics the sites
standardise with (federated/server/feature_round.py: a resume uses them, read back as untrusted,
instead of asking the sites again).

What a site keeps across rounds (its DP-SGD accountants, SCAFFOLD control variate, personal
parameters) is not the server's to hold: each site saves its own state next to its data
(clients/site_state.py) at every checkpoint round, and on resume the handshake tells it which
round to restore. A real hospital's privacy ledger thus never leaves the hospital.

Format: DIR/checkpoint.npz, arrays plus JSON without pickle (federated/core/statefile.py: read
with allow_pickle=False, versioned, an HMAC-SHA256 under this user's state key checked on load),
written atomically. The loader refuses, by file name, anything else: a `checkpoint.pkl` of an
earlier release is never opened (a pickle runs code when read), a foreign file is "not a
MultiMed-FL checkpoint", an edited one (or one written under another key) is "not authenticated by
this user's key" (CheckpointAuthError), another format version is "unsupported". Version 3: the
first without pickle.
A checkpoint resumed must also agree with itself (`check_resume`): its round is its history's
length, the rounds numbered 1..round, each recording the same privacy and secure-aggregation
settings (federated/core/config/protected.py), and its config's rounds not below its round.

Resuming is held to the privacy the run trained with: `check_resume` refuses a config (the
checkpoint's own, or the one a deployment submits) whose privacy.* or secure_aggregation.* settings
differ from those the last round recorded, naming each key with both values. Each site checks the
same against its own saved state (clients/site_state.py), so neither an edited config nor a server
that lies about it switches a hospital's DP off.

Saving is a callback (Checkpointer) that the round loop calls like any other side effect.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from federated.core.arrays import pack_arrays, record_to_numpy
from federated.core.config import ConfigError, config_from_yaml, config_to_yaml
from federated.core.config.protected import changed_settings, protected_settings
from federated.core.config.schema import ExperimentConfig
from federated.core.corpus_schema import CorpusSchema, Modality, Task
from federated.core.protocol import Role
from federated.core.state_key import check_key
from federated.core.statefile import StateAuthError, StateFileError, read_state_file, write_state_file
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


class CheckpointAuthError(CheckpointError):
    """A checkpoint this user cannot authenticate (no usable key here, or not this key's MAC)."""


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, Any]  # parameter name -> numpy array
    strategy_state: dict[str, Any]
    python_rng: Any  # random.getstate(): a tuple of ints, stored as JSON
    initial: RoundRecord
    history: list[RoundRecord]
    config_yaml: str
    # FeatureStatistics.to_dict() of the run; empty without raw-feature modalities (or from an
    # earlier release: the round is then run again).
    feature_statistics: dict[str, Any] = field(default_factory=dict)
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
    except StateAuthError as e:
        raise CheckpointAuthError(str(e)) from None
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
        and isinstance(ckpt.feature_statistics, dict)
    )
    if not ok:
        raise CheckpointError(f"{path} is not a MultiMed-FL checkpoint (its fields have the wrong types)")


def _check_rounds(path: Path, ckpt: Checkpoint) -> None:
    """The checkpoint's round against its history: CheckpointError naming both when they disagree."""
    numbers = [r.round for r in ckpt.history]
    if ckpt.round < 1 or numbers != list(range(1, ckpt.round + 1)) or ckpt.initial.round != 0:
        shown = numbers if len(numbers) <= 10 else [*numbers[:5], "...", *numbers[-5:]]
        raise CheckpointError(
            f"{path}: round {ckpt.round} does not agree with its history, which holds rounds {shown} "
            f"(initial round {ckpt.initial.round}); a checkpoint of round r holds the records of rounds 1..r"
        )
    last = ckpt.history[-1].trained_with
    for record in ckpt.history[:-1]:
        changed = changed_settings(record.trained_with, last)
        if changed:
            raise CheckpointError(
                f"{path}: round {record.round} recorded other privacy settings than round {ckpt.round} "
                f"({'; '.join(changed)}); a run never changes them"
            )


def check_resume(ckpt: Checkpoint, cfg: ExperimentConfig, where: Path | str, source: str) -> None:
    """Refuse to resume the checkpoint in `where` with `cfg` (read from `source`, said in the message)
    when cfg changes a privacy or secure-aggregation setting the run trained with, when the last round
    does not say what it trained with, or when cfg.rounds is below the checkpoint's round; and a
    checkpoint whose round disagrees with its history."""
    _check_rounds(Path(where) / CHECKPOINT_FILE, ckpt)
    last = ckpt.history[-1]
    if not last.trained_with:
        raise CheckpointError(
            f"resuming {where}: round {last.round} of the checkpoint does not record the privacy settings it "
            "trained with (an earlier release wrote it), so a resume cannot be held to them; start the run again"
        )
    changed = changed_settings(last.trained_with, protected_settings(cfg))
    if changed:
        raise CheckpointError(
            f"resuming {where}: {source} changes what the run trained rounds 1-{last.round} with: "
            f"{'; '.join(changed)}. A resume keeps the privacy and secure-aggregation settings; "
            "start a new run to train with others"
        )
    if cfg.rounds < ckpt.round:
        raise CheckpointError(
            f"resuming {where}: {source} has rounds={cfg.rounds}, below the checkpoint's round {ckpt.round}"
        )


def resume_config(ckpt: Checkpoint, where: Path | str) -> ExperimentConfig:
    """The checkpoint's own config, checked with check_resume (CheckpointError naming the keys)."""
    try:
        cfg = config_from_yaml(ckpt.config_yaml)
    except ConfigError as e:
        raise CheckpointError(f"resuming {where}: the checkpoint's config cannot be read: {e}") from None
    check_resume(ckpt, cfg, where, "the checkpoint's config")
    return cfg


def python_rng_state() -> Any:
    return random.getstate()


def restore_python_rng(state: Any) -> None:
    random.setstate(state)


class Checkpointer(Callback):
    """Saves the server's state to DIR every `every` rounds and after the last round."""

    def __init__(self, out_dir: Path, every: int, feature_statistics: dict[str, Any] | None = None) -> None:
        self.out_dir, self.every = Path(out_dir), every
        self.rounds, self.config_yaml = 0, ""
        self.feature_statistics = dict(feature_statistics or {})

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
                feature_statistics=self.feature_statistics,
            ),
        )


def checkpointers(
    cfg: ExperimentConfig, out_dir: Path | None, feature_statistics: dict[str, Any] | None = None
) -> list[Callback]:
    """The run's checkpoint callback: none without a folder or with engine.checkpoint_every = 0;
    each checkpoint keeps the run's feature statistics (FeatureStatistics.to_dict()).
    Every engine calls this before round 1: a state key that cannot be used (StateKeyError, naming
    it and the fix) stops the run here, not at the first checkpoint k rounds later."""
    every = cfg.engine.checkpoint_every
    if out_dir is None or not every:
        return []
    check_key()
    return [Checkpointer(out_dir, every, feature_statistics)]
