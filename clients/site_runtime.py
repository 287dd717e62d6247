"""Which site this ClientApp is, resolved once per process from the run and node config.

Run config (same for every node): `multimed-config` (the resolved experiment YAML) and
`corpus-path`. Node config (per node): `site` (deployment: a hospital names itself) or
`partition-id` (simulation: the i-th site of the plan), and optionally `corpus-path` (a
hospital's own copy of its data), `device` (where it computes; wins over engine.device) and, in
deployment, the privacy floor of the feature statistics round: `stats-min-count` (default 10: the
least min_count a query may ask) and `stats-epsilon` (default 0: exact aggregates allowed; > 0:
noise required, and the run's queries together spend at most this). A deployed site's run config
is the server's, so only its node config can hold the server to a floor (ReleaseFloor).
The site plan is rebuilt from config and seed, so every process agrees on it without shipping it
around.

Paths a site reads or writes (`corpus-path`, `state-dir`): in simulation (node config with
`partition-id`) the engine sets them in the run config, and a node config value wins. In
deployment (node config with `site`) they come only from the site's own node config: a server
could otherwise point a hospital at data or state files of its choosing, so a value the server
sends where the node config has none is refused, naming the key; the server's value is ignored
where the node config has its own.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import threading
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients.site_data import SiteData, TargetScale, exact_median, pooled_feature_rows
from federated.core.compute import resolve_device
from federated.core.config import ExperimentConfig, config_from_yaml, load_config
from federated.core.config.schema import DEVICE_CHOICES, valid_device_spec
from federated.core.corpus_schema import CorpusSchema, Modality, SchemaError
from federated.core.feature_stats import (
    BLOCKS,
    HIST_BINS,
    Moments,
    Standardiser,
    coarsened,
    laplace_blocks,
    laplace_moments,
)
from federated.core.features import INDICATOR
from federated.core.models import MultiMedModel, build_model
from federated.core.protocol import (
    CONFIG_KEY,
    CORPUS_KEY,
    DEVICE_KEY,
    PARTITION_ID_KEY,
    SITE_KEY,
    STATS_EPSILON_KEY,
    STATS_MIN_COUNT_KEY,
)
from federated.data.cache import prepare_corpus
from federated.data.format import Corpus
from partitions import SitePlan, plan_sites
from partitions.site_local import SITE_LOCAL, plan_own_site, site_corpus_folders
from strategies import ClientAlgorithm, client_algorithm


class SiteConfigError(ValueError):
    """The node or run config does not identify a site, or sets a path the site must set itself."""


# The site's own state record (Context.state) of what it released in this run's feature statistics
# round: per query kind the request's digest and its noise seed, and the epsilon spent so far.
RELEASES_STATE = "feature-stats-releases"


@dataclass(frozen=True)
class ReleaseFloor:
    """The least suppression and the most privacy loss a site accepts from a statistics query, and
    the setting that says so (named in a refusal). In simulation the run's preprocess settings; in
    deployment the site's own node config, since there the run config is the server's: a hostile
    server could otherwise ask min_count=1 and epsilon=0."""

    min_count: int
    epsilon: float  # 0: exact aggregates allowed; > 0: noise required, at most this per run in all
    min_count_key: str
    epsilon_key: str

    @classmethod
    def of_run(cls, cfg: ExperimentConfig) -> ReleaseFloor:
        pre = cfg.preprocess
        return cls(pre.min_count, pre.epsilon, "this run's preprocess.min_count", "this run's preprocess.epsilon")

    @classmethod
    def of_node(cls, node_config: Mapping[str, Any]) -> ReleaseFloor:
        """A deployed site's floor: node config `stats-min-count` (an integer >= 1, default 10) and
        `stats-epsilon` (a number >= 0, default 0)."""
        where = f"site {node_config.get(SITE_KEY, '?')}: node config"
        raw_k, raw_e = node_config.get(STATS_MIN_COUNT_KEY, 10), node_config.get(STATS_EPSILON_KEY, 0.0)
        try:
            k = int(raw_k) if not isinstance(raw_k, bool | float) else None
        except ValueError:
            k = None
        if k is None or k < 1:
            raise SiteConfigError(f"{where} {STATS_MIN_COUNT_KEY} must be an integer >= 1")
        try:
            eps = float(raw_e) if not isinstance(raw_e, bool) else math.nan
        except ValueError:
            eps = math.nan
        if not math.isfinite(eps) or eps < 0:
            raise SiteConfigError(f"{where} {STATS_EPSILON_KEY} must be a finite number >= 0")
        node = "this site's node config"
        return cls(k, eps, f"{node} {STATS_MIN_COUNT_KEY}", f"{node} {STATS_EPSILON_KEY}")


def is_deployed(node_config: Mapping[str, Any]) -> bool:
    """A hospital's own SuperNode names its site; simulated nodes get a partition id."""
    return SITE_KEY in node_config


def site_local_path(key: str, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> str:
    """The path `key` (corpus-path, state-dir) this site uses; "" when none is set. In deployment,
    only the node config's value counts: a server-sent one alone is refused, with the reason."""
    own, sent = node_config.get(key), run_config.get(key)
    if not is_deployed(node_config):
        return str(own or sent or "")
    if not own and sent:
        raise SiteConfigError(
            f"site {node_config[SITE_KEY]}: the server's run config sets {key}={str(sent)!r} but this site's node "
            f"config does not; in deployment a site's {key} comes only from its own node config (set {key} there)"
        )
    return str(own or "")


@dataclass
class SiteRuntime:
    cfg: ExperimentConfig
    plan: SitePlan
    data: SiteData
    config_yaml: str
    algorithm: ClientAlgorithm  # the site side of the run's strategy
    # Site-local mode: the schema the server built the model for (the union of the sites'), as
    # received; None in simulation, where every site's corpus schema is the federation's.
    federation_schema: CorpusSchema | None = None
    _received: tuple[str, str] = ("", "")  # the last (schema, scales) JSON applied
    # The node config's `device`, which wins over the run's engine.device: a hospital knows its
    # own hardware (e.g. device='cuda:1' to keep GPU 0 for the scanner's software). "" = the run's.
    device: str = ""
    corpus_path: str = ""  # the corpus this site opened (pooled statistics re-read it in simulation)
    deployed: bool = False  # a hospital's own SuperNode (its DP noise is drawn from the OS, not a seed)
    floor: ReleaseFloor | None = None  # deployment: the node config's; None: the run's (simulation)
    _features_received: str = ""  # the last feature statistics JSON applied

    def __post_init__(self) -> None:
        if self.cfg.preprocess.statistics == "per_site":  # no round: this site's own rows, from the start
            self.data.use_feature_stats(self.data.own_feature_stats())

    def apply_feature_stats(self, stats_json: str) -> None:
        """Take the feature statistics a train or evaluate message carries (JSON {modality: {mean,
        std, fill}}), checked as untrusted input: an entry for every raw-feature modality this site
        holds, of its width, finite (fill NaN only: no imputation), std positive."""
        if stats_json == self._features_received:
            return
        where = f"site {self.plan.site}: the server's feature statistics"
        try:
            raw = json.loads(stats_json)
        except json.JSONDecodeError as e:
            raise SiteConfigError(f"{where} are not JSON ({e})") from None
        if not isinstance(raw, dict):
            raise SiteConfigError(f"{where} are not a mapping modality -> {{mean, std, fill}}")
        stats = {}
        for m in self.data.raw_modalities:
            if m not in raw:
                raise SiteConfigError(f"{where} have no entry for modality {m}, which this site holds")
            spec = self.data.schema.modality(m)
            names = [f.name for f in spec.features]
            try:
                stats[m] = Standardiser.from_lists(raw[m], len(names), f"{where}: {m}", names, spec.impute)
            except ValueError as e:
                raise SiteConfigError(str(e)) from None
        self.data.use_feature_stats(stats)
        self._features_received = stats_json

    def feature_moments_reply(self, request: Any, ledger: MutableMapping[str, Any]) -> dict[str, list[float]]:
        """A feature statistics round's first query (protocol.FEATURE_MOMENTS): per raw-feature
        modality this site holds, `<m>/n`, `<m>/mean`, `<m>/m2` over its training rows, one value
        per feature; features seen fewer than min_count times sent as empty; with epsilon > 0,
        Laplace noise first (federated/core/feature_stats.py; epsilon-DP per record, not per
        patient). Answered once per run (`ledger`: the run's Context.state record, RELEASES_STATE):
        the same query again gets the same reply, another is refused. scope "pooled" (simulation
        only): the training sites' rows pooled, exact, with `<m>/median` for the modalities asked."""
        req = self._request(request, "modalities", list)
        mods = [m for m in self.data.schema.modalities if m in req["modalities"]]
        if req.get("scope", "site") == "pooled":
            return self._pooled_reply(mods, req.get("medians", []))
        min_count, epsilon = self._release_terms(req)
        mine = [m for m in mods if m in self.data.raw_modalities]
        ranges = {}
        if epsilon > 0:
            ranges = {m: feature_range(self.data.schema.modality(m), f"site {self.plan.site}") for m in mine}
        rng = self._once("moments", req, epsilon, ledger)
        out: dict[str, list[float]] = {}
        for m in mine:
            if epsilon > 0:
                low, high = ranges[m]
                rows = self.data.feature_rows(m)
                moments = laplace_moments(rows, low, high, epsilon / len(mine), rng, n_max=self.plan.n_train)
            else:
                moments = self.data.feature_moments(m)
            moments = moments.suppressed(min_count)
            out |= {f"{m}/n": moments.n.tolist(), f"{m}/mean": moments.mean.tolist(), f"{m}/m2": moments.m2.tolist()}
        return out

    def feature_histogram_reply(self, request: Any, ledger: MutableMapping[str, Any]) -> dict[str, list[float]]:
        """The round's second query (protocol.FEATURE_HISTOGRAM), where a median is asked for:
        `<m>/hist`, (features x HIST_BINS) counts flattened, on the grid the server sends (one
        lower edge and bin width per feature), coarsened before it leaves (feature_stats.coarsened):
        every released cell is a run of whole 64-bin blocks holding at least min_count values, so
        no cell places one patient's value; a feature seen fewer than min_count times sent as
        zeros. With epsilon > 0, Laplace noise of scale features / epsilon per block first (one
        record moves one block of each feature; feature_stats.laplace_blocks). A grid that is not
        finite, has a width <= 0, or spans less than 1/BLOCKS of this site's own values' spread
        (its cells would be narrower than a site's values are apart) is refused. Once per run, as
        the moments query."""
        req = self._request(request, "modalities", dict)
        min_count, epsilon = self._release_terms(req)
        mine = [m for m in self.data.raw_modalities if m in req["modalities"]]
        grids = {m: self._grid(m, req["modalities"][m]) for m in mine}
        rng = self._once("histogram", req, epsilon, ledger)
        out: dict[str, list[float]] = {}
        for m in mine:
            d = len(self.data.schema.modality(m).features)
            counts = self.data.feature_histogram(m, *grids[m])
            if epsilon > 0:
                counts = laplace_blocks(counts, d / (epsilon / len(mine)), rng)
            out[f"{m}/hist"] = coarsened(counts, min_count).reshape(d * HIST_BINS).tolist()
        return out

    def _grid(self, modality: str, raw: Any) -> tuple[np.ndarray, np.ndarray]:
        """A histogram grid the server sent, checked (its values are not named: the site's are not either)."""
        spec = self.data.schema.modality(modality)
        where = f"site {self.plan.site}: the statistics query's histogram grid of {modality}"
        lo, width = (_numbers(raw, k, len(spec.features), where) for k in ("lo", "width"))
        rows = self.data.feature_rows(modality, "train")
        for j, f in enumerate(spec.features):
            span = width[j] * HIST_BINS
            if not width[j] > 0 or not math.isfinite(lo[j] + span):
                raise SiteConfigError(f"{where}: width of feature {f.name!r} must be positive, lo + its span finite")
            col = rows[:, j][~np.isnan(rows[:, j])]
            if col.size and span < (col.max() - col.min()) / BLOCKS:
                raise SiteConfigError(
                    f"{where}: width of feature {f.name!r} spans less than 1/{BLOCKS} of this site's values' "
                    "spread: a grid that fine could place single values (the federation's, the merged mean +- 8 "
                    "SD, is that fine only around an outlier a thousand SDs out)"
                )
        return lo, width

    def _request(self, request: Any, key: str, kind: type) -> dict[str, Any]:
        if not isinstance(request, dict) or not isinstance(request.get(key), kind):
            raise SiteConfigError(
                f"site {self.plan.site}: a feature statistics query must be a mapping with {key!r} ({kind.__name__})"
            )
        return request

    @property
    def release_floor(self) -> ReleaseFloor:
        return self.floor or ReleaseFloor.of_run(self.cfg)

    def _release_terms(self, req: dict[str, Any]) -> tuple[int, float]:
        """(min_count, epsilon) of a release, held to this site's floor (ReleaseFloor: the run's
        preprocess settings in simulation, the node config's in deployment): a server may ask for
        more suppression or noise, never less."""
        floor, where = self.release_floor, f"site {self.plan.site}"
        min_count, epsilon = req.get("min_count"), req.get("epsilon")
        if not isinstance(min_count, int) or isinstance(min_count, bool) or min_count < floor.min_count:
            raise SiteConfigError(
                f"{where}: the statistics query's min_count {min_count!r} is below "
                f"{floor.min_count_key}={floor.min_count}"
            )
        if (
            isinstance(epsilon, bool)
            or not isinstance(epsilon, int | float)
            or not math.isfinite(epsilon)
            or epsilon < 0
        ):
            raise SiteConfigError(f"{where}: the statistics query's epsilon must be a finite number >= 0")
        if floor.epsilon > 0 and not 0 < epsilon <= floor.epsilon:
            raise SiteConfigError(
                f"{where}: the statistics query asks for epsilon {epsilon!r}; {floor.epsilon_key}="
                f"{floor.epsilon} allows a positive share of it, no more"
            )
        return min_count, float(epsilon)

    def _once(
        self, kind: str, req: dict[str, Any], epsilon: float, ledger: MutableMapping[str, Any]
    ) -> np.random.Generator:
        """The noise generator of this run's `kind` query, which a site answers once: the first
        time it records the query's digest, a noise seed and the epsilon spent (in `ledger`, the
        run's Context.state); the same query again draws the same noise, so gets the same reply,
        and a different one is refused, as is one that would take the run's spend past the floor's
        epsilon. Otherwise a server could repeat a noisy query and average its noise away.
        Deployed, the seed is drawn from the OS (the server must not know the noise); in
        simulation it is the run's seed and the site's name, so runs repeat."""
        where, floor = f"site {self.plan.site}", self.release_floor
        digest = hashlib.sha256(json.dumps(req, sort_keys=True).encode()).hexdigest()
        if f"{kind}/query" in ledger:
            if ledger[f"{kind}/query"] != digest:
                raise SiteConfigError(
                    f"{where}: this site already answered a feature {kind} query in this run and answers each "
                    "once (the same query again gets the same reply); a different one is refused, so repeated "
                    "noisy answers cannot be averaged"
                )
            return np.random.default_rng(int(ledger[f"{kind}/seed"]))
        spent = float(ledger.get("spent", 0.0)) + epsilon
        if floor.epsilon > 0 and spent > floor.epsilon * (1 + 1e-9):
            raise SiteConfigError(
                f"{where}: the feature statistics queries of this run would spend epsilon {spent:g} in all, over "
                f"{floor.epsilon_key}={floor.epsilon}"
            )
        seed_value = req.get("seed", 0)
        if not isinstance(seed_value, int) or isinstance(seed_value, bool):
            raise SiteConfigError(f"{where}: the statistics query's seed must be an integer")
        if self.deployed:
            seed = secrets.randbits(128)
        else:
            seed = int.from_bytes(hashlib.sha256(f"{seed_value}/{self.plan.site}".encode()).digest()[:16], "little")
        ledger[f"{kind}/query"], ledger[f"{kind}/seed"], ledger["spent"] = digest, str(seed), spent
        return np.random.default_rng(seed)

    def _pooled_reply(self, mods: list[str], medians: Any) -> dict[str, list[float]]:
        """preprocess.statistics=pooled: the statistics of every training site's training rows in
        one block. In simulation every site process opens the whole corpus and plans every site
        (the server does not hold the corpus under every engine), so the site asked computes them."""
        if self.cfg.sites.planner == SITE_LOCAL or self.deployed:
            raise SiteConfigError(
                f"site {self.plan.site}: preprocess.statistics=pooled is for simulation, where every site "
                "process holds the whole corpus; a hospital's site holds only its own rows (use federated)"
            )
        if not isinstance(medians, list):
            raise SiteConfigError(f"site {self.plan.site}: a pooled statistics query's medians must be a list")
        _, corpus, plans = _plans(self.config_yaml, self.corpus_path)
        out: dict[str, list[float]] = {}
        for m in mods:
            if not corpus.schema.modality(m).raw_features:
                continue
            rows = pooled_feature_rows(corpus, list(plans), m)
            moments = Moments.of(rows)
            out |= {f"{m}/n": moments.n.tolist(), f"{m}/mean": moments.mean.tolist(), f"{m}/m2": moments.m2.tolist()}
            if m in medians:
                med = exact_median(rows)
                out[f"{m}/median"] = np.where(np.isnan(med), moments.mean, med).tolist()
        return out

    def apply_site_local(self, schema_json: str, scales_json: str) -> None:
        """Take the federation's schema and target scales a site-local message carries, after
        checking them as untrusted input: the site's own tasks must be defined exactly as in its
        corpus (else the model's shapes or classes would not be its data's)."""
        if (schema_json, scales_json) == self._received:
            return
        where = f"site {self.plan.site}: the server's"
        try:
            schema = CorpusSchema.from_dict(json.loads(schema_json), f"{where} schema")
            raw = json.loads(scales_json)
        except (json.JSONDecodeError, SchemaError) as e:
            raise SiteConfigError(f"{where} schema or target scales: {e}") from None
        own = self.data.schema
        for t in self.plan.tasks:
            mine = [own.task(t), *(own.modality(m) for m in own.task(t).inputs)]
            theirs = [schema.tasks.get(t), *(schema.modalities.get(m) for m in own.task(t).inputs)]
            if mine != theirs:
                raise SiteConfigError(f"{where} schema defines task {t} or its inputs unlike this site's corpus")
        if not isinstance(raw, dict) or not all(
            isinstance(v, list) and len(v) == 3 and all(isinstance(x, int | float) and math.isfinite(x) for x in v)
            for v in raw.values()
        ):
            raise SiteConfigError(f"{where} target scales are not {{task: [mean, std, mad]}} of finite numbers")
        self.data.use_scales({t: TargetScale(float(m), max(float(s), 1e-8), float(d)) for t, (m, s, d) in raw.items()})
        self.federation_schema = schema
        self._received = (schema_json, scales_json)

    @property
    def model(self) -> MultiMedModel:
        """The model this site trains: one per thread and config, shared by the sites a
        process runs. Every message loads the global weights into it first (and a site's
        personal parameters from its Context), so no site sees another's weights; sharing it
        saves 1,000 copies and 1,000 constructions in a 1,000-site in-process run."""
        device = self.device or self.cfg.engine.device
        return _thread_model(self.config_yaml, self.cfg, self.federation_schema or self.data.schema, device)


def feature_range(spec: Modality, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Each feature's [low, high] for DP noise: the data dictionary's range (an indicator without
    one: [0, 1]); a numeric feature without one is refused, naming it and the setting."""
    low, high = [], []
    for f in spec.features:
        if f.low is None or f.high is None:
            if f.kind != INDICATOR:
                raise SiteConfigError(
                    f"{where}: preprocess.epsilon > 0 needs a range for every feature, and feature {f.name!r} of "
                    f"modality {spec.name} has none (low/high: the data dictionary's allowed range)"
                )
            low.append(0.0 if f.low is None else f.low)
            high.append(1.0 if f.high is None else f.high)
        else:
            low.append(f.low)
            high.append(f.high)
    return np.asarray(low), np.asarray(high)


def _numbers(raw: Any, key: str, width: int, where: str) -> np.ndarray:
    value = raw.get(key) if isinstance(raw, dict) else None
    if (
        not isinstance(value, list)
        or len(value) != width
        or not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in value)
    ):
        raise SiteConfigError(f"{where}: {key} must be a list of {width} finite numbers")
    return np.asarray(value, dtype=np.float64)


_local = threading.local()


def _thread_model(config_yaml: str, cfg: ExperimentConfig, schema: CorpusSchema, device: str) -> MultiMedModel:
    models = _local.__dict__.setdefault("models", {})
    model = models.get((config_yaml, device))
    if model is None or (model.schema is not schema and model.schema != schema):
        # Built on the host (the same initial weights on every device), then moved to the site's device.
        model = models[(config_yaml, device)] = build_model(cfg.model, schema, cfg.seed).to(resolve_device(device))
    return model


def apply_torch_threads(n: int) -> None:
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


@cache
def _plans(config_yaml: str, corpus_path: str) -> tuple[ExperimentConfig, Corpus, tuple[SitePlan, ...]]:
    cfg = config_from_yaml(config_yaml) if config_yaml else load_config()
    apply_torch_threads(cfg.engine.torch_threads)
    # No corpus given (e.g. `flwr run .` with the defaults): build or reuse the cached one.
    corpus = Corpus.open(corpus_path or prepare_corpus(cfg.corpus))
    return cfg, corpus, tuple(plan_sites(corpus, cfg))


@cache
def _runtime(
    config_yaml: str, corpus_path: str, site_key: str, device: str, floor: ReleaseFloor | None = None
) -> SiteRuntime:
    cfg = config_from_yaml(config_yaml) if config_yaml else load_config()
    if cfg.sites.planner == SITE_LOCAL:
        return _own_site_runtime(cfg, config_yaml, corpus_path, site_key, device, floor)
    cfg, corpus, plans = _plans(config_yaml, corpus_path)
    if site_key.startswith("#"):
        pid = int(site_key[1:])
        if not 0 <= pid < len(plans):
            raise SiteConfigError(f"partition-id {pid} is outside the plan's {len(plans)} sites")
        plan = plans[pid]
    else:
        by_name = {p.site: p for p in plans}
        if site_key not in by_name:
            raise SiteConfigError(f"node config names site {site_key!r}; the plan has {', '.join(by_name)}")
        plan = by_name[site_key]
    return SiteRuntime(
        cfg,
        plan,
        SiteData(corpus, plan),
        config_yaml,
        client_algorithm(cfg.strategy),
        device=device,
        corpus_path=corpus_path,
        deployed=not site_key.startswith("#"),
        floor=floor,
    )


def _own_site_runtime(
    cfg: ExperimentConfig, config_yaml: str, corpus_path: str, site_key: str, device: str, floor: ReleaseFloor | None
) -> SiteRuntime:
    """Site-local mode: this site's own corpus is all it opens. Deployed (a site name), the
    corpus is the node config's; simulated (a partition id), the i-th corpus folder of
    corpus.site_corpora, named after its site."""
    apply_torch_threads(cfg.engine.torch_threads)
    if site_key.startswith("#"):
        folders = site_corpus_folders(corpus_path)
        pid = int(site_key[1:])
        if not 0 <= pid < len(folders):
            raise SiteConfigError(f"partition-id {pid} is outside the {len(folders)} site corpora of {corpus_path}")
        site, path = list(folders.items())[pid]
    else:
        site, path = site_key, Path(corpus_path)
    corpus = Corpus.open(path)
    plan = plan_own_site(corpus, site, cfg)
    data = SiteData(corpus, plan, own_scales=False)
    deployed = not site_key.startswith("#")
    return SiteRuntime(
        cfg,
        plan,
        data,
        config_yaml,
        client_algorithm(cfg.strategy),
        device=device,
        corpus_path=str(path),
        deployed=deployed,
        floor=floor,
    )


def site_runtime(run_config: dict, node_config: dict) -> SiteRuntime:
    corpus_path = site_local_path(CORPUS_KEY, node_config, run_config)
    floor = None  # simulation: the run's preprocess settings
    if is_deployed(node_config):
        if not corpus_path:  # else the corpus would be one the server's config names
            raise SiteConfigError(f"site {node_config[SITE_KEY]}: node config needs {CORPUS_KEY} (the site's own data)")
        key = str(node_config[SITE_KEY])
        floor = ReleaseFloor.of_node(node_config)
    elif PARTITION_ID_KEY in node_config:
        key = f"#{int(node_config[PARTITION_ID_KEY])}"
    else:
        raise SiteConfigError(f"node config needs {SITE_KEY!r} (deployment) or {PARTITION_ID_KEY!r} (simulation)")
    device = str(node_config.get(DEVICE_KEY, ""))
    if device and not valid_device_spec(device):
        raise SiteConfigError(f"node config {DEVICE_KEY}={device!r}: must be one of {DEVICE_CHOICES}")
    return _runtime(str(run_config.get(CONFIG_KEY, "")), corpus_path, key, device, floor)
