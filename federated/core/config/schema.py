"""The experiment schema: one frozen dataclass per component.

Defaults here are the framework's; conf/*.yaml selects and tunes them. Inside the framework
only these dataclasses travel, never raw dicts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, TypeVar

from federated.core.config.values import allowed_checks, allowed_values, one_of
from federated.core.registry import Registry


@dataclass(frozen=True)
class CorpusConfig:
    """Which corpus the run reads (`corpus.*`), and how the synthetic one is generated."""

    # The conf/corpus preset: synthetic builds (or reuses) the generated corpus; any other needs corpus.path.
    name: str = "synthetic"
    # An existing corpus folder to use; None builds (or reuses from the cache) the synthetic one.
    path: Optional[str] = None
    seed: int = 0  # data seed, fixed across training seeds so seeds measure training variance
    samples_per_task_site: int = 300  # synthetic: samples of every task at every origin site
    n_origin_sites: int = 10  # synthetic: the hospitals the corpus comes from (site_00, site_01, ...)
    test_fraction: float = 0.2  # synthetic: the share of each (task, site) split "test"
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
    """How the corpus is split into simulated hospitals (`sites.*`; partitions/): which sites train,
    which are held out, and the shifts between them."""

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
    # One entry per held-out site (it never trains; it scores the model out of distribution), by archetype.
    held_out: List[str] = field(default_factory=lambda: ["eye_clinic", "neuro_clinic"])
    # Archetype -> the tasks a site of that archetype holds.
    archetypes: Dict[str, List[str]] = field(default_factory=_default_archetypes)
    # Dirichlet label skew of training sites (partitions/label_skew.py); 0 = none.
    label_skew_alpha: float = 0.0
    # Log-normal site sizes (partitions/quantity_skew.py); 0 = none. A training site keeps at
    # least min_samples training rows per task.
    quantity_skew_sigma: float = 0.0
    min_samples: int = 8  # quantity skew: the fewest training rows per task a training site keeps
    # Missing modalities (partitions/missing_modalities.py): the chance that a site lacks one
    # of its multimodal tasks' modalities entirely.
    missing_site_rate: float = 0.0
    missing_sample_rate: float = 0.0  # missing modalities: the chance that a sample lacks one of its inputs
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
    # Study selection (partitions/selection.py): only these tasks ([] = every task).
    tasks_only: List[str] = field(default_factory=list)
    train_only: List[str] = field(default_factory=list)  # study selection: only these training sites (local-only runs)
    pooled: bool = False  # study selection: every training site pooled into one (centralised)
    unimodal: bool = False  # study selection: multimodal tasks read their first modality only
    # Which sites are held out (partitions/holdout.py).
    holdout: str = one_of("listed", "named", "random", "archetype")
    holdout_sites: List[str] = field(default_factory=list)  # holdout=named: site ids / origins
    holdout_k: int = 2  # holdout=random: how many sites are held out, drawn with the corpus seed
    holdout_archetypes: List[str] = field(default_factory=list)  # holdout=archetype: every site of these is held out
    # Score held-out tasks no training site holds (zero-shot) instead of refusing the plan.
    zero_shot: bool = False
    # natural planner: origin sites with fewer samples than this are grouped into one site.
    min_site_size: int = 50
    # random_mix planner: how many sites, each holding tasks_per_site random tasks.
    n_sites: int = 10
    tasks_per_site: int = 3  # random_mix planner: the tasks each site draws
    min_overlap: int = 2  # random_mix planner: the fewest sites that hold each task


@dataclass(frozen=True)
class ModelConfig:
    """The multimodal multitask model every site trains (`model.*`; federated/core/models/)."""

    name: str = "default"  # an architecture of federated/core/models/architectures.py (`multimed-fl models`)
    dim: int = 64  # token width shared by every encoder and the fusion block
    tokens_per_modality: int = 4  # tokens each encoder makes of its modality's input
    fusion_layers: int = 1  # transformer blocks fusing the modalities' tokens
    heads: int = 4  # attention heads of each fusion block (model.dim must divide by it)
    dropout: float = 0.0  # dropout rate in the fusion blocks
    # A sample's missing modality: "mask" (left out of fusion) or "zeros" (its zero input
    # fused as if it were data; the ablation that shows what masking is worth).
    missing: str = one_of("mask", "zeros")
    # A local weights file to start the global model from (final_model.npz of an earlier run, a
    # torch state dict, or .safetensors): matching keys load, the summary lists the rest.
    init_weights: str = ""


@dataclass(frozen=True)
class TrainConfig:
    """Each site's local training in a round (`train.*`; clients/)."""

    local_epochs: int = 1  # passes over a site's training rows per round
    batch_size: int = 32  # samples per local step
    lr: float = 0.002  # the sites' learning rate
    optimizer: str = one_of("adam", "sgd")  # the sites' optimiser
    momentum: float = 0.9  # SGD's momentum (train.optimizer=sgd only)
    weight_decay: float = 0.0  # the optimiser's L2 weight decay
    # 0 = no cap; otherwise a site takes at most this many local steps per round.
    max_steps_per_round: int = 0
    # autocast's dtype for the forward pass (weights and optimiser stay fp32; fp16 adds loss
    # scaling). With DP-SGD: fp32, or bf16 with grad_sample_mode hooks/functorch.
    precision: str = one_of("fp32", "bf16", "fp16")


# train.precision's names (resolved to torch in federated/core/compute.py; the config layer does not import torch).
PRECISION_NAMES = allowed_values(TrainConfig, "precision") or ()
# engine.device's values: the forms ALLOWED shows a user, checked by this pattern.
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


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
    A str setting with a fixed set of values declares them with one_of; StrategyConfig checks those.
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

    name: str = DEFAULT_STRATEGY  # the strategy (its conf/strategy file; strategies/registry.py)
    fraction_train: float = 1.0  # fraction of training sites sampled per round
    # How updates are weighted: by their examples, or uniformly (every site counts once; what
    # site-level DP's noise calibration assumes, set by privacy=dp_fedavg).
    weighting: str = one_of("examples", "uniform")
    min_train_sites: int = 2  # the fewest training sites sampled per round
    # Update validation (every strategy): a round needs this many valid replies, else it
    # fails (or, with on_too_few_valid=skip, is recorded as skipped).
    min_valid_replies: int = 1
    on_too_few_valid: str = one_of("fail", "skip")  # a round with fewer valid replies: stop the run, or skip it
    # A reply may claim at most this x the training examples its site declared in the handshake.
    max_examples_factor: float = 1.0
    # What a site declared at the handshake is bounded too: with three or more training sites,
    # one declaring more than this share of all their training examples has every update
    # refused (1 = no bound). Generous: quantity skew (sigma 1) gave one site 69% in a clean run.
    max_site_weight_share: float = 0.9
    # Update-norm bound, on the L2 of (reply - global model) over all arrays: a reply above it is
    # refused (0 = no bound). Plain norms under privacy=dp_fedavg, which clips every update to one
    # norm first; this bound and the next are not applied under secure aggregation.
    max_update_norm: float = 1.0e4
    # A reply whose norm per sqrt(training example) is above this x the round's median of that is
    # refused (with three or more updates; 0 = off). Per sqrt(example) because a site's norm grows
    # with its steps, i.e. its data: a clean site holding 90% of the examples (16x the median's
    # steps) had 4.87x the median norm, 0.66 per sqrt(example); three or four training sites 1.81
    # at most. Default 4: over 2,426 clean updates (19 study runs, 9 plans) the largest ratio was
    # 2.89 (fedrex, plain SGD); a site's update x10 was refused for 2,403 of them, x1000 for all
    # (experiments/results/update_norm_bound/).
    max_update_norm_ratio: float = 4.0
    # The strategy's own settings: an instance of the class registered under `name`.
    settings: StrategySettings = field(default_factory=StrategySettings)

    def __post_init__(self) -> None:
        checks = [
            *allowed_checks(self),
            ("fraction_train", 0.0 < self.fraction_train <= 1.0, "must be in (0, 1]"),
            ("min_train_sites", self.min_train_sites >= 1, "must be >= 1"),
            ("min_valid_replies", self.min_valid_replies >= 1, "must be >= 1"),
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
        for key, ok, why in allowed_checks(self.settings):  # a strategy's own settings declared with one_of
            if not ok:
                raise ConfigError(f"strategy.{key}={getattr(self.settings, key)}: {why}")

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

    # Differential privacy: none, dp_sgd (sample-level, at each site) or dp_fedavg (site-level, at the server).
    name: str = one_of("none", "dp_sgd", "dp_fedavg")
    # Target epsilon over the planned rounds: the noise is calibrated once, up front, so that
    # `rounds` rounds spend exactly this. It is also each site's budget: a site whose next
    # round would exceed it stops training (and keeps evaluating). None with noise_multiplier
    # set: fixed noise, no budget.
    target_epsilon: Optional[float] = None
    delta: float = 1e-5  # the delta of (epsilon, delta)-DP
    noise_multiplier: Optional[float] = None  # fixed noise instead of a target epsilon
    max_grad_norm: float = 1.0  # dp_sgd: per-sample gradient clipping norm
    clipping_norm: float = 1.0  # dp_fedavg: per-site update clipping norm (L2, all arrays)
    accountant: str = one_of("rdp", "prv")  # an Opacus accountant
    # How Opacus computes per-sample gradients (experiments/bench/dp_step.py)
    grad_sample_mode: str = one_of("ew", "hooks", "functorch")


@dataclass(frozen=True)
class EngineConfig:
    """What runs the sites and the rounds (`engine.*`; federated/engines/): where, with what
    resources, with which timeouts and checkpoints."""

    name: str = "inprocess"  # the engine that runs the sites (federated/engines/, conf/engine/)
    # Where sites train and evaluate: auto (CUDA if this machine has it, else CPU), cpu, cuda,
    # cuda:N or mps. Each site resolves it on its own machine (federated/core/compute.py).
    device: str = one_of("auto", "cpu", "cuda", "cuda:N", "mps", pattern=DEVICE_PATTERN)
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
    handshake_timeout_s: float = 300.0  # the handshake's limit: sites connecting and answering, in seconds
    ray_cpus: int = 0  # engine=ray: CPUs a Ray started here may use; 0 = all (not with ray_address)
    # engine=ray: join a running Ray cluster at this address ("auto", "HOST:6379", "ray://HOST:10001";
    # empty = $RAY_ADDRESS, else start Ray here). A cluster is sized by its own nodes, not by us.
    ray_address: str = ""
    # engine=ray: the CPUs one site's process reserves (Flower's client resources); they bound how
    # many sites run at once.
    cpus_per_site: float = 1.0
    # engine=ray: the share of a GPU each site reserves; a fraction lets several sites share one
    # GPU (0.25: four per GPU).
    gpus_per_site: float = 0.0
    # A site that fails in every round, or a task scored in round 0 but not at the end, makes
    # `multimed-fl run` exit non-zero (the summary is written either way); true accepts them.
    allow_site_failures: bool = False
    # A site whose corpus schema disagrees with the federation's (other shapes, classes or task
    # definitions) or that runs another multimed-fl version: stop the run (fail), or run without
    # it (exclude; summary.json lists it under excluded_sites with the reason).
    on_incompatible_site: str = one_of("fail", "exclude")
    # Deployment (a SuperLink): a training site evaluates the model it receives before training
    # on it and replies with both, so a round is one exchange of messages instead of two (train,
    # then evaluate). The scores are the same; a site whose training fails loses that evaluation
    # too. Simulation engines, where a message costs nothing, always evaluate on their own.
    evaluate_with_train: bool = True


@dataclass(frozen=True)
class OODConfig:
    """Test-time adaptation at held-out sites (clients/test_time.py): at the last round each
    held-out site also scores the global model adapted to its own unlabelled inputs."""

    # At the last round, each held-out site also scores the model adapted to its own unlabelled
    # inputs: tent (entropy minimisation on the normalisation layers' scale and shift) or bn_stats
    # (BatchNorm's running statistics re-estimated); none = no adaptation.
    adapt: str = one_of("none", "tent", "bn_stats")
    adapt_steps: int = 10  # TENT's gradient steps (one batch each)
    adapt_lr: float = 0.001  # TENT's Adam learning rate (the paper's)
    adapt_batch_size: int = 64  # inputs per adaptation step


@dataclass(frozen=True)
class SecureAggregationConfig:
    """SecAgg+ for the training round (federated/server/secure_round.py): the server learns only the
    sum of the sites' masked vectors, never one site's update. Flower's names and defaults."""

    name: str = one_of("none", "secaggplus")  # SecAgg+ on the training round, or none
    # Each entry of a site's update is clipped to [-c, c] before quantisation (site side). Updates
    # are sent as differences from the global model, so a small c loses nothing; the quantisation
    # step is 2c / quantization_range.
    clipping_range: float = 1.0
    # Integer levels per entry, below 2**31; 0 = the most the field allows for the round's sites (the
    # largest power of 2 with sites x levels < modulus_range, at most 2**30: 2**28 for 8 sites).
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

    # What the bad sites do (clients/attacks.py says how each corrupts its reply).
    kind: str = one_of(
        "none", "sign_flip", "scale", "nan", "inflate_count", "inflate_handshake", "undeclared_group", "huge"
    )
    sites: List[str] = field(default_factory=list)  # the bad sites (training site ids, e.g. [site_00])
    factor: float = 0.0  # 0 = the attack's default (clients/attacks.py DEFAULT_FACTORS: sign_flip 10, scale 1000, ...)


@dataclass(frozen=True)
class FaultConfig:
    """Simulated failing sites, for fault-tolerance tests and studies (clients/faults.py)."""

    # What a failing site does in its training round: crash (raise), stall (sleep stall_s) or
    # exit (kill its process).
    kind: str = one_of("none", "crash", "stall", "exit")
    sites: List[str] = field(default_factory=list)  # the failing sites (training site ids)
    rounds: List[int] = field(default_factory=list)  # training rounds it happens in; [] = every
    stall_s: float = 30.0  # stall: how long the site sleeps, in seconds


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw vector features (a modality that lists its features) are imputed and standardised
    at load time: with statistics from a federated statistics round over the training sites
    (federated: the pooled numbers, no row moved), each site's own (per_site), or the training
    sites' rows pooled in one place (pooled: simulation only, the reference federated equals).
    A held-out site uses the training sites' statistics under federated and pooled; under
    per_site it standardises with its own (test) rows: what per_site means, each site its own scale."""

    # Where the imputation and standardisation statistics come from: federated, per_site or pooled
    # (the class docstring says what each means).
    statistics: str = one_of("federated", "per_site", "pooled")
    # A site sends nothing for a feature it has fewer observed values of than this, and no
    # histogram cell of fewer. In deployment a site's own node config (stats-min-count) is its floor.
    min_count: int = 10
    # > 0: each site adds Laplace noise to its feature sums, epsilon-DP per record (a corpus row,
    # not a patient) per site and run (features need a range from the data dictionary); 0 = exact.
    # In deployment a site's node config (stats-epsilon) caps what the server may ask for.
    epsilon: float = 0.0


@dataclass(frozen=True)
class ExperimentConfig:
    """One run's whole configuration: a section per component, each key as `section.key` in conf/
    and on the command line. Build it with federated.core.config.load_config (conf/ defaults, then
    overrides, then every check); config.yaml in a run folder is this, written back."""

    seed: int = 0  # the training seed: initial model, site sampling, batch order (the data has corpus.seed)
    rounds: int = 20  # federated rounds: train at the sampled training sites, aggregate, evaluate everywhere
    scale: str = "default"  # the conf/scale preset merged over the config
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


# Names other modules use for a setting's declared values (derived from its field, never listed again).
DEVICE_CHOICES = ", ".join(allowed_values(EngineConfig, "device") or ())  # as errors refusing a device spell them
HOLDOUT_MODES = allowed_values(SitesConfig, "holdout") or ()  # partitions/holdout.py's selectors
PRIVACY_MODES = allowed_values(PrivacyConfig, "name") or ()  # clients' local trainers, conf/privacy/
