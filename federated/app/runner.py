"""One experiment from a config: corpus -> site plan -> engine -> outputs in DIR."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from clients.site_runtime import apply_torch_threads
from clients.test_time import NothingToAdaptError, check_adaptable
from federated.core.compute import DeviceError, resolve_device
from federated.core.config import ConfigError, ExperimentConfig
from federated.core.config.schema import ModelConfig
from federated.core.corpus_schema import CorpusSchema
from federated.core.io import write_json
from federated.core.models import MultiMedModel, build_model
from federated.core.models.init_weights import WeightsFileError, read_weights
from federated.core.protocol import SITE_STATE_DIR, Role
from federated.core.registry import UnknownNameError
from federated.core.state_key import check_key
from federated.data.cache import prepare_corpus
from federated.data.format import Corpus
from federated.engines import ENGINES
from federated.engines.ray_engine import ray_address
from federated.server.checkpoint import Checkpoint, load_checkpoint, resume_config
from federated.server.federation import Callback
from federated.server.outputs import build_summary, write_config, write_final_model, write_summary
from federated.server.results import RunSummary
from federated.server.run_folder import (
    CHECKPOINT_FILE,
    CORPUS_RECORD,
    RunLock,
    check_out_dir,
    check_resumable,
    clear_run_outputs,
    record_outputs,
    remove_stale_temps,
)
from federated.server.tracking import MetricsTable, ProgressBar, TensorBoardLogger
from partitions import SitePlan, plan_sites
from partitions.site_local import SITE_LOCAL, plan_local_sites
from strategies.registry import STRATEGIES
from strategies.secure_sums import check_secure_strategy


class RunError(RuntimeError):
    """The run cannot start as asked (e.g. it would overwrite an earlier run's outputs)."""


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
    """Refuse, before anything runs and naming the key, a model that cannot be built (an unknown
    model.name, a token count the encoders cannot pool to), that cannot fit in memory (a huge
    model.dim), or whose model.init_weights file is missing or unreadable."""
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


def check_device(cfg: ExperimentConfig) -> None:
    """Sites that run on this machine (in-process, or a Ray started here) need engine.device to
    exist here; refused before anything runs. A Ray cluster's or a hospital's sites resolve it on
    their own machines."""
    if cfg.engine.name == "inprocess" or (cfg.engine.name == "ray" and not ray_address(cfg)):
        try:
            resolve_device(cfg.engine.device)
        except DeviceError as e:
            raise ConfigError(str(e)) from None


def check_state_key(cfg: ExperimentConfig) -> None:
    """A run that checkpoints authenticates its checkpoint (and, on this machine, its sites' states)
    with this user's state key: a key that cannot be used (StateKeyError, naming it and the fix) is
    refused before anything is written, not at the first checkpoint k rounds later."""
    if cfg.engine.checkpoint_every > 0:
        check_key()


def check_secure_aggregation(cfg: ExperimentConfig) -> None:
    """A strategy that needs each site's own update cannot run on masked sums: refused up front
    (the server checks again, for a deployment it runs alone)."""
    check_secure_strategy(cfg, getattr(STRATEGIES.get(cfg.strategy.name).server, "SECURE_SUMS", None))


def check_adaptation(cfg: ExperimentConfig, schema: CorpusSchema, plans: list[SitePlan]) -> None:
    """ood.adapt needs a held-out site to adapt at and something in the model to adapt."""
    if cfg.ood.adapt == "none":
        return
    if not any(p.role == Role.HELD_OUT for p in plans):
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


def check_plan_names(cfg: ExperimentConfig, plans: list[SitePlan]) -> None:
    """What only the plan can check: attacked and failing sites must be training sites (both act on
    training replies), personalised groups must be parameter groups some site trains, Krum's assumed
    Byzantine sites must be fewer than the trainers. An unknown name used to do nothing, silently. (The
    strategy itself checks its rule's minimum, e.g. Krum's 2f + 3, when it starts.)"""
    training = [p.site for p in plans if p.role == Role.TRAIN]
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
            | {f"encoder/{m}" for p in plans for m in p.modalities}
            | {f"head/{t}" for p in plans for t in p.tasks}
        )
        unmatched = [g for g in local if not any(group.startswith(g) for group in groups)]
        if unmatched:
            raise ConfigError(
                f"strategy.local_groups names parameter groups no site of this plan has: {', '.join(unmatched)} "
                f"(an entry is a group or a prefix of one, e.g. head/; groups: {', '.join(groups)})"
            )


@dataclass(frozen=True)
class SiteCorpora:
    """Site-local mode in simulation: a folder of per-site corpora, planned and fingerprinted as one."""

    path: Path
    plans: list[SitePlan]
    schema: CorpusSchema
    fingerprint: str

    @classmethod
    def open(cls, folder: str | Path, cfg: ExperimentConfig) -> SiteCorpora:
        planned = plan_local_sites(folder, cfg)
        digest = hashlib.sha256(b"multimed-fl site corpora v1\0")
        for plan, corpus in planned:
            digest.update(f"{plan.site}\0{corpus.fingerprint}\0".encode())
        # the model-size check's schema: the first site's (the server settles the federation's
        # schema, and which sites disagree with it, in the handshake)
        first_plan, first = planned[0]
        merged = first.schema.restrict(first_plan.tasks)
        return cls(Path(folder), [p for p, _ in planned], merged, digest.hexdigest())


def _open_corpus(cfg: ExperimentConfig) -> tuple[Path, Corpus | SiteCorpora]:
    """(the path the engine hands the sites, the corpus or, in site-local mode, the site corpora)."""
    if cfg.sites.planner == SITE_LOCAL:
        if not cfg.corpus.site_corpora:
            raise ConfigError(
                "sites.planner=site_local in simulation needs corpus.site_corpora (a folder with one corpus per "
                "site; `multimed-fl corpus split` makes one); in deployment each site's node config names its own"
            )
        corpora = SiteCorpora.open(cfg.corpus.site_corpora, cfg)
        return corpora.path, corpora
    corpus_path = prepare_corpus(cfg.corpus)
    return Path(corpus_path), Corpus.open(corpus_path)


def check_same_corpus(out_dir: Path, corpus: Corpus | SiteCorpora) -> None:
    """A resumed run must continue on the corpus it started on: a rebuilt, relabelled or swapped
    corpus under the same path would mix two datasets in one model without a word."""
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


def run_experiment(
    cfg: ExperimentConfig | None,
    out_dir: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    console: Console | None = None,
    resume: bool = False,
) -> RunSummary:
    """Run one federated experiment and write its outputs; returns the summary.
    resume=True continues the run in out_dir from its last checkpoint (cfg is ignored:
    the run's own config.yaml is used)."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if not resume and cfg is None:
        raise RunError("a new run needs a config (cfg is None only with resume=True)")
    with RunLock(out_dir):  # a second run into this folder fails here, naming this one's PID
        checkpoint = None
        if resume:
            check_resumable(out_dir)  # a finished run, no checkpoint, a symbolic link: refused by name
            checkpoint = load_checkpoint(out_dir)
            # held to the privacy and secure aggregation the run trained with (each site checks too)
            cfg = resume_config(checkpoint, out_dir)
            overwrite = False
        else:
            check_out_dir(out_dir, overwrite)  # another run's or a user's files: refused unless overwrite
        remove_stale_temps(out_dir)  # only now, the folder accepted: temporaries of dead writers
        assert cfg is not None
        return _run(cfg, out_dir, checkpoint, overwrite and not resume, progress, console, t0)


def _run(
    cfg: ExperimentConfig,
    out_dir: Path,
    checkpoint: Checkpoint | None,
    clear: bool,
    progress: bool,
    console: Console | None,
    t0: float,
) -> RunSummary:
    """The run itself, in a folder this process holds the lock of."""
    engine = ENGINES.get(cfg.engine.name)  # fail on a bad engine name before any work
    apply_torch_threads(cfg.engine.torch_threads)
    check_state_key(cfg)  # before anything is written into the folder (and before a corpus is built)
    corpus_path, corpus = _open_corpus(cfg)
    check_model(cfg, corpus.schema)  # before anything is written into the folder
    check_device(cfg)
    check_secure_aggregation(cfg)
    # a plan that cannot work fails here
    plans = corpus.plans if isinstance(corpus, SiteCorpora) else plan_sites(corpus, cfg)
    check_plan_names(cfg, plans)
    check_adaptation(cfg, corpus.schema, plans)
    if clear:  # --overwrite: a fresh run must not mix with what the folder's manifest lists of an earlier run
        clear_run_outputs(out_dir)
    if checkpoint is not None:
        check_same_corpus(out_dir, corpus)
    else:
        record_outputs(out_dir, CORPUS_RECORD)
        write_json(out_dir / CORPUS_RECORD, {"path": str(corpus_path), "fingerprint": corpus.fingerprint})
    if cfg.engine.checkpoint_every > 0:  # written by the Checkpointer and the sites: listed before they are
        record_outputs(out_dir, CHECKPOINT_FILE, SITE_STATE_DIR)
    write_config(out_dir, cfg)
    callbacks: list[Callback] = [MetricsTable(out_dir / "metrics.parquet"), TensorBoardLogger(out_dir / "tensorboard")]
    if progress:
        callbacks.append(ProgressBar(console))
    result = engine(cfg, corpus_path, len(plans), callbacks, out_dir=out_dir, resume=checkpoint)
    summary = dataclasses.replace(
        build_summary(cfg, result, time.perf_counter() - t0),
        corpus=str(corpus_path),
        resumed_from_round=checkpoint.round if checkpoint is not None else None,
    )
    write_final_model(out_dir, result.arrays)
    write_summary(out_dir, summary)
    return summary
