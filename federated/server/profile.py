"""`multimed-fl stats` on the server: a statistics-only run that profiles the sites, trains nothing.

The flow, the same under every engine (the in-process grid, or a SuperLink when the ServerApp
runs with the run-config key `statistics-only`): the handshake (who is there, what schema they
hold; in site-local mode the schemas agreed as for training), then two profile queries to every
site, training and held-out alike (clients/site_profile.py):

1. counts: each site's counts, label mix, missingness and per-feature (n, mean, M2), merged
   exactly into the pooled moments (federated/core/feature_stats.py: Chan et al.);
2. histograms: each site's counts on the grid every site shares (pooled mean +- 8 SD), fine
   (HIST_BINS) or, under DP, coarse (PROFILE_COARSE_BINS), released coarsened: cells of whole
   1/64ths of the grid (feature_stats.BLOCKS) of at least min_count values each; quantiles come
   from their sum.

Both requests carry preprocess.min_count and epsilon; a site holds them to its own floor. Every
reply is checked as untrusted input (shapes, finite values, non-negative counts, histograms
coarse_enough and of whole blocks: a site that would place one patient's value is refused), and a
site that fails or does not answer stops the profile, naming the site (never a node id).
Suppression of small cells and the outputs are federated/server/profile_report.py's.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp.grid import Grid

from federated.core.arrays import record_to_numpy
from federated.core.config.schema import ExperimentConfig
from federated.core.corpus_schema import CorpusSchema, Modality
from federated.core.feature_stats import BLOCKS, HIST_BINS, Moments, coarse_enough, combine, grid
from federated.core.protocol import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    PROFILE_COARSE_BINS,
    PROFILE_REPLY,
    PROFILE_REQUEST,
)
from federated.core.replies import error_reason
from federated.core.targets import VECTOR
from federated.server.evaluation import SiteProfile
from federated.server.handshake import handshake
from federated.server.site_agreement import FederationError, agreed_schema
from federated.server.site_roster import expected_site_names
from federated.server.transport import exchange

COUNTS, HISTOGRAMS = "counts", "histograms"


def feature_names(modality: Modality) -> list[str]:
    """The profiled features: a raw modality's listed ones (the zero padding after them is no
    feature), else every column, named <modality>[j] (clients/site_profile.py: profiled_width)."""
    if modality.raw_features:
        return [f.name for f in modality.features]
    return [f"{modality.name}[{j}]" for j in range(int(modality.shape[0]))]


@dataclass
class SiteAggregates:
    """What one site sent: counts and per-feature aggregates, no row."""

    site: str
    role: str
    tasks: dict[str, dict[str, int]]  # task -> split -> samples
    labels: dict[str, list[int]]  # task -> class counts (positives per label for multi-label)
    lacking: dict[str, int] = field(default_factory=dict)  # modality -> samples of its tasks without it
    # modality -> rows of values (a raw modality's: each sample once, however many tasks it feeds)
    rows: dict[str, int] = field(default_factory=dict)
    observed: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> observed values per feature
    moments: dict[str, Moments] = field(default_factory=dict)  # modality -> released moments (n = 0: none)
    hist: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> (features, bins)
    sent: dict[str, list[int]] = field(default_factory=dict)  # modality -> features with a histogram


@dataclass
class Profile:
    """A statistics-only run's result, before suppression."""

    schema: CorpusSchema
    sites: list[SiteAggregates]
    pooled: dict[str, Moments]  # modality -> the merged moments of every released feature
    grids: dict[str, tuple[np.ndarray, np.ndarray]]  # modality -> (lower edge, fine bin width) per feature
    bins: int  # the histograms' bins (HIST_BINS, or PROFILE_COARSE_BINS under DP)
    min_count: int
    epsilon: float
    excluded: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0

    def vector_modalities(self) -> list[str]:
        held = {m for s in self.sites for m in s.observed}
        return [m for m, spec in self.schema.modalities.items() if spec.kind == VECTOR and m in held]


def _ask(
    grid_: Grid, requests: dict[int, str], profiles: dict[int, SiteProfile], timeout: float | None, what: str
) -> dict[int, tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """Send each node its profile request; node -> (the reply's JSON, its arrays)."""
    messages = [
        Message(
            RecordDict({CONFIG_RECORD: ConfigRecord({PROFILE_REQUEST: text})}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node, text in requests.items()
    ]
    out = {}
    for msg in exchange(grid_, messages, timeout):
        node = msg.metadata.src_node_id
        where = f"profile ({what}): site {profiles[node].site}"
        if msg.has_error():
            raise FederationError(f"{where} failed: {error_reason(msg)}")
        try:
            body = json.loads(str(msg.content.config_records[CONFIG_RECORD][PROFILE_REPLY]))
            arrays = record_to_numpy(msg.content.array_records[ARRAYS_RECORD])
        except (KeyError, ValueError, TypeError) as e:
            raise FederationError(f"{where}: a malformed reply ({type(e).__name__}: {e})") from None
        if not isinstance(body, dict):
            raise FederationError(f"{where}: the reply's {PROFILE_REPLY} is not a JSON object")
        out[node] = (body, arrays)
    missing = [profiles[n].site for n in requests if n not in out]
    if missing:
        raise FederationError(
            f"profile ({what}): no reply from site(s) {', '.join(missing)} within engine.round_timeout_s"
        )
    return out


def _count(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise FederationError(f"{where}: not a count ({value!r})"[:300])
    return int(value)


def _array(arrays: dict[str, np.ndarray], key: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    a = arrays.get(key)
    if a is None or a.shape != shape or not np.isfinite(a).all():
        got = "none" if a is None else f"shape {a.shape}"
        raise FederationError(f"{where}: {key} must be a finite array of shape {shape} ({got})")
    return a.astype(np.float64)


def _site_counts(
    p: SiteProfile, schema: CorpusSchema, body: dict[str, Any], arrays: dict[str, np.ndarray]
) -> SiteAggregates:
    """A counts reply, checked against the federation's schema."""
    where = f"profile (counts): site {p.site}"
    tasks_raw, labels_raw, mods_raw = body.get("tasks"), body.get("labels"), body.get("modalities")
    if not (isinstance(tasks_raw, dict) and isinstance(labels_raw, dict) and isinstance(mods_raw, dict)):
        raise FederationError(f"{where}: the reply needs tasks, labels and modalities mappings")
    tasks: dict[str, dict[str, int]] = {}
    for t, splits in tasks_raw.items():
        if t not in schema.tasks or not isinstance(splits, dict) or set(splits) != {"train", "test"}:
            raise FederationError(f"{where}: task {t!r} is not a task of the federation, with train and test counts")
        tasks[t] = {s: _count(v, f"{where}: task {t} {s}") for s, v in splits.items()}
    labels: dict[str, list[int]] = {}
    for t, counts in labels_raw.items():
        if t not in tasks or not isinstance(counts, list) or len(counts) != len(schema.task(t).classes):
            raise FederationError(f"{where}: the label mix of task {t!r} is not one count per class")
        labels[t] = [_count(v, f"{where}: task {t} class {j}") for j, v in enumerate(counts)]
    site = SiteAggregates(p.site, p.role.value, tasks, labels)
    for m, entry in mods_raw.items():
        spec = schema.modalities.get(m)
        if spec is None or spec.kind != VECTOR or not isinstance(entry, dict):
            raise FederationError(f"{where}: {m!r} is not a vector modality of the federation")
        d = len(feature_names(spec))
        site.lacking[m] = _count(entry.get("lacking"), f"{where}: modality {m} lacking")
        site.rows[m] = _count(entry.get("rows"), f"{where}: modality {m} rows")
        observed = _array(arrays, f"{m}/observed", (d,), f"{where}: modality {m}")
        if (observed < 0).any():
            raise FederationError(f"{where}: modality {m}: negative observed counts")
        site.observed[m] = observed
        n, mean, m2 = _array(arrays, f"{m}/moments", (3, d), f"{where}: modality {m}")
        if (n < 0).any() or (m2 < 0).any():
            raise FederationError(f"{where}: modality {m}: a negative count or sum of squares")
        site.moments[m] = Moments(n, mean, m2)
    return site


def _request(phase: str, cfg: ExperimentConfig, **more: Any) -> str:
    """A profile request: its phase, the server's min_count and epsilon (a site may refuse them,
    never lower them), and what the phase needs."""
    pre = cfg.preprocess
    return json.dumps({"phase": phase, "min_count": pre.min_count, "epsilon": pre.epsilon, **more})


def _histogram_request(
    site: SiteAggregates,
    grids: dict[str, tuple[np.ndarray, np.ndarray]],
    pooled: dict[str, Moments],
    bins: int,
    cfg: ExperimentConfig,
) -> str:
    grid_ = {}
    for m, (lo, width) in grids.items():
        if m not in site.moments:
            continue
        features = [int(j) for j in np.flatnonzero((site.moments[m].n > 0) & (pooled[m].n > 0))]
        grid_[m] = {"lo": lo.tolist(), "width": width.tolist(), "features": features}
    return _request(HISTOGRAMS, cfg, bins=bins, grid=grid_)


def coarse_cells(hist: np.ndarray, min_count: int) -> int | None:
    """The first feature (row) of a received histogram that is not as feature_stats.coarsened
    releases it (constant within each of the BLOCKS blocks, every cell of equal bins holding at
    least min_count values); None if every row is."""
    blocks = hist.reshape(len(hist), BLOCKS, -1)
    whole = (blocks == blocks[:, :, :1]).all(axis=(1, 2))
    sums = blocks.sum(axis=2)  # within whole blocks, runs of equal bins are runs of equal blocks: 64x less to walk
    for j in range(len(hist)):
        if not (whole[j] and coarse_enough(sums[j : j + 1], min_count)):
            return j
    return None


def _site_histograms(
    site: SiteAggregates,
    body: dict[str, Any],
    arrays: dict[str, np.ndarray],
    bins: int,
    min_count: int,
    names: dict[str, list[str]],
) -> None:
    where = f"profile (histograms): site {site.site}"
    sent = body.get("sent")
    if not isinstance(sent, dict) or body.get("bins") != bins:
        raise FederationError(f"{where}: the reply needs the features sent and {bins} bins")
    for m, features in sent.items():
        if m not in site.observed:
            raise FederationError(f"{where}: a histogram of modality {m!r}, which it did not profile")
        d = len(site.observed[m])
        if not isinstance(features, list) or any(isinstance(j, bool) or not isinstance(j, int) for j in features):
            raise FederationError(f"{where}: modality {m}: sent must be a list of feature positions")
        hist = _array(arrays, f"{m}/hist", (d, bins), f"{where}: modality {m}")
        if (hist < 0).any():
            raise FederationError(f"{where}: modality {m}: a negative histogram count")
        keep = np.zeros(d, dtype=bool)
        keep[[j for j in features if 0 <= j < d]] = True
        hist[~keep] = 0.0
        bad = coarse_cells(hist, min_count)
        if bad is not None:
            raise FederationError(
                f"{where}: modality {m}: the histogram of feature {names[m][bad]} has a cell of fewer than "
                f"min_count={min_count} values or not of whole 1/{BLOCKS}ths of the grid (a bin could place one "
                "patient's value); refused"
            )
        site.hist[m], site.sent[m] = hist, sorted(j for j in features if 0 <= j < d)


def run_profile(grid_: Grid, cfg: ExperimentConfig, planned_sites: Sequence[str] = ()) -> Profile:
    """Handshake, counts and moments, then histograms on the shared grid: the run's Profile."""
    t0 = time.perf_counter()
    profiles = handshake(
        grid_,
        expected=cfg.engine.expected_sites,
        timeout_s=cfg.engine.handshake_timeout_s,
        expected_names=expected_site_names(cfg, planned_sites),
    )
    schema, excluded = agreed_schema(cfg, profiles, "profiles the others")
    profiles = {n: p for n, p in profiles.items() if p.site not in excluded}
    timeout = cfg.engine.round_timeout_s or None
    pre = cfg.preprocess
    counts = _ask(grid_, dict.fromkeys(profiles, _request(COUNTS, cfg)), profiles, timeout, COUNTS)
    sites = {n: _site_counts(profiles[n], schema, *counts[n]) for n in profiles}
    pooled: dict[str, Moments] = {}
    grids: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for m in {m for s in sites.values() for m in s.moments}:
        pooled[m] = combine([s.moments[m] for s in sites.values() if m in s.moments])
        lo, width = grid(pooled[m].mean, pooled[m].std)
        grids[m] = (np.where(pooled[m].n > 0, lo, 0.0), np.where(pooled[m].n > 0, width, 1.0))
    bins = PROFILE_COARSE_BINS if pre.epsilon > 0 else HIST_BINS
    asks = {n: _histogram_request(s, grids, pooled, bins, cfg) for n, s in sites.items() if s.moments}
    names = {m: feature_names(schema.modality(m)) for m in grids}
    if asks:
        for n, (body, arrays) in _ask(grid_, asks, profiles, timeout, HISTOGRAMS).items():
            _site_histograms(sites[n], body, arrays, bins, pre.min_count, names)
    ordered = sorted(sites.values(), key=lambda s: s.site)
    return Profile(schema, ordered, pooled, grids, bins, pre.min_count, pre.epsilon, excluded, time.perf_counter() - t0)
