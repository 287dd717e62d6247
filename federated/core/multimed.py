"""The MultiMed vocabulary: 11 modalities and 11 tasks (Mo & Liang, arXiv 2408.12682).

Every other module refers to modalities and tasks by these names. Shapes are the
CPU-friendly corpus shapes of the embedded synthetic corpus; ingest adapters resize real
data to them.
"""

from __future__ import annotations

from dataclasses import dataclass

from federated.core.registry import Registry

# Kinds of input, which decide the encoder family.
IMAGE, SIGNAL, TOKENS, VECTOR = "image", "signal", "tokens", "vector"

# Target types.
BINARY = "binary"
MULTICLASS = "multiclass"
MULTILABEL = "multilabel"
REGRESSION = "regression"
PER_RESIDUE = "per_residue"
CLOSED_SET = "closed_set"
TARGET_TYPES = (BINARY, MULTICLASS, MULTILABEL, REGRESSION, PER_RESIDUE, CLOSED_SET)

PAD_TOKEN = 0  # token id 0 is padding in every token modality
IGNORE_LABEL = -1  # per-residue label of a padded position


@dataclass(frozen=True)
class Modality:
    name: str
    kind: str
    shape: tuple[int, ...]  # per-sample array shape in the corpus
    dtype: str  # numpy dtype name of the stored array
    vocab_size: int = 0  # token modalities only, padding included

    @property
    def is_tokens(self) -> bool:
        return self.kind == TOKENS


@dataclass(frozen=True)
class Task:
    name: str
    inputs: tuple[str, ...]
    target: str  # one of TARGET_TYPES
    metrics: tuple[str, ...]  # the first is the primary metric
    classes: tuple[str, ...] = ()  # class / label / answer names; empty for regression
    label_shape: tuple[int, ...] = ()  # per-sample label array shape
    unit: str = ""  # regression targets only
    real_source: str = ""
    multimed: bool = True  # one of MultiMed's 11 tasks; False: a real-data extension task

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    @property
    def n_outputs(self) -> int:
        """Width of the model head's output (per position for per-residue tasks)."""
        if self.target in (BINARY, REGRESSION):
            return 1
        return len(self.classes)

    @property
    def is_classification(self) -> bool:
        return self.target in (BINARY, MULTICLASS, CLOSED_SET)


MODALITIES: Registry[Modality] = Registry("modality")
TASKS: Registry[Task] = Registry("task")

for _m in (
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
):
    MODALITIES.add(_m.name, _m)

SECONDARY_STRUCTURE = ("H", "E", "C")

for _t in (
    Task(
        "disease_classification",
        ("ct", "text"),
        MULTICLASS,
        ("macro_f1", "accuracy"),
        ("normal", "common_pneumonia", "novel_coronavirus_pneumonia"),
        real_source="CT slice folders (CC-CCII)",
    ),
    Task(
        "brain_tumor_classification",
        ("mri",),
        MULTICLASS,
        ("macro_f1", "accuracy"),
        ("glioma", "meningioma", "pituitary", "no_tumor"),
        real_source="JPEG class folders",
    ),
    Task(
        "breast_cancer_classification",
        ("pathology", "tabular"),
        BINARY,
        ("auroc", "accuracy"),
        ("benign", "malignant"),
        real_source="image folders / CSV",
    ),
    Task(
        "radiographic_findings",
        ("xray",),
        MULTILABEL,
        ("mean_auroc",),
        ("atelectasis", "cardiomegaly", "effusion", "nodule", "pneumothorax"),
        label_shape=(5,),
        real_source="images + CSV labels",
    ),
    Task("bone_age", ("xray",), REGRESSION, ("mae",), unit="months", real_source="images + CSV"),
    Task(
        "diabetic_retinopathy",
        ("oct",),
        MULTICLASS,
        ("macro_f1", "accuracy"),
        ("normal", "drusen", "dme", "cnv"),
        real_source="JPEG class folders (Kermany OCT)",
    ),
    Task(
        "motor_imagery",
        ("eeg",),
        MULTICLASS,
        ("accuracy", "kappa"),
        ("left_hand", "right_hand", "feet", "tongue"),
        real_source="EDF/GDF recordings + events",
    ),
    Task(
        "cell_type",
        ("scrna",),
        MULTICLASS,
        ("macro_f1", "accuracy"),
        tuple(f"type_{i}" for i in range(10)),
        real_source="AnnData .h5ad",
    ),
    Task(
        "expression_prediction",
        ("genomic_sequence",),
        REGRESSION,
        ("pearson", "mse"),
        unit="log expression",
        real_source="FASTA + table",
    ),
    Task(
        "protein_structure",
        ("protein_sequence",),
        PER_RESIDUE,
        ("q3",),
        SECONDARY_STRUCTURE,
        label_shape=(64,),
        real_source="FASTA + per-residue labels",
    ),
    Task(
        "medical_vqa",
        ("xray", "text"),
        CLOSED_SET,
        ("accuracy",),
        ("no", "yes", "0", "1", "2", "3", "4"),
        real_source="JSON/JSONL + images",
    ),
):
    TASKS.add(_t.name, _t)

# MultiMed's own 11 tasks: what the synthetic corpus generates and the studies compare.
MULTIMED_TASKS: tuple[str, ...] = tuple(TASKS.names())

# Extension tasks: real data that ships in registry packages (the real_mini study) but matches
# no MultiMed task exactly. Mapping Br35H's "tumour: yes" onto one of MultiMed's four tumour
# types, or a trial's birthweight onto bone age, would be wrong, so they get tasks of their own.
# They reuse MultiMed's encoders (mri, tabular): only their heads are new.
for _t in (
    Task(
        "brain_tumor_detection",
        ("mri",),
        BINARY,
        ("auroc", "accuracy"),
        ("no_tumor", "tumor"),
        real_source="JPEG class folders (Br35H)",
        multimed=False,
    ),
    Task(
        "birthweight",
        ("tabular",),
        REGRESSION,
        ("mae",),
        unit="grams",
        real_source="CSV with a clinic column (OPT trial)",
        multimed=False,
    ),
    Task(
        "preterm_birth",
        ("tabular",),
        BINARY,
        ("auroc", "accuracy"),
        ("term", "preterm"),
        real_source="CSV with a clinic column (OPT trial)",
        multimed=False,
    ),
):
    TASKS.add(_t.name, _t)


def modality(name: str) -> Modality:
    return MODALITIES.get(name)


def task(name: str) -> Task:
    return TASKS.get(name)


def modalities_of(task_names: list[str] | tuple[str, ...]) -> list[str]:
    """The modalities the given tasks read, in registry order."""
    wanted = {m for t in task_names for m in TASKS.get(t).inputs}
    return [m for m in MODALITIES if m in wanted]
