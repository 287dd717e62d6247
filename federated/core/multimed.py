"""The MultiMed catalogue: 11 modalities and 11 tasks (Mo & Liang, arXiv 2408.12682), plus the
extension tasks of the real data shipped in registry packages.

The catalogue is a CorpusSchema like any other: the synthetic generator writes it into the
corpora it builds, and an ingest spec may use a catalogue task by name. Nothing downstream
reads it directly: planning, models, metrics and reports read the schema of their corpus.
Shapes are the CPU-friendly shapes of the embedded synthetic corpus.
"""

from __future__ import annotations

from dataclasses import replace

from federated.core.corpus_schema import CorpusSchema, Modality, SchemaError, Task
from federated.core.targets import (
    BINARY,
    CLASS_TARGETS,
    CLOSED_SET,
    IGNORE_LABEL,
    IMAGE,
    KINDS,
    MULTICLASS,
    MULTILABEL,
    PAD_TOKEN,
    PER_RESIDUE,
    REGRESSION,
    SIGNAL,
    TARGET_TYPES,
    TOKENS,
    VECTOR,
)

__all__ = [
    "BINARY",
    "CATALOGUE",
    "CLASS_TARGETS",
    "CLOSED_SET",
    "IGNORE_LABEL",
    "IMAGE",
    "KINDS",
    "MULTICLASS",
    "MULTILABEL",
    "MULTIMED",
    "MULTIMED_TASKS",
    "PAD_TOKEN",
    "PER_RESIDUE",
    "REGRESSION",
    "SIGNAL",
    "TARGET_TYPES",
    "TOKENS",
    "VECTOR",
    "CorpusSchema",
    "Modality",
    "SchemaError",
    "Task",
]

_MODALITIES = (
    Modality("oct", IMAGE, (1, 32, 32), "float32"),
    Modality("xray", IMAGE, (1, 32, 32), "float32"),
    Modality("ct", IMAGE, (1, 32, 32), "float32"),
    Modality("mri", IMAGE, (1, 32, 32), "float32"),
    Modality("pathology", IMAGE, (3, 32, 32), "float32"),
    Modality("eeg", SIGNAL, (8, 128), "float32"),
    Modality("genomic_sequence", TOKENS, (128,), "int64", vocab_size=5),  # pad + ACGT
    Modality("scrna", VECTOR, (256,), "float32"),  # log-normalised expression of 256 genes
    Modality("protein_sequence", TOKENS, (64,), "int64", vocab_size=21),  # pad + 20 amino acids
    Modality("text", TOKENS, (32,), "int64", vocab_size=128),
    Modality("tabular", VECTOR, (16,), "float32"),
)

SECONDARY_STRUCTURE = ("H", "E", "C")

_MULTIMED_TASKS = (
    Task(
        "disease_classification",
        ("ct", "text"),
        MULTICLASS,
        ("macro_f1", "accuracy"),
        ("normal", "common_pneumonia", "novel_coronavirus_pneumonia"),
        description="CT slice folders (CC-CCII)",
    ),
    Task(
        "brain_tumor_classification",
        ("mri",),
        MULTICLASS,
        ("macro_f1", "accuracy"),
        ("glioma", "meningioma", "pituitary", "no_tumor"),
        description="JPEG class folders",
    ),
    Task(
        "breast_cancer_classification",
        ("pathology", "tabular"),
        BINARY,
        ("auroc", "accuracy"),
        ("benign", "malignant"),
        description="image folders / CSV",
    ),
    Task(
        "radiographic_findings",
        ("xray",),
        MULTILABEL,
        ("mean_auroc",),
        ("atelectasis", "cardiomegaly", "effusion", "nodule", "pneumothorax"),
        label_shape=(5,),
        description="images + CSV labels",
    ),
    Task("bone_age", ("xray",), REGRESSION, ("mae",), unit="months", description="images + CSV"),
    Task(
        "diabetic_retinopathy",
        ("oct",),
        MULTICLASS,
        ("macro_f1", "accuracy"),
        ("normal", "drusen", "dme", "cnv"),
        description="JPEG class folders (Kermany OCT)",
    ),
    Task(
        "motor_imagery",
        ("eeg",),
        MULTICLASS,
        ("accuracy", "kappa"),
        ("left_hand", "right_hand", "feet", "tongue"),
        description="EDF/GDF recordings + events",
    ),
    Task(
        "cell_type",
        ("scrna",),
        MULTICLASS,
        ("macro_f1", "accuracy"),
        tuple(f"type_{i}" for i in range(10)),
        description="AnnData .h5ad",
    ),
    Task(
        "expression_prediction",
        ("genomic_sequence",),
        REGRESSION,
        ("pearson", "mse"),
        unit="log expression",
        description="FASTA + table",
    ),
    Task(
        "protein_structure",
        ("protein_sequence",),
        PER_RESIDUE,
        ("q3",),
        SECONDARY_STRUCTURE,
        label_shape=(64,),
        description="FASTA + per-residue labels",
    ),
    Task(
        "medical_vqa",
        ("xray", "text"),
        CLOSED_SET,
        ("accuracy",),
        ("no", "yes", "0", "1", "2", "3", "4"),
        description="JSON/JSONL + images",
    ),
)


# Extension tasks: real data that ships in registry packages (the real_mini study) but matches
# no MultiMed task exactly. Mapping Br35H's "tumour: yes" onto one of MultiMed's four tumour
# types, or a trial's birthweight onto bone age, would be wrong, so they get tasks of their own.
# Br35H reuses MultiMed's mri encoder; the OPT tasks share the obstetric one.
# Extension modalities, for the extension tasks below: the OPT trial's baseline covariates are
# their own columns. A vector modality's columns mean one thing in a corpus (its features are in
# the schema), so they cannot share MultiMed's `tabular`, which the breast-cancer table fills.
_EXTENSION_MODALITIES = (Modality("obstetric", VECTOR, (16,), "float32"),)
_EXTENSION_TASKS = (
    Task(
        "brain_tumor_detection",
        ("mri",),
        BINARY,
        ("auroc", "accuracy"),
        ("no_tumor", "tumor"),
        description="JPEG class folders (Br35H)",
    ),
    Task(
        "birthweight",
        ("obstetric",),
        REGRESSION,
        ("mae",),
        unit="grams",
        description="CSV with a clinic column (OPT trial)",
    ),
    Task(
        "preterm_birth",
        ("obstetric",),
        BINARY,
        ("auroc", "accuracy"),
        ("term", "preterm"),
        description="CSV with a clinic column (OPT trial)",
    ),
)


_MODALITY_MAP = {m.name: m for m in _MODALITIES}
# MultiMed's own 11 tasks: what the synthetic corpus generates and the studies compare.
MULTIMED = CorpusSchema(_MODALITY_MAP, {t.name: replace(t, multimed=True) for t in _MULTIMED_TASKS})
MULTIMED_TASKS: tuple[str, ...] = tuple(MULTIMED.tasks)
# Every task an ingest spec may use by name.
CATALOGUE = CorpusSchema(
    {**_MODALITY_MAP, **{m.name: m for m in _EXTENSION_MODALITIES}},
    {**MULTIMED.tasks, **{t.name: t for t in _EXTENSION_TASKS}},
)
