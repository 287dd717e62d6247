"""Ingest of images + CSV labels, CT slice folders and VQA records, on tiny fixtures built in
the test: labels, shapes and sites come through; every bad input names its file and row (or
line), and a failed ingest leaves no corpus folder behind."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from federated.core.multimed import CATALOGUE
from federated.data.format import Corpus
from federated.data.ingest.ct_slices import natural_key
from federated.data.ingest.image_folders import load_image
from federated.data.ingest.images_csv import labeler
from federated.data.ingest.spec import run_spec
from federated.data.ingest.text import tokenize
from federated.data.synthetic.vocabulary import FIRST_FILLER_TOKEN, QUESTION_MARK_TOKEN, TOKEN_NAMES

SIZE = 40


def _image(path, seed=0, rgb=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (SIZE, SIZE, 3) if rgb else (SIZE, SIZE)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)


def _spec(tmp_path, body: str):
    path = tmp_path / "spec.yaml"
    path.write_text(body)
    return path


def _ingest(tmp_path, body: str):
    out, skipped = run_spec(_spec(tmp_path, body), tmp_path / "corpus")
    return Corpus.open(out), skipped


def _rows(corpus, task):
    """The task's manifest rows, in target order, and its targets."""
    m = corpus.manifest
    rows = m[m["task"] == task].sort_values("target_row")
    return rows, np.asarray(corpus.targets(task))[rows["target_row"].to_numpy()]


# --- the tokenizer -------------------------------------------------------------------------


def test_tokenize_keeps_vocabulary_ids_and_hashes_other_words_stably():
    t = tokenize("Is there an Effusion? Follow-up")
    assert t.dtype == np.int64 and t.shape == (32,)
    hashed = FIRST_FILLER_TOKEN + zlib.crc32(b"an") % (128 - FIRST_FILLER_TOKEN)
    assert t[:5].tolist() == [
        TOKEN_NAMES.index("is-there"),
        hashed,
        TOKEN_NAMES.index("effusion"),
        QUESTION_MARK_TOKEN,
        TOKEN_NAMES.index("follow-up"),
    ]
    assert (t[5:] == 0).all()  # padding
    long = tokenize(" ".join(f"word{i}" for i in range(50)))
    assert (long >= FIRST_FILLER_TOKEN).all() and (long < 128).all()  # truncated, in vocabulary
    assert (tokenize("") == 0).all()


# --- images_csv ----------------------------------------------------------------------------

BONE_AGE = """
sources:
  - adapter: images_csv
    task: bone_age
    path: hand
    labels: boneage.csv
    image_column: id
    label_column: months
    patient_column: patient
    site_column: hospital
"""


def _bone_age(tmp_path, n=6, months=None):
    for i in range(n):
        _image(tmp_path / "hand" / f"{i}.png", seed=i)
    frame = pd.DataFrame(
        {
            "id": [f"{i}.png" for i in range(n)],
            "months": months if months is not None else [12.0 * (i + 1) for i in range(n)],
            "patient": [f"p{i // 2}" for i in range(n)],
            "hospital": ["north", "south"] * (n // 2),
        }
    )
    frame.to_csv(tmp_path / "boneage.csv", index=False)
    return frame


def test_images_csv_regression_labels_patients_and_sites(tmp_path):
    _bone_age(tmp_path)
    corpus, skipped = _ingest(tmp_path, BONE_AGE)
    rows, y = _rows(corpus, "bone_age")
    assert skipped == [] and len(rows) == 6
    assert y.dtype == np.float32 and y.tolist() == [12.0 * (i + 1) for i in range(6)]
    assert rows["label"].tolist() == y.tolist()
    assert sorted(rows["origin_site"].unique()) == ["north", "south"]  # site_column -> natural sites
    assert rows["patient_id"].tolist() == ["p0", "p0", "p1", "p1", "p2", "p2"]
    x = corpus.array("xray")[rows["idx_xray"].to_numpy()]
    assert x.shape == (6, 1, 32, 32) and abs(float(x[0].mean())) < 1e-4  # resized, standardised
    assert np.allclose(x[0], load_image(tmp_path / "hand" / "0.png", (1, 32, 32)))


def test_images_csv_classes_mapping_and_rgb_modality(tmp_path):
    for i in range(4):
        _image(tmp_path / "slides" / f"s{i}.jpg", seed=i)
    pd.DataFrame({"file": [f"s{i}.jpg" for i in range(4)], "dx": ["B", "M", "M", "B"]}).to_csv(
        tmp_path / "dx.csv", index=False
    )
    corpus, _ = _ingest(
        tmp_path,
        """
sources:
  - adapter: images_csv
    task: breast_cancer_classification
    path: slides
    labels: dx.csv
    image_column: file
    label_column: dx
    classes: {B: benign, M: malignant}
    origin_site: lab_a
""",
    )
    rows, y = _rows(corpus, "breast_cancer_classification")
    assert y.tolist() == [0, 1, 1, 0] and set(rows["origin_site"]) == {"lab_a"}
    assert corpus.array("pathology").shape == (4, 3, 32, 32)  # grey JPEG -> the modality's RGB


FINDINGS = ("atelectasis", "cardiomegaly", "effusion", "nodule", "pneumothorax")


def test_images_csv_finding_columns_make_a_multilabel_vector(tmp_path):
    labels = np.array([[1, 0, 0, 1, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]])
    frame = pd.DataFrame(labels, columns=[f.upper() for f in FINDINGS])
    frame.insert(0, "path", [f"sub/{i}.png" for i in range(4)])
    for i in range(4):
        _image(tmp_path / "cxr" / "sub" / f"{i}.png", seed=i)
    frame.to_csv(tmp_path / "labels.csv", index=False)
    columns = ", ".join(f"{f}: {f.upper()}" for f in FINDINGS)
    corpus, _ = _ingest(
        tmp_path,
        f"""
sources:
  - adapter: images_csv
    task: radiographic_findings
    path: cxr
    labels: labels.csv
    image_column: path
    finding_columns: {{{columns}}}
""",
    )
    rows, y = _rows(corpus, "radiographic_findings")
    assert y.shape == (4, 5) and y.tolist() == labels.tolist()
    assert rows["label"].isna().all()  # no scalar label for a multi-label target


NIH = """
sources:
  - adapter: images_csv
    task: radiographic_findings
    path: nih
    labels: Data_Entry.csv
    image_column: Image Index
    findings_column: Finding Labels
    findings: {Mass: nodule}
    ignore_findings: [Hernia]
    patient_column: Patient ID
"""


def _nih(tmp_path, findings):
    for i in range(len(findings)):
        _image(tmp_path / "nih" / f"{i:08d}_000.png", seed=i)
    pd.DataFrame(
        {
            "Image Index": [f"{i:08d}_000.png" for i in range(len(findings))],
            "Finding Labels": findings,
            "Patient ID": list(range(len(findings))),
        }
    ).to_csv(tmp_path / "Data_Entry.csv", index=False)


def test_images_csv_nih_findings_column(tmp_path):
    _nih(tmp_path, ["Cardiomegaly|Effusion", "No Finding", "mass|Hernia", "ATELECTASIS", "Pneumothorax|Effusion"])
    corpus, _ = _ingest(tmp_path, NIH)
    _, y = _rows(corpus, "radiographic_findings")
    assert y.tolist() == [[0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 1, 0, 1]]


def test_images_csv_errors_name_the_row_or_the_image(tmp_path, expect_failure):
    _nih(tmp_path, ["Cardiomegaly", "Fibrosis", "Atelectasis|Nodule|Effusion|Pneumothorax"])
    expect_failure(NIH, r"Data_Entry\.csv row 3: Finding Labels: finding number 1 of the cell is not a finding")
    _nih(tmp_path, ["Cardiomegaly", "Atelectasis|Nodule|Effusion"])
    expect_failure(NIH, r"Data_Entry\.csv: finding\(s\) \['pneumothorax'\] .* no positive sample")
    _bone_age(tmp_path, months=[12.0, np.nan, 30.0, 40.0, 50.0, 60.0])
    expect_failure(BONE_AGE, r"boneage\.csv row 3: label \(months\) is missing")
    _bone_age(tmp_path)
    (tmp_path / "hand" / "4.png").unlink()
    expect_failure(BONE_AGE, r"boneage\.csv row 6: image file .*hand/4\.png does not exist")
    (tmp_path / "hand" / "4.png").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    expect_failure(BONE_AGE, r"hand/4\.png: unreadable or corrupt image .*boneage\.csv row 6")


def test_images_csv_config_mistakes_and_unknown_labels(tmp_path, expect_failure):
    for i in range(2):
        _image(tmp_path / "mri" / f"{i}.png", seed=i)
    pd.DataFrame({"f": ["0.png", "1.png"], "y": ["glioma", "zebra"]}).to_csv(tmp_path / "y.csv", index=False)
    body = (
        "sources:\n  - {adapter: images_csv, task: brain_tumor_classification, path: mri, labels: y.csv, "
        "image_column: f, label_column: %s}\n"
    )
    expect_failure(body % "y", r"y\.csv row 3: label \(y\) is not a class")
    expect_failure(body % "diagnosis", r"sources\[0\]: .*y\.csv: no column\(s\) \['diagnosis'\]")
    expect_failure(body % "y, classes: {zebra: horse}", r"sources\[0\]: classes: \['horse'\]")
    expect_failure(
        body.replace("label_column: %s", "finding_columns: {}"),
        r"sources\[0\]: task brain_tumor_classification has multiclass targets",
    )


def test_images_csv_on_error_skip_drops_bad_rows_and_lists_them(tmp_path):
    _bone_age(tmp_path, months=[12.0, np.nan, 30.0, 40.0, 50.0, 60.0])
    (tmp_path / "hand" / "4.png").write_bytes(b"broken")
    (tmp_path / "hand" / "5.png").unlink()
    corpus, skipped = _ingest(tmp_path, "on_error: skip\n" + BONE_AGE)
    assert [s["item"].rsplit("/", 1)[-1] for s in skipped] == ["boneage.csv row 3", "4.png", "boneage.csv row 7"]
    _, y = _rows(corpus, "bone_age")
    assert y.tolist() == [12.0, 30.0, 40.0]


# --- ct_slices -----------------------------------------------------------------------------

CT = """
test_fraction: 0.5
sources:
  - adapter: ct_slices
    task: disease_classification
    path: ccccii
    classes: {NCP: novel_coronavirus_pneumonia, CP: common_pneumonia, Normal: normal}
    reports: reports.csv
    origin_site: cc
"""


def _ct(tmp_path, slices=4, reports=(("0", "scan0"), ("1", "scan0"), ("1", "scan1"))):
    """3 classes x 2 patients (numbered per class, as in CC-CCII) x scans of `slices` slices;
    patient 1 of each class has two scans. reports.csv has a report for each (patient, scan)
    of `reports`, in every class."""
    root = tmp_path / "ccccii"
    for c, cls in enumerate(("NCP", "CP", "Normal")):
        for p in (0, 1):
            for s in range(1 + p):
                for k in range(slices):
                    _image(root / cls / str(p) / f"scan{s}" / f"{k}.png", seed=100 * c + 10 * p + k)
    texts = ["Fever and cough, contact with a confirmed case", "no fever", "pleural fluid"]
    pd.DataFrame(
        {"patient_id": [p for p, _ in reports], "scan_id": [s for _, s in reports], "report": texts[: len(reports)]}
    ).to_csv(tmp_path / "reports.csv", index=False)
    return root


def test_ct_slices_per_scan_and_per_slice(tmp_path):
    _ct(tmp_path)
    corpus, _ = _ingest(tmp_path, CT)
    rows, y = _rows(corpus, "disease_classification")
    assert len(rows) == 3 * 3  # scans
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert rows["patient_id"].nunique() == 6 and "NCP/0" in set(rows["patient_id"])  # ids are per class
    assert corpus.array("ct").shape == (9, 1, 32, 32) and set(rows["origin_site"]) == {"cc"}
    text = corpus.array("text")[rows["idx_text"].to_numpy()]
    assert text.shape == (9, 32)
    assert (
        text[rows["patient_id"].eq("CP/0").to_numpy()][0].tolist()
        == tokenize("Fever and cough, contact with a confirmed case").tolist()
    )

    run_spec(_spec(tmp_path, CT.replace("origin_site: cc", "per: slice")), tmp_path / "slices")
    m = Corpus.open(tmp_path / "slices").manifest
    assert len(m) == 9 * 4 and (m["idx_text"] >= 0).all()  # each slice has its scan's report
    assert (m.groupby("patient_id")["split"].nunique() == 1).all()  # a patient's slices on one side
    assert set(m["split"]) == {"train", "test"}


def test_ct_slices_scan_without_report_has_no_text(tmp_path):
    _ct(tmp_path, slices=2, reports=(("0", "scan0"), ("1", "scan1")))
    corpus, _ = _ingest(tmp_path, CT)
    rows, _ = _rows(corpus, "disease_classification")
    has_text = rows["idx_text"].to_numpy() >= 0
    assert has_text.sum() == 6  # every class's patient 1 lacks a report for scan0
    text = corpus.array("text")[rows["idx_text"].to_numpy()[has_text]]
    assert text[rows["patient_id"].to_numpy()[has_text] == "CP/1"][0].tolist() == tokenize("no fever").tolist()


def test_ct_slices_natural_order_and_central_slices(tmp_path):
    assert [p.name for p in sorted(tmp_path.joinpath(n) for n in ("s10.png", "s2.png", "s1.png"))] != [
        "s1.png",
        "s2.png",
        "s10.png",
    ]
    assert sorted([tmp_path / n for n in ("s10.png", "s2.png", "s1.png")], key=natural_key) == [
        tmp_path / n for n in ("s1.png", "s2.png", "s10.png")
    ]
    scan = tmp_path / "ct" / "normal" / "p" / "scan"
    gradient = np.tile(np.linspace(0, 255, SIZE, dtype=np.uint8), (SIZE, 1))
    for k in range(1, 12):  # 11 slices: the central three are 5, 6 and 7 in natural order
        if k in (5, 6, 7):
            scan.mkdir(parents=True, exist_ok=True)
            Image.fromarray(gradient).save(scan / f"IM{k}.png")
        else:
            _image(scan / f"IM{k}.png", seed=k)
    corpus, _ = _ingest(tmp_path, "sources:\n  - {adapter: ct_slices, task: disease_classification, path: ct}\n")
    x = np.asarray(corpus.array("ct"))
    assert x.shape == (1, 1, 32, 32)
    assert np.allclose(x[0], load_image(scan / "IM6.png", (1, 32, 32)), atol=1e-4)
    assert (corpus.manifest["idx_text"] == -1).all()  # no reports: text missing


def test_ct_slices_errors(tmp_path, expect_failure):
    root = _ct(tmp_path, slices=2)
    (root / "CP" / "0" / "scan0" / "0.png").write_bytes(b"\xff\xd8\xff\xe0 broken")
    expect_failure(CT, r"CP/0/scan0/0\.png: unreadable or corrupt image")
    _image(root / "CP" / "0" / "scan0" / "0.png")
    (root / "NCP" / "1" / "scan9").mkdir()
    expect_failure(CT, r"NCP/1/scan9: scan folder has no slice images")
    (root / "NCP" / "1" / "scan9").rmdir()
    (root / "Zebra" / "0" / "scan0").mkdir(parents=True)
    expect_failure(CT, r"ccccii/Zebra: class 'Zebra' is not a class of disease_classification")


# --- vqa -----------------------------------------------------------------------------------

VQA = """
sources:
  - adapter: vqa
    task: medical_vqa
    path: vqa/{file}
    images: vqa/img
    answers: {{two: "2"}}
    site_key: hospital
"""


def _vqa_images(tmp_path, n=3):
    for i in range(n):
        _image(tmp_path / "vqa" / "img" / f"{i}.png", seed=i)


def _records():
    return [
        {"image": "0.png", "question": "Is there an effusion?", "answer": "Yes", "hospital": "a"},
        {"image": "0.png", "question": "How many nodules?", "answer": 2, "hospital": "a"},
        {"image": "1.png", "question": "Any pneumothorax?", "answer": "NO", "hospital": "b"},
        {"image": "2.png", "question": "How many lesions?", "answer": "two", "hospital": "b"},
    ]


def _jsonl(tmp_path, lines):
    (tmp_path / "vqa").mkdir(exist_ok=True)
    (tmp_path / "vqa" / "qa.jsonl").write_text("\n".join(lines) + "\n")


def test_vqa_jsonl_and_json(tmp_path):
    _vqa_images(tmp_path)
    _jsonl(tmp_path, [json.dumps(r) for r in _records()])
    corpus, _ = _ingest(tmp_path, VQA.format(file="qa.jsonl"))
    rows, y = _rows(corpus, "medical_vqa")
    assert y.tolist() == [1, 4, 0, 4]  # yes, "2", no, two -> "2"
    assert rows["origin_site"].tolist() == ["a", "a", "b", "b"]
    assert rows["patient_id"].tolist()[:2] == ["0.png", "0.png"]  # one image, one patient
    q = corpus.array("text")[rows["idx_text"].to_numpy()]
    assert q.shape == (4, 32) and q[0].tolist() == tokenize("Is there an effusion?").tolist()
    assert q[0][0] == TOKEN_NAMES.index("is-there") and q[0][3] == QUESTION_MARK_TOKEN
    assert corpus.array("xray").shape == (4, 1, 32, 32)  # one row per sample, shared image or not

    (tmp_path / "vqa" / "qa.json").write_text(json.dumps(_records()))
    corpus = Corpus.open(run_spec(_spec(tmp_path, VQA.format(file="qa.json")), tmp_path / "c2")[0])
    assert _rows(corpus, "medical_vqa")[1].tolist() == [1, 4, 0, 4]


def test_vqa_errors_name_the_line(tmp_path, expect_failure):
    _vqa_images(tmp_path)
    good = [json.dumps(r) for r in _records()]
    spec = VQA.format(file="qa.jsonl")
    _jsonl(tmp_path, [good[0], "", '{"image": "1.png", "question": "Any', *good[1:]])
    expect_failure(spec, r"qa\.jsonl line 3: unparsable JSON")
    _jsonl(tmp_path, [good[0], json.dumps({**_records()[1], "answer": "maybe"})])
    expect_failure(spec, r"qa\.jsonl line 2: answer is not an answer of medical_vqa")
    _jsonl(tmp_path, [json.dumps({"image": "0.png", "answer": "yes", "hospital": "a"})])
    expect_failure(spec, r"qa\.jsonl line 1: record has no 'question' key")
    _jsonl(tmp_path, [good[0], json.dumps({**_records()[2], "image": "9.png"})])
    expect_failure(spec, r"qa\.jsonl line 2: image file .*vqa/img/9\.png does not exist")
    (tmp_path / "vqa" / "img" / "1.png").write_bytes(b"\xff\xd8 broken")
    _jsonl(tmp_path, good)
    expect_failure(spec, r"img/1\.png: unreadable or corrupt image .*qa\.jsonl line 3")
    (tmp_path / "vqa" / "qa.json").write_text(json.dumps([_records()[0], {**_records()[3], "answer": "lots"}]))
    expect_failure(VQA.format(file="qa.json"), r"qa\.json \[1\]: answer is not an answer")


def test_vqa_on_error_skip(tmp_path):
    _vqa_images(tmp_path)
    good = [json.dumps(r) for r in _records()]
    _jsonl(tmp_path, [good[0], "not json", json.dumps({**_records()[1], "answer": "maybe"}), *good[2:]])
    corpus, skipped = _ingest(tmp_path, "on_error: skip\n" + VQA.format(file="qa.jsonl"))
    assert [s["item"].rsplit(" ", 1)[-1] for s in skipped] == ["2", "3"]
    assert _rows(corpus, "medical_vqa")[1].tolist() == [1, 0, 4]


@pytest.mark.parametrize(
    "task_name, params, message",
    [
        ("bone_age", {}, r"give exactly one of label_column, finding_columns, findings_column \(got none\)"),
        (
            "bone_age",
            {"label_column": "y", "findings_column": "Finding Labels"},
            r"give exactly one of .* \(got \['label_column', 'findings_column'\]\)",
        ),
        ("bone_age", {"label_column": "y", "separator": ";"}, r"key\(s\) \['separator'\] do not go with label_column"),
        (
            "radiographic_findings",
            {"label_column": "y"},
            "task radiographic_findings has multilabel targets: "
            "give finding_columns or findings_column, not label_column",
        ),
        (
            "bone_age",
            {"label_column": "y", "classes": {"1": "old"}},
            "task bone_age is a regression: it has no classes",
        ),
        ("protein_structure", {"label_column": "y"}, r"images_csv cannot label task protein_structure \(per_residue"),
    ],
)
def test_images_csv_label_style_must_fit_the_task(tmp_path, task_name, params, message):
    frame = pd.DataFrame({"f": ["0.png"], "y": ["30"], "Finding Labels": ["Nodule"]})
    with pytest.raises(ValueError, match=message):
        labeler(CATALOGUE.task(task_name), params, frame, tmp_path / "y.csv")


def test_images_csv_label_column_reads_a_regression_value_or_a_class(tmp_path):
    frame = pd.DataFrame({"f": ["0.png"], "y": ["30"]})
    months, declared = labeler(CATALOGUE.task("bone_age"), {"label_column": "y"}, frame, tmp_path / "y.csv")
    assert months({"y": "30"}) == 30.0 and declared == set()
    tumour, declared = labeler(
        CATALOGUE.task("brain_tumor_classification"),
        {"label_column": "y", "classes": {"G": "glioma"}},
        frame,
        tmp_path / "y.csv",
    )
    assert tumour({"y": "G"}) == CATALOGUE.task("brain_tumor_classification").classes.index("glioma")
    assert declared == {"glioma"}
