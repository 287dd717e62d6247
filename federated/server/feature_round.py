"""The feature statistics round: imputation and standardisation parameters without any row moving.

A vector modality that lists its features is stored raw (federated/core/features.py) and is
imputed and standardised when a site loads it, with statistics from `preprocess.statistics`:

- federated (the default, every engine): before round 1 the server asks each training site for
  (n, mean, M2) per feature over its training rows (a feature seen fewer than
  `preprocess.min_count` times is sent empty; with `preprocess.epsilon` > 0 under Laplace noise)
  and merges them exactly (federated/core/feature_stats.py). Where a modality imputes by median,
  a second query asks for histograms on a grid every site shares (the merged mean +- 8 SD), whose
  sum gives the median within a bin (0.004 SD) of the pooled rows' lower middle value (with an
  even count the exact median is halfway to the upper one). Only these aggregates leave a site:
  one value per feature, or per feature and bin.
- pooled (simulation only): the training sites' training rows in one block, exact, the reference
  `federated` equals (means and SDs to rounding). Held-out sites are not pooled: their rows are the
  OOD test set, and their means and spreads would leak into training. The server does not hold
  the corpus under every engine; every simulated site process does (it plans every site), so the
  first training site computes them.
- per_site: no round; each site uses its own rows (clients/site_runtime.py).

The result goes to every site, held-out ones included, in every train and evaluate message
(protocol.FEATURE_STATS), and into summary.json and the checkpoint, so a resume does not ask again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log

from federated.core.config.schema import ExperimentConfig
from federated.core.corpus_schema import CorpusSchema
from federated.core.feature_stats import HIST_BINS, Moments, Standardiser, combine, grid, quantile
from federated.core.features import INDICATOR, indicator_mask
from federated.core.protocol import CONFIG_RECORD, FEATURE_HISTOGRAM, FEATURE_MOMENTS, METRICS_RECORD
from federated.core.replies import error_reason
from federated.server.site_agreement import FederationError

Exchange = Callable[[list[Message]], list[Message]]
MOMENT_KEYS = ("n", "mean", "m2")


@dataclass(frozen=True, eq=False)
class FeatureStatistics:
    """The run's feature statistics: where they came from, what each training site spent on them,
    and per raw-feature modality the transform (none under per_site: each site has its own)."""

    source: str  # preprocess.statistics
    epsilon: float  # what each training site spent on the round (0: exact)
    min_count: int
    standardisers: dict[str, Standardiser] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # values behind each feature's statistics
    features: dict[str, list[str]] = field(default_factory=dict)  # each modality's feature names

    def message(self) -> str:
        """protocol.FEATURE_STATS: JSON {modality: {mean, std, fill}} (fill NaN: no imputation)."""
        return json.dumps({m: s.to_lists() for m, s in self.standardisers.items()})

    def preprocess(self) -> dict[str, Any]:
        """summary.json's `preprocess`: the source, min_count and the epsilon each training site spent."""
        return {"statistics": self.source, "min_count": self.min_count, "epsilon": self.epsilon}

    def per_modality(self) -> dict[str, dict[str, list[Any]]]:
        """summary.json's `feature_statistics`: {modality: {features, mean, std, fill, n}}."""
        return {
            m: {"features": list(self.features.get(m, [])), **s.to_lists(), "n": self.counts[m].tolist()}
            for m, s in self.standardisers.items()
        }

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (JSON values; NaN kept by the state file)."""
        return {**self.preprocess(), "modalities": self.per_modality()}

    @classmethod
    def from_dict(cls, raw: Any, schema: CorpusSchema, where: str) -> FeatureStatistics:
        """Read back from a checkpoint, checked like anything a file holds: the modalities the
        schema stores raw, each of its width (Standardiser.from_lists), counts >= 0."""
        if not isinstance(raw, dict) or not {"statistics", "min_count", "epsilon", "modalities"} <= set(raw):
            raise FederationError(f"{where}: feature statistics must hold statistics, min_count, epsilon, modalities")
        mods, source = raw["modalities"], raw["statistics"]
        eps, k = raw["epsilon"], raw["min_count"]
        if not isinstance(source, str) or not isinstance(mods, dict):
            raise FederationError(f"{where}: feature statistics: statistics must be a name, modalities a mapping")
        if not isinstance(eps, int | float) or not math.isfinite(eps) or eps < 0 or not isinstance(k, int) or k < 1:
            raise FederationError(f"{where}: feature statistics: epsilon must be >= 0 and min_count >= 1")
        raw_mods = _raw_modalities(schema)
        if not set(mods) <= set(raw_mods) or (source != "per_site" and sorted(mods) != sorted(raw_mods)):
            raise FederationError(
                f"{where}: feature statistics for modalities {sorted(mods)}, the schema stores {sorted(raw_mods)} raw"
            )
        standardisers, counts, names = {}, {}, {}
        for m, entry in mods.items():
            width = len(schema.modality(m).features)
            if not isinstance(entry, dict):
                raise FederationError(f"{where}: feature statistics of {m} must be a mapping")
            try:
                standardisers[m] = Standardiser.from_lists(
                    {k: entry.get(k) for k in ("mean", "std", "fill")}, width, f"{where}: {m}"
                )
            except ValueError as e:
                raise FederationError(str(e)) from None
            n = np.asarray(_numbers(entry.get("n"), width, f"{where}: {m}: n"))
            if (n < 0).any():
                raise FederationError(f"{where}: {m}: n must be >= 0")
            counts[m], names[m] = n, [f.name for f in schema.modality(m).features]
        return cls(source, float(eps), k, standardisers, counts, names)


def _numbers(value: Any, width: int, where: str) -> list[float]:
    if (
        not isinstance(value, list)
        or len(value) != width
        or not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in value)
    ):
        raise FederationError(f"{where} must be a list of {width} finite numbers")
    return [float(x) for x in value]


def _raw_modalities(schema: CorpusSchema) -> list[str]:
    return [m for m, spec in schema.modalities.items() if spec.raw_features]


def run_statistics(
    exchange: Exchange,
    train_nodes: Sequence[int],
    schema: CorpusSchema,
    cfg: ExperimentConfig,
    saved: dict[str, Any] | None = None,
) -> FeatureStatistics | None:
    """The run's feature statistics; None when the schema stores no modality raw (the run is
    unchanged). `saved` (a checkpoint's, on resume): read back instead of asking again."""
    raw = _raw_modalities(schema)
    if not raw:
        return None
    pre = cfg.preprocess
    if saved:
        stats = FeatureStatistics.from_dict(saved, schema, "the checkpoint's feature statistics")
        if stats.source != pre.statistics:
            raise FederationError(
                f"the checkpoint's feature statistics are {stats.source}, the run's preprocess.statistics "
                f"{pre.statistics}; a resume keeps them"
            )
        log(INFO, "feature statistics (%s) from the checkpoint: no statistics round", stats.source)
        return stats
    names = {m: [f.name for f in schema.modality(m).features] for m in raw}
    if pre.statistics == "per_site":
        return FeatureStatistics("per_site", 0.0, pre.min_count, features=names)
    if pre.epsilon > 0:
        _check_ranges(schema, raw)
    medians = [m for m in raw if schema.modality(m).impute == "median"]
    seed = int(cfg.seed)
    if pre.statistics == "pooled":
        request = {"modalities": raw, "scope": "pooled", "medians": medians, "min_count": pre.min_count}
        (reply,) = ask(exchange, list(train_nodes)[:1], FEATURE_MOMENTS, request | {"epsilon": 0.0, "seed": seed})
        moments = {m: _moments(reply, m, len(names[m]), exact=True) for m in raw}
        median = {m: _array(reply, f"{m}/median", len(names[m])) for m in medians}
    else:
        share = pre.epsilon / 2 if medians and pre.epsilon > 0 else pre.epsilon  # moments, then histograms
        request = {"modalities": raw, "min_count": pre.min_count, "epsilon": share, "seed": seed}
        replies = ask(exchange, train_nodes, FEATURE_MOMENTS, request)
        moments = {m: combine([_moments(r, m, len(names[m]), exact=pre.epsilon == 0) for r in replies]) for m in raw}
        median = _medians(exchange, train_nodes, moments, medians, names, share, pre.min_count, seed)
    for m in raw:
        unseen = [names[m][j] for j in np.flatnonzero(moments[m].n == 0)]
        if unseen:
            log(
                WARNING,
                "feature statistics: no training site sent values of %s features %s (each seen fewer than "
                "preprocess.min_count=%d times at every site): standardised with mean 0, sd 1",
                m,
                unseen,
                pre.min_count,
            )
    standardisers = {
        m: Standardiser.of(moments[m], schema.modality(m).impute, median.get(m), indicator_mask(schema.modality(m)))
        for m in raw
    }
    counts = {m: moments[m].n for m in raw}
    return FeatureStatistics(pre.statistics, pre.epsilon, pre.min_count, standardisers, counts, names)


def _check_ranges(schema: CorpusSchema, raw: list[str]) -> None:
    """Laplace noise is scaled by each feature's range: a numeric feature without one is refused."""
    for m in raw:
        for f in schema.modality(m).features:
            if f.kind != INDICATOR and (f.low is None or f.high is None):
                raise FederationError(
                    f"preprocess.epsilon > 0 needs a range for every feature: feature {f.name!r} of modality {m} "
                    "has none (low/high, from the data dictionary); set them, or preprocess.epsilon=0"
                )


def _medians(
    exchange: Exchange,
    train_nodes: Sequence[int],
    moments: dict[str, Moments],
    medians: list[str],
    names: dict[str, list[str]],
    epsilon: float,
    min_count: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """The median of each feature of the modalities imputed by median, from the sum of the sites'
    histograms on the grid the merged mean and SD give."""
    if not medians:
        return {}
    grids = {m: grid(moments[m].mean, moments[m].std) for m in medians}
    request = {
        "modalities": {m: {"lo": lo.tolist(), "width": w.tolist()} for m, (lo, w) in grids.items()},
        "min_count": min_count,
        "epsilon": epsilon,
        "seed": seed + 1,
    }
    replies = ask(exchange, train_nodes, FEATURE_HISTOGRAM, request)
    out = {}
    for m in medians:
        d = len(names[m])
        total = np.zeros((d, HIST_BINS))
        for r in replies:
            if f"{m}/hist" in r:
                counts = _array(r, f"{m}/hist", d * HIST_BINS).reshape(d, HIST_BINS)
                if (counts < 0).any():
                    raise FederationError(f"feature statistics: a site sent negative histogram counts for {m}")
                total += counts
        lo, width = grids[m]
        out[m] = np.array([quantile(total[j], lo[j], width[j], 0.5) for j in range(d)])
    return out


def ask(exchange: Exchange, nodes: Sequence[int], key: str, request: dict[str, Any]) -> list[dict[str, Any]]:
    """One query to every node in `nodes`; each reply's values (lists of floats, one per feature or
    per feature and bin). A node that fails or does not answer stops the run, named."""
    content = RecordDict({CONFIG_RECORD: ConfigRecord({key: json.dumps(request)})})
    replies = exchange([Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes])
    out = []
    for msg in replies:
        if msg.has_error():
            raise FederationError(f"feature statistics: node {msg.metadata.src_node_id} failed: {error_reason(msg)}")
        record = msg.content.metric_records.get(METRICS_RECORD)
        if record is None:
            raise FederationError(f"feature statistics: node {msg.metadata.src_node_id} sent no {METRICS_RECORD!r}")
        out.append({"node": msg.metadata.src_node_id, **dict(record)})
    if len(out) != len(nodes):
        raise FederationError(
            f"feature statistics: {len(nodes) - len(out)} of {len(nodes)} training sites did not answer"
        )
    return out


def _array(reply: dict[str, Any], key: str, width: int) -> np.ndarray:
    """A reply's list under `key`: `width` finite numbers, else the node is named."""
    value = reply.get(key)
    if not isinstance(value, list) or len(value) != width or not np.isfinite(np.asarray(value, dtype=np.float64)).all():
        raise FederationError(
            f"feature statistics: node {reply['node']} sent {key} that is not a list of {width} finite numbers"
        )
    return np.asarray(value, dtype=np.float64)


def _moments(reply: dict[str, Any], modality: str, width: int, exact: bool) -> Moments:
    """A site's (n, mean, M2) of a modality (absent: a site that holds none of it); checked: one
    value per feature, n and M2 >= 0, n whole unless noised."""
    keys = [f"{modality}/{k}" for k in MOMENT_KEYS]
    if not any(k in reply for k in keys):
        return Moments.empty(width)
    n, mean, m2 = (_array(reply, k, width) for k in keys)
    if (n < 0).any() or (m2 < 0).any() or (exact and (n != np.round(n)).any()):
        raise FederationError(
            f"feature statistics: node {reply['node']} sent counts or M2 of {modality} that no set of rows has"
        )
    return Moments(n, mean, m2)
