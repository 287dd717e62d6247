"""What the round loop produces: one record per round, and the result of a whole run.

These stay in memory (and in checkpoints); federated/server/outputs.py turns them into summary.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord

from federated.core.corpus_schema import CorpusSchema
from federated.server.evaluation import SiteEvaluation, SiteProfile
from federated.server.feature_round import FeatureStatistics
from federated.server.results import PrivacyReport, PrivacyRound, RoundSummary


@dataclass
class TrainStats:
    """What a site reported about its local training in one round."""

    loss: float
    n: float  # examples it trained on
    steps: float


@dataclass
class RoundRecord:
    """One round: its evaluations and scores, and what happened in its training (round 0: none)."""

    round: int
    evaluations: list[SiteEvaluation]
    summary: RoundSummary
    train: dict[str, TrainStats] = field(default_factory=dict)  # site -> its training report
    failures: dict[str, str] = field(default_factory=dict)  # "train:site" / "evaluate:site" -> reason
    rejections: dict[str, str] = field(default_factory=dict)  # site -> why its update was refused
    # site -> (L2 norm of its update, its norm per sqrt(example) over the round's median of that,
    # None: not compared; strategies/validation.norm_ratios)
    update_norms: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    skipped: bool = False  # too few valid updates and strategy.on_too_few_valid=skip
    privacy: dict[str, PrivacyReport] = field(default_factory=dict)  # site -> privacy report
    # The privacy and secure-aggregation settings the server trained this round with
    # (federated/core/config/protected.py): a resume must keep them; the summary lists them per round.
    trained_with: dict[str, Any] = field(default_factory=dict)
    train_s: float = 0.0
    aggregate_s: float = 0.0


@dataclass
class FederationTiming:
    """Seconds the federation spent, summed over rounds (wall_s: the whole federation)."""

    train_s: float = 0.0
    aggregate_s: float = 0.0
    evaluate_s: float = 0.0
    wall_s: float = 0.0


@dataclass
class FederationResult:
    profiles: list[SiteProfile]
    initial: RoundRecord
    history: list[RoundRecord]
    arrays: ArrayRecord
    timing: FederationTiming
    # What model.init_weights loaded into the initial model (InitReport.as_dict()); None without it.
    init_weights: dict[str, Any] | None = None
    schema: CorpusSchema | None = None  # the schema the sites agreed on in the handshake
    excluded_sites: dict[str, str] = field(default_factory=dict)  # site -> why (engine.on_incompatible_site=exclude)
    # Site-local mode: the regression targets' scales from the federated statistics round.
    target_scales: dict[str, list[float]] = field(default_factory=dict)  # task -> [mean, std, mad]
    # Raw-feature modalities: the statistics they were imputed and standardised with; None without any.
    feature_statistics: FeatureStatistics | None = None

    @property
    def final(self) -> RoundRecord:
        return self.history[-1] if self.history else self.initial

    def privacy(self) -> dict[str, PrivacyReport]:
        """Each site's latest privacy report (its cumulative spend)."""
        latest: dict[str, PrivacyReport] = {}
        for record in self.history:
            latest.update(record.privacy)
        return dict(sorted(latest.items()))

    def privacy_by_round(self) -> list[PrivacyRound]:
        """The privacy each training round ran with and each site's spend so far (a resumed run's
        history holds the rounds before the resume too); empty when no round recorded its settings."""
        if not any(record.trained_with for record in self.history):
            return []
        spent: dict[str, float] = {}
        rounds = []
        for record in self.history:
            spent.update({site: float(r["epsilon"]) for site, r in record.privacy.items() if "epsilon" in r})
            rounds.append(PrivacyRound.of(record.round, record.trained_with, dict(sorted(spent.items()))))
        return rounds
