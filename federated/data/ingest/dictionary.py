"""A data dictionary: what every column of a table means, one file every hospital ingests with.

Alone, each hospital's table would choose its categorical reference levels from its own
frequencies, so one hospital's `sex=male` column can be another's `sex=female`, at one width.
A coordinator writes a dictionary once and sends it with the ingest spec; the tabular adapter
encodes by it, never by local frequency, so every hospital's features are the same list.

    columns:
      age:      {type: numeric, unit: years, range: [18, 110], missing: [-1, 999]}
      lactate:  {type: numeric, unit: mmol/L, range: [0, 30], out_of_range: missing}
      sex:      {type: categorical, levels: [female, male], reference: female, missing: [unknown]}
      ward:     {type: categorical, levels: [icu, er, general], reference: icu, unknown_level: missing}
    genes: [CD3E, CD14, MS4A1]     # the h5ad adapter's genes, in this column order

Per column: `type` numeric | categorical; `unit` (numeric; recorded in the schema); `range`
[low, high] (numeric; null leaves a side open); `missing`: cell values that mean missing (codes
such as -1 or "unknown"; a blank cell is always missing); `out_of_range` / `unknown_level`:
`error` (the default: the row is a problem naming file, row and column, never the value) or
`missing`; `levels` (categorical, in a fixed order) and `reference` (one of the levels, default
the first: it gets no indicator column); `description` (free text for people). Cells are
compared as text stripped of spaces, with an integral number written without ".0" (1.0 is "1"),
and a boolean as `true` or `false` (a column pandas reads as booleans, and a text cell spelt
True, TRUE or true, all match the level "true"). A text cell that is no level or missing code
but reads as a whole number ("2.0", "-1.0") is compared as that number ("2", "-1"), as a numeric
column's cells are with its missing codes. YAML reads a bare yes/no/true/false as a boolean and
null or ~ as nothing: quote such levels and column names ("yes", "null").

`multimed-fl corpus dictionary TABLE --out FILE` drafts one from a table (`draft`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from federated.core.features import INDICATOR, NUMERIC, Feature, FeatureError
from federated.core.io import atomic_write_text
from federated.data.ingest.core import IngestError, distinct_cells, inside, real_path

NUMERIC_TYPE, CATEGORICAL_TYPE = "numeric", "categorical"
COLUMN_TYPES = (NUMERIC_TYPE, CATEGORICAL_TYPE)
ON_BAD_VALUE = ("error", "missing")  # what an out-of-range value or an unknown level becomes
COLUMN_KEYS = frozenset(
    {"type", "unit", "range", "missing", "levels", "reference", "out_of_range", "unknown_level", "description"}
)
NUMERIC_ONLY = frozenset({"unit", "range", "out_of_range"})
CATEGORICAL_ONLY = frozenset({"levels", "reference", "unknown_level"})
TOP_KEYS = frozenset({"columns", "genes"})
# The draft's rule: a numeric column whose observed values are all integers and number at most
# this many is categorical (0/1 flags, small codes); any other numeric column is numeric.
DRAFT_MAX_INTEGER_LEVELS = 5
# A text column with more distinct values than this is left out of a draft (identifiers, free text).
DRAFT_MAX_TEXT_LEVELS = 50


_BOOLEAN_TEXTS = frozenset({"true", "false"})
_INTEGER = re.compile(r"-?[0-9]+")  # ASCII digits only: str.isdigit also passes "²", which int() refuses


def is_integer_text(text: str) -> bool:
    """Whether `text` is a whole number as int() reads it back (an optional minus, ASCII digits)."""
    return _INTEGER.fullmatch(text) is not None


def integral_text(text: str) -> str | None:
    """A text cell that reads as a whole number ("2.0", " -1 ", "1e3"), as cell_text writes that
    number ("2", "-1", "1000"); None for any other text."""
    try:
        v = float(text)
    except ValueError:
        return None
    return str(int(v)) if math.isfinite(v) and v.is_integer() and abs(v) < 2**53 else None


def cell_text(value: Any) -> str | None:
    """A cell (or a dictionary level or code) as the text it is compared by; None when missing.
    Strings are stripped ("No " is "No"); an integral number loses its ".0", so a column read as
    floats because it has a blank still matches the level 1; a boolean, and a text spelling one in
    any case, is `true` or `false` (pandas reads a CSV's true/false column as booleans)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, str):
        value = value.strip()
        return (value.lower() if value.lower() in _BOOLEAN_TEXTS else value) or None
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isnan(v):
            return None
        return str(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)
    return str(value)


@dataclass(frozen=True)
class ColumnSpec:
    """One column of a data dictionary (module docstring)."""

    name: str
    type: str
    unit: str = ""
    low: float | None = None
    high: float | None = None
    missing: tuple[str, ...] = ()  # as cell_text writes them
    levels: tuple[str, ...] = ()
    reference: str = ""
    out_of_range: str = "error"
    unknown_level: str = "error"
    description: str = ""

    @property
    def missing_numbers(self) -> np.ndarray:
        """The missing codes that are numbers (matched by value in a numeric column)."""
        out = []
        for code in self.missing:
            try:
                out.append(float(code))
            except ValueError:
                continue
        return np.asarray(out, dtype=np.float64)


@dataclass(frozen=True)
class DataDictionary:
    """A dictionary as read: its columns in order (the feature order it gives), its genes."""

    columns: tuple[ColumnSpec, ...] = ()
    genes: tuple[str, ...] = ()
    where: str = ""  # the file (or spec section) it was read from, for messages
    sha256: str = ""  # of the file's bytes ("" for a spec section): recorded in provenance
    _by_name: dict[str, ColumnSpec] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name.update({c.name: c for c in self.columns})

    def column(self, name: str) -> ColumnSpec | None:
        return self._by_name.get(name)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]


def parse_dictionary(raw: object, where: str, sha256: str = "") -> DataDictionary:
    """A dictionary from its YAML mapping; IngestError naming the entry at fault."""
    if not isinstance(raw, dict):
        raise IngestError(f"{where}: a data dictionary is a mapping with `columns` (and `genes`)")
    unknown = sorted(map(str, set(raw) - TOP_KEYS))
    if unknown:
        raise IngestError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(sorted(TOP_KEYS))}")
    columns_raw = raw.get("columns") or {}
    if not isinstance(columns_raw, dict):
        raise IngestError(f"{where}: columns must be a mapping of column name -> its entry")
    for name in columns_raw:
        if name is None or isinstance(name, bool):
            raise IngestError(
                f"{where}: columns: a column name was read as {name!r} (YAML reads a bare yes/no/true/false/on/off "
                'as a boolean and null or ~ as nothing): quote it, e.g. "yes":'
            )
    columns = tuple(_column(str(name), entry, f"{where} columns.{name}") for name, entry in columns_raw.items())
    genes = raw.get("genes") or []
    if not isinstance(genes, list) or not all(isinstance(g, str) and g for g in genes):
        raise IngestError(f"{where}: genes must be a list of gene names")
    twice = sorted(g for g, k in Counter(genes).items() if k > 1)
    if twice:
        raise IngestError(f"{where}: gene(s) {twice[:10]} appear more than once")
    if not columns and not genes:
        raise IngestError(f"{where}: the dictionary lists no columns and no genes")
    return DataDictionary(columns, tuple(genes), where, sha256)


def _column(name: str, raw: object, where: str) -> ColumnSpec:
    if not isinstance(raw, dict):
        raise IngestError(f"{where}: must be a mapping (type, unit, range, missing, levels, reference)")
    unknown = sorted(map(str, set(raw) - COLUMN_KEYS))
    if unknown:
        raise IngestError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(sorted(COLUMN_KEYS))}")
    kind = raw.get("type")
    if kind not in COLUMN_TYPES:
        raise IngestError(f"{where}: type must be one of {', '.join(COLUMN_TYPES)} (got {kind!r})")
    wrong = sorted(set(raw) & (CATEGORICAL_ONLY if kind == NUMERIC_TYPE else NUMERIC_ONLY))
    if wrong:
        raise IngestError(f"{where}: {', '.join(wrong)} do(es) not apply to a {kind} column")
    for key in ("unit", "description"):
        if not isinstance(raw.get(key, ""), str):
            raise IngestError(f"{where}: {key} must be a string")
    for key in ("out_of_range", "unknown_level"):
        if raw.get(key, "error") not in ON_BAD_VALUE:
            raise IngestError(f"{where}: {key} must be error or missing (got {raw[key]!r})")
    missing = _texts(raw.get("missing") or [], f"{where}: missing")
    common = {"name": name, "type": kind, "missing": missing, "description": raw.get("description", "")}
    if kind == NUMERIC_TYPE:
        low, high = _range(raw.get("range"), where)
        return ColumnSpec(
            **common, unit=raw.get("unit", ""), low=low, high=high, out_of_range=raw.get("out_of_range", "error")
        )
    levels = _texts(raw.get("levels"), f"{where}: levels")
    if len(levels) < 2:
        raise IngestError(f"{where}: a categorical column needs at least two levels (in a fixed order)")
    twice = sorted(lv for lv, k in Counter(levels).items() if k > 1)
    if twice:
        raise IngestError(f"{where}: level(s) {twice} appear more than once")
    clash = sorted(set(levels) & set(missing))
    if clash:
        raise IngestError(f"{where}: {clash} are both levels and missing codes")
    reference = _texts([raw["reference"]], f"{where}: reference")[0] if "reference" in raw else levels[0]
    if reference not in levels:
        raise IngestError(f"{where}: reference {reference!r} is not one of its levels {list(levels)}")
    return ColumnSpec(**common, levels=levels, reference=reference, unknown_level=raw.get("unknown_level", "error"))


def _texts(values: object, where: str) -> tuple[str, ...]:
    """Levels or codes as cell_text writes them; a YAML boolean is refused (it was a bare yes/no)."""
    if not isinstance(values, list):
        raise IngestError(f"{where} must be a list")
    out = []
    for v in values:
        if isinstance(v, bool):
            raise IngestError(
                f'{where}: {v!r} was read as a boolean (YAML reads a bare yes/no/true/false so): quote it, e.g. "yes"'
            )
        if not isinstance(v, str | int | float):
            raise IngestError(f"{where}: {v!r} is not a text or a number")
        text = cell_text(v)
        if text is None:
            raise IngestError(f"{where}: a blank is always missing; list only non-blank values")
        out.append(text)
    return tuple(out)


def _range(raw: object, where: str) -> tuple[float | None, float | None]:
    if raw is None:
        return None, None
    if not isinstance(raw, list) or len(raw) != 2:
        raise IngestError(f"{where}: range must be [low, high] (null for an open side)")
    bounds = []
    for v in raw:
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)):
            raise IngestError(f"{where}: range must hold finite numbers or null (got {v!r})")
        bounds.append(None if v is None else float(v))
    if bounds[0] is not None and bounds[1] is not None and bounds[0] > bounds[1]:
        raise IngestError(f"{where}: range low {bounds[0]} is above high {bounds[1]}")
    return bounds[0], bounds[1]


def read_dictionary(path: Path) -> DataDictionary:
    """A dictionary file; IngestError naming the file when it is absent, not YAML or not a dictionary."""
    if not path.is_file():
        raise IngestError(f"{path}: data dictionary does not exist")
    data = path.read_bytes()
    try:
        raw = yaml.safe_load(data.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise IngestError(f"{path} is not valid YAML: {e}") from None
    return parse_dictionary(raw, str(path), hashlib.sha256(data).hexdigest())


def dictionary_at(
    value: object, folder: Path, where: str = "`dictionary`", folder_is: str = "folder"
) -> DataDictionary:
    """The dictionary a spec or source names: a mapping (the dictionary itself) or a path relative
    to `folder`, which it must lie inside (symlinks followed; refused before it is opened)."""
    if isinstance(value, DataDictionary):
        return value
    if isinstance(value, dict):
        return parse_dictionary(value, where)
    if not isinstance(value, str) or not value:
        raise IngestError(f"{where}: a path to a data dictionary (YAML) or the dictionary itself, got {value!r}")
    path = inside(folder / value, folder)
    if path is None:
        raise IngestError(
            f"{where}: {value} (real path {real_path(folder / value)}) lies outside the {folder_is} "
            f"{real_path(folder)}; not opened"
        )
    return read_dictionary(path)


# --- encoding a column -------------------------------------------------------------------------


@dataclass
class Encoded:
    """A column's features: values (NaN where missing), what they are, and which rows are wrong."""

    values: np.ndarray  # [rows, features] float64
    features: list[Feature]
    missing: np.ndarray  # [rows] bool: the column is missing in that row
    problems: list[tuple[np.ndarray, str]]  # (rows, why): rows that cannot become samples
    chosen: str = ""  # without a dictionary: the levels this table's frequencies chose, for the report
    observed: int = 0  # distinct observed values (levels, or numbers up to 2): 1 or 0 is a constant column


def encode_numeric(column: pd.Series, name: str, spec: ColumnSpec | None) -> Encoded:
    """A numeric column's raw values: its missing codes and (where the dictionary says so) values
    outside its range become NaN; a cell that is not a number, or out of range, is a row problem."""
    problems: list[tuple[np.ndarray, str]] = []
    if pd.api.types.is_numeric_dtype(column):
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
        if spec is not None and spec.missing:
            values = np.where(np.isin(values, spec.missing_numbers), np.nan, values)
    else:  # text cells (only with a dictionary): its missing codes, else numbers
        codes, cells = distinct_cells(column)
        per_cell = np.full(len(cells), np.nan)
        not_number = np.zeros(len(cells), dtype=bool)
        numbers = set(spec.missing_numbers.tolist()) if spec else set()
        for k, cell in enumerate(cells):
            text = cell_text(cell)
            if text is None or (spec is not None and text in spec.missing):
                continue
            try:
                v = float(text)
            except ValueError:
                not_number[k] = True
                continue
            per_cell[k] = np.nan if v in numbers else v
        values = per_cell[codes]
        if not_number.any():
            problems.append((not_number[codes], f"column {name!r} is not a number"))
    if spec is not None and (spec.low is not None or spec.high is not None):
        low = -np.inf if spec.low is None else spec.low
        high = np.inf if spec.high is None else spec.high
        with np.errstate(invalid="ignore"):
            out = (values < low) | (values > high)
        if spec.out_of_range == "missing":
            values = np.where(out, np.nan, values)
        elif out.any():
            problems.append((out, f"column {name!r} is outside the dictionary's range [{spec.low}, {spec.high}]"))
    feature = Feature(
        name,
        name,
        NUMERIC,
        unit=spec.unit if spec else "",
        low=spec.low if spec else None,
        high=spec.high if spec else None,
    )
    finite = values[np.isfinite(values)]
    observed = 0 if not len(finite) else (1 if finite.min() == finite.max() else 2)
    return Encoded(values[:, None], [feature], np.isnan(values), problems, observed=observed)


def encode_categorical(column: pd.Series, name: str, spec: ColumnSpec | None) -> Encoded:
    """Indicator columns for every level but the reference one (NaN in a row where the column is
    missing). With a dictionary the levels and reference are its own; without, the levels this
    table holds, sorted, with the most frequent as reference (ties: the first in order), which
    `chosen` reports. A value outside the dictionary's levels is a row problem (or missing)."""
    codes, cells = distinct_cells(column)
    texts = [cell_text(c) for c in cells]
    problems: list[tuple[np.ndarray, str]] = []
    chosen = ""
    if spec is None:
        levels, reference, row_level = levels_by_frequency(texts, codes)
        index = {lv: k for k, lv in enumerate(levels)}
        if levels:
            chosen = f"{name}: reference {reference!r}, indicators {[lv for lv in levels if lv != reference]}"
    else:
        index = {lv: k for k, lv in enumerate(spec.levels)}
        cell_level = np.array([_level_index(t, index, spec.missing) for t in texts], dtype=np.int64)
        row_level = cell_level[codes]
        unknown = row_level == -2
        if unknown.any() and spec.unknown_level == "error":
            problems.append((unknown, f"column {name!r} holds a value that is not one of the dictionary's levels"))
        row_level = np.where(unknown, -1, row_level)
        reference, levels = spec.reference, list(spec.levels)
    indicators = [lv for lv in levels if lv != reference]
    missing = row_level < 0
    block = np.zeros((len(column), len(indicators)))
    for j, lv in enumerate(indicators):
        block[:, j] = row_level == index[lv]
    block[missing] = np.nan
    try:
        features = [Feature(f"{name}={lv}", name, INDICATOR, level=lv, low=0.0, high=1.0) for lv in indicators]
    except FeatureError:  # names the column, never the level (a cell's value)
        raise IngestError(f"column {name!r}: a level is too long to name a feature (256 characters at most)") from None
    observed = len(np.unique(row_level[~missing]))
    return Encoded(block, features, missing, problems, chosen, observed)


def _level_index(text: str | None, index: dict[str, int], missing: tuple[str, ...]) -> int:
    """A cell's level (its index), -1 where missing, -2 where it is no level: compared as its text,
    else, where it reads as a whole number ("2.0"), as that number's text ("2")."""
    for t in (text, None if text is None or text in index or text in missing else integral_text(text)):
        if t is None:
            continue
        if t in missing:
            return -1
        if t in index:
            return index[t]
    return -1 if text is None else -2


def levels_by_frequency(texts: list[str | None], codes: np.ndarray) -> tuple[list[str], str, np.ndarray]:
    """(the levels in order, the reference: the most frequent, ties to the first in order, each
    row's level index or -1 where missing) of a column's distinct cell texts and row codes."""
    names = {t for t in texts if t is not None}
    levels = sorted(names, key=level_sort_key(names))
    index = {lv: k for k, lv in enumerate(levels)}
    row_level = np.array([-1 if t is None else index[t] for t in texts], dtype=np.int64)[codes]
    counts = np.bincount(row_level[row_level >= 0], minlength=len(levels))
    reference = levels[int(np.argmax(counts))] if levels else ""  # argmax: the first of the most frequent
    return levels, reference, row_level


def level_sort_key(texts: set[str]) -> Any:
    """Integer levels in numeric order (2 before 10; "01" before "1", ties by text), any other set
    of levels as text."""
    if texts and all(is_integer_text(t) for t in texts):
        return lambda t: (int(t), t)
    return str


# --- the draft ---------------------------------------------------------------------------------


def draft(frame: pd.DataFrame, exclude: set[str]) -> tuple[dict[str, Any], list[str]]:
    """A dictionary drafted from a table, for a person to edit, and the columns left out (with why).
    Numeric columns first (unit "", range = the observed min and max), then categorical ones
    (non-numeric columns, and integer columns of at most DRAFT_MAX_INTEGER_LEVELS values: levels
    sorted, the most frequent as reference); missing codes empty. A column the draft reads as
    ingest without a dictionary would (the same reference level, the same order of indicators)."""
    numeric: dict[str, Any] = {}
    categorical: dict[str, Any] = {}
    left_out: list[str] = []
    for col in frame.columns:
        name = str(col)
        if name in exclude:
            continue
        series = frame[col]
        kind = draft_type(series)
        if kind == NUMERIC_TYPE:
            values = series.to_numpy(dtype=np.float64, na_value=np.nan)
            finite = values[np.isfinite(values)]
            entry: dict[str, Any] = {"type": NUMERIC_TYPE, "unit": ""}
            if len(finite):
                entry["range"] = [_plain(finite.min()), _plain(finite.max())]
            else:
                left_out.append(f"{name} (no value)")
                continue
            entry["missing"] = []
            numeric[name] = entry
            continue
        codes, cells = distinct_cells(series)
        texts = [cell_text(c) for c in cells]
        levels, reference, _ = levels_by_frequency(texts, codes)
        if len(levels) > DRAFT_MAX_TEXT_LEVELS:
            left_out.append(f"{name} ({len(levels)} distinct values: an identifier or free text?)")
            continue
        if len(levels) < 2:
            left_out.append(f"{name} ({'one value' if levels else 'no value'}: nothing to encode)")
            continue
        # a level is written as a number only where every level reads back as its own text: "01"
        # and "-0" would come back as 1 and 0 (and "01" beside "1" as one level twice)
        as_value: Any = int if all(is_integer_text(t) and str(int(t)) == t for t in levels) else str
        categorical[name] = {
            "type": CATEGORICAL_TYPE,
            "levels": [as_value(lv) for lv in levels],
            "reference": as_value(reference),
            "missing": [],
        }
    return {"columns": {**numeric, **categorical}}, left_out


def draft_type(series: pd.Series) -> str:
    """numeric or categorical, by the draft's rule (DRAFT_MAX_INTEGER_LEVELS)."""
    if pd.api.types.is_bool_dtype(series) or not pd.api.types.is_numeric_dtype(series):
        return CATEGORICAL_TYPE
    values = series.to_numpy(dtype=np.float64, na_value=np.nan)
    finite = values[np.isfinite(values)]
    distinct = np.unique(finite)
    if len(distinct) and len(distinct) <= DRAFT_MAX_INTEGER_LEVELS and bool(np.all(distinct == np.round(distinct))):
        return CATEGORICAL_TYPE
    return NUMERIC_TYPE


def _plain(v: float) -> int | float:
    """A number as YAML writes it back exactly: an int where integral, else the float (repr round-trips)."""
    return int(v) if float(v).is_integer() and abs(v) < 2**53 else float(v)


DRAFT_HEADER = """\
# A DRAFT data dictionary, written by `multimed-fl corpus dictionary` from {table}.
# Read and edit it before anyone ingests with it: every hospital encodes its table by this file.
#   numeric:     unit is empty: write it (mg/dL, years). range is the min and max this table holds:
#                widen it to what is plausible, or another hospital's valid values are refused.
#                out_of_range: error (default) or missing.
#   categorical: levels are the values this table holds, sorted; reference (no indicator column) is
#                the most frequent here. Add levels other hospitals have; choose the reference.
#                unknown_level: error (default) or missing.
#   missing:     codes that mean "not recorded" (e.g. -1, 999, unknown); a blank cell always is.
# Rule used: a non-numeric column, or an integer column of at most {max_int} distinct values, is categorical.
"""


def comment_safe(text: str) -> str:
    """`text` for a YAML comment: a line break (or any other control character) inside a column's
    name would end the comment and start YAML of its own; each is written as its escape (\\n)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def write_draft(
    table: Path, out: Path, frame: pd.DataFrame, exclude: set[str], overwrite: bool = False
) -> tuple[Path, dict[str, Any], list[str]]:
    """Write the draft of `frame` (read from `table`) to `out`, commented; an existing file is
    refused unless overwrite. Returns the path, the draft and the columns left out."""
    absent = sorted(exclude - {str(c) for c in frame.columns})
    if absent:
        raise IngestError(f"{table}: no column(s) {absent} (columns: {', '.join(map(str, frame.columns))})")
    body, left_out = draft(frame, exclude)
    if not body["columns"]:
        raise IngestError(f"{table}: no column to describe (left out: {', '.join(left_out) or 'none'})")
    text = DRAFT_HEADER.format(table=comment_safe(table.name), max_int=DRAFT_MAX_INTEGER_LEVELS)
    if exclude:
        text += f"# Not features (label, site, patient, split, excluded): {comment_safe(', '.join(sorted(exclude)))}\n"
    if left_out:
        text += f"# Left out: {comment_safe('; '.join(left_out))}\n"
    text += yaml.safe_dump(body, sort_keys=False, default_flow_style=None, allow_unicode=True, width=100)
    parse_dictionary(yaml.safe_load(text), str(out))  # what a person starts from must itself be valid
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise IngestError(f"{out} already exists; choose another --out, or pass --overwrite to replace it")
        atomic_write_text(out, text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(out, "x") as f:  # exclusive: a file that appeared meanwhile is not replaced
                f.write(text)
        except FileExistsError:
            raise IngestError(f"{out} already exists; choose another --out, or pass --overwrite") from None
    return out, body, left_out


def dictionary_digest(d: DataDictionary) -> dict[str, Any]:
    """What provenance records of the dictionary an ingest used."""
    return {"where": d.where, **({"sha256": d.sha256} if d.sha256 else {}), "columns": len(d.columns)}
