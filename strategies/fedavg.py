"""FedAvg: Flower's message-based FedAvg with the averaging done by our tested pure function."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from strategies.aggregation import weighted_mean


class FedAvg(FlowerFedAvg):
    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        records = [next(iter(c.array_records.values())) for c in contents]
        weights = [float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]
        averaged = weighted_mean([{k: a.numpy() for k, a in r.items()} for r in records], weights)
        arrays = ArrayRecord({k: Array(v) for k, v in averaged.items()})
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)
