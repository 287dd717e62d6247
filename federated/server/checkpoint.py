"""Server checkpoints: everything the server needs to continue a run where it stopped.

A checkpoint holds the global model, the strategy's state (server-optimiser moments, SCAFFOLD's
server control, site-level DP's accountant), the round, the RNG states that decide later
rounds (Python's, which Flower's node sampling uses), and the round records so far (so the
summary and metrics of a resumed run cover every round).

What a site keeps across rounds (its DP-SGD accountants, SCAFFOLD control variate, personal
parameters) is not the server's to hold: each site saves its own state next to its data
(clients/site_state.py) at every checkpoint round, and on resume the handshake tells it which
round to restore. A real hospital's privacy ledger thus never leaves the hospital.

Format: one pickle written atomically (temp file, then rename) as DIR/checkpoint.pkl. Pickle
runs code when loaded: only resume from checkpoints you wrote. Version 2: round records hold typed
summaries (federated/server/results.py); a version-1 checkpoint is refused by name.

Saving is a callback (Checkpointer) that the round loop calls like any other side effect.
"""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from federated.core.config.loader import config_to_yaml
from federated.core.config.schema import ExperimentConfig
from federated.core.io import atomic_write
from federated.server.callbacks import Callback, ServerState
from federated.server.evaluation import SiteProfile
from federated.server.records import RoundRecord

CHECKPOINT_FILE = "checkpoint.pkl"
FORMAT_VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says why."""


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, Any]  # parameter name -> numpy array
    strategy_state: dict[str, Any]
    python_rng: Any  # random.getstate()
    initial: RoundRecord
    history: list[RoundRecord]
    config_yaml: str
    version: int = FORMAT_VERSION

    def array_record(self) -> ArrayRecord:
        import torch

        return ArrayRecord({k: torch.from_numpy(v.copy()) for k, v in self.arrays.items()})


def save_checkpoint(out_dir: Path, ckpt: Checkpoint) -> Path:
    """Write DIR/checkpoint.pkl atomically: a crash mid-write leaves the previous checkpoint."""
    path = Path(out_dir) / CHECKPOINT_FILE
    atomic_write(path, lambda tmp: tmp.write_bytes(pickle.dumps(ckpt, protocol=pickle.HIGHEST_PROTOCOL)))
    return path


def load_checkpoint(out_dir: Path) -> Checkpoint:
    """The checkpoint in DIR; CheckpointError saying why when there is none or it cannot be used."""
    path = Path(out_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: nothing to resume (was engine.checkpoint_every > 0?)")
    try:
        ckpt = pickle.loads(path.read_bytes())
    except Exception as e:  # truncated or foreign file
        raise CheckpointError(f"{path} is not a readable checkpoint: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, Checkpoint) or ckpt.version != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a version-{FORMAT_VERSION} MultiMed-FL checkpoint")
    return ckpt


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
                arrays={k: a.numpy() for k, a in state.arrays.items()},
                strategy_state=state.strategy.state_dict(),
                python_rng=python_rng_state(),
                initial=state.initial,
                history=state.history,
                config_yaml=self.config_yaml,
            ),
        )


def checkpointers(cfg: ExperimentConfig, out_dir: Path | None) -> list[Callback]:
    """The run's checkpoint callback: none without a folder or with engine.checkpoint_every = 0."""
    every = cfg.engine.checkpoint_every
    return [Checkpointer(out_dir, every)] if out_dir is not None and every else []
