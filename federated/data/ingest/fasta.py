"""`fasta`: FASTA sequences with a label table (expression) or per-residue structure (proteins).

    - adapter: fasta
      task: expression_prediction    # genomic_sequence: its declared length (catalogue: 128 bases),
                                     # ACGT = tokens 1-4
      path: promoters.fa
      labels: expression.csv         # one row per record: its id and its regression target
      id_column: id                  # default: id
      label_column: log_tpm
      site_column: lab               # optional: origin_site from the table (default: origin_site)
      patient_column: donor          # optional: patient from the table (default: the record id)
      origin_site: lab_a             # default: the FASTA file's stem
      crop: center                   # longer sequences: keep the centre (default) or the start

    - adapter: fasta
      task: protein_structure        # protein_sequence: its declared length (catalogue: 64 residues),
                                     # ACDEFGHIKLMNPQRSTVWY = 1-20
      path: chains.fa
      structure: chains.dssp.fa      # same record ids, one state letter per residue

The record id is the first word of its '>' header. Letters may be lower case; whitespace
inside sequence lines is ignored and one trailing '*' (stop) is dropped from a protein. The
sequence modality's declared length (`modalities: {protein_sequence: {length: 256}}` changes it,
and protein_structure's per-residue label shape with it) is the sample length: shorter
sequences are padded with token 0 (PAD_TOKEN), longer ones cropped; per-residue labels are
cropped the same way and are IGNORE_LABEL (-1) at padded positions. Structure letters are DSSP's
8 states reduced to 3: H, G, I -> H; E, B -> E; T, S, C, L, P, '-' and space -> C (a structure
line keeps its inner and trailing spaces, which DSSP writes for coil). A labels table is
optional for protein_structure (then only for site_column / patient_column).

Every problem names the file and the record id (or line, or table row), and on_error: skip
skips that record: text before the first header, an empty header or sequence, a duplicate id
(the later record), a letter outside the alphabet (DNA's N and other IUPAC codes included), a
record without a label row or a label row without a record, a missing or NaN label, an unknown
structure letter, a structure whose length differs from its sequence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from federated.core.corpus_schema import CorpusSchema, Task
from federated.core.multimed import SECONDARY_STRUCTURE
from federated.core.targets import IGNORE_LABEL, PAD_TOKEN, REGRESSION, TOKENS
from federated.data.ingest.core import Problems, SampleSet, adapter, error_reason, read_csv_checked, resolve

ALPHABETS = {"genomic_sequence": "ACGT", "protein_sequence": "ACDEFGHIKLMNPQRSTVWY"}
DSSP_TO_3 = {**dict.fromkeys("HGI", "H"), **dict.fromkeys("EB", "E"), **dict.fromkeys("TSCLP- ", "C")}
CROPS = ("center", "start")


def read_fasta(path: Path, problems: Problems, keep_spaces: bool = False) -> dict[str, str] | None:
    """{record id: sequence} in file order, None if unreadable. Malformed parts are reported
    and left out."""
    records: dict[str, str] = {}
    header_line: dict[str, int] = {}
    current: str | None = None
    chunks: list[str] = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        problems.report(path, f"unreadable text file ({error_reason(e)})")
        return None
    for n, raw in enumerate(lines, start=1):
        line = raw if keep_spaces else "".join(raw.split())
        if raw.startswith(">"):
            _close(path, current, chunks, records, problems)
            current, chunks = _open(path, raw, n, header_line, problems), []
        elif current is None and line.strip():
            problems.report(f"{path} line {n}", "text before the first '>' header")
        elif current is not None:
            chunks.append(line)
    _close(path, current, chunks, records, problems)
    return records


def _open(path: Path, header: str, n: int, seen: dict[str, int], problems: Problems) -> str | None:
    """The id of a header line, or None when the record must be left out."""
    words = header[1:].split()
    if not words:
        problems.report(f"{path} line {n}", "empty '>' header (no record id)")
        return None
    if words[0] in seen:
        problems.report(
            f"{path} record {words[0]}", f"duplicate id (first at line {seen[words[0]]}); the later record is left out"
        )
        return None
    seen[words[0]] = n
    return words[0]


def _close(path: Path, rid: str | None, chunks: list[str], records: dict[str, str], problems: Problems) -> None:
    if rid is None:
        return
    text = "".join(chunks)
    if not text:
        problems.report(f"{path} record {rid}", "empty sequence")
        return
    records[rid] = text


def tokens(seq: str, alphabet: str) -> np.ndarray:
    """Letters (any case) -> ids 1..len(alphabet); ValueError names the first unknown letter."""
    seq = seq.upper()
    bad = next(((i, c) for i, c in enumerate(seq) if c not in alphabet), None)
    if bad:
        raise ValueError(f"the letter at position {bad[0] + 1} is not in the alphabet {alphabet}")
    return 1 + np.array([alphabet.index(c) for c in seq], dtype=np.int64)


def states(text: str) -> np.ndarray:
    """DSSP (8-state) or 3-state letters -> indices into SECONDARY_STRUCTURE."""
    text = text.upper()
    bad = next(((i, c) for i, c in enumerate(text) if c not in DSSP_TO_3), None)
    if bad:
        raise ValueError(
            f"the structure letter at position {bad[0] + 1} is not a DSSP state "
            f"({''.join(sorted(DSSP_TO_3)).strip()} or space)"
        )
    return np.array([SECONDARY_STRUCTURE.index(DSSP_TO_3[c]) for c in text], dtype=np.int64)


def fit(x: np.ndarray, length: int, crop: str, fill: int) -> np.ndarray:
    """Crop (centre or start) or pad with `fill` to exactly `length`."""
    if len(x) > length:
        start = (len(x) - length) // 2 if crop == "center" else 0
        return x[start : start + length]
    return np.concatenate([x, np.full(length - len(x), fill, dtype=x.dtype)])


def _config(params: dict[str, Any], task: Task, schema: CorpusSchema) -> dict[str, Any]:
    """The source's settings, checked before any file is read, so a wrong key fails before a long read."""
    modality = next((m for m in task.inputs if m in ALPHABETS), None)
    if modality is None or len(task.inputs) != 1:
        raise ValueError(f"task {task.name} has no sequence input the fasta adapter reads ({', '.join(ALPHABETS)})")
    declared = schema.modality(modality)
    if declared.vocab_size <= len(ALPHABETS[modality]):
        raise ValueError(
            f"modality {modality} has vocab_size {declared.vocab_size}; its letters need "
            f"{len(ALPHABETS[modality]) + 1} ids (padding and {ALPHABETS[modality]})"
        )
    crop = str(params.get("crop", "center"))
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {', '.join(CROPS)} (got {crop!r})")
    regression = task.target == REGRESSION
    if regression and not (params.get("labels") and params.get("label_column")):
        raise ValueError(f"task {task.name} needs `labels` (a CSV) and `label_column`")
    if not regression and not params.get("structure"):
        raise ValueError(f"task {task.name} needs `structure` (per-residue states, FASTA-style)")
    return {
        "modality": modality,
        "length": declared.shape[0],
        "crop": crop,
        "regression": regression,
        "id_column": str(params.get("id_column", "id")),
        "label_column": params.get("label_column"),
        "site_column": params.get("site_column"),
        "patient_column": params.get("patient_column"),
    }


def read_label_table(path: Path, cfg: dict[str, Any], problems: Problems) -> dict[str, tuple[int, pd.Series]] | None:
    """{record id: (spreadsheet row, row)}, None if unreadable; a duplicate id is reported (the
    later row left out)."""
    frame = read_csv_checked(path, problems, dtype={cfg["id_column"]: str})
    if frame is None:
        return None
    wanted = [cfg[k] for k in ("id_column", "label_column", "site_column", "patient_column") if cfg[k]]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing} (columns: {', '.join(map(str, frame.columns))})")
    table: dict[str, tuple[int, pd.Series]] = {}
    for i, row in frame.iterrows():
        rid, where = str(row[cfg["id_column"]]).strip(), f"{path} row {int(i) + 2}"
        if pd.isna(row[cfg["id_column"]]) or not rid:
            problems.report(where, f"no id in column {cfg['id_column']!r}")
        elif rid in table:
            problems.report(where, f"duplicate id {rid!r} (first at row {table[rid][0]})")
        else:
            table[rid] = (int(i) + 2, row)
    return table


class _Bad(ValueError):
    """A problem with one record, and where it is (file and record id, or table row)."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(reason)
        self.where = where


def _cross_check(
    records: dict[str, str], others: dict[str, Any], path: Path, other: Path, other_where, problems: Problems
) -> set[str]:
    """Ids on both sides; an id on one side only is reported, naming its file and record."""
    for rid in records:
        if rid not in others:
            problems.report(f"{path} record {rid}", f"no entry for this id in {other.name}")
    for rid in others:
        if rid not in records:
            problems.report(other_where(rid), f"id {rid!r} has no record in {path.name}")
    return {rid for rid in records if rid in others}


def _row_value(row: pd.Series, column: str, where: str, number: bool = False) -> Any:
    value = row[column]
    if pd.isna(value) or (isinstance(value, str) and not value.strip()):
        raise _Bad(where, f"{column} is missing or NaN")
    if not number:
        return str(value).strip()
    value = pd.to_numeric(value, errors="coerce")
    if not np.isfinite(value):
        raise _Bad(where, f"{column} is not a finite number")
    return float(value)


def _structure_target(structure: str, n_residues: int, cfg: dict[str, Any], where: str) -> np.ndarray:
    if len(structure) != n_residues:
        raise _Bad(where, f"{len(structure)} structure states for a sequence of {n_residues} residues")
    try:
        labels = states(structure)
    except ValueError as e:
        raise _Bad(where, str(e)) from None
    return fit(labels, cfg["length"], cfg["crop"], IGNORE_LABEL)


def _sample(
    rid: str,
    seq: str,
    cfg: dict[str, Any],
    files: dict[str, Path],
    row: tuple[int, pd.Series] | None,
    structure: str | None,
) -> tuple[np.ndarray, Any, str | None, str | None]:
    """(tokens, target, site or None, patient or None) of one record; _Bad says what is wrong."""
    if cfg["modality"] == "protein_sequence" and seq.endswith("*"):
        seq = seq[:-1]
    try:
        toks = tokens(seq, ALPHABETS[cfg["modality"]])
    except ValueError as e:
        raise _Bad(f"{files['path']} record {rid}", str(e)) from None
    where_row = f"{files.get('labels')} row {row[0]}" if row else ""
    target: Any
    if cfg["regression"]:
        if row is None:
            raise _Bad(f"{files['path']} record {rid}", "has no row in the label table")
        target = _row_value(row[1], cfg["label_column"], where_row, number=True)
    else:
        if structure is None:
            raise _Bad(f"{files['path']} record {rid}", "has no per-residue structure record")
        target = _structure_target(structure, len(toks), cfg, f"{files['structure']} record {rid}")
    site, patient = (
        _row_value(row[1], cfg[k], where_row) if row and cfg[k] else None for k in ("site_column", "patient_column")
    )
    return fit(toks, cfg["length"], cfg["crop"], PAD_TOKEN), target, site, patient


def _side_files(params: dict[str, Any], base: Path, problems: Problems) -> dict[str, Path] | None:
    """The FASTA, label table and structure files that the source names; None if one is absent."""
    files = {k: resolve(base, params, k) for k in ("path", "labels", "structure") if params.get(k)}
    absent = [f for f in files.values() if not f.is_file()]
    for f in absent:
        problems.report(f, "file does not exist")
    return None if absent else files


@adapter(
    "fasta",
    keys={
        "path",
        "labels",
        "id_column",
        "label_column",
        "structure",
        "crop",
        "site_column",
        "patient_column",
        "origin_site",
    },
    fills=TOKENS,
    paths=frozenset({"path", "labels", "structure"}),
)
def fasta(params: dict[str, Any], base: Path, problems: Problems, schema: CorpusSchema) -> SampleSet:
    """One sample per FASTA record that every named file agrees on; the rest are reported by file and id."""
    task = schema.task(params["task"])
    cfg = _config(params, task, schema)
    samples = SampleSet(task.name, schema)
    files = _side_files(params, base, problems)
    if files is None:
        return samples
    path = files["path"]
    read = _read_files(files, cfg, problems)
    if read is None:
        return samples
    records, table, structure = read
    ids = _matched_ids(records, table, structure, files, problems)
    default_site = str(params.get("origin_site") or path.stem)
    for rid in (r for r in records if r in ids):
        try:
            x, target, site, patient = _sample(rid, records[rid], cfg, files, table.get(rid), structure.get(rid))
        except _Bad as e:
            problems.report(e.where, str(e))
            continue
        samples.add({cfg["modality"]: x}, target, site or default_site, patient or rid, f"fasta:{path.name}")
    return samples


def _read_files(
    files: dict[str, Path], cfg: dict[str, Any], problems: Problems
) -> tuple[dict[str, str], dict[str, tuple[int, pd.Series]], dict[str, str]] | None:
    """(records, label table, structures) of the source; empty where not given; None if one is unreadable.
    Every file is read before giving up, so all unreadable ones are reported at once."""
    records = read_fasta(files["path"], problems)
    table = read_label_table(files["labels"], cfg, problems) if "labels" in files else {}
    structure = read_fasta(files["structure"], problems, keep_spaces=True) if "structure" in files else {}
    if records is None or table is None or structure is None:
        return None
    return records, table, structure


def _matched_ids(
    records: dict[str, str],
    table: dict[str, tuple[int, pd.Series]],
    structure: dict[str, str],
    files: dict[str, Path],
    problems: Problems,
) -> set[str]:
    """The record ids present in every file the source names; the others are reported by file."""
    path = files["path"]
    ids = set(records)
    if "labels" in files:
        ids &= _cross_check(
            records, table, path, files["labels"], lambda r: f"{files['labels']} row {table[r][0]}", problems
        )
    if "structure" in files:
        ids &= _cross_check(
            records, structure, path, files["structure"], lambda r: f"{files['structure']} record {r}", problems
        )
    return ids
