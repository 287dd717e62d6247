"""What a site tells `multimed-fl stats` (federated/server/profile.py): aggregates, never a row.

Two queries, as in the feature statistics round (federated/core/feature_stats.py):

1. counts: samples per task and split, the label mix of each classification task (class counts;
   positives per label of a multi-label task), per vector modality the samples lacking it and
   the observed values per feature, and per feature (n, mean, M2) of its observed values;
2. histograms: per feature, the counts of its observed values on the grid every site shares
   (the pooled mean +- 8 SD the server derived from the merged moments), released only as
   feature_stats.coarsened: cells of whole 1/64ths of the grid holding at least min_count values
   each, a cell's count spread evenly over its bins. A fine bin of one patient would place that
   patient's value to 1/4096 of the grid.

Every number is a count, a per-feature statistic or a histogram bin: no reply holds an array
whose length is a number of rows. A feature with fewer than `min_count` observed values at this
site is sent as nothing (no moments, no histogram). A modality that lists its features
(Modality.raw_features) is profiled on its raw values (missing = NaN); any other vector modality
as the site loaded it. Both splits count: this is a profile of what the site holds.

The request carries the min_count and epsilon the server asks for; the site holds them to its own
floor (deployed: its node config's stats-min-count and stats-epsilon), never the server's word:
more suppression or noise is answered, less refused. A phase is answered once per run: the same
request again gets the same reply (fresh noise could be averaged away), a different one is refused.

With epsilon > 0 each reply is epsilon/3-DP per sample (Laplace mechanism; the counts, the
moments and the histograms each get a third of the budget, so the profile is epsilon-DP): the
counts' noise is scaled to the most counts one sample can change, the moments are
laplace_moments (features need a declared range; an indicator's is [0, 1]; others are not
released) and the histograms are on the coarse REPORT_BINS grid (noise on HIST_BINS bins would
drown any site), then coarsened as above: post-processing, so no released cell's noisy count is
under min_count and the boundaries cost no budget. Which features a site releases (>= min_count
observed values) is decided on exact counts, as NVIDIA FLARE does: that choice is not covered by
the epsilon.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np
from flwr.app import ConfigRecord, Context, RecordDict

from clients.site_data import SiteData, once_each
from clients.site_runtime import ReleaseFloor, SiteRuntime, is_deployed
from federated.core.arrays import pack_arrays
from federated.core.corpus_schema import Modality
from federated.core.feature_stats import HIST_BINS, Moments, coarsened, histogram, laplace_moments
from federated.core.features import INDICATOR
from federated.core.protocol import ARRAYS_RECORD, CONFIG_RECORD, PROFILE_COARSE_BINS, PROFILE_REPLY
from federated.core.targets import CLASS_TARGETS, MULTILABEL, VECTOR

COUNTS, HISTOGRAMS = "counts", "histograms"
PHASES = (COUNTS, HISTOGRAMS)
REPORT_BINS = PROFILE_COARSE_BINS  # the coarse grid: reports, and histograms under DP
DP_PARTS = 3  # counts, moments, histograms: each gets epsilon / 3


class ProfileRequestError(ValueError):
    """A profile request this site refuses; the message names the field."""


@dataclass(frozen=True)
class Grid:
    """One modality's histogram grid: per feature the lower edge and the fine bin width, and
    which features the server asks for."""

    lo: np.ndarray
    width: np.ndarray
    features: tuple[int, ...]


@dataclass(frozen=True)
class ProfileRequest:
    """What the server asks a site for (the JSON value of protocol.PROFILE_REQUEST)."""

    phase: str
    min_count: int  # the suppression floor the server asks for (held to the site's own: check_floor)
    epsilon: float  # the DP budget of the whole profile (0: exact)
    bins: int = HIST_BINS  # histograms: HIST_BINS, or REPORT_BINS (coarse, required under DP)
    grids: dict[str, Grid] = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str, schema_widths: dict[str, int]) -> ProfileRequest:
        """Parsed and checked as untrusted input: a phase, min_count (an integer >= 1), epsilon
        (a finite number >= 0), a bin count, and per modality of this site's (name -> width) a
        grid of finite numbers, positive widths, features in range."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileRequestError(f"profile request: not JSON ({e})") from None
        if not isinstance(raw, dict) or raw.get("phase") not in PHASES:
            raise ProfileRequestError(f"profile request: phase must be one of {', '.join(PHASES)}")
        min_count, epsilon = raw.get("min_count"), raw.get("epsilon")
        if not isinstance(min_count, int) or isinstance(min_count, bool) or min_count < 1:
            raise ProfileRequestError("profile request: min_count must be an integer >= 1")
        if not _number(epsilon) or epsilon < 0:
            raise ProfileRequestError("profile request: epsilon must be a finite number >= 0")
        bins = raw.get("bins", HIST_BINS)
        if bins not in (HIST_BINS, REPORT_BINS) or isinstance(bins, bool):
            raise ProfileRequestError(f"profile request: bins must be {HIST_BINS} or {REPORT_BINS}")
        grids_raw = raw.get("grid", {})
        if not isinstance(grids_raw, dict):
            raise ProfileRequestError("profile request: grid must be a mapping of modality -> grid")
        grids = {}
        for m, g in grids_raw.items():
            if m not in schema_widths:
                continue  # a modality this site does not hold: nothing to send for it
            grids[m] = _grid(g, schema_widths[m], f"profile request: grid of modality {m!r}")
        return cls(raw["phase"], min_count, float(epsilon), int(bins), grids)


def _grid(raw: object, width: int, where: str) -> Grid:
    if not isinstance(raw, dict) or set(raw) != {"lo", "width", "features"}:
        raise ProfileRequestError(f"{where}: must be {{lo, width, features}}")
    arrays = {}
    for key in ("lo", "width"):
        v = raw[key]
        if not isinstance(v, list) or len(v) != width or not all(_number(x) for x in v):
            raise ProfileRequestError(f"{where}: {key} must be a list of {width} finite numbers")
        arrays[key] = np.asarray(v, dtype=np.float64)
    if not (arrays["width"] > 0).all():
        raise ProfileRequestError(f"{where}: every bin width must be positive")
    feats = raw["features"]
    if not isinstance(feats, list) or not all(isinstance(j, int) and not isinstance(j, bool) for j in feats):
        raise ProfileRequestError(f"{where}: features must be a list of feature positions")
    if any(not 0 <= j < width for j in feats) or len(set(feats)) != len(feats):
        raise ProfileRequestError(f"{where}: features must be distinct positions below {width}")
    return Grid(arrays["lo"], arrays["width"], tuple(sorted(feats)))


def _number(x: object) -> TypeGuard[int | float]:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def profiled_width(modality: Modality) -> int:
    """The features profiled: a raw modality's listed ones (zero padding after them is not a
    feature), else every column."""
    return len(modality.features) if modality.raw_features else int(modality.shape[0])


@dataclass
class ModalityBlock:
    """A vector modality at this site: the rows that hold it (rows x profiled features, NaN =
    missing) and how many of the site's samples of tasks that take it lack it."""

    values: np.ndarray
    lacking: int


def vector_modalities(data: SiteData) -> list[str]:
    """The vector modalities the site's tasks take, in schema order."""
    used = {m for t in data.plan.tasks for m in data.schema.task(t).inputs}
    return [m for m, spec in data.schema.modalities.items() if spec.kind == VECTOR and m in used]


def modality_block(data: SiteData, modality: str) -> ModalityBlock:
    """Every (task, split) the site loaded that takes `modality`. A raw-feature modality: its raw
    rows as SiteData keeps them (SiteData.raw), each corpus array row once (a sample that feeds two
    tasks is one patient: site_data.once_each); any other: the loaded rows, one per sample."""
    spec = data.schema.modality(modality)
    width = profiled_width(spec)
    lacking = sum(
        int((~part.present[modality].numpy().astype(bool)).sum())
        for part in data.splits.values()
        if modality in part.present
    )
    if spec.raw_features:
        return ModalityBlock(once_each([b[modality] for b in data.raw.values() if modality in b], width), lacking)
    parts = []
    for _, part in sorted(data.splits.items()):
        if modality in part.inputs:
            present = part.present[modality].numpy().astype(bool)
            parts.append(part.inputs[modality].numpy().reshape(len(present), -1)[present, :width].astype(np.float64))
    return ModalityBlock(np.concatenate(parts) if parts else np.zeros((0, width)), lacking)


def _blocks(data: SiteData) -> Iterator[tuple[str, Modality, ModalityBlock]]:
    for m in vector_modalities(data):
        yield m, data.schema.modality(m), modality_block(data, m)


def label_counts(data: SiteData, task: str) -> list[int] | None:
    """Class counts of a classification task (both splits), positives per label of a multi-label
    one, None for any other target."""
    spec = data.schema.task(task)
    parts = [data.splits[(task, s)].targets.numpy() for s in ("train", "test") if (task, s) in data.splits]
    if spec.target in CLASS_TARGETS:
        labels = np.concatenate([p.reshape(-1) for p in parts]) if parts else np.zeros(0, dtype=np.int64)
        labels = labels[(labels >= 0) & (labels < len(spec.classes))]
        return np.bincount(labels.astype(np.int64), minlength=len(spec.classes)).tolist()
    if spec.target == MULTILABEL:
        if not parts:
            return [0] * len(spec.classes)
        return (np.concatenate(parts) > 0).sum(axis=0).astype(np.int64).reshape(-1).tolist()
    return None


def _label_sensitivity(data: SiteData, task: str) -> int:
    spec = data.schema.task(task)
    return 1 if spec.target in CLASS_TARGETS else len(spec.classes) if spec.target == MULTILABEL else 0


def feature_range(modality: Modality) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low, high, declared) per profiled feature: the data dictionary's range; an indicator's is
    [0, 1]; a feature without one cannot be released under DP (declared False)."""
    width = profiled_width(modality)
    low, high, declared = np.zeros(width), np.ones(width), np.zeros(width, dtype=bool)
    for j, f in enumerate(modality.features[:width]):
        if f.low is not None and f.high is not None:
            low[j], high[j], declared[j] = f.low, f.high, True
        elif f.kind == INDICATOR:
            declared[j] = True
    return low, high, declared


def _noisy(counts: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Laplace noise of this scale, then rounded and clipped at 0 (post-processing)."""
    noisy = np.asarray(counts, dtype=np.float64) + rng.laplace(0.0, scale, np.shape(counts))
    return np.maximum(np.rint(noisy), 0.0)


def counts_reply(data: SiteData, min_count: int, epsilon: float, rng: np.random.Generator) -> RecordDict:
    """Phase 1: counts, label mix, missingness and moments (see the module docstring)."""
    tasks = {
        t: {s: len(data.splits[(t, s)]) if (t, s) in data.splits else 0 for s in ("train", "test")}
        for t in data.plan.tasks
    }
    labels = {t: c for t in data.plan.tasks if (c := label_counts(data, t)) is not None}
    blocks = list(_blocks(data))
    modalities: dict[str, dict[str, Any]] = {}
    arrays: dict[str, np.ndarray] = {}
    if epsilon > 0:
        # One sample moves its (task, split) count, its label's, and per vector modality its task
        # takes either the modality's lacking count or its rows and up to every feature's observed count.
        widths = {m: b.values.shape[1] for m, _, b in blocks}
        sens = max(
            (
                1 + _label_sensitivity(data, t) + sum(1 + widths[m] for m in data.schema.task(t).inputs if m in widths)
                for t in data.plan.tasks
            ),
            default=1,
        )
        scale = sens * DP_PARTS / epsilon
        tasks = {
            t: {s: int(v) for s, v in zip(n, _noisy(np.array(list(n.values())), scale, rng), strict=True)}
            for t, n in tasks.items()
        }
        labels = {t: _noisy(np.array(c), scale, rng).astype(int).tolist() for t, c in labels.items()}
    for m, spec, block in blocks:
        exact = (~np.isnan(block.values)).sum(axis=0)
        released = exact >= max(min_count, 1)
        if epsilon > 0:
            low, high, declared = feature_range(spec)
            released &= declared
            eps_m = epsilon / DP_PARTS / len(blocks)
            moments = laplace_moments(block.values, low, high, eps_m, rng) if len(block.values) else None
            observed = _noisy(exact, scale, rng)
            lacking, rows = (int(v) for v in _noisy(np.array([block.lacking, len(block.values)]), scale, rng))
        else:
            moments = Moments.of(block.values)
            observed, lacking, rows = exact.astype(np.float64), block.lacking, len(block.values)
        if moments is None or not released.any():
            moments = Moments.empty(block.values.shape[1])
        keep = released.astype(np.float64)
        arrays[f"{m}/observed"] = observed
        arrays[f"{m}/moments"] = np.stack([moments.n * keep, moments.mean * keep, moments.m2 * keep])
        modalities[m] = {"lacking": lacking, "rows": rows}  # released: the features whose moments have n > 0
    reply = {"tasks": tasks, "labels": labels, "modalities": modalities}
    return RecordDict(
        {CONFIG_RECORD: ConfigRecord({PROFILE_REPLY: json.dumps(reply)}), ARRAYS_RECORD: pack_arrays(arrays)}
    )


def histograms_reply(data: SiteData, request: ProfileRequest, rng: np.random.Generator) -> RecordDict:
    """Phase 2: per modality the server asked for, the requested features' histograms on its
    grid, coarsened (feature_stats.coarsened: every released cell of whole blocks holds at least
    min_count values); rows of features this site has fewer than min_count values of stay empty,
    and are not listed as sent. Under DP the noisy REPORT_BINS histogram is what is coarsened."""
    min_count, epsilon = request.min_count, request.epsilon
    if epsilon > 0 and request.bins != REPORT_BINS:
        raise ProfileRequestError(
            f"profile request: under DP (epsilon > 0) histograms are sent on {REPORT_BINS} bins, not {request.bins}"
        )
    sent: dict[str, list[int]] = {}
    arrays: dict[str, np.ndarray] = {}
    blocks = {m: (spec, b) for m, spec, b in _blocks(data) if m in request.grids}
    for m, (spec, block) in blocks.items():
        grid = request.grids[m]
        exact = (~np.isnan(block.values)).sum(axis=0)
        ok = [j for j in grid.features if exact[j] >= min_count]
        if epsilon > 0:
            declared = feature_range(spec)[2]
            ok = [j for j in ok if declared[j]]
        fine = histogram(block.values, grid.lo, grid.width)
        hist = fine.reshape(len(fine), request.bins, HIST_BINS // request.bins).sum(axis=2)
        mask = np.zeros(len(hist), dtype=bool)
        mask[ok] = True
        hist[~mask] = 0.0
        arrays[f"{m}/hist"] = hist
        sent[m] = ok
    if epsilon > 0 and arrays:
        sens = max(sum(len(v) for v in sent.values()), 1)  # a sample adds one to one bin per feature
        scale = sens * DP_PARTS / epsilon
        for m, hist in arrays.items():
            rows = sent[m.split("/")[0]]
            hist[rows] = _noisy(hist[rows], scale, rng)
    for key, hist in arrays.items():
        arrays[key] = coarsened(hist, min_count)
        m = key.split("/")[0]
        sent[m] = [j for j in sent[m] if arrays[key][j].sum() > 0]  # under DP a noisy total under min_count
    return RecordDict(
        {
            CONFIG_RECORD: ConfigRecord({PROFILE_REPLY: json.dumps({"sent": sent, "bins": request.bins})}),
            ARRAYS_RECORD: pack_arrays(arrays),
        }
    )


def check_floor(request: ProfileRequest, floor: ReleaseFloor) -> None:
    """Refuse a request that asks for less suppression or less noise than this site's floor
    (clients/site_runtime.ReleaseFloor: deployed, its node config's stats-min-count and
    stats-epsilon; simulated, the run's preprocess settings), naming the setting."""
    if request.min_count < floor.min_count:
        raise ProfileRequestError(
            f"profile request: min_count {request.min_count} is below {floor.min_count_key}={floor.min_count}"
        )
    if floor.epsilon > 0 and not 0 < request.epsilon <= floor.epsilon:
        raise ProfileRequestError(
            f"profile request: epsilon {request.epsilon:g} is less noise than {floor.epsilon_key}="
            f"{floor.epsilon:g} allows (an epsilon in (0, {floor.epsilon:g}] for the whole profile)"
        )


def site_profile(data: SiteData, request_json: str, floor: ReleaseFloor, rng: np.random.Generator) -> RecordDict:
    """The reply to a profile request (protocol.PROFILE_REQUEST), under the request's min_count
    and epsilon once the site's floor allows them."""
    widths = {m: profiled_width(data.schema.modality(m)) for m in vector_modalities(data)}
    request = ProfileRequest.from_json(request_json, widths)
    check_floor(request, floor)
    if request.phase == COUNTS:
        return counts_reply(data, request.min_count, request.epsilon, rng)
    return histograms_reply(data, request, rng)


ANSWERED = "multimed-fl.profile."  # + phase: in the node's Context.state, what this run asked and the noise seed


def noise_seed(seed: int, site: str, phase: str, deployed: bool) -> int:
    """The DP noise's seed. Deployed, fresh OS entropy: noise the coordinator could regenerate
    from the run's seed would protect nothing. Simulated (where the server could read every row
    anyway), from (seed, site, phase), so one config gives one profile."""
    if deployed:
        return secrets.randbits(128)
    return int.from_bytes(hashlib.sha256(f"profile/{seed}/{site}/{phase}".encode()).digest()[:16], "little")


def _digest(request_json: str) -> str:
    try:
        text = json.dumps(json.loads(request_json), sort_keys=True)
    except json.JSONDecodeError:
        text = request_json
    return hashlib.sha256(text.encode()).hexdigest()


def profile_reply(rt: SiteRuntime, request_json: str, context: Context) -> RecordDict:
    """This site's reply to a profile request, under its floor (rt.release_floor). Each phase is
    answered once per run: its request's digest and noise seed go into the node's Context.state, so
    the same request again gets the same reply (the same noise: it cannot be averaged away) and a
    different one is refused (two answers could average the noise or difference the cells)."""
    try:
        phase = str(json.loads(request_json).get("phase", ""))
    except (json.JSONDecodeError, AttributeError):
        phase = ""  # site_profile names what is wrong with it
    run = str(context.run_id)
    before = context.state.config_records.get(ANSWERED + phase)
    if before is not None and before.get("run") == run:
        if before.get("request") != _digest(request_json):
            raise ProfileRequestError(
                f"site {rt.plan.site}: this run already asked for its {phase} profile; a second, different "
                "request is refused (answering both could average away the noise or difference the cells)"
            )
        seed = int(str(before["seed"]))
    else:
        seed = noise_seed(rt.cfg.seed, rt.plan.site, phase, is_deployed(context.node_config))
    reply = site_profile(rt.data, request_json, rt.release_floor, np.random.default_rng(seed))
    context.state[ANSWERED + phase] = ConfigRecord({"run": run, "request": _digest(request_json), "seed": str(seed)})
    return reply
