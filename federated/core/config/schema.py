"""The experiment schema: one frozen dataclass per component.

Defaults here are the framework's; conf/*.yaml selects and tunes them. Inside the framework
only these dataclasses travel, never raw dicts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, TypeVar

from federated.core.registry import Registry


@dataclass(frozen=True)
class CorpusConfig:
    name: str = "synthetic"
    # An existing corpus folder to use; None builds (or reuses from the cache) the synthetic one.
    path: Optional[str] = None
    seed: int = 0  # data seed, fixed across training seeds so seeds measure training variance
    samples_per_task_site: int = 300
    n_origin_sites: int = 10
    test_fraction: float = 0.2
    # How differently the corpus's origin hospitals acquire their data (scanners, protocols),
    # baked into the generated corpus: 0 = all alike, 1 = realistic, 2 = strong.
    origin_shift_severity: float = 1.0
    # Where synthetic corpora are cached; "" = $MULTIMED_FL_CACHE or ~/.cache/multimed-fl.
    cache_dir: str = ""
    # sites.planner=site_local in simulation: a folder holding one corpus folder per site, named
    # after the site (`multimed-fl corpus split` writes one). In deployment each site's node
    # config names its own corpus instead.
    site_corpora: Optional[str] = None


def _default_archetypes() -> Dict[str, List[str]]:
    return {
        "imaging_centre": ["radiographic_findings", "bone_age", "brain_tumor_classification", "diabetic_retinopathy"],
        "neuro_clinic": ["motor_imagery", "brain_tumor_classification"],
        "genomics_lab": ["cell_type", "expression_prediction", "protein_structure"],
        "general_hospital": [
            "disease_classification",
            "breast_cancer_classification",
            "medical_vqa",
            "radiographic_findings",
        ],
        "cancer_centre": ["breast_cancer_classification", "brain_tumor_classification", "cell_type"],
        "eye_clinic": ["diabetic_retinopathy", "medical_vqa"],
    }


@dataclass(frozen=True)
class SitesConfig:
    name: str = "default"  # the conf/sites preset this came from
    planner: str = "archetypes"  # the site planner (partitions.PLANNERS)
    # One entry per site, by archetype; site i reads the corpus's i-th origin site.
    train: List[str] = field(
        default_factory=lambda: [
            "imaging_centre",
            "imaging_centre",
            "neuro_clinic",
            "genomics_lab",
            "genomics_lab",
            "general_hospital",
            "general_hospital",
            "cancer_centre",
        ]
    )
    held_out: List[str] = field(default_factory=lambda: ["eye_clinic", "neuro_clinic"])
    archetypes: Dict[str, List[str]] = field(default_factory=_default_archetypes)
    # Dirichlet label skew of training sites (partitions/label_skew.py); 0 = none.
    label_skew_alpha: float = 0.0
    # Log-normal site sizes (partitions/quantity_skew.py); 0 = none. A training site keeps at
    # least min_samples training rows per task.
    quantity_skew_sigma: float = 0.0
    min_samples: int = 8
    # Missing modalities (partitions/missing_modalities.py): the chance that a site lacks one
    # of its multimodal tasks' modalities entirely, and that a sample lacks one of them.
    missing_site_rate: float = 0.0
    missing_sample_rate: float = 0.0
    # Share of each training site's class labels replaced through its own transition matrix.
    label_noise_rate: float = 0.0
    # Pathological label skew: each training site keeps k classes per task; 0 = none.
    label_skew_classes: int = 0
    # An extra acquisition shift each simulated site applies when it loads its data, on top of
    # the corpus's own (partitions/acquisition_shift.py): each (site, modality) gets severity
    # load_shift_severity * U(0.5, 1.5); 0 = none.
    load_shift_severity: float = 0.0
    # Planner steps, applied in this order; each is skipped when its setting above is off.
    steps: List[str] = field(
        default_factory=lambda: [
            "tasks_only",
            "train_only",
            "pool",
            "label_skew",
            "quantity_skew",
            "label_noise",
            "missing_modalities",
            "unimodal",
            "acquisition_shift",
        ]
    )
    # Study selections (partitions/selection.py): only these tasks; only these training sites
    # (local-only runs); all training sites pooled into one (centralised); multimodal tasks
    # read their first modality only.
    tasks_only: List[str] = field(default_factory=list)
    train_only: List[str] = field(default_factory=list)
    pooled: bool = False
    unimodal: bool = False
    # Which sites are held out (partitions/holdout.py): listed | named | random | archetype.
    holdout: str = "listed"
    holdout_sites: List[str] = field(default_factory=list)  # holdout=named: site ids / origins
    holdout_k: int = 2  # holdout=random
    holdout_archetypes: List[str] = field(default_factory=list)  # holdout=archetype
    # Score held-out tasks no training site holds (zero-shot) instead of refusing the plan.
    zero_shot: bool = False
    # natural planner: origin sites with fewer samples than this are grouped into one site.
    min_site_size: int = 50
    # random_mix planner: n_sites sites of tasks_per_site random tasks each; every task a
    # site holds is held by at least min_overlap sites.
    n_sites: int = 10
    tasks_per_site: int = 3
    min_overlap: int = 2


@dataclass(frozen=True)
class ModelConfig:
    name: str = "default"  # an architecture of federated/core/models/architectures.py (`multimed-fl models`)
    dim: int = 64  # token width shared by every encoder and the fusion block
    tokens_per_modality: int = 4
    fusion_layers: int = 1
    heads: int = 4
    dropout: float = 0.0
    # A sample's missing modality: "mask" (left out of fusion) or "zeros" (its zero input
    # fused as if it were data; the ablation that shows what masking is worth).
    missing: str = "mask"
    # A local weights file to start the global model from (final_model.npz of an earlier run, a
    # torch state dict, or .safetensors): matching keys load, the summary lists the rest.
    init_weights: str = ""


@dataclass(frozen=True)
class TrainConfig:
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.002
    optimizer: str = "adam"  # adam | sgd
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    # 0 = no cap; otherwise a site takes at most this many local steps per round.
    max_steps_per_round: int = 0
    # fp32 | bf16 | fp16: autocast's dtype for the forward pass (weights and optimiser stay fp32;
    # fp16 adds loss scaling). With DP-SGD: fp32, or bf16 with grad_sample_mode hooks/functorch.
    precision: str = "fp32"


# The values of engine.device and train.precision (resolved to torch in federated/core/compute.py;
# the config layer does not import torch).
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
PRECISION_NAMES = ("fp32", "bf16", "fp16")


def valid_device_spec(spec: str) -> bool:
    return DEVICE_PATTERN.fullmatch(spec) is not None


class ConfigError(ValueError):
    """A config file, override or setting that cannot be used; the message names the key."""


@dataclass(frozen=True)
class StrategySettings:
    """The base of every strategy's own settings (one frozen dataclass per algorithm).

    A strategy declares a subclass next to its code (strategies/<algorithm>.py), checks it in
    __post_init__ with `require`, and registers it under its name in STRATEGY_SETTINGS
    (strategies/registry.py does both). The loader then accepts exactly its fields under
    `strategy.` for that strategy, beside StrategyConfig's common ones, and refuses any other
    strategy's by name. A strategy with no settings of its own registers this class itself.
    """

    def require(self, key: str, ok: bool, why: str) -> None:
        """Refuse the value of field `key`, named as a user types it: strategy.key=value."""
        if not ok:
            raise ConfigError(f"strategy.{key}={getattr(self, key)}: {why}")

    def experiment_checks(self, cfg: ExperimentConfig) -> list[tuple[str, bool, str]]:
        """(key, ok, why) checks of other sections that this strategy relies on (e.g. SCAFFOLD's
        plain SGD); the loader runs them with its own and reports them the same way."""
        return []


SettingsT = TypeVar("SettingsT", bound=StrategySettings)

# Strategy name -> its settings class. The strategies package fills it when imported (the loader,
# below it, cannot import it); the loader reads it to type and check the strategy section.
STRATEGY_SETTINGS: Registry[type[StrategySettings]] = Registry("strategy")
DEFAULT_STRATEGY = "modality_fedavg"


@dataclass(frozen=True)
class StrategyConfig:
    """What every strategy reads; the algorithm's own settings are in `settings`.

    In conf/ and on the command line both are flat keys of the strategy section
    (strategy.fraction_train, strategy.proximal_mu); the loader splits them.
    """

    name: str = DEFAULT_STRATEGY
    fraction_train: float = 1.0  # fraction of training sites sampled per round
    # How updates are weighted: by their examples, or uniformly (every site counts once; what
    # site-level DP's noise calibration assumes, set by privacy=dp_fedavg).
    weighting: str = "examples"
    min_train_sites: int = 2
    # Update validation (every strategy): a round needs this many valid replies, else it
    # fails (or, with "skip", is recorded as skipped); a reply may claim at most
    # max_examples_factor x the training examples its site declared in the handshake.
    min_valid_replies: int = 1
    on_too_few_valid: str = "fail"  # fail | skip
    max_examples_factor: float = 1.0
    # What a site declared at the handshake is bounded too: with three or more training sites,
    # one declaring more than this share of all their training examples has every update
    # refused (1 = no bound). Generous: quantity skew (sigma 1) gave one site 69% in a clean run.
    max_site_weight_share: float = 0.9
    # Update-norm bounds, on the L2 of (reply - global model) over all arrays: above
    # max_update_norm is refused (0 = no bound), and, per sqrt(training example), above
    # max_update_norm_ratio x the round's median of that (with three or more updates; 0 = off).
    # Per sqrt(example) because a site's norm grows with its steps, i.e. its data: a clean site
    # holding 90% of the examples (16x the median's steps) had 4.87x the median norm, 0.66 per
    # sqrt(example); three or four training sites 1.81 at most. Default 4: over 2,426 clean
    # updates (19 study runs, 9 plans) the largest ratio was 2.89 (fedrex, plain
    # SGD); a site's update x10 was refused for 2,403 of them, x1000 for all
    # (experiments/results/update_norm_bound/). Plain norms under privacy=dp_fedavg, which clips
    # every update to one norm first; not applied under secure aggregation.
    max_update_norm: float = 1.0e4
    max_update_norm_ratio: float = 4.0
    # The strategy's own settings: an instance of the class registered under `name`.
    settings: StrategySettings = field(default_factory=StrategySettings)

    def __post_init__(self) -> None:
        checks = [
            ("fraction_train", 0.0 < self.fraction_train <= 1.0, "must be in (0, 1]"),
            ("weighting", self.weighting in ("examples", "uniform"), "must be one of: examples, uniform"),
            ("min_train_sites", self.min_train_sites >= 1, "must be >= 1"),
            ("min_valid_replies", self.min_valid_replies >= 1, "must be >= 1"),
            ("on_too_few_valid", self.on_too_few_valid in ("fail", "skip"), "must be one of: fail, skip"),
            ("max_examples_factor", 1.0 <= self.max_examples_factor < math.inf, "must be finite and >= 1"),
            ("max_site_weight_share", 0.0 < self.max_site_weight_share <= 1.0, "must be in (0, 1]"),
            ("max_update_norm", 0.0 <= self.max_update_norm < math.inf, "must be finite and >= 0 (0 = no bound)"),
            (
                "max_update_norm_ratio",
                self.max_update_norm_ratio == 0.0 or 1.0 <= self.max_update_norm_ratio < math.inf,
                "must be 0 (off) or finite and >= 1",
            ),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"strategy.{key}={getattr(self, key)}: {why}")

    def settings_as(self, cls: type[SettingsT]) -> SettingsT:
        """The settings, typed as the strategy reading them declared them."""
        if not isinstance(self.settings, cls):
            raise TypeError(
                f"strategy {self.name!r} carries {type(self.settings).__name__}, not the {cls.__name__} it reads"
            )
        return self.settings


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy (clients/dp_sgd.py for dp_sgd, strategies/site_dp.py for dp_fedavg)."""

    name: str = "none"  # none | dp_sgd (sample-level, at each site) | dp_fedavg (site-level)
    # Target epsilon over the planned rounds: the noise is calibrated once, up front, so that
    # `rounds` rounds spend exactly this. It is also each site's budget: a site whose next
    # round would exceed it stops training (and keeps evaluating). None with noise_multiplier
    # set: fixed noise, no budget.
    target_epsilon: Optional[float] = None
    delta: float = 1e-5
    noise_multiplier: Optional[float] = None  # fixed noise instead of a target epsilon
    max_grad_norm: float = 1.0  # dp_sgd: per-sample gradient clipping norm
    clipping_norm: float = 1.0  # dp_fedavg: per-site update clipping norm (L2, all arrays)
    accountant: str = "rdp"  # an Opacus accountant: rdp | prv
    grad_sample_mode: str = "ew"  # Opacus per-sample gradients: ew | hooks | functorch (experiments/bench/dp_step.py)


@dataclass(frozen=True)
class EngineConfig:
    name: str = "inprocess"
    # Where sites train and evaluate: auto (CUDA if this machine has it, else CPU) | cpu | cuda |
    # cuda:N | mps. Each site resolves it on its own machine (federated/core/compute.py).
    device: str = "auto"
    # Torch intra-op threads per process. The models are small, so one thread is fastest
    # (2 threads ran 60x slower here when the other core was busy) and leaves cores for
    # other clients; 0 keeps torch's default.
    torch_threads: int = 1
    # Save a checkpoint (server) and site states (each site) every k rounds and at the end;
    # `multimed-fl run --resume DIR` continues from the last one. 0 = no checkpoints.
    checkpoint_every: int = 0
    # A round's replies are awaited at most this long; later replies are discarded and the
    # round goes on with those that came (strategy.min_valid_replies still applies). 0 = wait.
    round_timeout_s: float = 0.0
    # Deployment: wait until this many sites are connected before the handshake (0 = take
    # the nodes connected when the run starts, as simulation engines register all up front).
    expected_sites: int = 0
    handshake_timeout_s: float = 300.0
    ray_cpus: int = 0  # engine=ray: CPUs a Ray started here may use; 0 = all (not with ray_address)
    # engine=ray: join a running Ray cluster at this address ("auto", "HOST:6379", "ray://HOST:10001";
    # empty = $RAY_ADDRESS, else start Ray here). A cluster is sized by its own nodes, not by us.
    ray_address: str = ""
    # engine=ray: what one site's process reserves (Flower's client resources). Fractional GPUs let
    # several sites share one GPU (0.25: four per GPU); CPUs per site bound how many run at once.
    cpus_per_site: float = 1.0
    gpus_per_site: float = 0.0
    # A site that fails in every round, or a task scored in round 0 but not at the end, makes
    # `multimed-fl run` exit non-zero (the summary is written either way); true accepts them.
    allow_site_failures: bool = False
    # A site whose corpus schema disagrees with the federation's (other shapes, classes or task
    # definitions) or that runs another multimed-fl version: stop the run (fail), or run without
    # it (exclude; summary.json lists it under excluded_sites with the reason).
    on_incompatible_site: str = "fail"
    # Deployment (a SuperLink): a training site evaluates the model it receives before training
    # on it and replies with both, so a round is one exchange of messages instead of two (train,
    # then evaluate). The scores are the same; a site whose training fails loses that evaluation
    # too. Simulation engines, where a message costs nothing, always evaluate on their own.
    evaluate_with_train: bool = True


OOD_ADAPT_METHODS = ("none", "tent", "bn_stats")  # clients/test_time.py


@dataclass(frozen=True)
class OODConfig:
    """Test-time adaptation at held-out sites (clients/test_time.py): at the last round each
    held-out site also scores the global model adapted to its own unlabelled inputs."""

    adapt: str = "none"  # none | tent | bn_stats
    adapt_steps: int = 10  # TENT's gradient steps (one batch each)
    adapt_lr: float = 0.001  # TENT's Adam learning rate (the paper's)
    adapt_batch_size: int = 64


SECURE_AGGREGATION_MODES = ("none", "secaggplus")


@dataclass(frozen=True)
class SecureAggregationConfig:
    """SecAgg+ for the training round (federated/server/secure_round.py): the server learns only the
    sum of the sites' masked vectors, never one site's update. Flower's names and defaults."""

    name: str = "none"  # none | secaggplus
    # Each entry of a site's update is clipped to [-c, c] before quantisation (site side). Updates
    # are sent as differences from the global model, so a small c loses nothing; the quantisation
    # step is 2c / quantization_range.
    clipping_range: float = 1.0
    # Integer levels per entry, below 2**31; 0 = the most the field allows for the round's sites (the
    # largest power of 2 with sites x levels < modulus_range, at most 2**30: 2**29 for 8 sites).
    # Flower's default is 2**22; finer levels matter because a group's mean divides the summed
    # rounding error by the group's total weight, small when only small sites hold it.
    quantization_range: int = 0
    modulus_range: int = 4294967296  # 2**32: the masks' field; a power of 2 above sites x quantization_range
    # How many neighbours hold shares of each site's secrets: a fraction (<= 1) of the round's sites,
    # or a number (> 1). Flower's default, 1.0, is every site.
    num_shares: float = 1.0
    # Shares needed to recover a dropped site's masks: a fraction in (0.5, 1] of num_shares (1: every
    # share, Flower's reading of 1), or a whole number above num_shares / 2 and below it. More than
    # half: otherwise a server could collect both secrets of one site and unmask its update alone.
    reconstruction_threshold: float = 0.6
    # A group's sum is unmasked only when at least this many sites contributed to it: one site's sum
    # is its update. A group fewer sampled sites declared is left out of the round (it keeps its
    # value); if dropouts leave fewer contributors, the round is not unmasked.
    min_sites_per_group: int = 2


@dataclass(frozen=True)
class AttackConfig:
    """Simulated bad sites, for robustness studies: what they do to their training replies."""

    kind: str = "none"  # none | sign_flip | scale | nan | inflate_count
    sites: List[str] = field(default_factory=list)  # site ids, e.g. [site_00]
    factor: float = 0.0  # 0 = the attack's default (sign_flip 10, scale 1000, inflate_count 1000)


@dataclass(frozen=True)
class FaultConfig:
    """Simulated failing sites, for fault-tolerance tests and studies (clients/faults.py)."""

    kind: str = "none"  # none | crash (raise) | stall (sleep stall_s) | exit (kill the process)
    sites: List[str] = field(default_factory=list)  # site ids
    rounds: List[int] = field(default_factory=list)  # training rounds it happens in; [] = every
    stall_s: float = 30.0


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw vector features (a modality that lists its features) are imputed and standardised
    at load time: with statistics from a federated statistics round over the training sites
    (federated: the pooled numbers, no row moved), each site's own (per_site), or the training
    sites' rows pooled in one place (pooled: simulation only, the reference federated equals).
    A held-out site uses the training sites' statistics under federated and pooled; under
    per_site it standardises with its own (test) rows: what per_site means, each site its own scale."""

    statistics: str = "federated"
    # A site sends nothing for a feature it has fewer observed values of than this, and no
    # histogram cell of fewer. In deployment a site's own node config (stats-min-count) is its floor.
    min_count: int = 10
    # > 0: each site adds Laplace noise to its feature sums, epsilon-DP per record (a corpus row,
    # not a patient) per site and run (features need a range from the data dictionary); 0 = exact.
    # In deployment a site's node config (stats-epsilon) caps what the server may ask for.
    epsilon: float = 0.0


@dataclass(frozen=True)
class ExperimentConfig:
    seed: int = 0
    rounds: int = 20
    scale: str = "default"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    sites: SitesConfig = field(default_factory=SitesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    ood: OODConfig = field(default_factory=OODConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
