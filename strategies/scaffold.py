"""SCAFFOLD (Karimireddy et al. 2020): control variates correct each site's client drift.

The server sends its control variate c with the model; sites return their model y_i and the
change of their own control variate (clients/scaffold.py). The server moves
x <- x + global_lr * mean_i(y_i - x) and c <- c + (|S| / N) * mean_i(delta c_i), per
parameter group over the sites that trained it (|S| = those sites, N = all training sites),
and keeps c across rounds (saved in checkpoints).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from federated.core.config.schema import StrategyConfig
from federated.core.arrays import record_to_numpy
from federated.core.models import group_of
from federated.core.protocol import CONTROL_DELTA_RECORD, CONTROL_RECORD
from strategies.aggregation import groupwise_aggregate, weighted_mean
from strategies.base import Arrays, MultiMedStrategy, Update
from strategies.validation import validate_update



def _mean(updates: list[Arrays], weights: list[float]) -> Arrays:
    return weighted_mean(updates, [1.0] * len(updates))  # SCAFFOLD averages unweighted


class Scaffold(MultiMedStrategy):
    STATE = ("control",)

    def __init__(self, cfg: StrategyConfig, n_train_sites: int) -> None:
        super().__init__(cfg, n_train_sites)
        self.n_sites = n_train_sites
        self.control: Arrays | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.control is None:
            self.control = {k: np.zeros_like(a.numpy()) for k, a in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        record = ArrayRecord({k: Array(v) for k, v in self.control.items()})
        for m in messages:
            m.content[CONTROL_RECORD] = record
        return messages

    def parse(self, msg: Message, current: Arrays) -> Update | str:
        parsed = super().parse(msg, current)
        if isinstance(parsed, str):
            return parsed
        record = msg.content.array_records.get(CONTROL_DELTA_RECORD)
        if record is None:
            return f"no '{CONTROL_DELTA_RECORD}' record (SCAFFOLD sites must send their control change)"
        reason = validate_update(record_to_numpy(record), current, parsed.num_examples, None)
        return f"control change: {reason}" if reason else parsed

    def aggregate_updates(self, current: Arrays, updates: list[Update]) -> Arrays:
        assert self.control is not None
        ys = [u.arrays for u in updates]
        deltas = [record_to_numpy(u.message.content[CONTROL_DELTA_RECORD]) for u in updates]
        trained = [{g: 1.0 for g, n in u.group_examples.items() if n > 0} for u in updates]
        mean_y = groupwise_aggregate(current, ys, trained, group_of, _mean)
        zeros = {k: np.zeros_like(v) for k, v in self.control.items()}
        mean_dc = groupwise_aggregate(zeros, deltas, trained, group_of, _mean)
        trainers: dict[str, int] = {}
        for t in trained:
            for g in t:
                trainers[g] = trainers.get(g, 0) + 1
        self.control = {k: (c + trainers.get(group_of(k), 0) / max(self.n_sites, 1) * mean_dc[k]).astype(c.dtype)
                        for k, c in self.control.items()}
        lr = self.cfg.global_lr
        return {k: (current[k] + lr * (mean_y[k] - current[k])).astype(current[k].dtype) for k in current}
