"""Modality-aware FedAvg: each parameter group averaged only over the sites that trained it.

Plain FedAvg dilutes an encoder trained by two imaging centres with the untouched copies of
every site that never saw an image; here `encoder/<modality>`, `fusion` and `head/<task>` are
each averaged over their trainers, weighted by the examples behind that group, and a group
nobody trained this round keeps its value. Sites report their groups in the `trained`
ConfigRecord of the train reply (groups, examples).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from federated.models import group_of
from strategies.aggregation import groupwise_weighted_mean
from strategies.fedavg import FedAvg


class ModalityFedAvg(FedAvg):
    def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self._current: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._current = arrays  # untrained groups keep these values
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        if self._current is None:
            raise RuntimeError("aggregate_train called before configure_train")
        contents = [m.content for m in valid]
        updates = [{k: a.numpy() for k, a in next(iter(c.array_records.values())).items()}
                   for c in contents]
        weights = []
        for c in contents:
            trained = c.config_records.get("trained")
            if trained is None:
                raise ValueError("a train reply lacks the 'trained' record that modality_fedavg needs")
            weights.append(dict(zip(trained["groups"], trained["examples"])))
        current = {k: a.numpy() for k, a in self._current.items()}
        averaged = groupwise_weighted_mean(current, updates, weights, group_of)
        arrays = ArrayRecord({k: Array(v) for k, v in averaged.items()})
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)
