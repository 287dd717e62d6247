"""Ingest of signals and sequences: EDF+ recordings (eeg_edf) and FASTA files (fasta), with
fixtures written in the test. Values are checked, not only shapes (a sine wave's resampled
samples, token ids, crops, structure states), and every bad input names its file and record
and leaves no corpus folder behind."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from federated.core.multimed import CATALOGUE
from federated.data.format import Corpus
from federated.data.ingest.core import ADAPTERS, Problems
from federated.data.ingest.spec import run_spec

pyedflib = pytest.importorskip("pyedflib")

RATE = 160
AMINO = "ACDEFGHIKLMNPQRSTVWY"
EVENTS = ((1.0, "T1"), (3.0, "T2"), (5.0, "T1"), (7.0, "T2"), (8.5, "T0"))


def _wave(ch: int, t: np.ndarray) -> np.ndarray:
    """Channel ch of every fixture: a sine of 1-3 Hz, so a 2 s epoch holds whole cycles."""
    return np.sin(2 * np.pi * (1 + ch % 3) * t + ch)


def _edf(path, n_channels=10, seconds=10, events=EVENTS, rates=None):
    rates = rates or [RATE] * n_channels
    writer = pyedflib.EdfWriter(str(path), n_channels, file_type=pyedflib.FILETYPE_EDFPLUS)
    writer.setSignalHeaders(
        [
            {
                "label": f"C{i}",
                "dimension": "uV",
                "sample_frequency": r,
                "physical_max": 100.0,
                "physical_min": -100.0,
                "digital_max": 32767,
                "digital_min": -32768,
                "transducer": "",
                "prefilter": "",
            }
            for i, r in enumerate(rates)
        ]
    )
    writer.writeSamples([50 * _wave(i, np.arange(seconds * r) / r) for i, r in enumerate(rates)])
    for onset, text in events:
        writer.writeAnnotation(onset, 0.5, text)
    writer.close()
    return path


def _spec(tmp_path, body: str):
    path = tmp_path / "spec.yaml"
    path.write_text("sources:" + body)
    return path


CHANNELS = ["C9", "C2", "C3", "C4", "C5", "C6", "C7", "C0"]
EEG = f"""
  - adapter: eeg_edf
    task: motor_imagery
    path: eeg
    events: {{T1: left_hand, T2: right_hand}}
    channels: {CHANNELS}
    offset_s: 0.5
    subject_pattern: '^(?P<subject>S\\d+)R'
    site_from: subject
"""


def test_edf_epochs_are_cut_resampled_and_standardised(tmp_path):
    (tmp_path / "eeg").mkdir()
    _edf(tmp_path / "eeg" / "S001R04.edf")
    _edf(tmp_path / "eeg" / "S002R04.edf", events=EVENTS[:2])
    out, skipped = run_spec(_spec(tmp_path, EEG), tmp_path / "corpus")
    corpus = Corpus.open(out)
    m, eeg = corpus.manifest, corpus.array("eeg")
    assert skipped == [] and len(m) == 4 + 2  # T0 is not listed: ignored
    assert eeg.shape == (6, 8, 128) and eeg.dtype == np.float32
    assert m["label"].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]  # left_hand, right_hand, ...
    assert m["origin_site"].tolist() == ["S001"] * 4 + ["S002"] * 2 and set(m["patient_id"]) == {"S001", "S002"}
    np.testing.assert_allclose(eeg.mean(axis=2), 0, atol=1e-4)
    np.testing.assert_allclose(eeg.std(axis=2), 1, atol=1e-4)
    x = eeg[m["idx_eeg"].to_numpy()]
    for k, (onset, _) in enumerate(EVENTS[:4]):
        t = onset + 0.5 + np.arange(128) * 2.0 / 128  # 128 samples over the 2 s epoch
        for c, label in enumerate(CHANNELS):  # whole cycles: mean 0, sd 1/sqrt(2)
            np.testing.assert_allclose(x[k, c], np.sqrt(2) * _wave(int(label[1:]), t), atol=0.01)


def test_events_from_a_csv_and_the_first_eight_channels(tmp_path):
    _edf(tmp_path / "rec.edf", events=())
    (tmp_path / "events.csv").write_text("file,onset_s,description\nrec.edf,1.0,769\nrec,4,770\nrec.edf,6,783\n")
    body = """
  - adapter: eeg_edf
    task: motor_imagery
    path: rec.edf
    events: {769: left_hand, 770: right_hand}   # YAML ints: descriptions are matched as text
    events_csv: events.csv
    origin_site: lab_a
"""
    out, _ = run_spec(_spec(tmp_path, body), tmp_path / "corpus")
    corpus = Corpus.open(out)
    assert corpus.manifest["label"].tolist() == [0.0, 1.0]
    assert set(corpus.manifest["origin_site"]) == {"lab_a"} and set(corpus.manifest["patient_id"]) == {"rec"}
    t = 4.0 + np.arange(128) * 2.0 / 128
    np.testing.assert_allclose(corpus.array("eeg")[1, 7], np.sqrt(2) * _wave(7, t), atol=0.01)


@pytest.mark.parametrize("filtered", [True, False])
def test_power_above_the_new_nyquist_is_filtered_not_folded(tmp_path, monkeypatch, filtered):
    """256 Hz recording, 2 s epochs -> 64 Hz: a 2 Hz rhythm plus as much 60 Hz mains noise. With
    the anti-alias low-pass the epoch is the 2 Hz rhythm; without it (the check that this test
    can fail) the 60 Hz folds to 4 Hz and the epoch no longer looks like the rhythm."""
    import federated.data.ingest.eeg_edf as eeg_edf

    if not filtered:
        monkeypatch.setattr(eeg_edf, "low_pass", lambda signals, rate, cutoff: signals)
    rate, seconds = 256, 10
    t_all = np.arange(seconds * rate) / rate
    writer = pyedflib.EdfWriter(str(tmp_path / "rec.edf"), 8, file_type=pyedflib.FILETYPE_EDFPLUS)
    writer.setSignalHeaders(
        [
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
            for i in range(8)
        ]
    )
    writer.writeSamples(
        [40 * np.sin(2 * np.pi * 2 * t_all + i) + 40 * np.sin(2 * np.pi * 60 * t_all) for i in range(8)]
    )
    writer.writeAnnotation(3.0, 0.5, "T1")
    writer.close()
    body = """
  - adapter: eeg_edf
    task: motor_imagery
    path: rec.edf
    events: {T1: left_hand}
    origin_site: lab_a
"""
    out, _ = run_spec(_spec(tmp_path, body), tmp_path / "corpus")
    x = Corpus.open(out).array("eeg")[0]
    t = 3.0 + np.arange(128) * 2.0 / 128
    worst = min(np.corrcoef(x[c], np.sin(2 * np.pi * 2 * t + c))[0, 1] for c in range(8))
    if filtered:
        assert worst > 0.999
    else:
        assert worst < 0.8


def test_a_nan_sample_spoils_only_the_epochs_it_reaches(tmp_path):
    from federated.data.ingest.eeg_edf import low_pass

    rate = 160
    x = np.sin(2 * np.pi * 2 * np.arange(10 * rate) / rate)[None].repeat(2, axis=0)
    x[1, 500] = np.nan
    out = low_pass(x, rate, 25.6)
    assert np.isfinite(out[0]).all()
    spoiled = np.flatnonzero(np.isnan(out[1]))
    assert spoiled.min() > 400 and spoiled.max() < 600  # a few dozen samples around it, not the channel
    short = x[:, 470:520]  # shorter than the filter (85 taps), NaN inside: no crash, NaN kept
    assert np.isnan(low_pass(short, rate, 25.6)[1]).all() and np.isfinite(low_pass(short, rate, 25.6)[0]).all()
    assert low_pass(x[:, :0], rate, 25.6).shape == (2, 0)


def test_edf_problems_name_the_file_and_event(tmp_path, expect_failure):
    (tmp_path / "eeg").mkdir()
    edf = _edf(tmp_path / "eeg" / "S001R04.edf")
    data = edf.read_bytes()
    edf.write_bytes(data[:-700])  # truncated
    expect_failure("sources:" + EEG, r"S001R04\.edf: unreadable, truncated or corrupt EDF")
    _edf(edf)
    expect_failure(
        "sources:" + EEG.replace("C9", "Cz"),
        r"S001R04\.edf: channel\(s\) \['Cz'\] not in this recording \(its channels: C0, C1",
    )
    _edf(edf, n_channels=6)
    expect_failure(
        "sources:" + EEG.replace(f"    channels: {CHANNELS}\n", ""),
        r"S001R04\.edf: has 6 signal channels, the eeg modality needs 8",
    )
    _edf(edf, events=((9.0, "T2"),))
    expect_failure(
        "sources:" + EEG,
        r"S001R04\.edf event 'T2' at onset 9 s: epoch \[9\.5, 11\.5\] s "
        r"runs outside the recording",
    )
    _edf(edf, events=((1.0, "T0"),))
    expect_failure("sources:" + EEG, r"S001R04\.edf: no event among \['T1', 'T2'\]")
    _edf(edf, events=EVENTS[:1])
    expect_failure("sources:" + EEG, r"eeg: declared class\(es\) \['right_hand'\]")
    _edf(edf, rates=[RATE] * 9 + [80])
    expect_failure("sources:" + EEG, r"S001R04\.edf: the selected channels have different sampling rates")


def test_nan_samples_and_config_mistakes(tmp_path, expect_failure, monkeypatch):
    from federated.data.ingest import eeg_edf

    (tmp_path / "eeg").mkdir()
    _edf(tmp_path / "eeg" / "S001R04.edf")
    read = eeg_edf._read

    def with_nan(*args):
        signals, rate, events = read(*args)
        signals[3, 640] = np.nan  # 4 s: inside the second epoch (3.5 to 5.5 s) only
        return signals, rate, events

    monkeypatch.setattr(eeg_edf, "_read", with_nan)
    expect_failure("sources:" + EEG, r"S001R04\.edf event 'T2' at onset 3 s: NaN")
    expect_failure(
        "sources:" + EEG.replace("T2: right_hand", "T2: hands"),
        r"sources\[0\]: events map to \['hands'\], not classes of motor_imagery",
    )
    expect_failure("sources:" + EEG.replace("'C9', ", ""), r"sources\[0\]: channels lists 7 labels")
    expect_failure("sources:" + EEG.replace("'C9'", "'C0'"), r"sources\[0\]: channels lists a label twice")


def test_edf_on_error_skip_keeps_the_good_recordings(tmp_path):
    (tmp_path / "eeg").mkdir()
    _edf(tmp_path / "eeg" / "S001R04.edf")
    bad = _edf(tmp_path / "eeg" / "S002R04.edf")
    bad.write_bytes(bad.read_bytes()[:-700])
    out, skipped = run_spec(_spec(tmp_path, EEG + "    on_error: skip\n"), tmp_path / "corpus")
    assert [s["item"].rsplit("/", 1)[-1] for s in skipped] == ["S002R04.edf"]
    assert len(Corpus.open(out).manifest) == 4


def test_a_missing_edf_library_names_the_install_command(tmp_path, expect_failure, monkeypatch):
    (tmp_path / "eeg").mkdir()
    monkeypatch.setitem(sys.modules, "pyedflib", None)  # import pyedflib -> ImportError
    expect_failure("sources:" + EEG, r"pip install 'multimed-fl\[edf\]'")


# --- FASTA ----------------------------------------------------------------------------------

LONG_DNA = "".join("ACGT"[(i * 7 + i // 5) % 4] for i in range(200))
PROMOTERS = f">r1 first promoter\nacgtAC\nGTA\n>r2\n{LONG_DNA[:90]}\n{LONG_DNA[90:]}\n>r3\n{'T' * 128}\n"
TABLE = "id,log_tpm,lab\nr1,1.5,north\nr2,-0.25,south\nr3,3,south\n"
EXPRESSION = """
  - adapter: fasta
    task: expression_prediction
    path: promoters.fa
    labels: expression.csv
    label_column: log_tpm
    site_column: lab
"""


def _promoters(tmp_path, fasta=PROMOTERS, table=TABLE):
    (tmp_path / "promoters.fa").write_text(fasta)
    (tmp_path / "expression.csv").write_text(table)


def test_dna_tokens_center_crop_and_regression_targets(tmp_path):
    _promoters(tmp_path)
    out, _ = run_spec(_spec(tmp_path, EXPRESSION), tmp_path / "corpus")
    corpus = Corpus.open(out)
    m, seqs = corpus.manifest, corpus.array("genomic_sequence")
    assert m["patient_id"].tolist() == ["r1", "r2", "r3"] and m["origin_site"].tolist() == ["north", "south", "south"]
    x = seqs[m["idx_genomic_sequence"].to_numpy()]
    assert x.shape == (3, 128) and x.dtype == np.int64
    assert x[0, :10].tolist() == [1, 2, 3, 4, 1, 2, 3, 4, 1, 0] and (x[0, 9:] == 0).all()  # padded
    assert x[1].tolist() == [1 + "ACGT".index(c) for c in LONG_DNA[36:164]]  # centre of 200
    assert (x[2] == 4).all()
    targets = corpus.targets("expression_prediction")[m["target_row"].to_numpy()]
    np.testing.assert_allclose(targets, [1.5, -0.25, 3.0])
    np.testing.assert_allclose(m["label"], [1.5, -0.25, 3.0])


def test_dna_crop_start(tmp_path):
    _promoters(tmp_path)
    out, _ = run_spec(_spec(tmp_path, EXPRESSION + "    crop: start\n"), tmp_path / "corpus")
    corpus = Corpus.open(out)
    assert corpus.array("genomic_sequence")[1].tolist() == [1 + "ACGT".index(c) for c in LONG_DNA[:128]]


CHAIN = "".join(AMINO[(i * 3) % 20] for i in range(80))
DSSP = "HHHHGGGIII" + "EEEEBBB" + "TTSS--CC  " + "LPHH" + "E" * 49  # 80 states
PROTEINS = """
  - adapter: fasta
    task: protein_structure
    path: chains.fa
    structure: chains.dssp.fa
    origin_site: pdb
"""


def _proteins(tmp_path, structure_p1="hhGG-ebTS "):
    (tmp_path / "chains.fa").write_text(f">p1\nmkVLaE\nGHIW*\n>p2 long\n{CHAIN}\n")
    (tmp_path / "chains.dssp.fa").write_text(f">p2\n{DSSP[:40]}\n{DSSP[40:]}\n>p1\n{structure_p1}\n")


def test_protein_tokens_structure_states_padding_and_crop(tmp_path):
    _proteins(tmp_path)
    out, _ = run_spec(_spec(tmp_path, PROTEINS), tmp_path / "corpus")
    corpus = Corpus.open(out)
    m = corpus.manifest
    x = corpus.array("protein_sequence")[m["idx_protein_sequence"].to_numpy()]
    y = corpus.targets("protein_structure")[m["target_row"].to_numpy()]
    assert y.shape == (2, 64) and y.dtype == np.int64 and m["label"].isna().all()
    assert x[0, :10].tolist() == [1 + AMINO.index(c) for c in "MKVLAEGHIW"] and (x[0, 10:] == 0).all()
    assert y[0, :10].tolist() == [0, 0, 0, 0, 2, 1, 1, 2, 2, 2]  # H H G G - e b T S ' '
    assert (y[0, 10:] == -1).all()  # IGNORE_LABEL where padded
    assert x[1].tolist() == [1 + AMINO.index(c) for c in CHAIN[8:72]]  # centre 64 of 80
    three = [{"H": 0, "G": 0, "I": 0, "E": 1, "B": 1}.get(c, 2) for c in DSSP]
    assert y[1].tolist() == three[8:72]


def test_fasta_problems_name_the_file_and_record(tmp_path, expect_failure):
    _promoters(tmp_path, fasta="ACGT\n" + PROMOTERS)
    expect_failure("sources:" + EXPRESSION, r"promoters\.fa line 1: text before the first '>' header")
    _promoters(tmp_path, fasta=PROMOTERS + ">r1\nACGT\n")
    expect_failure("sources:" + EXPRESSION, r"promoters\.fa record r1: duplicate id \(first at line 1\)")
    _promoters(tmp_path, fasta=PROMOTERS + ">r4\n\n")
    expect_failure("sources:" + EXPRESSION, r"promoters\.fa record r4: empty sequence")
    _promoters(tmp_path, fasta=PROMOTERS.replace("acgtAC", "acgtNC"))
    expect_failure(
        "sources:" + EXPRESSION,
        r"promoters\.fa record r1: the letter at position 5 is not in "
        "the alphabet ACGT",
    )
    _promoters(tmp_path, table=TABLE.replace("r3,3,south\n", ""))
    expect_failure("sources:" + EXPRESSION, r"promoters\.fa record r3: no entry for this id in expression\.csv")
    _promoters(tmp_path, table=TABLE + "r9,1,north\n")
    expect_failure("sources:" + EXPRESSION, r"expression\.csv row 5: id 'r9' has no record in promoters\.fa")
    _promoters(tmp_path, table=TABLE.replace("r2,-0.25", "r2,"))
    expect_failure("sources:" + EXPRESSION, r"expression\.csv row 3: log_tpm is missing or NaN")
    _proteins(tmp_path, structure_p1="HHHEEECCC")
    expect_failure(
        "sources:" + PROTEINS,
        r"chains\.dssp\.fa record p1: 9 structure states for a sequence "
        "of 10 residues",
    )
    _proteins(tmp_path, structure_p1="HHHEEECCCX")
    expect_failure("sources:" + PROTEINS, r"chains\.dssp\.fa record p1: the structure letter at position 10")


def test_fasta_on_error_skip_and_config_mistakes(tmp_path, expect_failure):
    _promoters(tmp_path, fasta=PROMOTERS.replace("acgtAC", "acgtRC"))
    out, skipped = run_spec(_spec(tmp_path, EXPRESSION + "    on_error: skip\n"), tmp_path / "kept")
    assert [s["item"].rsplit("/", 1)[-1] for s in skipped] == ["promoters.fa record r1"]
    assert Corpus.open(out).manifest["patient_id"].tolist() == ["r2", "r3"]
    expect_failure("sources:" + EXPRESSION.replace("log_tpm", "tpm"), r"sources\[0\]: .*no column\(s\) \['tpm'\]")
    expect_failure("sources:" + EXPRESSION + "    crop: end\n", r"sources\[0\]: crop must be one of center, start")


@pytest.mark.parametrize(
    "task_name, change, message",
    [
        ("bone_age", {}, r"task bone_age has no signal input \(its inputs: xray\)"),
        ("motor_imagery", {"events": None}, r"missing key 'events' \(annotation description -> task class\)"),
        ("motor_imagery", {"epoch_s": 0}, r"epoch_s must be > 0 \(got 0\.0\)"),
        ("motor_imagery", {"site_from": "clinic"}, r"site_from must be one of origin_site, subject \(got 'clinic'\)"),
        ("motor_imagery", {"origin_site": "lab_a"}, "give either origin_site .* or site_from: subject, not both"),
        ("motor_imagery", {"subject_pattern": "(S"}, "subject_pattern is not a valid regex"),
    ],
)
def test_eeg_settings_are_refused_by_key_before_any_file_is_read(tmp_path, task_name, change, message):
    params = {
        "adapter": "eeg_edf",
        "task": task_name,
        "path": "absent",
        "events": {"T1": "left_hand"},
        "site_from": "subject",
        **change,
    }
    with pytest.raises(ValueError, match=message):
        ADAPTERS.get("eeg_edf")(params, tmp_path, Problems(), CATALOGUE)


def test_every_unreadable_fasta_side_file_is_reported_at_once(tmp_path):
    (tmp_path / "promoters.fa").write_bytes(b">r1\n\xff\xfe\n")  # not UTF-8
    (tmp_path / "expression.csv").write_text("")  # no columns at all
    params = {
        "adapter": "fasta",
        "task": "expression_prediction",
        "path": "promoters.fa",
        "labels": "expression.csv",
        "label_column": "log_tpm",
    }
    problems = Problems("skip")
    assert len(ADAPTERS.get("fasta")(params, tmp_path, problems, CATALOGUE)) == 0
    assert [(s["item"].rsplit("/", 1)[-1], s["reason"].split(" (")[0]) for s in problems.skipped] == [
        ("promoters.fa", "unreadable text file"),
        ("expression.csv", "unreadable CSV"),
    ]
