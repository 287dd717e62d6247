"""A study definition: a base config, a grid of conditions, seeds, and a quick variant.

    name: missing_modality
    title: Missing modalities against score, with and without masking
    base: [corpus.samples_per_task_site=150, rounds=12]   # overrides every run gets
    quick: [scale=smoke, rounds=2]                        # added with --quick
    seeds: 3
    quick_seeds: 1
    axes:                                                 # the grid: one run per combination
      missing_rate:
        "0": [sites.missing_sample_rate=0]
        "0.5": [sites.missing_sample_rate=0.5]
    generated_axes: [leave_one_site_out]                  # axes built from the site plan
    setup: experiments/real_mini/setup.sh                 # builds corpus.path (real-data studies)
    reference: "0"                                        # what the report compares the others to

Axis values are labels mapped to override lists. Unknown keys fail with the key's name.
`reference` names a label of the first axis (default: its first label); the report's paired
differences are each other label of that axis minus it.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federated.core.io import read_yaml_mapping
from federated.core.literal import interpolation_in, refusal
from federated.core.resources import shipped_dir

STUDY_DIR_ENV = "MULTIMED_FL_STUDIES"
KEYS = {
    "name",
    "title",
    "description",
    "base",
    "quick",
    "seeds",
    "quick_seeds",
    "axes",
    "generated_axes",
    "processes",
    "quick_axes",
    "per_task_arms",
    "setup",
    "per_task_table",
    "reference",
}
GENERATORS = ("leave_one_site_out", "local_sites")


class StudyError(ValueError):
    """A study definition that cannot run; the message names the file and key."""


@dataclass(frozen=True)
class Run:
    """One experiment of a study: its id, its labels per axis, its seed, its overrides."""

    run_id: str
    labels: dict[str, str]
    seed: int
    overrides: list[str]


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    description: str
    base: list[str]
    quick: list[str]
    seeds: int
    quick_seeds: int
    axes: dict[str, dict[str, list[str]]]
    quick_axes: dict[str, list[str]]  # axis -> the labels a quick run keeps
    generated_axes: list[str]
    processes: int = 2
    # Report a task x arm table: labels "arm:task" of the first axis are one arm's runs of a
    # single task (e.g. single-task models), other labels are arms of their own.
    per_task_arms: bool = False
    # Report per-task ID and OOD scores (mean ± sd) for each condition of the first axis.
    per_task_table: bool = False
    # The command that builds the study's corpus (real data), named when the corpus is missing.
    setup: str = ""
    # The first axis's label the report compares every other label to; None: its first label.
    reference: str | None = None
    path: Path | None = None

    def runs(self, quick: bool = False, generated: dict[str, dict[str, list[str]]] | None = None) -> list[Run]:
        """One run per combination of axis values and seed, in grid order (the report's order)."""
        axes = self._grid(quick, generated)
        seeds = self.quick_seeds if quick else self.seeds
        base = [*self.base, *(self.quick if quick else [])]
        out = []
        for labels, overrides in _combinations(axes):
            for seed in range(seeds):
                rid = "__".join([*(f"{a}={_safe(lbl)}" for a, lbl in labels.items()), f"seed={seed}"])
                out.append(Run(rid, labels, seed, [*base, *overrides, f"seed={seed}"]))
        return out

    def _grid(self, quick: bool, generated: dict[str, dict[str, list[str]]] | None) -> dict[str, dict[str, list[str]]]:
        """The axes with the generated values joined in; a quick run keeps only its quick_axes labels."""
        axes = {a: dict(v) for a, v in self.axes.items()}
        for a, values in (generated or {}).items():  # generated values join a static axis
            axes.setdefault(a, {}).update(values)
        if not quick:
            return axes
        return {
            a: {k: v for k, v in vals.items() if a not in self.quick_axes or k in self.quick_axes[a]}
            for a, vals in axes.items()
        }


def _combinations(axes: dict[str, dict[str, list[str]]]) -> list[tuple[dict[str, str], list[str]]]:
    """(label per axis, their overrides joined in axis order) for every point of the grid."""
    names = list(axes)
    out = []
    for combo in itertools.product(*[list(axes[a].items()) for a in names]):
        labels = {a: label for a, (label, _) in zip(names, combo, strict=True)}
        out.append((labels, [o for _, ovs in combo for o in ovs]))
    return out


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "-" for c in label)


def study_dir() -> Path:
    """$MULTIMED_FL_STUDIES, else the study definitions that shipped with the package (a clone's
    experiments/studies/ when the install is editable): see federated/core/resources.py."""
    env = os.environ.get(STUDY_DIR_ENV)
    return Path(env) if env else shipped_dir("_studies")


def available() -> list[str]:
    return sorted(p.stem for p in study_dir().glob("*.yaml"))


def load_study(name_or_path: str) -> Study:
    """A study by name (in study_dir()) or by path, every key checked, so a typo fails before any run."""
    path = _study_path(name_or_path)
    raw = read_yaml_mapping(path, KEYS, StudyError, "a study")
    interpolated = interpolation_in(raw)
    if interpolated is not None:  # before any value becomes an override that OmegaConf would resolve
        raise StudyError(f"{path}: {refusal(interpolated)}")
    axes = _axes(raw.get("axes") or {}, path)
    generated = list(raw.get("generated_axes") or [])
    bad = [g for g in generated if g not in GENERATORS]
    if bad:
        raise StudyError(f"{path}: generated_axes {bad} unknown; choices: {', '.join(GENERATORS)}")
    for key in ("seeds", "quick_seeds", "processes"):
        if key in raw and (not isinstance(raw[key], int) or raw[key] < 1):
            raise StudyError(f"{path}: {key} must be an integer >= 1 (got {raw[key]!r})")
    quick_axes = {str(a): [str(v) for v in vals] for a, vals in (raw.get("quick_axes") or {}).items()}
    return Study(
        name=str(raw.get("name", path.stem)),
        title=str(raw.get("title", path.stem)),
        description=str(raw.get("description", "")).strip(),
        base=_overrides(raw.get("base"), "base", path),
        quick=_overrides(raw.get("quick"), "quick", path),
        seeds=int(raw.get("seeds", 3)),
        quick_seeds=int(raw.get("quick_seeds", 1)),
        axes=axes,
        quick_axes=quick_axes,
        generated_axes=generated,
        processes=int(raw.get("processes", 2)),
        per_task_arms=bool(raw.get("per_task_arms", False)),
        setup=str(raw.get("setup", "")),
        per_task_table=bool(raw.get("per_task_table", False)),
        reference=_reference(raw.get("reference"), axes, path),
        path=path,
    )


def _study_path(name_or_path: str) -> Path:
    """A bare name is a file in study_dir(); an unknown one fails listing the studies there."""
    path = Path(name_or_path)
    if not path.suffix:
        path = study_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise StudyError(f"unknown study {name_or_path!r}; available: {', '.join(available()) or '(none)'}")
    return path


def _overrides(value: Any, where: str, path: Path) -> list[str]:
    """A list of key=value strings (none when absent); anything else fails naming the key."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise StudyError(f"{path}: {where} must be a list of key=value strings")
    return list(value)


def _axes(raw_axes: dict[Any, Any], path: Path) -> dict[str, dict[str, list[str]]]:
    """Each axis maps labels to override lists; labels become strings (YAML may read 0 as an int)."""
    axes: dict[str, dict[str, list[str]]] = {}
    for axis, values in raw_axes.items():
        if not isinstance(values, dict) or not values:
            raise StudyError(f"{path}: axes.{axis} must map labels to override lists")
        axes[str(axis)] = {str(k): _overrides(v, f"axes.{axis}.{k}", path) for k, v in values.items()}
    return axes


def _reference(value: Any, axes: dict[str, dict[str, list[str]]], path: Path) -> str | None:
    """A label of the first static axis (string, as labels are); generated labels are unknown until
    the corpus is planned, so they cannot be named."""
    if value is None:
        return None
    if not axes:
        raise StudyError(f"{path}: reference {value!r} needs an axes: entry to name a label of")
    first, labels = next(iter(axes.items()))
    if str(value) not in labels:
        raise StudyError(f"{path}: reference {value!r} is not a label of axis {first}; choices: {', '.join(labels)}")
    return str(value)
