"""MultiMed's catalogue (federated/core/multimed.py) and the CorpusSchema every corpus declares."""

import copy
import json
import re

import pytest

from federated.core.multimed import (
    BINARY,
    CATALOGUE,
    MULTIMED,
    MULTIMED_TASKS,
    TARGET_TYPES,
    CorpusSchema,
    Modality,
    SchemaError,
    Task,
)
from federated.core.registry import Registry

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
    assert MULTIMED.modality_names == DESIGN_MODALITIES
    # the catalogue adds one: the OPT trial's covariates are columns of their own, not `tabular`'s
    assert CATALOGUE.modality_names == [*DESIGN_MODALITIES, "obstetric"]
    assert {t: CATALOGUE.task(t).inputs for t in MULTIMED_TASKS} == DESIGN_TASKS
    assert list(MULTIMED_TASKS) == MULTIMED.task_names == list(DESIGN_TASKS)
    assert all(MULTIMED.task(t).multimed for t in MULTIMED_TASKS)
    # the real-data extension tasks read MultiMed's mri or the obstetric covariates, marked as extensions
    extensions = [t for t in CATALOGUE.tasks if t not in MULTIMED_TASKS]
    assert extensions == ["brain_tumor_detection", "birthweight", "preterm_birth"]
    assert all(
        not CATALOGUE.task(t).multimed and set(CATALOGUE.task(t).inputs) <= {"mri", "obstetric"} for t in extensions
    )
    assert len(CATALOGUE.task_names) == 14


def test_every_task_is_well_formed():
    for t in CATALOGUE.tasks.values():
        assert t.target in TARGET_TYPES
        assert t.metrics, t.name
        assert all(m in CATALOGUE.modalities for m in t.inputs)
        if t.target in ("regression",):
            assert t.classes == () and t.n_outputs == 1
        elif t.target == "binary":
            assert len(t.classes) == 2 and t.n_outputs == 1
        else:
            assert t.n_outputs == len(t.classes) >= 2
    targets = {t.target for t in CATALOGUE.tasks.values()}
    assert targets == set(TARGET_TYPES)  # every target type is exercised


def test_primary_metrics():
    assert CATALOGUE.task("bone_age").primary_metric == "mae"
    assert CATALOGUE.task("protein_structure").primary_metric == "q3"
    assert CATALOGUE.task("motor_imagery").metrics == ("accuracy", "kappa")


def test_unknown_name_lists_valid_names():
    with pytest.raises(SchemaError, match="unknown task 'disease'; tasks of this corpus: disease_classification"):
        CATALOGUE.task("disease")
    with pytest.raises(SchemaError, match="unknown modality 'pet'"):
        CATALOGUE.modality("pet")
    with pytest.raises(SchemaError, match="unknown task 'birthweight'"):
        MULTIMED.task("birthweight")  # an extension task is in the catalogue only


def test_registry_rejects_duplicates_and_modalities_of():
    r: Registry[int] = Registry("thing")
    r.add("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        r.add("a", 2)
    # in schema order (xray before text), not in the order the tasks were named
    assert CATALOGUE.modalities_of(["medical_vqa", "bone_age"]) == ["xray", "text"]
    with pytest.raises(SchemaError, match="unknown task 'x'"):
        CATALOGUE.modalities_of(["x"])


# --- CorpusSchema: a schema as data --------------------------------------------------------


def _sepsis() -> dict:
    """A research group's own schema: 13 clinical variables and a binary task on them."""
    return {
        "modalities": {"vitals": {"kind": "vector", "shape": [13]}},
        "tasks": {
            "sepsis": {
                "inputs": ["vitals"],
                "target": "binary",
                "metrics": ["auroc", "accuracy"],
                "classes": ["no", "yes"],
                "description": "ICU stays",
            }
        },
    }


def _lists(raw: dict) -> dict:
    """The on-disk form of a schema written here as name -> definition mappings (easier to edit)."""
    if not isinstance(raw.get("modalities"), dict) or not isinstance(raw.get("tasks"), dict):
        return raw
    return {section: [{"name": n, **d} for n, d in raw[section].items()] for section in ("modalities", "tasks")}


def _refusal(raw: dict) -> str:
    with pytest.raises(SchemaError) as err:
        CorpusSchema.from_dict(_lists(raw), where="spec.json")
    return str(err.value)


def test_round_trip_through_json_keeps_every_field():
    for schema in (CATALOGUE, MULTIMED, CATALOGUE.restrict(["protein_structure", "medical_vqa"])):
        back = CorpusSchema.from_dict(json.loads(json.dumps(schema.to_dict())))
        assert back == schema
        assert back.task_names == schema.task_names and back.modality_names == schema.modality_names
    own = CorpusSchema.from_dict(_lists(_sepsis()))
    assert own.modality("vitals") == Modality("vitals", "vector", (13,), "float32")
    assert own.task("sepsis") == Task(
        "sepsis", ("vitals",), BINARY, ("auroc", "accuracy"), ("no", "yes"), description="ICU stays"
    )
    assert own.to_dict()["modalities"] == [{"name": "vitals", "kind": "vector", "shape": [13], "dtype": "float32"}]
    # only the catalogue's own tasks carry the multimed flag through the round trip
    flagged = {t["name"] for t in CATALOGUE.to_dict()["tasks"] if t.get("multimed")}
    assert flagged == set(MULTIMED_TASKS)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["modalities"].update({"../x": {"kind": "vector", "shape": [2]}}), "modality name '../x'"),
        (lambda r: r["tasks"].update({"Sepsis": r["tasks"]["sepsis"]}), "task name 'Sepsis'"),
        (lambda r: r["modalities"]["vitals"].update(kind="audio"), "modality 'vitals': kind 'audio' is not one of"),
        (
            lambda r: r["modalities"]["vitals"].update(kind="image"),
            r"modality 'vitals': a image sample has 3 dimensions .* shape \[13\] has 1",
        ),
        (
            lambda r: r["modalities"]["vitals"].update(kind="tokens", dtype="int64"),
            "modality 'vitals': a tokens modality needs vocab_size",
        ),
        (lambda r: r["modalities"]["vitals"].update(shape=[0]), "modality 'vitals': shape must be a list of positive"),
        (
            lambda r: r["modalities"]["vitals"].update(colour="red"),
            r"modality 'vitals': unknown field\(s\) \['colour'\]",
        ),
        (
            lambda r: r["tasks"]["sepsis"].update(classes=["no", "maybe", "yes"]),
            "task 'sepsis': a binary task has exactly 2 classes",
        ),
        (
            lambda r: r["tasks"]["sepsis"].update(metrics=["auroc", "sensitivity"]),
            "task 'sepsis': metric 'sensitivity' is not a known metric",
        ),
        (
            lambda r: r["tasks"]["sepsis"].update(metrics=["mae"]),
            "task 'sepsis': metric 'mae' does not apply to binary targets",
        ),
        (
            lambda r: r["tasks"]["sepsis"].update(inputs=["vitals", "notes"]),
            r"task 'sepsis': input\(s\) \['notes'\] are not modalities of this schema",
        ),
        (lambda r: r["tasks"]["sepsis"].pop("target"), "task 'sepsis': missing target"),
    ],
)
def test_a_bad_schema_is_refused_naming_the_entry(edit, message):
    raw = _sepsis()
    edit(raw)
    text = _refusal(raw)
    assert text.startswith("spec.json: ")
    assert re.search(message, text), text


def test_a_per_residue_label_has_one_class_per_token_position():
    raw = {
        "modalities": {"protein": {"kind": "tokens", "shape": [64], "vocab_size": 21}},
        "tasks": {
            "structure": {
                "inputs": ["protein"],
                "target": "per_residue",
                "metrics": ["q3"],
                "classes": ["H", "E", "C"],
                "label_shape": [64],
            }
        },
    }
    assert CorpusSchema.from_dict(_lists(copy.deepcopy(raw))).task("structure").n_outputs == 3
    raw["tasks"]["structure"]["label_shape"] = [32]
    assert (
        "task 'structure': a per_residue label has one class per position of protein, label_shape [64], not [32]"
        in (_refusal(raw))
    )
    raw["modalities"]["protein"] = {"kind": "vector", "shape": [32]}
    assert "task 'structure': a per_residue task needs a tokens input" in _refusal(raw)


def test_restrict_keeps_the_tasks_and_their_inputs_in_schema_order():
    small = MULTIMED.restrict(["medical_vqa", "bone_age"])
    assert small.task_names == ["bone_age", "medical_vqa"]  # MULTIMED's order, not the argument's
    assert small.modality_names == ["xray", "text"]
    assert small.task("bone_age") is MULTIMED.task("bone_age")
    assert MULTIMED.restrict([]) == CorpusSchema()
    with pytest.raises(SchemaError, match="unknown task 'birthweight'"):
        MULTIMED.restrict(["bone_age", "birthweight"])


def test_merged_adds_new_entries_and_refuses_a_name_defined_two_ways():
    own = CorpusSchema.from_dict(_lists(_sepsis()))
    both = MULTIMED.restrict(["bone_age"]).merged(own)
    assert both.modality_names == ["xray", "vitals"] and both.task_names == ["bone_age", "sepsis"]
    assert own.merged(own) == own  # the same definition twice is no conflict
    other = _sepsis()
    other["modalities"]["vitals"]["shape"] = [12]
    with pytest.raises(SchemaError, match="modality 'vitals' is defined two ways") as err:
        own.merged(CorpusSchema.from_dict(_lists(other)))
    assert "[13]" in str(err.value) and "[12]" in str(err.value)
    renamed = _sepsis()
    renamed["tasks"]["sepsis"]["classes"] = ["negative", "positive"]
    with pytest.raises(SchemaError, match="task 'sepsis' is defined two ways"):
        own.merged(CorpusSchema.from_dict(_lists(renamed)))


def test_the_top_level_shape_is_checked():
    with pytest.raises(SchemaError, match="spec.json: must be a mapping with exactly `modalities` and `tasks`"):
        CorpusSchema.from_dict({"modalities": {}}, where="spec.json")
    with pytest.raises(SchemaError, match="`tasks` must be a list of definitions, each with a `name`"):
        CorpusSchema.from_dict({"modalities": [], "tasks": {}})
    twice = {"modalities": [{"name": "v", "kind": "vector", "shape": [2]}] * 2, "tasks": []}
    with pytest.raises(SchemaError, match=r"`modalities` defines \['v'\] more than once"):
        CorpusSchema.from_dict(twice)


def test_the_order_survives_a_json_writer_that_sorts_keys():
    """spec.json is written with sort_keys: the schema's order (the order the model builds its
    encoders and heads in, hence their initial weights) must not depend on it."""
    back = CorpusSchema.from_dict(json.loads(json.dumps(MULTIMED.to_dict(), sort_keys=True)))
    assert back.modality_names == MULTIMED.modality_names and back.task_names == MULTIMED.task_names
    assert back.modality_names != sorted(back.modality_names)
