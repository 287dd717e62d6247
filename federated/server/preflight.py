"""Every check of a run, for every entry point, in one place: one function per stage.

`before_run` holds what the config, the corpus schema and the site plan say, before anything is
written into the run's folder; `after_handshake` what needs the sites' answers: the schema they
agree on, who is left out, who trains, and the schema- and plan-dependent checks again on the sites
that answered (a deployment's server sees no corpus before the handshake, so they first run there).
`multimed-fl run`, the Python API and studies call before_run from federated/app/runner.py;
`flwr run .` and `deploy submit` from federated/server/server_app.py; every engine's round loop calls
after_handshake. A run is refused for the same reason whichever way it came in.

The config's own checks (federated/core/config/checks.py) run when a config is loaded or read back;
before_run runs them again, for a config built in Python or changed with dataclasses.replace.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from federated.core.compute import DeviceError, resolve_device
from federated.core.config.checks import validate
from federated.core.config.schema import ConfigError, ExperimentConfig, ModelConfig
from federated.core.corpus_schema import CorpusSchema
from federated.core.models import MultiMedModel, build_model
from federated.core.models.adaptable import NothingToAdaptError, check_adaptable
from federated.core.models.init_weights import WeightsFileError, read_weights
from federated.core.protocol import Role
from federated.core.registry import UnknownNameError
from federated.core.state_key import check_key
from federated.server.evaluation import SiteProfile
from federated.server.run_folder import CORPUS_RECORD
from federated.server.site_agreement import FederationError, agreed_schema
from strategies.secure_support import check_secure_strategy

__all__ = [
    "Agreed",
    "ConfigError",
    "FederationError",
    "RunError",
    "SiteView",
    "after_handshake",
    "before_run",
    "check_same_corpus",
]


class RunError(RuntimeError):
    """The run cannot start as asked (e.g. it would overwrite an earlier run's outputs)."""


class SiteView(Protocol):
    """What the checks read of a site: a planned one (partitions.SitePlan) or one that answered the
    handshake (SiteProfile)."""

    @property
    def site(self) -> str: ...
    @property
    def role(self) -> Role: ...
    @property
    def modalities(self) -> Sequence[str]: ...
    @property
    def tasks(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class Agreed:
    """What the federation runs under once the sites answered the handshake."""

    schema: CorpusSchema  # the schema the sites agree on (site_agreement)
    excluded: dict[str, str]  # site -> why it was left out (engine.on_incompatible_site=exclude)
    # node id -> profile, in site order: the excluded sites removed, schemas stripped (every round
    # record, and so every checkpoint, would otherwise carry one per site per round)
    profiles: dict[int, SiteProfile]
    train_nodes: list[int]  # the nodes of the training sites, in site order


def before_run(
    cfg: ExperimentConfig,
    schema: CorpusSchema | None,
    sites: Sequence[SiteView] | Callable[[], Sequence[SiteView]] | None = None,
    *,
    sites_here: bool,
) -> Sequence[SiteView] | None:
    """Every check that needs no site's answer, before anything is written. `schema`: the corpus
    schema, where this machine can see the corpus (None: the model is checked after the handshake);
    `sites`: the site plan where known, or the function that plans it (called after the model check,
    so a bad model.name is named before a plan that cannot work); `sites_here`: whether the sites
    run on this machine, so engine.device must exist here (elsewhere each site resolves it on its
    own). Returns the plan, as given or made."""
    validate(cfg)
    if cfg.engine.checkpoint_every > 0:
        # a run that checkpoints authenticates its state with this user's key: a key that cannot be
        # used (StateKeyError, naming it and the fix) is refused now, not at the first checkpoint
        check_key()
    # a strategy that needs each site's own update cannot run on masked sums (as its class declares)
    check_secure_strategy(cfg)
    if sites_here:
        check_device(cfg)
    if schema is None:
        return None
    check_model(cfg, schema)
    planned = sites() if callable(sites) else sites
    if planned is not None:
        check_plan(cfg, schema, planned)
    return planned


def after_handshake(cfg: ExperimentConfig, profiles: dict[int, SiteProfile]) -> Agreed:
    """The checks that need the sites' answers: one schema (or the run stops, or leaves sites out,
    as engine.on_incompatible_site says), at least one training site among those that remain, and
    the model and plan checks on the agreed schema and the sites that remain (so attack.sites naming
    a site left out, or ood.adapt with its only held-out site left out, is refused, not ignored)."""
    schema, excluded = agreed_schema(cfg, profiles)
    kept = {n: dataclasses.replace(p, schema=None) for n, p in profiles.items() if p.site not in excluded}
    train_nodes = [n for n, p in kept.items() if p.role == Role.TRAIN]
    if not train_nodes:
        raise FederationError("no training sites answered the handshake")
    check_model(cfg, schema)
    check_plan(cfg, schema, list(kept.values()))
    return Agreed(schema, excluded, kept, train_nodes)


def check_plan(cfg: ExperimentConfig, schema: CorpusSchema, sites: Sequence[SiteView]) -> None:
    """What only the sites can tell: the names settings give them, and whether one adapts the model."""
    check_plan_names(cfg, sites)
    check_adaptation(cfg, schema, sites)


# --- the model -------------------------------------------------------------------------------

# Bytes per parameter beyond the weights themselves: its gradient, and the optimiser's state
# (Adam: two moments; SGD with momentum: one buffer).
_STATE_COPIES = {"adam": 3, "sgd": 2}
_WEIGHT_BYTES = 4  # float32


def parameter_count(model: ModelConfig, schema: CorpusSchema) -> int:
    """The model's parameter count without building it at its size. Every parameter tensor is a
    constant, dim or dim x dim elements (linear layers, embeddings, norms, convolutions' output
    channels), so the count is a quadratic in dim: three small models (dim = h, 2h, 3h, h =
    model.heads) fix it exactly. (torch's meta device would do it too, but costs seconds to start.)"""
    h = model.heads
    with torch.random.fork_rng(devices=[]):  # a check leaves the run's random numbers as they were
        n1, n2, n3 = (
            sum(p.numel() for p in MultiMedModel(dataclasses.replace(model, dim=k * h), schema).parameters())
            for k in (1, 2, 3)
        )
    # Newton's forward differences on x = dim / h at 1, 2, 3
    x = model.dim // h
    d1, d2 = n2 - n1, n3 - 2 * n2 + n1
    return int(n1 + (x - 1) * d1 + (x - 1) * (x - 2) // 2 * d2)


def model_bytes(cfg: ExperimentConfig, schema: CorpusSchema) -> int:
    """What one copy of the model needs while training: parameters x 4 bytes x (weights, gradients,
    optimiser state)."""
    n = parameter_count(cfg.model, schema)
    copies = 1 + _STATE_COPIES["adam" if cfg.train.optimizer == "adam" else "sgd"]
    if cfg.train.optimizer == "sgd" and cfg.train.momentum == 0:
        copies -= 1
    return int(n) * _WEIGHT_BYTES * copies


def available_memory() -> int:
    """Memory this machine can give now: /proc/meminfo's MemAvailable (Linux), else physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))


def check_model(cfg: ExperimentConfig, schema: CorpusSchema) -> None:
    """Refuse, naming the key, a model that cannot be built (an unknown model.name, a token count
    the encoders cannot pool to), that cannot fit in memory (a huge model.dim), or whose
    model.init_weights file is missing or unreadable."""
    try:
        need = model_bytes(cfg, schema)
    except UnknownNameError as e:
        raise ConfigError(f"model.name: {e}") from None
    except ValueError as e:  # a model section the model cannot be built from (e.g. a token count)
        raise ConfigError(f"model: {e} (model.dim={cfg.model.dim}, model.heads={cfg.model.heads})") from None
    if cfg.model.init_weights:
        try:
            read_weights(cfg.model.init_weights)
        except WeightsFileError as e:
            raise ConfigError(str(e)) from None
    have = available_memory()
    if need > have:
        raise ConfigError(
            f"model.dim={cfg.model.dim}: the model needs about {need / 2**30:.1f} GiB to train "
            f"(parameters x {_WEIGHT_BYTES} bytes x weights, gradients and {cfg.train.optimizer} state), "
            f"more than the {have / 2**30:.1f} GiB available"
        )


# --- the machine -----------------------------------------------------------------------------


def check_device(cfg: ExperimentConfig) -> None:
    """engine.device must exist on this machine, where the sites run on it."""
    try:
        resolve_device(cfg.engine.device)
    except DeviceError as e:
        raise ConfigError(str(e)) from None


# --- the sites -------------------------------------------------------------------------------


def check_adaptation(cfg: ExperimentConfig, schema: CorpusSchema, sites: Sequence[SiteView]) -> None:
    """ood.adapt needs a held-out site to adapt at and something in the model to adapt."""
    if cfg.ood.adapt == "none":
        return
    if not any(p.role == Role.HELD_OUT for p in sites):
        raise ConfigError(
            f"ood.adapt={cfg.ood.adapt}: this run holds out no site (sites.held_out, sites.holdout), "
            "so no site adapts the model"
        )
    try:
        check_adaptable(build_model(cfg.model, schema, cfg.seed), cfg.ood.adapt)
    except NothingToAdaptError as e:
        raise ConfigError(f"{e} (model.name={cfg.model.name})") from None


def _unknown(key: str, given: list[str], valid: list[str], what: str) -> None:
    unknown = [name for name in given if name not in valid]
    if unknown:
        raise ConfigError(f"{key} names {what} in this run's plan: {', '.join(unknown)} (valid: {', '.join(valid)})")


def check_plan_names(cfg: ExperimentConfig, sites: Sequence[SiteView]) -> None:
    """What only the plan can check: attacked and failing sites must be training sites (both act on
    training replies), personalised groups must be parameter groups some site trains, Krum's assumed
    Byzantine sites must be fewer than the trainers. An unknown name used to do nothing, silently. (The
    strategy itself checks its rule's minimum, e.g. Krum's 2f + 3, when it starts.)"""
    training = [p.site for p in sites if p.role == Role.TRAIN]
    if cfg.attack.kind != "none":
        _unknown("attack.sites", list(cfg.attack.sites), training, "sites that are not training sites")
    if cfg.faults.kind != "none":
        _unknown("faults.sites", list(cfg.faults.sites), training, "sites that are not training sites")
    n_byzantine = getattr(cfg.strategy.settings, "n_byzantine", None)
    if n_byzantine is not None and n_byzantine >= len(training):
        raise ConfigError(
            f"strategy.n_byzantine={n_byzantine}: assumes at least as many Byzantine sites as this plan has "
            f"training sites ({len(training)}); no honest update would be left to choose"
        )
    local = getattr(cfg.strategy.settings, "local_groups", None)
    if local:
        groups = sorted(
            {"fusion"}
            | {f"encoder/{m}" for p in sites for m in p.modalities}
            | {f"head/{t}" for p in sites for t in p.tasks}
        )
        unmatched = [g for g in local if not any(group.startswith(g) for group in groups)]
        if unmatched:
            raise ConfigError(
                f"strategy.local_groups names parameter groups no site of this plan has: {', '.join(unmatched)} "
                f"(an entry is a group or a prefix of one, e.g. head/; groups: {', '.join(groups)})"
            )


# --- a resumed run ---------------------------------------------------------------------------


class Fingerprinted(Protocol):
    """A corpus (federated.data.format.Corpus) or a folder of site corpora, as a run records it."""

    @property
    def path(self) -> Path: ...
    @property
    def fingerprint(self) -> str: ...


def check_same_corpus(out_dir: Path, corpus: Fingerprinted) -> None:
    """A resumed run must continue on the corpus it started on (out_dir's CORPUS_RECORD): a rebuilt,
    relabelled or swapped corpus under the same path would mix two datasets in one model without a word."""
    record = out_dir / CORPUS_RECORD
    try:
        started = json.loads(record.read_text())
        started_fp, started_path = str(started["fingerprint"]), str(started.get("path", "?"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(
            f"{record}: cannot tell which corpus this run started on ({type(e).__name__}: {e}); "
            "a run can only be resumed on the corpus it started on"
        ) from None
    if corpus.fingerprint != started_fp:
        raise RunError(
            f"the corpus changed since this run started: {corpus.path} has fingerprint "
            f"{corpus.fingerprint[:16]}..., the run started on {started_path} with {started_fp[:16]}... "
            f"({record}); resume it on the same corpus, or start a new run"
        )
