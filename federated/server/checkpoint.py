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
runs code when loaded: only resume from checkpoints you wrote.
"""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from federated.core.io import atomic_write

CHECKPOINT_FILE = "checkpoint.pkl"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says why."""


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, Any]  # parameter name -> numpy array
    strategy_state: dict[str, Any]
    python_rng: Any
    initial: Any  # RoundRecord
    history: list[Any]  # RoundRecords
    config_yaml: str
    version: int = FORMAT_VERSION

    def array_record(self) -> ArrayRecord:
        import torch

        return ArrayRecord({k: torch.from_numpy(v.copy()) for k, v in self.arrays.items()})


def save_checkpoint(out_dir: Path, ckpt: Checkpoint) -> Path:
    path = Path(out_dir) / CHECKPOINT_FILE
    atomic_write(path, lambda tmp: tmp.write_bytes(pickle.dumps(ckpt, protocol=pickle.HIGHEST_PROTOCOL)))
    return path


def load_checkpoint(out_dir: Path) -> Checkpoint:
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
