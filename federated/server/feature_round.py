"""The feature statistics round: imputation and standardisation parameters without any row moving.

A vector modality that lists its features is stored raw (federated/core/features.py) and is
imputed and standardised when a site loads it, with statistics from `preprocess.statistics`:

- federated (the default, every engine): before round 1 the server asks each training site for
  (n, mean, M2) per feature over its training rows (a feature seen fewer than
  `preprocess.min_count` times is sent empty; with `preprocess.epsilon` > 0 under Laplace noise)
  and merges them exactly (federated/core/feature_stats.py). Where a modality imputes by median,
  a second query asks for histograms on a grid every site shares (the merged mean +- 8 SD),
  coarsened by each site so that every released cell is a run of whole 64-bin blocks holding at
  least min_count values: their sum gives the median to within the width of the runs around it
  (each site's counts are spread evenly over a run). Only these aggregates leave a site: one
  value per feature, or per feature and bin. A site answers each query once per run and holds the
  server to its own floor (clients/site_runtime.py ReleaseFloor: in deployment its node config's
  stats-min-count and stats-epsilon). Noise makes a release epsilon-DP per record (a corpus row),
  not per patient.
- pooled (simulation only): the training sites' training rows in one block, exact, the reference
  `federated` equals (means and SDs to rounding). Held-out sites are not pooled: their rows are the
  OOD test set, and their means and spreads would leak into training. The server does not hold
  the corpus under every engine; every simulated site process does (it plans every site), so the
  first training site computes them.
- per_site: no round; each site uses its own rows (clients/site_runtime.py), a held-out site its
  own test rows (what per_site means: each site its own scale).

Every reply is untrusted: 0 <= n <= the site's training sample count (its handshake profile),
finite means within a feature's declared [low, high] (clamped to it under noise), 0 <= M2 <= what
n values in that range can spread, histograms non-negative and coarse; a reply that fails is
refused naming the site, and the merged statistics are checked as every site will check them
before they are sent. The result goes to every site, held-out ones included, in every train and evaluate message
(protocol.FEATURE_STATS), and into summary.json and the checkpoint, so a resume does not ask again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log

from federated.core.config.schema import ExperimentConfig
from federated.core.corpus_schema import CorpusSchema, Modality
from federated.core.feature_stats import HIST_BINS, Moments, Standardiser, coarse_enough, combine, grid, quantile
from federated.core.features import INDICATOR, indicator_mask
from federated.core.protocol import CONFIG_RECORD, FEATURE_HISTOGRAM, FEATURE_MOMENTS, METRICS_RECORD
from federated.core.replies import error_reason
from federated.server.evaluation import SiteProfile
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
            spec = schema.modality(m)
            width, names[m] = len(spec.features), [f.name for f in spec.features]
            if not isinstance(entry, dict):
                raise FederationError(f"{where}: feature statistics of {m} must be a mapping")
            try:
                standardisers[m] = Standardiser.from_lists(
                    {k: entry.get(k) for k in ("mean", "std", "fill")}, width, f"{where}: {m}", names[m], spec.impute
                )
            except ValueError as e:
                raise FederationError(str(e)) from None
            n = np.asarray(_numbers(entry.get("n"), width, f"{where}: {m}: n"))
            if (n < 0).any():
                raise FederationError(f"{where}: {m}: n must be >= 0")
            counts[m] = n
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
    profiles: Mapping[int, SiteProfile],
    saved: dict[str, Any] | None = None,
) -> FeatureStatistics | None:
    """The run's feature statistics; None when the schema stores no modality raw (the run is
    unchanged). `profiles`: the handshake's, by node (each reply is checked against its site's
    training sample count, and errors name the site). `saved` (a checkpoint's, on resume): read
    back instead of asking again."""
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
    noisy = pre.epsilon > 0
    sites = {n: profiles[n].site if n in profiles else f"at node {n}" for n in train_nodes}
    if pre.statistics == "pooled":
        request = {"modalities": raw, "scope": "pooled", "medians": medians, "min_count": pre.min_count}
        (reply,) = ask(
            exchange, list(train_nodes)[:1], FEATURE_MOMENTS, request | {"epsilon": 0.0, "seed": seed}, sites
        )
        everyone = float(sum(_n_train(profiles, n) for n in train_nodes))  # the pooled rows are every site's
        moments = {m: _moments(reply, schema.modality(m), everyone, noisy=False) for m in raw}
        median = {m: _array(reply, f"{m}/median", len(names[m])) for m in medians}
        noisy = False
    else:
        share = pre.epsilon / 2 if medians and pre.epsilon > 0 else pre.epsilon  # moments, then histograms
        request = {"modalities": raw, "min_count": pre.min_count, "epsilon": share, "seed": seed}
        replies = ask(exchange, train_nodes, FEATURE_MOMENTS, request, sites)
        moments = {
            m: combine([_moments(r, schema.modality(m), _n_train(profiles, r["node"]), noisy) for r in replies])
            for m in raw
        }
        median = _medians(exchange, train_nodes, moments, medians, share, pre.min_count, seed, sites, profiles)
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
    standardisers = {m: _standardiser(schema.modality(m), moments[m], median.get(m), noisy) for m in raw}
    counts = {m: moments[m].n for m in raw}
    return FeatureStatistics(pre.statistics, pre.epsilon, pre.min_count, standardisers, counts, names)


def _n_train(profiles: Mapping[int, SiteProfile], node: int) -> int:
    """A training site's training sample count from its handshake profile: more values of a
    feature than that, no site holds."""
    if node not in profiles:
        raise FederationError(f"feature statistics: node {node} answered and is no training site of the handshake")
    return int(profiles[node].n_train)


def _bounds(spec: Modality) -> tuple[np.ndarray, np.ndarray]:
    """Each feature's declared [low, high] (an indicator without one: [0, 1]); NaN: none declared."""
    low = [f.low if f.low is not None else 0.0 if f.kind == INDICATOR else math.nan for f in spec.features]
    high = [f.high if f.high is not None else 1.0 if f.kind == INDICATOR else math.nan for f in spec.features]
    return np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)


def _standardiser(spec: Modality, moments: Moments, median: np.ndarray | None, noisy: bool) -> Standardiser:
    """A modality's transform from its merged statistics: under noise held to each feature's
    declared range (post-processing); then checked as every site will check it (finite, std not
    vanishing, a fill for every feature where the modality imputes), so a failure is the
    server's, named here, not a puzzle at every site."""
    out = Standardiser.of(moments, spec.impute, median, indicator_mask(spec))
    if noisy:
        out = out.clamped(*_bounds(spec))
    names = [f.name for f in spec.features]
    try:
        return Standardiser.from_lists(
            out.to_lists(), len(names), f"feature statistics of {spec.name}", names, spec.impute
        )
    except ValueError as e:
        raise FederationError(f"the merged {e} (the sites' replies passed their checks: the server's error)") from None


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
    epsilon: float,
    min_count: int,
    seed: int,
    sites: Mapping[int, str],
    profiles: Mapping[int, SiteProfile],
) -> dict[str, np.ndarray]:
    """The median of each feature of the modalities imputed by median, from the sum of the sites'
    coarsened histograms on the grid the merged mean and SD give. Each reply is checked: finite,
    non-negative, coarse (feature_stats.coarse_enough: every cell of at least min_count values) and,
    without noise, no more values than the site's training samples."""
    if not medians:
        return {}
    grids = {m: grid(moments[m].mean, moments[m].std) for m in medians}
    request = {
        "modalities": {m: {"lo": lo.tolist(), "width": w.tolist()} for m, (lo, w) in grids.items()},
        "min_count": min_count,
        "epsilon": epsilon,
        "seed": seed + 1,
    }
    replies = ask(exchange, train_nodes, FEATURE_HISTOGRAM, request, sites)
    out = {}
    for m in medians:
        d = len(moments[m].n)
        total = np.zeros((d, HIST_BINS))
        for r in replies:
            if f"{m}/hist" not in r:
                continue
            counts = _array(r, f"{m}/hist", d * HIST_BINS).reshape(d, HIST_BINS)
            where = f"feature statistics: site {r['site']} sent a histogram of {m}"
            if (counts < 0).any():
                raise FederationError(f"{where} with negative counts")
            if not coarse_enough(counts, min_count):
                raise FederationError(
                    f"{where} with a cell of fewer than preprocess.min_count={min_count} values: a site sends "
                    "runs of whole blocks of at least that many (feature_stats.coarsened), never finer cells"
                )
            if epsilon == 0 and (counts.sum(axis=1) > _n_train(profiles, r["node"]) + 1e-6).any():
                raise FederationError(f"{where} holding more values than the site has training samples")
            total += counts
        lo, width = grids[m]
        out[m] = np.array([quantile(total[j], lo[j], width[j], 0.5) for j in range(d)])
    return out


def ask(
    exchange: Exchange, nodes: Sequence[int], key: str, request: dict[str, Any], sites: Mapping[int, str]
) -> list[dict[str, Any]]:
    """One query to every node in `nodes`; each reply's values (lists of floats, one per feature or
    per feature and bin) with its "node" and "site" (`sites`: node -> site, from the handshake). A
    site that fails or does not answer stops the run, named."""
    content = RecordDict({CONFIG_RECORD: ConfigRecord({key: json.dumps(request)})})
    replies = exchange([Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes])
    out = []
    for msg in replies:
        node = msg.metadata.src_node_id
        site = sites.get(node, f"at node {node}")
        if msg.has_error():
            raise FederationError(f"feature statistics: site {site} failed: {error_reason(msg)}")
        record = msg.content.metric_records.get(METRICS_RECORD)
        if record is None:
            raise FederationError(f"feature statistics: site {site} sent no {METRICS_RECORD!r}")
        out.append({**dict(record), "node": node, "site": site})
    missing = [sites.get(n, f"at node {n}") for n in nodes if n not in {r["node"] for r in out}]
    if missing:
        raise FederationError(
            f"feature statistics: {len(missing)} of {len(nodes)} training sites did not answer: {', '.join(missing)}"
        )
    return out


def _array(reply: dict[str, Any], key: str, width: int) -> np.ndarray:
    """A reply's list under `key`: `width` finite numbers, else the site is named."""
    value = reply.get(key)
    if not isinstance(value, list) or len(value) != width or not np.isfinite(np.asarray(value, dtype=np.float64)).all():
        raise FederationError(
            f"feature statistics: site {reply['site']} sent {key} that is not a list of {width} finite numbers"
        )
    return np.asarray(value, dtype=np.float64)


def _moments(reply: dict[str, Any], spec: Modality, n_max: float, noisy: bool) -> Moments:
    """A site's (n, mean, M2) of a modality (absent: a site that holds none of it), checked as
    untrusted: one finite value per feature; 0 <= n <= n_max (the site's training samples), n
    whole unless noised; M2 >= 0, and 0 where n is; where a feature declares [low, high] the mean
    within it and M2 at most n (high - low)^2 / 4 (the widest n values in the range can spread).
    Under noise, which can push an honest site's mean or M2 out, those two are clamped instead."""
    m, width = spec.name, len(spec.features)
    keys = [f"{m}/{k}" for k in MOMENT_KEYS]
    if not any(k in reply for k in keys):
        return Moments.empty(width)
    n, mean, m2 = (_array(reply, k, width) for k in keys)
    where = f"feature statistics: site {reply['site']} sent"

    def refuse(bad: np.ndarray, what: str) -> None:
        if bad.any():
            name = spec.features[int(np.flatnonzero(bad)[0])].name
            raise FederationError(f"{where} {what} of feature {name!r} of {m}")

    whole = noisy | (n == np.round(n))
    refuse((n < 0) | (n > n_max) | ~whole, f"a count that no set of its {int(n_max)} training samples has")
    refuse((m2 < 0) | ((n == 0) & (m2 != 0)), "an M2 that no set of values has")
    low, high = _bounds(spec)
    declared = ~np.isnan(low) & ~np.isnan(high) & (n > 0)
    widest = np.where(declared, n * (high - low) ** 2 / 4, np.inf)
    if noisy:
        return Moments(n, np.where(declared, np.clip(mean, low, high), mean), np.minimum(m2, widest))
    tol = 1e-9 * np.maximum(1.0, np.maximum(np.abs(np.nan_to_num(low)), np.abs(np.nan_to_num(high))))
    refuse(declared & ((mean < low - tol) | (mean > high + tol)), "a mean outside the declared range [low, high]")
    refuse(declared & (m2 > widest * (1 + 1e-9) + tol), "an M2 wider than values in the declared [low, high] spread")
    return Moments(n, mean, m2)
