"""Ingest specs that declare their own tasks, modalities and shapes (`tasks:`, `modalities:`,
a source's `shape:`): data built in the test, every refusal named and made before anything is
written."""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from federated.core.corpus_schema import Modality
from federated.core.multimed import CATALOGUE
from federated.data.format import Corpus
from federated.data.ingest.spec import run_spec
from federated.data.ingest.text import check_text_modality, token_id, tokenize
from federated.data.synthetic.vocabulary import FIRST_FILLER_TOKEN, TOKEN_NAMES

HOSPITALS = ("h_north", "h_south", "h_east", "h_west")


def _spec(tmp_path, body: str):
    path = tmp_path / "spec.yaml"
    path.write_text(body)
    return path


# --- a new binary task over a new vector modality ----------------------------------------------


def _clinical_csv(path) -> None:
    """12 clinical variables (9 numeric, 3 categorical) for 4 hospitals, 6 patients each, some
    values missing (row 3 of each hospital lacks its age). No column alone gives the label away
    (sex is F, F, M, M, F, F against sepsis yes, no, yes, no, yes, no)."""
    rng = np.random.default_rng(3)
    rows = []
    for h, hospital in enumerate(HOSPITALS):
        for i, age in enumerate([50.0, 60.0, 70.0, np.nan, 55.0, 65.0]):
            row = {"id": f"{hospital}_p{i}", "hospital": hospital, "age": age}
            for j in range(8):  # heart rate, lactate, ... as plain numbers
                row[f"v{j}"] = float(rng.normal(10 * j, 1 + j))
            row["sex"] = ["F", "M"][(i // 2) % 2]
            row["smoker"] = ["no", "no", "yes"][i % 3]
            row["ward"] = ["icu", "er", "general"][(i + h) % 3]
            row["sepsis"] = ["yes", "no"][i % 2]
            rows.append(row)
    frame = pd.DataFrame(rows)
    frame.loc[5, "v7"] = np.nan  # another gap
    frame.to_csv(path, index=False)


CLINICAL = """name: icu
modalities:
  clinical: {kind: vector, features: 24}
tasks:
  sepsis:
    inputs: [clinical]
    target: binary
    classes: [no_sepsis, sepsis]
    description: ICU admissions from four hospitals
sources:
  - adapter: tabular
    task: sepsis
    path: icu.csv
    label_column: sepsis
    labels: {"no": no_sepsis, "yes": sepsis}
    categorical_columns: [sex, smoker, ward]
    site_column: hospital
    patient_column: id
    impute: median
"""


def test_a_new_binary_task_over_a_new_vector_modality(tmp_path):
    _clinical_csv(tmp_path / "icu.csv")
    out, skipped = run_spec(_spec(tmp_path, CLINICAL), tmp_path / "corpus")
    assert skipped == []
    corpus = Corpus.open(out)
    task = corpus.schema.task("sepsis")
    assert task.inputs == ("clinical",) and task.target == "binary"
    assert task.classes == ("no_sepsis", "sepsis")
    assert task.metrics == ("auroc", "accuracy")  # the binary default
    assert task.description == "ICU admissions from four hospitals"
    assert corpus.schema.modality("clinical").shape == (24,)
    assert corpus.tasks == ["sepsis"] and corpus.modalities == ["clinical"]
    assert sorted(corpus.manifest["origin_site"].unique()) == sorted(HOSPITALS)
    x = corpus.array("clinical")
    assert x.shape == (24, 24)  # 24 patients; 9 numeric + sex(1) + smoker(1) + ward(2) = 13 features
    assert np.all(x[:, 13:] == 0) and np.all(np.nansum(np.abs(x[:, :13]), axis=0) > 0)
    clinical = corpus.schema.modality("clinical")
    assert [f.name for f in clinical.features][8:] == ["v7", "sex=M", "smoker=yes", "ward=general", "ward=icu"]
    assert clinical.impute == "median"
    manifest = corpus.manifest.set_index("patient_id")
    for hospital in HOSPITALS:  # stored raw: a missing age stays missing (imputed at load time)
        assert np.isnan(x[manifest.loc[f"{hospital}_p3", "idx_clinical"], 0])
        assert x[manifest.loc[f"{hospital}_p0", "idx_clinical"], 0] == 50.0
    labels = corpus.targets("sepsis")[manifest["target_row"].to_numpy()]
    assert labels.tolist() == [1 if p[-1] in "024" else 0 for p in manifest.index]
    provenance = corpus.spec["provenance"]
    assert provenance["declared"]["tasks"]["sepsis"]["classes"] == ["no_sepsis", "sepsis"]
    assert provenance["declared"]["modalities"] == {"clinical": {"kind": "vector", "features": 24}}
    assert next(t for t in corpus.spec["schema"]["tasks"] if t["name"] == "sepsis")["metrics"] == ["auroc", "accuracy"]


def test_a_catalogue_vector_modality_can_be_widened(tmp_path):
    _clinical_csv(tmp_path / "icu.csv")
    body = CLINICAL.replace("  clinical: {kind: vector, features: 24}", "  tabular: {features: 40}")
    body = body.replace("inputs: [clinical]", "inputs: [tabular]")
    corpus = Corpus.open(run_spec(_spec(tmp_path, body), tmp_path / "corpus")[0])
    assert corpus.schema.modality("tabular").shape == (40,)
    assert corpus.array("tabular").shape == (24, 40)


# --- image shapes from the spec ------------------------------------------------------------------


def _half_and_half(root, classes=("no_tumor", "tumor"), n=4, size=20):
    """Images black on the left half, white on the right: at any size, resized and standardised,
    the left column is the lowest value, the right one the same value negated."""
    img = np.zeros((size, size), dtype=np.uint8)
    img[:, size // 2 :] = 255
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(img).save(root / c / f"img{i}.png")


MRI = """
  - adapter: image_folders
    task: brain_tumor_detection
    path: mri
    origin_site: hospital_a
"""


@pytest.mark.parametrize(
    "header, size",
    [
        ("modalities:\n  mri: {shape: [1, 64, 64]}\n", 64),
        ("modalities:\n  mri: {size: 128}\n", 128),
        ("", 48),  # the source's own `shape:` sets the modality's
    ],
)
def test_image_size_is_a_spec_setting(tmp_path, header, size):
    _half_and_half(tmp_path / "mri")
    source = MRI + ("    shape: [1, 48, 48]\n" if not header else "")
    corpus = Corpus.open(run_spec(_spec(tmp_path, header + "sources:" + source), tmp_path / "corpus")[0])
    x = corpus.array("mri")
    assert x.shape == (8, 1, size, size)
    assert corpus.schema.modality("mri").shape == (1, size, size)
    assert next(m for m in corpus.spec["schema"]["modalities"] if m["name"] == "mri")["shape"] == [1, size, size]
    left, right = x[:, 0, :, 0], x[:, 0, :, -1]
    assert np.all(left == left.min()) and left.min() == pytest.approx(x.min()) and left.min() < -0.9
    np.testing.assert_allclose(right, -left, atol=1e-5)
    np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=(1, 2, 3)), 1.0, atol=1e-3)
    assert corpus.schema.task("brain_tumor_detection") == CATALOGUE.task("brain_tumor_detection")


# --- a new regression task and a new multilabel task -----------------------------------------------


def test_a_new_regression_task_and_a_new_multilabel_task(tmp_path):
    rng = np.random.default_rng(5)
    table = pd.DataFrame(rng.normal(size=(12, 6)), columns=[f"f{i}" for i in range(6)])
    table["los"] = np.arange(12) * 1.5
    table["clinic"] = ["a", "b"] * 6
    table.to_csv(tmp_path / "stays.csv", index=False)
    (tmp_path / "skin").mkdir()
    findings = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1)]
    for i in range(len(findings)):
        Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "skin" / f"s{i}.png")
    labels = pd.DataFrame(findings, columns=["Pigment", "Vessels", "Scale"])
    labels.insert(0, "file", [f"s{i}.png" for i in range(len(findings))])
    labels.to_csv(tmp_path / "skin.csv", index=False)
    body = """modalities:
  tabular: {features: 8}
  dermoscopy: {kind: image, channels: 3, size: [16, 24]}
tasks:
  length_of_stay: {inputs: [tabular], target: regression, unit: days}
  skin_findings:
    inputs: [dermoscopy]
    target: multilabel
    classes: [pigment, vessels, scale]
sources:
  - adapter: tabular
    task: length_of_stay
    path: stays.csv
    label_column: los
    site_column: clinic
  - adapter: images_csv
    task: skin_findings
    path: skin
    labels: skin.csv
    image_column: file
    finding_columns: {pigment: Pigment, vessels: Vessels, scale: Scale}
"""
    corpus = Corpus.open(run_spec(_spec(tmp_path, body), tmp_path / "corpus")[0])
    stay, skin = corpus.schema.task("length_of_stay"), corpus.schema.task("skin_findings")
    assert (stay.target, stay.unit, stay.metrics, stay.classes) == ("regression", "days", ("mae", "pearson"), ())
    assert (skin.label_shape, skin.metrics) == ((3,), ("mean_auroc",))
    assert corpus.array("tabular").shape == (12, 8)
    assert corpus.array("dermoscopy").shape == (6, 3, 16, 24)
    m = corpus.manifest
    stays = m[m["task"] == "length_of_stay"]
    assert corpus.targets("length_of_stay")[stays["target_row"]].tolist() == [
        1.5 * int(p.removeprefix("stays.csv:row")) for p in stays["patient_id"]
    ]
    skins = m[m["task"] == "skin_findings"]
    got = corpus.targets("skin_findings")[skins["target_row"]].tolist()
    assert got == [list(findings[int(p[1:-4])]) for p in skins["patient_id"]]


def test_a_protein_length_change_reshapes_the_per_residue_labels(tmp_path):
    (tmp_path / "chains.fa").write_text(">p1\nACDEFGHIKL\n>p2\nMNPQRSTVWY\n>p3\nACDEF\n")
    (tmp_path / "chains.dssp.fa").write_text(">p1\nHHHEEECCCH\n>p2\nEEEEHHHHCC\n>p3\nHHHHH\n")
    body = """modalities:
  protein_sequence: {length: 8}
sources:
  - adapter: fasta
    task: protein_structure
    path: chains.fa
    structure: chains.dssp.fa
"""
    corpus = Corpus.open(run_spec(_spec(tmp_path, body), tmp_path / "corpus")[0])
    assert corpus.schema.task("protein_structure").label_shape == (8,)
    by_patient = corpus.manifest.set_index("patient_id")
    tokens = corpus.array("protein_sequence")[by_patient.loc["p3", "idx_protein_sequence"]]
    assert tokens.tolist() == [1, 2, 3, 4, 5, 0, 0, 0]  # ACDEF, padded to the declared 8
    states = corpus.targets("protein_structure")[by_patient.loc["p1", "target_row"]]
    assert states.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]  # centre crop of HHHEEECCCH: HHEEECCC


# --- text into a declared tokens modality ---------------------------------------------------------


def test_text_hashes_into_the_declared_vocabulary_and_length():
    notes = Modality("notes", "tokens", (64,), vocab_size=4096)
    ids = tokenize("effusion zebra", notes)
    assert ids.shape == (64,) and ids.dtype == np.int64 and ids[2:].tolist() == [0] * 62
    assert ids[0] == TOKEN_NAMES.index("effusion")
    assert ids[1] == FIRST_FILLER_TOKEN + zlib.crc32(b"zebra") % (4096 - FIRST_FILLER_TOKEN)
    assert token_id("zebra", 4096) == ids[1]
    assert tokenize("zebra")[0] == FIRST_FILLER_TOKEN + zlib.crc32(b"zebra") % (128 - FIRST_FILLER_TOKEN)
    with pytest.raises(ValueError, match="modality tiny has vocab_size 16; text needs more than"):
        check_text_modality(Modality("tiny", "tokens", (8,), vocab_size=16))


# --- refusals: named, and before anything is read or written ----------------------------------------

SEPSIS = "sources:\n  - {adapter: tabular, task: sepsis, path: absent.csv, label_column: y}\n"
DECLARED = "modalities:\n  clinical: {kind: vector, features: 12}\ntasks:\n  sepsis: "


@pytest.mark.parametrize(
    "body, message",
    [
        (SEPSIS, r"spec\.yaml sources\[0\]: task 'sepsis' is not declared; declare it under `tasks:` or use a "),
        (
            DECLARED + "{inputs: [clinical], target: binary, classes: [n, y], metrics: [auroc, f2]}\n" + SEPSIS,
            r"spec\.yaml tasks\.sepsis: task 'sepsis': metric 'f2' is not a known metric; metrics for binary",
        ),
        (
            DECLARED + "{inputs: [clinical], target: ordinal, classes: [n, y]}\n" + SEPSIS,
            r"spec\.yaml tasks\.sepsis: target 'ordinal' is not a target type; valid: binary, multiclass",
        ),
        (
            DECLARED + "{inputs: [clinical], target: binary}\n" + SEPSIS,
            r"spec\.yaml tasks\.sepsis: a binary task needs `classes`",
        ),
        (
            DECLARED + "{inputs: [vitals], target: binary, classes: [n, y]}\n" + SEPSIS,
            r"spec\.yaml tasks\.sepsis: input\(s\) \['vitals'\] are not modalities",
        ),
        (
            DECLARED + "{inputs: [clinical], target: binary, classes: [n, y], weights: [1, 2]}\n" + SEPSIS,
            r"spec\.yaml tasks\.sepsis: unknown key\(s\) \['weights'\]; valid: inputs, target, classes",
        ),
        (
            "modalities:\n  clinical: {kind: table, features: 12}\n" + SEPSIS,
            r"spec\.yaml modalities\.clinical: kind 'table' is not one of image, signal, tokens, vector",
        ),
        (
            "modalities:\n  clinical: {features: 12}\n" + SEPSIS,
            r"spec\.yaml modalities\.clinical: 'clinical' is not a catalogue modality .*needs `kind`",
        ),
        (
            "modalities:\n  ct: {kind: signal}\n" + SEPSIS,
            r"spec\.yaml modalities\.ct: ct is a catalogue image modality; its kind cannot become signal",
        ),
        (
            "modalities:\n  eeg: {channels: 22, samples: 512, rate: 250}\n" + SEPSIS,
            r"spec\.yaml modalities\.eeg: unknown key\(s\) \['rate'\] for a signal modality; "
            r"valid: channels, kind, samples, shape",
        ),
        (
            "modalities:\n  ct: {shape: [128, 128]}\n" + SEPSIS,
            r"spec\.yaml modalities\.ct: modality 'ct': a image sample has 3 dimensions",
        ),
        (
            "modalities:\n  notes: {kind: tokens, length: 64}\n" + SEPSIS,
            r"spec\.yaml modalities\.notes: a new tokens modality needs `vocab_size`",
        ),
        (
            "tasks:\n  bone_age: {inputs: [xray], target: regression, unit: years}\n" + SEPSIS,
            r"spec\.yaml tasks\.bone_age: task 'bone_age' is a catalogue task; choose another name "
            r"\(this declaration differs in unit\)",
        ),
    ],
)
def test_declarations_are_refused_by_name_before_anything_is_written(expect_failure, body, message):
    expect_failure(body, message)


TWO_MRI_SOURCES = """sources:
  - {adapter: image_folders, task: brain_tumor_detection, path: absent_a, shape: [1, 64, 64]}
  - {adapter: image_folders, task: brain_tumor_classification, path: absent_b, shape: [1, 128, 128]}
"""


def test_one_modality_with_two_shapes_is_refused_naming_both_sources(expect_failure):
    # the paths do not exist: an adapter that ran would report that instead
    expect_failure(
        TWO_MRI_SOURCES,
        r"spec\.yaml sources\[1\]: shape \[1, 128, 128\] for modality mri contradicts sources\[0\] "
        r"\(shape \[1, 64, 64\]\)",
    )
    expect_failure(
        "modalities:\n  mri: {size: 32}\n" + TWO_MRI_SOURCES,
        r"spec\.yaml sources\[0\]: shape \[1, 64, 64\] for modality mri contradicts modalities\.mri "
        r"\(shape \[1, 32, 32\]\)",
    )
    expect_failure(
        SEPSIS.replace("sepsis", "birthweight")
        + "  - {adapter: image_folders, task: brain_tumor_detection, path: a, shape: [4, 64, 64]}\n",
        r"spec\.yaml sources\[1\]: modality mri has 4 channels; images are read as 1 \(grey\) or 3",
    )


def test_a_catalogue_task_repeated_word_for_word_keeps_its_definition(tmp_path):
    _half_and_half(tmp_path / "mri")
    body = (
        "tasks:\n  brain_tumor_detection: {inputs: [mri], target: binary, classes: [no_tumor, tumor]}\nsources:" + MRI
    )
    corpus = Corpus.open(run_spec(_spec(tmp_path, body), tmp_path / "corpus")[0])
    assert corpus.schema.task("brain_tumor_detection") == CATALOGUE.task("brain_tumor_detection")


# --- EEG channels and samples from the spec -------------------------------------------------------


def test_eeg_channels_and_samples_are_spec_settings(tmp_path):
    pyedflib = pytest.importorskip("pyedflib")
    rate, seconds = 160, 6
    headers = [
        {
            "label": f"C{i}",
            "dimension": "uV",
            "sample_frequency": rate,
            "physical_max": 100.0,
            "physical_min": -100.0,
            "digital_max": 32767,
            "digital_min": -32768,
            "transducer": "",
            "prefilter": "",
        }
        for i in range(6)
    ]
    t = np.arange(seconds * rate) / rate
    writer = pyedflib.EdfWriter(str(tmp_path / "S001.edf"), 6, file_type=pyedflib.FILETYPE_EDFPLUS)
    writer.setSignalHeaders(headers)
    writer.writeSamples([50 * np.sin(2 * np.pi * (1 + i) * t) for i in range(6)])
    for onset, text in ((1.0, "T1"), (3.0, "T2")):
        writer.writeAnnotation(onset, 0.5, text)
    writer.close()
    body = """modalities:
  eeg: {channels: 4, samples: 320}
sources:
  - adapter: eeg_edf
    task: motor_imagery
    path: S001.edf
    events: {T1: left_hand, T2: right_hand}
"""
    corpus = Corpus.open(run_spec(_spec(tmp_path, body), tmp_path / "corpus")[0])
    x = corpus.array("eeg")[corpus.manifest["idx_eeg"].to_numpy()]
    assert x.shape == (2, 4, 320)  # the first 4 channels; 2 s at 160 Hz is 320 samples: no resampling
    for k, onset in enumerate((1.0, 3.0)):
        window = onset + np.arange(320) / rate
        for c in range(4):  # whole cycles of a sine standardise to sqrt(2) x the sine
            np.testing.assert_allclose(x[k, c], np.sqrt(2) * np.sin(2 * np.pi * (1 + c) * window), atol=0.01)
