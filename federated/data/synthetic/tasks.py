"""One generator per MultiMed task: draw latent factors, render each modality, apply the site.

A generator takes the (task, site) random stream, the number of samples and the site
context, and returns a `TaskBatch` at the registry's shapes and dtypes. Class labels are
balanced within a site (a shuffled repeat of the classes), so a small site is not skewed by
chance; deliberate label skew is the partitioners' job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from federated.core.multimed import MULTIMED
from federated.core.registry import Registry
from federated.data.synthetic.acquisition import SiteAcquisition
from federated.data.synthetic.expression import expression_world, sample_cells
from federated.data.synthetic.images import (
    BASE_NOISE,
    render_brain_mri,
    render_chest_ct,
    render_pathology,
    render_radiograph,
    render_retina_oct,
)
from federated.data.synthetic.sequences import genomic_world, sample_promoters, sample_proteins
from federated.data.synthetic.signals import render_motor_imagery
from federated.data.synthetic.tabular import sample_clinical
from federated.data.synthetic.text import write_questions, write_reports

FINDING_PREVALENCE = 0.3
INCIDENTAL_PREVALENCE = 0.1  # findings on bone-age films: present but not the question
BONE_AGE_MONTHS = (12.0, 216.0)
MATURITY_NOISE = 0.06  # skeletal maturity vs chronological age, as a fraction of the range
MALIGNANCY_NOISE = 0.25
VQA_YES_NO_SHARE = 0.6
VQA_FIRST_COUNT_ANSWER = 2  # closed-set answers: no, yes, then "0".."4"
VQA_MAX_COUNT = 4  # "4" means four or more


@dataclass(frozen=True)
class SiteContext:
    seed: int  # selects the world (motifs, gene programs) shared by all sites
    acquisition: SiteAcquisition


@dataclass(frozen=True)
class TaskBatch:
    inputs: dict[str, np.ndarray]  # modality -> [n, *shape]
    target: np.ndarray  # [n, *label_shape]
    label: np.ndarray  # [n] float64: the scalar label, NaN for multilabel / per-residue


TaskGenerator = Callable[[np.random.Generator, int, SiteContext], TaskBatch]
GENERATORS: Registry[TaskGenerator] = Registry("synthetic task generator")


def _balanced(rng: np.random.Generator, n: int, n_classes: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % n_classes).astype(np.int64)


def _classes(name: str) -> int:
    return len(MULTIMED.task(name).classes)


def _image(ctx: SiteContext, modality: str, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return ctx.acquisition.images[modality].apply(clean, rng, BASE_NOISE[modality])


def _classified(inputs: dict[str, np.ndarray], y: np.ndarray) -> TaskBatch:
    return TaskBatch(inputs, y.astype(np.int64), y.astype(np.float64))


@GENERATORS.register("disease_classification")
def disease_classification(rng: np.random.Generator, n: int, ctx: SiteContext) -> TaskBatch:
    """CT shows pneumonia (classes 1, 2 vs 0); the report's exposure history marks class 2."""
    y = _balanced(rng, n, _classes("disease_classification"))
    ct = _image(ctx, "ct", render_chest_ct(rng, y != 0), rng)
    return _classified({"ct": ct, "text": write_reports(rng, y, ctx.acquisition.text)}, y)


@GENERATORS.register("brain_tumor_classification")
def brain_tumor_classification(rng: np.random.Generator, n: int, ctx: SiteContext) -> TaskBatch:
    y = _balanced(rng, n, _classes("brain_tumor_classification"))
    return _classified({"mri": _image(ctx, "mri", render_brain_mri(rng, y), rng)}, y)


@GENERATORS.register("breast_cancer_classification")
def breast_cancer_classification(rng: np.random.Generator, n: int, ctx: SiteContext) -> TaskBatch:
    """Malignant iff a + b + noise > 0: pathology shows a, the clinical table shows b."""
    a = rng.normal(size=n)
    b = rng.normal(size=n)
    y = (a + b + rng.normal(0.0, MALIGNANCY_NOISE, n) > 0).astype(np.int64)
    pathology = _image(ctx, "pathology", render_pathology(rng, a), rng)
    tabular = ctx.acquisition.tabular.apply(sample_clinical(rng, b))
    return _classified({"pathology": pathology, "tabular": tabular}, y)


@GENERATORS.register("radiographic_findings")
def radiographic_findings(rng: np.random.Generator, n: int, ctx: SiteContext) -> TaskBatch:
    findings = rng.random((n, _classes("radiographic_findings"))) < FINDING_PREVALENCE
    xray = _image(ctx, "xray", render_radiograph(rng, findings, rng.uniform(0.8, 1.0, n)), rng)
    return TaskBatch({"xray": xray}, findings.astype(np.int64), np.full(n, np.nan))


@GENERATORS.register("bone_age")
def bone_age(rng: np.random.Generator, n: int, ctx: SiteContext) -> TaskBatch:
    """Age in months drives skeletal maturity (plus individual variation) on the film."""
    lo, hi = BONE_AGE_MONTHS
    age = rng.uniform(lo, hi, n)
    maturity = np.clip((age - lo) / (hi - lo) + rng.normal(0.0, MATURITY_NOISE, n), 0.0, 1.0)
    incidental = rng.random((n, _classes("radiographic_findings"))) < INCIDENTAL_PREVALENCE
    xray = _image(ctx, "xray", render_radiograph(rng, incidental, maturity), rng)
    age32 = age.astype(np.float32)
    return TaskBatch({"xray": xray}, age32, age32.astype(np.float64))


@GENERATORS.register("diabetic_retinopathy")
def diabetic_retinopathy(rng: np.random.Generator, n: int, ctx: SiteContext) -> TaskBatch:
    y = _balanced(rng, n, _classes("diabetic_retinopathy"))
    return _classified({"oct": _image(ctx, "oct", render_retina_oct(rng, y), rng)}, y)


@GENERATORS.register("motor_imagery")
def motor_imagery(rng: np.random.Generator, n: int, ctx: SiteContext) -> TaskBatch:
    y = _balanced(rng, n, _classes("motor_imagery"))
    eeg = ctx.acquisition.eeg.apply(render_motor_imagery(rng, y), rng)
    return _classified({"eeg": eeg}, y)


@GENERATORS.register("cell_type")
def cell_type(rng: np.random.Generator, n: int, ctx: SiteContext) -> TaskBatch:
    y = _balanced(rng, n, _classes("cell_type"))
    cells = sample_cells(rng, y, expression_world(ctx.seed), ctx.acquisition.expression)
    return _classified({"scrna": cells}, y)


@GENERATORS.register("expression_prediction")
def expression_prediction(rng: np.random.Generator, n: int, ctx: SiteContext) -> TaskBatch:
    seqs, level = sample_promoters(rng, n, genomic_world(ctx.seed), ctx.acquisition.sequences)
    return TaskBatch({"genomic_sequence": seqs}, level, level.astype(np.float64))


@GENERATORS.register("protein_structure")
def protein_structure(rng: np.random.Generator, n: int, ctx: SiteContext) -> TaskBatch:
    tokens, labels = sample_proteins(rng, n, ctx.acquisition.sequences)
    return TaskBatch({"protein_sequence": tokens}, labels, np.full(n, np.nan))


@GENERATORS.register("medical_vqa")
def medical_vqa(rng: np.random.Generator, n: int, ctx: SiteContext) -> TaskBatch:
    """A radiograph with findings + a question about one finding or their number."""
    n_findings = _classes("radiographic_findings")
    findings = rng.random((n, n_findings)) < FINDING_PREVALENCE
    xray = _image(ctx, "xray", render_radiograph(rng, findings, rng.uniform(0.8, 1.0, n)), rng)
    asked = np.where(rng.random(n) < VQA_YES_NO_SHARE, rng.integers(0, n_findings, n), -1)
    present = findings[np.arange(n), np.maximum(asked, 0)].astype(np.int64)
    count = np.minimum(findings.sum(axis=1), VQA_MAX_COUNT) + VQA_FIRST_COUNT_ANSWER
    answer = np.where(asked >= 0, present, count).astype(np.int64)
    question = write_questions(rng, asked, ctx.acquisition.text)
    return _classified({"xray": xray, "text": question}, answer)
