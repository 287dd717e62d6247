"""What a run reports, typed: the records behind summary.json (a contract: docs/getting-started.md, "What it writes").

Each dataclass writes itself with `to_dict()` as exactly the JSON it always was (field names and
their order are what users' scripts read) and reads itself back with `from_dict()`, so a study can
reuse a finished run's summary.json as the same object a fresh run returns. JSON has no NaN:
federated.core.io.write_json writes it as null, and `from_dict` reads null back as NaN. An infinite
privacy spend is written as the string "inf" with a flag (`epsilon_infinite: true`), never null.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from federated.core.protocol import Role

PrivacyReport = dict[str, Any]
"""A site's privacy spend as its mechanism reports it (epsilon, delta, steps, ...): the keys differ
per mechanism (DP-SGD, site-level DP), so it stays a mapping and is written as it came."""

PerTaskMetrics = dict[str, dict[str, float]]
"""task -> metric name -> value (a site's evaluation of each task it holds)."""


def _num(value: Any) -> float:
    """A float read back from JSON, where NaN was written as null."""
    return math.nan if value is None else float(value)


def _report_to_json(report: PrivacyReport) -> dict[str, Any]:
    """A privacy report as JSON writes it: an infinite value (epsilon without a bound) becomes the
    string "inf" plus `<key>_infinite: true`, since JSON has no infinity and null reads as "unknown"."""
    out: dict[str, Any] = {}
    for key, value in report.items():
        if isinstance(value, float) and math.isinf(value) and value > 0:
            out[key], out[f"{key}_infinite"] = "inf", True
        else:
            out[key] = value
    return out


def _report_from_json(raw: dict[str, Any]) -> PrivacyReport:
    """The inverse of _report_to_json: "inf" with its flag is infinity again."""
    flags = {k for k, v in raw.items() if k.endswith("_infinite") and v is True}
    out = {k: v for k, v in raw.items() if k not in flags}
    for flag in flags:
        out[flag.removesuffix("_infinite")] = math.inf
    return out


def _per_task_metrics(raw: dict[str, dict[str, Any]]) -> PerTaskMetrics:
    return {task: {name: _num(v) for name, v in metrics.items()} for task, metrics in raw.items()}


@dataclass
class GroupScores:
    """The ID or OOD scores of a round: per task, and their mean over tasks."""

    score: float
    per_task: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "per_task": dict(self.per_task)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GroupScores:
        return cls(_num(raw["score"]), {t: _num(v) for t, v in raw["per_task"].items()})


@dataclass
class WorstSite:
    """The site with the lowest score of a round (ID or OOD)."""

    site: str
    role: Role
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "role": self.role.value, "score": self.score}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> WorstSite:
        return cls(str(raw["site"]), Role(raw["role"]), _num(raw["score"]))


@dataclass
class RoundSummary:
    """A round's scores: summary.json's `final` (and, in part, `initial` and `history`)."""

    id: GroupScores
    ood: GroupScores
    gap: float  # mean over gap_tasks of ID - OOD
    gap_tasks: list[str]
    worst_site: WorstSite | None
    id_personal: GroupScores | None = None  # strategies that keep a personal model per site
    ood_adapted: GroupScores | None = None  # held-out sites' test-time-adapted models (ood.adapt)

    def to_dict(self) -> dict[str, Any]:
        personal = {"id_personal": self.id_personal.to_dict()} if self.id_personal is not None else {}
        adapted = {"ood_adapted": self.ood_adapted.to_dict()} if self.ood_adapted is not None else {}
        return {
            "id": self.id.to_dict(),
            "ood": self.ood.to_dict(),
            **adapted,
            **personal,
            "gap": self.gap,
            "gap_tasks": list(self.gap_tasks),
            "worst_site": self.worst_site.to_dict() if self.worst_site is not None else None,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RoundSummary:
        personal, worst, adapted = raw.get("id_personal"), raw.get("worst_site"), raw.get("ood_adapted")
        return cls(
            GroupScores.from_dict(raw["id"]),
            GroupScores.from_dict(raw["ood"]),
            _num(raw["gap"]),
            [str(t) for t in raw["gap_tasks"]],
            WorstSite.from_dict(worst) if worst else None,
            GroupScores.from_dict(personal) if personal else None,
            GroupScores.from_dict(adapted) if adapted else None,
        )

    def headline(self) -> Headline:
        return Headline(self.id, self.ood, self.gap)


@dataclass
class Headline:
    """The three numbers a round is judged by: summary.json's `initial`."""

    id: GroupScores
    ood: GroupScores
    gap: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id.to_dict(), "ood": self.ood.to_dict(), "gap": self.gap}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Headline:
        return cls(GroupScores.from_dict(raw["id"]), GroupScores.from_dict(raw["ood"]), _num(raw["gap"]))


@dataclass
class SiteRow:
    """One site at the end of a run: an entry of summary.json's `per_site`."""

    site: str
    role: Role
    archetype: str
    origin_site: str
    modalities: list[str]
    tasks: list[str]
    n_train: int
    n_test: int
    score: float
    per_task: PerTaskMetrics  # without the sample counts
    personal_score: float | None = None  # the site's personalised model, when the strategy keeps one
    personal_per_task: PerTaskMetrics | None = None
    adapted_score: float | None = None  # a held-out site's test-time-adapted model (ood.adapt)
    adapted_per_task: PerTaskMetrics | None = None

    def to_dict(self) -> dict[str, Any]:
        personal = (
            {"personal_score": self.personal_score, "personal_per_task": self.personal_per_task}
            if self.personal_per_task is not None
            else {}
        )
        if self.adapted_per_task is not None:
            personal |= {"adapted_score": self.adapted_score, "adapted_per_task": self.adapted_per_task}
        return {
            "site": self.site,
            "role": self.role.value,
            "archetype": self.archetype,
            "origin_site": self.origin_site,
            "modalities": list(self.modalities),
            "tasks": list(self.tasks),
            "n_train": self.n_train,
            "n_test": self.n_test,
            "score": self.score,
            "per_task": self.per_task,
            **personal,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SiteRow:
        personal, adapted = raw.get("personal_per_task"), raw.get("adapted_per_task")
        return cls(
            str(raw["site"]),
            Role(raw["role"]),
            str(raw["archetype"]),
            str(raw["origin_site"]),
            list(raw["modalities"]),
            list(raw["tasks"]),
            int(raw["n_train"]),
            int(raw["n_test"]),
            _num(raw["score"]),
            _per_task_metrics(raw["per_task"]),
            _num(raw.get("personal_score")) if personal is not None else None,
            _per_task_metrics(personal) if personal is not None else None,
            _num(raw.get("adapted_score")) if adapted is not None else None,
            _per_task_metrics(adapted) if adapted is not None else None,
        )


@dataclass
class Rejection:
    """A training update the strategy refused (summary.json's `rejections`)."""

    round: int
    site: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "site": self.site, "reason": self.reason}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Rejection:
        return cls(int(raw["round"]), str(raw["site"]), str(raw["reason"]))


@dataclass
class HistoryRow:
    """One round's ID score, OOD score and gap (summary.json's `history`)."""

    round: int
    id: float
    ood: float
    gap: float

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "id": self.id, "ood": self.ood, "gap": self.gap}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> HistoryRow:
        return cls(int(raw["round"]), _num(raw["id"]), _num(raw["ood"]), _num(raw["gap"]))


# The settings summary.json lists per round for each privacy mode (the rest of privacy.* does not
# act in that mode); a mode not listed here gets every privacy.* key.
MODE_SETTINGS = {
    "none": (),
    "dp_sgd": ("target_epsilon", "noise_multiplier", "max_grad_norm", "delta", "accountant"),
    "dp_fedavg": ("target_epsilon", "noise_multiplier", "clipping_norm", "delta", "accountant"),
}


@dataclass
class PrivacyRound:
    """One training round as it was protected (summary.json's `privacy_by_round`): the privacy mode
    and its settings from the round's record (what the server trained it with), secure aggregation,
    and each site's epsilon spent up to and including the round (a site not sampled in it keeps its
    earlier spend). `epsilon` is the largest; None when no site has reported a spend."""

    round: int
    mode: str | None  # privacy.name; None: the round recorded no settings
    settings: dict[str, Any]  # privacy.<key> -> value, the keys of MODE_SETTINGS[mode]
    secure_aggregation: str | None
    epsilon_per_site: dict[str, float]

    @classmethod
    def of(cls, rnd: int, trained_with: dict[str, Any], spent: dict[str, float]) -> PrivacyRound:
        mode = trained_with.get("privacy.name")
        prefix = "privacy."
        listed = MODE_SETTINGS.get(str(mode))
        keys = listed if listed is not None else [k.removeprefix(prefix) for k in trained_with if k.startswith(prefix)]
        settings = {k: trained_with[prefix + k] for k in keys if prefix + k in trained_with and k != "name"}
        return cls(rnd, mode, settings, trained_with.get("secure_aggregation.name"), dict(spent))

    @property
    def epsilon(self) -> float | None:
        return max(self.epsilon_per_site.values(), default=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "mode": self.mode,
            **_report_to_json(self.settings),
            "secure_aggregation": self.secure_aggregation,
            **_report_to_json({"epsilon": self.epsilon}),
            "epsilon_per_site": _report_to_json(self.epsilon_per_site),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PrivacyRound:
        fixed = {"round", "mode", "secure_aggregation", "epsilon", "epsilon_infinite", "epsilon_per_site"}
        settings = _report_from_json({k: v for k, v in raw.items() if k not in fixed})
        per_site = {str(k): float(v) for k, v in _report_from_json(raw.get("epsilon_per_site", {})).items()}
        return cls(int(raw["round"]), raw.get("mode"), settings, raw.get("secure_aggregation"), per_site)


@dataclass
class RunTiming:
    """Seconds spent: the whole run (wall_s) and the federation's parts."""

    wall_s: float
    federation_s: float
    train_s: float
    aggregate_s: float
    evaluate_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "wall_s": self.wall_s,
            "federation_s": self.federation_s,
            "train_s": self.train_s,
            "aggregate_s": self.aggregate_s,
            "evaluate_s": self.evaluate_s,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunTiming:
        return cls(*(_num(raw[k]) for k in ("wall_s", "federation_s", "train_s", "aggregate_s", "evaluate_s")))


@dataclass
class RunSummary:
    """summary.json: what a run reports, in the order it is written."""

    rounds_completed: int
    seed: int
    strategy: str
    engine: str
    privacy_mode: str
    scale: str
    final: RoundSummary
    initial: Headline
    per_site: list[SiteRow]
    privacy: dict[str, PrivacyReport]  # site -> its latest (cumulative) spend; empty without DP
    failures: dict[int, dict[str, str]]  # round -> "stage:site" -> reason
    rejections: list[Rejection]
    skipped_rounds: list[int]
    history: list[HistoryRow]
    timing: RunTiming
    corpus: str | None = None  # the corpus a run read (written when known)
    resumed_from_round: int | None = None  # written only for a resumed run
    # What makes the run's scores incomplete (a site failing every round, a task no longer
    # scored at the end): written only when there is any; `multimed-fl run` then exits non-zero.
    problems: list[str] = field(default_factory=list)
    init_weights: dict[str, Any] | None = None  # what model.init_weights loaded; written only with it
    # The run's tasks as its corpus declares them (inputs, target, classes, metrics: the primary
    # first), so a summary can be read without the corpus.
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Sites left out as incompatible (engine.on_incompatible_site=exclude): site -> why.
    excluded_sites: dict[str, str] = field(default_factory=dict)
    # Site-local mode: each regression task's scale from the federated statistics round.
    target_scales: dict[str, dict[str, float]] = field(default_factory=dict)
    # Round by round, the privacy the run trained with and the epsilon spent so far (PrivacyRound):
    # written when the rounds recorded their settings (every run of this release does).
    privacy_by_round: list[PrivacyRound] = field(default_factory=list)
    # Runs with raw-feature modalities: how their statistics were made ({statistics, min_count,
    # epsilon}: epsilon is what each training site spent on the statistics round, 0 = exact) and,
    # for federated or pooled statistics, the transform itself per modality ({features, mean, std,
    # fill, n}: fill null where a modality imputes nothing; n: values behind each feature's numbers).
    preprocess: dict[str, Any] = field(default_factory=dict)
    feature_statistics: dict[str, dict[str, list[Any]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.init_weights is not None:
            extra["init_weights"] = self.init_weights
        if self.tasks:
            extra["tasks"] = self.tasks
        if self.excluded_sites:
            extra["excluded_sites"] = self.excluded_sites
        if self.target_scales:
            extra["target_scales"] = self.target_scales
        if self.preprocess:
            extra["preprocess"] = self.preprocess
        if self.feature_statistics:
            extra["feature_statistics"] = self.feature_statistics
        if self.corpus is not None:
            extra["corpus"] = self.corpus
        if self.resumed_from_round is not None:
            extra["resumed_from_round"] = self.resumed_from_round
        if self.problems:
            extra["problems"] = list(self.problems)
        return {
            "rounds_completed": self.rounds_completed,
            "seed": self.seed,
            "strategy": self.strategy,
            "engine": self.engine,
            "privacy_mode": self.privacy_mode,
            "scale": self.scale,
            "final": self.final.to_dict(),
            "initial": self.initial.to_dict(),
            "per_site": [row.to_dict() for row in self.per_site],
            "privacy": {site: _report_to_json(report) for site, report in self.privacy.items()},
            **({"privacy_by_round": [r.to_dict() for r in self.privacy_by_round]} if self.privacy_by_round else {}),
            "failures": {str(rnd): dict(reasons) for rnd, reasons in self.failures.items()},
            "rejections": [r.to_dict() for r in self.rejections],
            "skipped_rounds": list(self.skipped_rounds),
            "history": [row.to_dict() for row in self.history],
            "timing": self.timing.to_dict(),
            **extra,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunSummary:
        resumed = raw.get("resumed_from_round")
        return cls(
            rounds_completed=int(raw["rounds_completed"]),
            seed=int(raw["seed"]),
            strategy=str(raw["strategy"]),
            engine=str(raw["engine"]),
            privacy_mode=str(raw["privacy_mode"]),
            scale=str(raw["scale"]),
            final=RoundSummary.from_dict(raw["final"]),
            initial=Headline.from_dict(raw["initial"]),
            per_site=[SiteRow.from_dict(r) for r in raw["per_site"]],
            privacy={str(site): _report_from_json(report) for site, report in raw["privacy"].items()},
            failures={int(rnd): dict(reasons) for rnd, reasons in raw["failures"].items()},
            rejections=[Rejection.from_dict(r) for r in raw["rejections"]],
            skipped_rounds=[int(r) for r in raw["skipped_rounds"]],
            history=[HistoryRow.from_dict(r) for r in raw["history"]],
            timing=RunTiming.from_dict(raw["timing"]),
            corpus=raw.get("corpus"),
            resumed_from_round=int(resumed) if resumed is not None else None,
            problems=[str(p) for p in raw.get("problems", [])],
            init_weights=raw.get("init_weights"),
            tasks=dict(raw.get("tasks", {})),
            excluded_sites={str(k): str(v) for k, v in raw.get("excluded_sites", {}).items()},
            target_scales={
                str(t): {k: float(v) for k, v in s.items()} for t, s in raw.get("target_scales", {}).items()
            },
            privacy_by_round=[PrivacyRound.from_dict(r) for r in raw.get("privacy_by_round", [])],
            preprocess=dict(raw.get("preprocess", {})),
            feature_statistics={
                str(m): {k: [str(x) if k == "features" else _num(x) for x in v] for k, v in s.items()}
                for m, s in raw.get("feature_statistics", {}).items()
            },
        )

    def max_epsilon(self) -> float | None:
        """The largest epsilon any site spent; None without DP (a site without a bound counts 0)."""
        return max((report.get("epsilon") or 0.0 for report in self.privacy.values()), default=None)
