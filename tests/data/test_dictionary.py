"""The data dictionary (issue 29): hospitals that ingest their own rows with one dictionary encode
every column alike, whatever their own frequencies; a value outside it is named by row and column
(never by value) or becomes missing where it says so; `corpus dictionary` drafts one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from federated.app.cli import main
from federated.data.format import Corpus
from federated.data.ingest import IngestError
from federated.data.ingest.dictionary import cell_text, parse_dictionary, read_dictionary
from federated.data.ingest.spec import run_spec

DICTIONARY = {
    "columns": {
        "age": {"type": "numeric", "unit": "years", "range": [18, 100], "missing": [-1]},
        "lactate": {"type": "numeric", "unit": "mmol/L", "range": [0, 30]},
        "sex": {"type": "categorical", "levels": ["F", "M"], "reference": "F"},
        "ward": {"type": "categorical", "levels": ["icu", "er", "general"], "reference": "icu", "missing": ["n/a"]},
    }
}
FEATURES = ["age", "lactate", "sex=M", "ward=er", "ward=general"]
TASK = {"inputs": ["clinical"], "target": "binary", "classes": ["no", "yes"]}


def _table(n: int, male_share: float, icu_share: float, seed: int) -> pd.DataFrame:
    """n admissions; the label is noise, so no column leaks it."""
    rng = np.random.default_rng(seed)
    n_male, n_icu = round(n * male_share), round(n * icu_share)
    wards = ["icu"] * n_icu + [["er", "general"][i % 2] for i in range(n - n_icu)]
    return pd.DataFrame(
        {
            "id": [f"p{seed}_{i}" for i in range(n)],
            "age": rng.integers(20, 90, n),
            "lactate": rng.gamma(2.0, 1.0, n).round(2),
            "sex": ["M"] * n_male + ["F"] * (n - n_male),
            "ward": wards,
            "outcome": rng.integers(0, 2, n),
        }
    )


def _spec(folder: Path, table: str, source_extra: dict | None = None, top: dict | None = None) -> Path:
    source = {
        "adapter": "tabular",
        "task": "sepsis",
        "path": table,
        "label_column": "outcome",
        "labels": {0: "no", 1: "yes"},
        "patient_column": "id",
        **(source_extra or {}),
    }
    spec = {
        "name": "icu",
        "modalities": {"clinical": {"kind": "vector", "features": 8}},
        "tasks": {"sepsis": TASK},
        **(top or {}),
        "sources": [source],
    }
    path = folder / f"spec_{table}.yaml"
    path.write_text(json.dumps(spec))
    return path


def _write_dictionary(folder: Path, body: dict = DICTIONARY) -> Path:
    path = folder / "dictionary.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _by_patient(corpus: Corpus) -> pd.DataFrame:
    m = corpus.manifest
    x = corpus.array("clinical")[m["idx_clinical"].to_numpy()]
    return pd.DataFrame(x, index=m["patient_id"])


def test_one_dictionary_gives_two_hospitals_with_opposite_frequencies_the_same_features(tmp_path):
    """One half of the table is mostly male and in the ICU, the other mostly female and on the
    wards: without a dictionary each half picks its own reference levels (its features differ),
    with one both encode every column alike."""
    north, south = _table(40, 0.8, 0.7, seed=1), _table(40, 0.2, 0.1, seed=2)
    north.to_csv(tmp_path / "north.csv", index=False)
    south.to_csv(tmp_path / "south.csv", index=False)
    _write_dictionary(tmp_path)
    with_dictionary = [
        Corpus.open(run_spec(_spec(tmp_path, f"{h}.csv", {"dictionary": "dictionary.yaml"}), tmp_path / h)[0])
        for h in ("north", "south")
    ]
    a, b = (c.schema.modality("clinical") for c in with_dictionary)
    assert a.features == b.features and [f.name for f in a.features] == FEATURES
    assert (a.features[0].unit, a.features[0].low, a.features[0].high) == ("years", 18.0, 100.0)
    assert a.features[2].kind == "indicator" and a.features[2].level == "M" and a.features[2].column == "sex"
    for corpus, table in zip(with_dictionary, (north, south), strict=True):
        x = _by_patient(corpus).loc[table["id"]]
        expected = np.column_stack(
            [
                table["age"],
                table["lactate"],
                table["sex"] == "M",
                table["ward"] == "er",
                table["ward"] == "general",
            ]
        ).astype(np.float32)
        np.testing.assert_array_equal(x.to_numpy()[:, :5], expected)  # the same encoding at both
    without = [
        Corpus.open(
            run_spec(_spec(tmp_path, f"{h}.csv", {"categorical_columns": ["sex", "ward"]}), tmp_path / f"{h}0")[0]
        )
        for h in ("north", "south")
    ]
    names = [[f.name for f in c.schema.modality("clinical").features] for c in without]
    assert names[0] == ["age", "lactate", "sex=F", "ward=er", "ward=general"]  # reference: M, icu (most frequent)
    assert names[1] == ["age", "lactate", "sex=M", "ward=general", "ward=icu"]  # reference: F, er (ties: first)
    report = without[0].spec["provenance"]["warnings"]
    assert any("no data dictionary: categorical levels chosen from this table's own frequencies" in w["warning"]
               and "sex: reference 'M'" in w["warning"] for w in report)  # fmt: skip


def test_a_value_outside_the_dictionary_is_named_by_row_and_column_never_by_value(tmp_path):
    table = _table(30, 0.5, 0.5, seed=3)
    table["ward"] = table["ward"].astype(object)
    table.loc[4, "ward"] = "zebra_ward_17"
    table.to_csv(tmp_path / "t.csv", index=False)
    _write_dictionary(tmp_path)
    spec = _spec(tmp_path, "t.csv", {"dictionary": "dictionary.yaml"})
    with pytest.raises(IngestError) as caught:
        run_spec(spec, tmp_path / "c")
    message = str(caught.value)
    assert "t.csv row 6: column 'ward' holds a value that is not one of the dictionary's levels" in message
    assert "zebra" not in message
    table.loc[4, "ward"] = "icu"
    table["age"] = table["age"].astype(float)
    table.loc[7, "age"] = 130.25
    table.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(IngestError) as caught:
        run_spec(spec, tmp_path / "c")
    message = str(caught.value)
    assert "t.csv row 9: column 'age' is outside the dictionary's range [18.0, 100.0]" in message
    assert "130" not in message.replace(str(tmp_path), "")
    assert not (tmp_path / "c").exists()


def test_out_of_range_and_unknown_levels_become_missing_where_the_dictionary_says_so(tmp_path):
    table = _table(30, 0.5, 0.5, seed=4)
    table["ward"] = table["ward"].astype(object)
    table.loc[[2, 3], "ward"] = ["zebra", "n/a"]  # an unknown level, a missing code
    table.loc[5, "age"] = 130
    table.loc[6, "age"] = -1  # the missing code
    table.loc[8, "sex"] = " "  # blank: always missing
    table.to_csv(tmp_path / "t.csv", index=False)
    lenient = json.loads(json.dumps(DICTIONARY))
    lenient["columns"]["age"]["out_of_range"] = "missing"
    lenient["columns"]["ward"]["unknown_level"] = "missing"
    _write_dictionary(tmp_path, lenient)
    strict_missing = _spec(tmp_path, "t.csv", {"dictionary": "dictionary.yaml"})
    with pytest.raises(
        IngestError, match=r"t\.csv row 4: NaN or infinite value in \['ward'\] \(impute: mean or median"
    ):
        run_spec(strict_missing, tmp_path / "c0")  # missing, and no impute
    corpus = Corpus.open(
        run_spec(_spec(tmp_path, "t.csv", {"dictionary": "dictionary.yaml", "impute": "mean"}), tmp_path / "c")[0]
    )
    x = _by_patient(corpus)
    ids = table["id"]
    assert np.isnan(x.loc[ids[2], [3, 4]]).all() and np.isnan(x.loc[ids[3], [3, 4]]).all()  # both ward indicators
    assert np.isnan(x.loc[ids[5], 0]) and np.isnan(x.loc[ids[6], 0])
    assert np.isnan(x.loc[ids[8], 2]) and not np.isnan(x.loc[ids[8], [0, 3, 4]]).any()
    assert corpus.schema.modality("clinical").impute == "mean"
    assert np.isfinite(x.drop(index=ids[[2, 3, 5, 6, 8]])).all().all()


def test_the_spec_section_reaches_every_tabular_source_and_a_path_outside_the_spec_folder_is_refused(tmp_path):
    table = _table(30, 0.5, 0.5, seed=5)
    table.to_csv(tmp_path / "t.csv", index=False)
    corpus = Corpus.open(run_spec(_spec(tmp_path, "t.csv", top={"dictionary": DICTIONARY}), tmp_path / "c")[0])
    assert [f.name for f in corpus.schema.modality("clinical").features] == FEATURES
    assert corpus.spec["provenance"]["dictionary"]["columns"]["sex"]["levels"] == ["F", "M"]
    (tmp_path / "inner").mkdir()
    table.to_csv(tmp_path / "inner" / "t.csv", index=False)
    _write_dictionary(tmp_path)
    spec = _spec(tmp_path / "inner", "t.csv", {"dictionary": "../dictionary.yaml"})
    with pytest.raises(
        IngestError, match=r"sources\[0\] `dictionary`: \.\./dictionary\.yaml .* lies outside the spec's folder"
    ):
        run_spec(spec, tmp_path / "d")
    listed = _spec(tmp_path, "t.csv", {"dictionary": "dictionary.yaml", "feature_columns": ["ward", "bmi"]})
    with pytest.raises(IngestError, match=r"column\(s\) \['bmi'\] are not in the data dictionary"):
        run_spec(listed, tmp_path / "e")
    chosen = _spec(tmp_path, "t.csv", {"dictionary": "dictionary.yaml", "feature_columns": ["ward", "age"]})
    corpus = Corpus.open(run_spec(chosen, tmp_path / "f")[0])  # listed columns, in the dictionary's order
    assert [f.name for f in corpus.schema.modality("clinical").features] == ["age", "ward=er", "ward=general"]


def test_two_sources_filling_one_modality_must_give_the_same_features(tmp_path):
    _table(30, 0.8, 0.5, seed=6).to_csv(tmp_path / "a.csv", index=False)
    _table(30, 0.2, 0.5, seed=7).to_csv(tmp_path / "b.csv", index=False)
    source = {"adapter": "tabular", "task": "sepsis", "label_column": "outcome", "patient_column": "id",
              "labels": {0: "no", 1: "yes"}, "categorical_columns": ["sex"]}  # fmt: skip
    spec = {
        "modalities": {"clinical": {"kind": "vector", "features": 8}},
        "tasks": {"sepsis": TASK},
        "sources": [{**source, "path": "a.csv"}, {**source, "path": "b.csv"}],
    }
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))
    with pytest.raises(IngestError) as caught:
        run_spec(tmp_path / "spec.yaml", tmp_path / "c")
    assert "sources[1]: modality clinical is filled by two sources that encode it differently" in str(caught.value)
    assert "feature 3 is 'sex=M' here and 'sex=F' in " in str(caught.value) and "sources[0]" in str(caught.value)
    spec["dictionary"] = DICTIONARY
    for s in spec["sources"]:
        s.pop("categorical_columns")
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))
    corpus = Corpus.open(run_spec(tmp_path / "spec.yaml", tmp_path / "c")[0])
    assert [f.name for f in corpus.schema.modality("clinical").features] == FEATURES


def test_the_draft_command_round_trips(tmp_path, capsys):
    table = _table(40, 0.3, 0.6, seed=8)
    table["flag"] = np.arange(40) % 2  # an integer column of two values: categorical by the draft's rule
    table.loc[3, "lactate"] = np.nan
    table.to_csv(tmp_path / "t.csv", index=False)
    out = tmp_path / "drafted.yaml"
    args = ["corpus", "dictionary", str(tmp_path / "t.csv"), "--out", str(out), "--label-column", "outcome",
            "--patient-column", "id"]  # fmt: skip
    assert main(args) == 0
    assert "wrote a draft data dictionary" in capsys.readouterr().out
    text = out.read_text()
    assert text.startswith("# A DRAFT data dictionary") and "edit it before anyone ingests" in text
    drafted = read_dictionary(out)
    assert drafted.names == ["age", "lactate", "sex", "ward", "flag"]  # numeric first, then categorical
    age = drafted.column("age")
    assert age is not None and (age.low, age.high) == (float(table["age"].min()), float(table["age"].max()))
    sex, ward, flag = drafted.column("sex"), drafted.column("ward"), drafted.column("flag")
    assert sex is not None and ward is not None and flag is not None
    assert (sex.levels, sex.reference) == (("F", "M"), "F")  # sorted; the most frequent is the reference
    assert (ward.levels, ward.reference) == (("er", "general", "icu"), "icu") and flag.levels == ("0", "1")
    mtime = out.stat().st_mtime_ns
    assert main(args) == 2 and out.stat().st_mtime_ns == mtime  # never overwritten without --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    # ingesting with the draft gives what ingest without a dictionary chose, with the draft's ranges
    listed = {"feature_columns": ["age", "lactate"], "categorical_columns": ["sex", "ward", "flag"], "impute": "median"}
    plain = Corpus.open(run_spec(_spec(tmp_path, "t.csv", listed), tmp_path / "plain")[0])
    with_draft = Corpus.open(
        run_spec(_spec(tmp_path, "t.csv", {"dictionary": "drafted.yaml", "impute": "median"}), tmp_path / "d")[0]
    )
    a, b = plain.schema.modality("clinical").features, with_draft.schema.modality("clinical").features
    assert (
        [f.name for f in a] == [f.name for f in b] == ["age", "lactate", "sex=M", "ward=er", "ward=general", "flag=1"]
    )
    assert b[0].low == age.low and a[0].low is None  # only the dictionary's features carry a range
    np.testing.assert_array_equal(_by_patient(plain).to_numpy(), _by_patient(with_draft).to_numpy())


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"type": "text"}, r"columns\.c: type must be one of numeric, categorical \(got 'text'\)"),
        ({"type": "numeric", "levels": ["a", "b"]}, r"columns\.c: levels do\(es\) not apply to a numeric column"),
        ({"type": "numeric", "range": [5, 1]}, r"columns\.c: range low 5\.0 is above high 1\.0"),
        ({"type": "numeric", "range": [0]}, r"columns\.c: range must be \[low, high\]"),
        ({"type": "categorical", "levels": ["a"]}, r"needs at least two levels"),
        ({"type": "categorical", "levels": ["a", "b"], "reference": "c"}, r"reference 'c' is not one of its levels"),
        ({"type": "categorical", "levels": [False, True]}, r"was read as a boolean .*quote it"),
        (
            {"type": "categorical", "levels": ["a", "b"], "unknown_level": "skip"},
            r"unknown_level must be error or missing",
        ),
        ({"type": "numeric", "units": "kg"}, r"columns\.c: unknown key\(s\) \['units'\]"),
        ({"type": "categorical", "levels": ["a", "b"], "missing": ["a"]}, r"\['a'\] are both levels and missing codes"),
    ],
)
def test_a_bad_dictionary_entry_is_named(entry, message):
    with pytest.raises(IngestError, match=message):
        parse_dictionary({"columns": {"c": entry}}, "dict.yaml")


def test_cells_and_levels_compare_as_the_same_text():
    assert cell_text(1.0) == cell_text(1) == cell_text(np.int64(1)) == cell_text(" 1 ") == "1"
    assert cell_text(" No ") == "No" and cell_text("") is None and cell_text(np.nan) is None
    assert cell_text(2.5) == "2.5" and cell_text(np.True_) == cell_text(True) == cell_text(" TRUE ") == "true"
    yes = parse_dictionary({"columns": {"s": {"type": "categorical", "levels": ["no", "yes", 3]}}}, "d")
    column = yes.column("s")
    assert column is not None and column.levels == ("no", "yes", "3") and column.reference == "no"


def _one_column_table(folder: Path, name: str, cells: list, parquet: bool = False) -> str:
    """A table of `cells` in column `c` (as strings where given so), a label that is noise, ids."""
    n = len(cells)
    outcome = np.random.default_rng(n).permutation(np.arange(n) % 2)  # noise: no column leaks it
    frame = pd.DataFrame({"id": [f"p{i}" for i in range(n)], "c": cells, "outcome": outcome})
    if parquet:
        frame.to_parquet(folder / f"{name}.parquet")
        return f"{name}.parquet"
    frame.to_csv(folder / f"{name}.csv", index=False)
    return f"{name}.csv"


def test_draft_levels_that_are_not_plain_whole_numbers_stay_text_and_ingest(tmp_path):
    """Codes "01".."03" (a Parquet string column) were drafted as 1..3, which no cell matches;
    "01" beside "1" drafted one level twice; "-0" came back as 0."""
    codes = ["01", "02", "03", "1", "-0"] * 8
    table = _one_column_table(tmp_path, "t", codes, parquet=True)
    out = tmp_path / "drafted.yaml"
    assert main(["corpus", "dictionary", str(tmp_path / table), "--out", str(out), "--exclude", "id", "outcome"]) == 0
    column = read_dictionary(out).column("c")
    assert column is not None and column.levels == ("-0", "01", "1", "02", "03")  # by number, ties by text
    assert "'01'" in out.read_text() and "'-0'" in out.read_text()  # written as text, read back as text
    spec = _spec(tmp_path, table, {"dictionary": "drafted.yaml"})
    corpus = Corpus.open(run_spec(spec, tmp_path / "c")[0])
    names = [f.name for f in corpus.schema.modality("clinical").features]
    assert names == [f"c={lv}" for lv in column.levels if lv != column.reference]
    plain = _one_column_table(tmp_path, "u", [1, 2, 10] * 10)
    assert main(["corpus", "dictionary", str(tmp_path / plain), "--out", str(tmp_path / "u.yaml"),
                 "--exclude", "id", "outcome"]) == 0  # fmt: skip
    assert yaml.safe_load((tmp_path / "u.yaml").read_text())["columns"]["c"]["levels"] == [1, 2, 10]  # numbers


def test_whole_number_levels_match_cells_written_with_a_point_zero(tmp_path):
    """A grade column with a text missing code is read as text, so its cells are "2.0": they
    match the level 2 as a numeric column's cells match its missing codes; "-1.0" matches the
    missing code -1."""
    cells = ["1.0", "2.0", "3.0", "unknown", "-1.0", "2"] * 8
    table = _one_column_table(tmp_path, "t", cells)
    _write_dictionary(
        tmp_path, {"columns": {"c": {"type": "categorical", "levels": [1, 2, 3], "missing": ["unknown", -1]}}}
    )
    corpus = Corpus.open(
        run_spec(_spec(tmp_path, table, {"dictionary": "dictionary.yaml", "impute": "median"}), tmp_path / "c")[0]
    )
    x = _by_patient(corpus)
    expected = {"1.0": [0, 0], "2.0": [1, 0], "3.0": [0, 1], "2": [1, 0]}
    for i, cell in enumerate(cells):
        row = x.loc[f"p{i}"].to_numpy()[:2]
        if cell in expected:
            assert row.tolist() == expected[cell], cell
        else:
            assert np.isnan(row).all(), cell  # a missing code: missing, kept for imputation


def test_a_true_false_column_matches_the_levels_true_and_false(tmp_path):
    """pandas reads a CSV's true/false cells as booleans; the dictionary's quoted levels "true"
    and "True" both name them (booleans compare as lower-case text on both sides)."""
    table = _one_column_table(tmp_path, "t", ["true", "false", "false"] * 10)
    assert pd.read_csv(tmp_path / table)["c"].dtype == bool
    for levels in (["false", "true"], ["False", "True"]):
        _write_dictionary(tmp_path, {"columns": {"c": {"type": "categorical", "levels": levels}}})
        out = tmp_path / levels[0]
        corpus = Corpus.open(run_spec(_spec(tmp_path, table, {"dictionary": "dictionary.yaml"}), out)[0])
        assert [f.name for f in corpus.schema.modality("clinical").features] == ["c=true"]
        assert _by_patient(corpus).loc["p0"].iloc[0] == 1 and _by_patient(corpus).loc["p1"].iloc[0] == 0


@pytest.mark.parametrize("cell", ["--1", "²", "1 000"])
def test_odd_integer_looking_cells_neither_crash_nor_are_printed(tmp_path, cell, capsys):
    """str.isdigit passes "²" and lstrip("-") passes "--1", which int() then refused, quoting the
    cell: they are text levels (sorted as text), in an ingest and in a draft."""
    table = _one_column_table(tmp_path, "t", [cell, "2"] * 15)
    listed = {"feature_columns": [], "categorical_columns": ["c"]}
    corpus = Corpus.open(run_spec(_spec(tmp_path, table, listed), tmp_path / "c")[0])
    assert len(corpus.schema.modality("clinical").features) == 1
    out = tmp_path / "d.yaml"
    assert main(["corpus", "dictionary", str(tmp_path / table), "--out", str(out), "--exclude", "id", "outcome"]) == 0
    column = read_dictionary(out).column("c")
    assert column is not None and set(column.levels) == {cell, "2"}


def test_a_column_name_cannot_write_yaml_into_the_drafts_comments(tmp_path):
    """Column names go into the draft's comments (the excluded and left-out columns): a line break
    in one would end the comment and add YAML of its own (here a `genes:` list)."""
    evil = "lab\ngenes: [EVIL]"
    frame = pd.DataFrame(
        {"x": np.arange(60) * 1.5, evil: np.arange(60) % 2, "free\r\ntext": [f"t{i}" for i in range(60)]}
    )
    frame.to_parquet(tmp_path / "t.parquet")
    out = tmp_path / "d.yaml"
    assert main(["corpus", "dictionary", str(tmp_path / "t.parquet"), "--out", str(out), "--label-column", evil]) == 0
    drafted = read_dictionary(out)
    assert drafted.genes == () and drafted.names == ["x"]
    text = out.read_text()
    assert "lab\\ngenes: [EVIL]" in text and "free\\r\\ntext (60 distinct values" in text
    assert all(line.startswith(("#", " ", "columns:")) for line in text.splitlines())


def test_the_draft_leaves_out_excluded_and_split_columns(tmp_path, capsys):
    table = _table(40, 0.5, 0.5, seed=9)
    table["split"] = ["train", "test"] * 20
    table["admitted"] = [f"2024-01-{1 + i % 28:02d}" for i in range(40)]
    table.to_csv(tmp_path / "t.csv", index=False)
    out = tmp_path / "d.yaml"
    args = ["corpus", "dictionary", str(tmp_path / "t.csv"), "--out", str(out), "--label-column", "outcome",
            "--patient-column", "id", "--split-column", "split", "--exclude", "admitted", "lactate"]  # fmt: skip
    assert main(args) == 0
    assert read_dictionary(out).names == ["age", "sex", "ward"]
    assert (
        "# Not features (label, site, patient, split, excluded): admitted, id, lactate, outcome, split"
        in out.read_text()
    )
    assert main([*args[:-1], "no_such_column", "--overwrite"]) == 2
    assert "no column(s) ['no_such_column']" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["yes", "no", "on", "off", "true", "null", "~"])
def test_a_column_name_yaml_reads_as_a_boolean_or_nothing_is_refused(tmp_path, key):
    (tmp_path / "d.yaml").write_text(f"columns:\n  {key}: {{type: numeric}}\n  age: {{type: numeric}}\n")
    with pytest.raises(IngestError, match=r"columns: a column name was read as (True|False|None) .*quote it"):
        read_dictionary(tmp_path / "d.yaml")
    (tmp_path / "d.yaml").write_text(f"columns:\n  '{key}': {{type: numeric}}\n")
    assert read_dictionary(tmp_path / "d.yaml").names == [key]
