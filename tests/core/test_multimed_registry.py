import pytest

from federated.core.multimed import MODALITIES, MULTIMED_TASKS, TARGET_TYPES, TASKS, modalities_of
from federated.core.registry import Registry, UnknownNameError

DESIGN_MODALITIES = [
    "oct",
    "xray",
    "ct",
    "mri",
    "pathology",
    "eeg",
    "genomic_sequence",
    "scrna",
    "protein_sequence",
    "text",
    "tabular",
]
DESIGN_TASKS = {
    "disease_classification": ("ct", "text"),
    "brain_tumor_classification": ("mri",),
    "breast_cancer_classification": ("pathology", "tabular"),
    "radiographic_findings": ("xray",),
    "bone_age": ("xray",),
    "diabetic_retinopathy": ("oct",),
    "motor_imagery": ("eeg",),
    "cell_type": ("scrna",),
    "expression_prediction": ("genomic_sequence",),
    "protein_structure": ("protein_sequence",),
    "medical_vqa": ("xray", "text"),
}


def test_vocabulary_matches_design():
    assert MODALITIES.names() == DESIGN_MODALITIES
    assert {t: TASKS.get(t).inputs for t in MULTIMED_TASKS} == DESIGN_TASKS
    # the real-data extension tasks reuse MultiMed's modalities and are marked as extensions
    extensions = [t for t in TASKS if t not in MULTIMED_TASKS]
    assert extensions == ["brain_tumor_detection", "birthweight", "preterm_birth"]
    assert all(not TASKS.get(t).multimed and set(TASKS.get(t).inputs) <= {"mri", "tabular"} for t in extensions)


def test_every_task_is_well_formed():
    for name in TASKS:
        t = TASKS.get(name)
        assert t.target in TARGET_TYPES
        assert t.metrics, name
        assert all(m in MODALITIES for m in t.inputs)
        if t.target in ("regression",):
            assert t.classes == () and t.n_outputs == 1
        elif t.target == "binary":
            assert len(t.classes) == 2 and t.n_outputs == 1
        else:
            assert t.n_outputs == len(t.classes) >= 2
    targets = {TASKS.get(t).target for t in TASKS}
    assert targets == set(TARGET_TYPES)  # every target type is exercised


def test_primary_metrics():
    assert TASKS.get("bone_age").primary_metric == "mae"
    assert TASKS.get("protein_structure").primary_metric == "q3"
    assert TASKS.get("motor_imagery").metrics == ("accuracy", "kappa")


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownNameError, match="valid names: .*disease_classification"):
        TASKS.get("disease")
    with pytest.raises(UnknownNameError, match="unknown modality 'pet'"):
        MODALITIES.get("pet")


def test_registry_rejects_duplicates_and_modalities_of():
    r: Registry[int] = Registry("thing")
    r.add("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        r.add("a", 2)
    assert modalities_of(["medical_vqa", "bone_age"]) == ["xray", "text"]
