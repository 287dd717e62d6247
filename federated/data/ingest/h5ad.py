"""`h5ad`: single-cell expression in an AnnData `.h5ad` file, cell-type labels from `obs`.

    - adapter: h5ad
      task: cell_type
      path: data/pbmc.h5ad
      label_key: bulk_labels          # obs column with each cell's type
      classes: {CD14+ Monocyte: type_0, Dendritic: type_1, ...}   # source label -> task class
      layer: X                        # X (default), raw (the file's .raw.X) or a name in .layers
      genes: top_variance             # top_variance (default), highly_variable, or a list of names
      dictionary: dictionary.yaml     # a data dictionary's `genes:` list (relative to the spec;
                                      # default: the spec's `dictionary:` when it lists genes)
      site_key: donor                 # obs column -> origin_site (natural sites); optional
      patient_key: donor              # obs column -> patient_id; default: the cell's barcode
      modality: scrna                 # default: the task's first vector input

The vector modality holds as many genes as its declared shape says (the catalogue's `scrna`:
256; `modalities: {scrna: {features: 2000}}` changes it): `top_variance` keeps that many most
variable genes of the chosen layer, `highly_variable` the file's var['highly_variable'] genes
(at most that many, by variance), a list keeps those genes in that order. Fewer genes than
the width are zero-padded. Gene selection looks at every cell of the file (all sites must share
the same columns).

The genes are the modality's features (`Feature(gene, gene, numeric)`, one per column, a gene the
file lacks included), in the corpus's schema, so the handshake refuses two hospitals whose
columns hold different genes, naming the first that differs. Like a table's, the expression is
stored as read, and a run standardises it at load time with the statistics
`preprocess.statistics` names (federated by default); so the old `scale:` key (each site's own
means and SDs, at ingest) is refused. A cell with a NaN or infinite value is a problem, never
stored: the genes declare no imputation.

Top-variance and highly-variable genes are each file's own choice: two hospitals' files pick
different genes for the same columns. A data dictionary's `genes:` list fixes them: the columns
are its genes in its order, whatever the file holds; a gene the file lacks is a column of zeros,
named in the ingest report (a warning, so a hospital whose panel lacks a gene can still take
part). The dictionary replaces `genes:` (a source giving both is refused).

The file is opened backed (anndata's read-only mode) and X (or raw.X) is read in blocks of rows:
one pass for the gene variances, one for the chosen genes, so an atlas-size file needs memory for
one block and the cells x width result, not for the whole matrix. Backed mode keeps only X and raw.X
on disk: anndata 0.12 loads `layers` (and obsm, uns) into memory, so `layer: NAME` holds that
layer, and any file with large layers pays for them. Read with anndata (extra `h5ad`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from federated.core.corpus_schema import CorpusSchema, Task
from federated.core.features import NUMERIC, Feature, FeatureError
from federated.core.targets import VECTOR
from federated.data.ingest.core import (
    IngestError,
    Problems,
    SampleSet,
    adapter,
    check_classes,
    error_reason,
    filled_modality,
    optional_import,
    resolve,
)
from federated.data.ingest.dictionary import DataDictionary, dictionary_at, dictionary_digest

GENE_MODES = ("top_variance", "highly_variable")
SCALE_RETIRED = (
    "ingest no longer standardises expression: it stores the values as read (the genes are the "
    "modality's features), and the statistics that standardise them at load time are the run's "
    "setting `preprocess.statistics` (federated, per_site or pooled); remove `scale:` from the source"
)


# values per block of rows: 32 MB as float64, whatever the file's width
BLOCK_VALUES = 1 << 22


def _matrix(data: Any, layer: str, path: Path) -> tuple[Any, list[str]]:
    """The chosen layer, still on disk (backed), with its gene names."""
    if layer == "X":
        return data.X, list(data.var_names)
    if layer == "raw":
        if data.raw is None:
            raise ValueError(f"{path}: layer raw asked for, but the file has no .raw")
        return data.raw.X, list(data.raw.var_names)
    if layer not in data.layers:
        raise ValueError(f"{path}: no layer {layer!r} (layers: X, raw, {', '.join(data.layers)})")
    return data.layers[layer], list(data.var_names)


def _blocks(matrix: Any, block_values: int):
    """(start, dense float64 block of rows) over a backed dense or sparse matrix."""
    n_cells, n_genes = matrix.shape
    step = max(1, block_values // max(1, n_genes))
    for start in range(0, n_cells, step):
        block = matrix[start : start + step]
        block = block.toarray() if hasattr(block, "toarray") else np.asarray(block)
        yield start, block.astype(np.float64)


def _variances(matrix: Any, block_values: int) -> np.ndarray:
    """Per-gene variance over the cells, ignoring NaN (sums of x and x^2 in float64)."""
    n = np.zeros(matrix.shape[1])
    total, squares = np.zeros(matrix.shape[1]), np.zeros(matrix.shape[1])
    for _, block in _blocks(matrix, block_values):
        finite = np.isfinite(block)
        block = np.where(finite, block, 0.0)
        n += finite.sum(axis=0)
        total += block.sum(axis=0)
        squares += (block * block).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / n
        return np.maximum(squares / n - mean * mean, 0.0)


def _select_genes(
    matrix: Any, genes: list[str], data: Any, how: Any, width: int, path: Path, block_values: int, modality: str
) -> list[int]:
    if isinstance(how, (list, tuple)):
        index = {g: i for i, g in enumerate(genes)}
        missing = [g for g in how if g not in index]
        if missing:
            raise ValueError(f"{path}: genes not in the file: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if len(how) > width:
            raise ValueError(f"{len(how)} genes listed; the {modality} modality holds {width}")
        return [index[g] for g in how]
    if how not in GENE_MODES:
        raise ValueError(f"genes must be one of {GENE_MODES} or a list of gene names (got {how!r})")
    candidates = np.arange(len(genes))
    if how == "highly_variable":
        if "highly_variable" not in data.var:
            raise ValueError(f"{path}: genes: highly_variable, but var has no 'highly_variable' column")
        flags = data.var["highly_variable"].reindex(genes).fillna(False).to_numpy(dtype=bool)
        candidates = np.flatnonzero(flags)
    variance = np.nan_to_num(_variances(matrix, block_values)[candidates], nan=-1.0)
    order = np.argsort(-variance, kind="stable")[:width]
    return sorted(int(candidates[j]) for j in order)  # keep the file's gene order


def _columns(matrix: Any, columns: list[int], block_values: int) -> np.ndarray:
    out = np.empty((matrix.shape[0], len(columns)))
    for start, block in _blocks(matrix, block_values):
        out[start : start + len(block)] = block[:, columns]
    return out


@adapter(
    "h5ad",
    keys={
        "path",
        "label_key",
        "classes",
        "layer",
        "genes",
        "site_key",
        "patient_key",
        "origin_site",
        "modality",
        "dictionary",
    },
    fills=VECTOR,
    retired={"scale": SCALE_RETIRED},
    dictionary="genes",
)
def h5ad(params: dict[str, Any], base: Path, problems: Problems, schema: CorpusSchema) -> SampleSet:
    """One sample per labelled cell, its chosen genes' values as read; the genes in the schema."""
    if "scale" in params:
        raise ValueError(f"`scale`: {SCALE_RETIRED}")
    task = schema.task(params["task"])
    modality = filled_modality(task, schema, VECTOR, params)
    dictionary = _gene_dictionary(params, base)
    anndata = optional_import("anndata", "h5ad")
    path = resolve(base, params)
    samples = SampleSet(task.name, schema)
    if not path.is_file():
        problems.report(path, "file does not exist")
        return samples
    try:
        data = anndata.read_h5ad(path, backed="r")
    except Exception as e:  # h5py/anndata raise many types for a truncated or foreign file
        problems.report(path, f"unreadable or corrupt .h5ad ({error_reason(e)})")
        return samples
    try:
        return _cells(data, params, task, modality, path, samples, problems, dictionary)
    finally:
        data.file.close()


def _cells(
    data: Any,
    params: dict[str, Any],
    task: Task,
    modality: str,
    path: Path,
    samples: SampleSet,
    problems: Problems,
    dictionary: DataDictionary | None = None,
) -> SampleSet:
    """The file's cells as samples filling `modality`: checked obs keys and classes, the chosen
    genes (the dictionary's, where given), one row per usable cell."""
    label_key = _obs_keys(data, params, path)
    mapping = _class_mapping(params, task)
    width = samples.schema.modality(modality).shape[0]
    matrix, genes = _matrix(data, str(params.get("layer", "X")), path)
    try:
        if dictionary is not None:
            columns, x = _dictionary_genes(matrix, genes, dictionary, width, path, modality, problems)
        else:
            how = params.get("genes", "top_variance")
            columns = _select_genes(matrix, genes, data, how, width, path, BLOCK_VALUES, modality)
            x = _columns(matrix, columns, BLOCK_VALUES)
    except (OSError, RuntimeError, KeyError) as e:  # h5py's errors for a damaged block
        problems.report(path, f"unreadable expression matrix ({error_reason(e)})")
        return samples
    cells = list(map(str, data.obs_names))
    labels = data.obs[label_key].astype(object).tolist()
    sites = data.obs[params["site_key"]].astype(str).tolist() if params.get("site_key") else None
    patients = data.obs[params["patient_key"]].astype(str).tolist() if params.get("patient_key") else cells
    names: list[str | None] = [  # the task class of each cell that becomes a sample
        _cell_class(labels[i], x[i], mapping, task, label_key, f"{path} cell {cell}", problems)
        for i, cell in enumerate(cells)
    ]
    ok = np.array([n is not None for n in names], dtype=bool)
    default_site = str(params.get("origin_site", path.stem))
    for i in map(int, np.flatnonzero(ok)):
        row = np.zeros(width, dtype=np.float32)
        row[: x.shape[1]] = x[i]
        site = sites[i] if sites else default_site
        samples.add({modality: row}, task.classes.index(str(names[i])), site, patients[i], f"h5ad:{path.name}")
    check_classes(samples, {str(v) for v in mapping.values()}, str(path), problems)
    chosen = list(dictionary.genes) if dictionary is not None else [genes[j] for j in columns]
    samples.notes["genes"] = chosen
    if dictionary is not None:
        samples.notes["dictionary"] = dictionary_digest(dictionary)
    samples.features[modality] = (gene_features(chosen, path), "")  # "": no NaN is ever stored
    return samples


def gene_features(genes: list[str], path: Path) -> tuple[Feature, ...]:
    """One numeric feature per gene column, named after the gene. A gene named twice among the
    chosen columns (a file whose var_names repeat) is refused: a feature is named once."""
    twice = sorted(g for g, k in Counter(genes).items() if k > 1)
    if twice:
        raise IngestError(
            f"{path}: gene(s) {twice[:10]} name more than one chosen column; make the file's var_names unique "
            "(anndata's var_names_make_unique) or list the genes"
        )
    try:
        return tuple(Feature(g, g, NUMERIC) for g in genes)
    except FeatureError as e:
        raise IngestError(f"{path}: {e}") from None


def _gene_dictionary(params: dict[str, Any], base: Path) -> DataDictionary | None:
    """The dictionary whose genes fix the columns (a source called outside a spec names it
    relative to the data root); refused with `genes:` too, or without genes."""
    if params.get("dictionary") is None:
        return None
    dictionary = dictionary_at(params["dictionary"], base, folder_is="data root")
    if not dictionary.genes:
        raise ValueError(f"the data dictionary {dictionary.where} lists no genes")
    if "genes" in params:
        raise ValueError(
            f"both `genes:` and the data dictionary {dictionary.where}'s genes choose the columns; remove `genes:`"
        )
    return dictionary


def _dictionary_genes(
    matrix: Any,
    genes: list[str],
    dictionary: DataDictionary,
    width: int,
    path: Path,
    modality: str,
    problems: Problems,
) -> tuple[list[int], np.ndarray]:
    """The dictionary's genes as columns, in its order: (the file's column of each gene present,
    the cells x genes values, zeros for a gene the file lacks, which the report names)."""
    if len(dictionary.genes) > width:
        raise IngestError(
            f"{path}: the data dictionary {dictionary.where} lists {len(dictionary.genes)} genes; "
            f"the {modality} modality holds {width}"
        )
    index = {g: i for i, g in enumerate(genes)}
    present = [k for k, g in enumerate(dictionary.genes) if g in index]
    absent = [g for g in dictionary.genes if g not in index]
    if absent:
        problems.warn(
            path,
            f"{len(absent)} of the data dictionary's {len(dictionary.genes)} genes are not in the file "
            f"({', '.join(absent[:10])}{' ...' if len(absent) > 10 else ''}): their columns are zeros",
        )
    columns = [index[dictionary.genes[k]] for k in present]
    x = np.zeros((matrix.shape[0], len(dictionary.genes)))
    x[:, present] = _columns(matrix, columns, BLOCK_VALUES)
    return columns, x


def _obs_keys(data: Any, params: dict[str, Any], path: Path) -> Any:
    """The label key, after checking that it and the site and patient keys name obs columns."""
    label_key = params.get("label_key")
    if not label_key:
        raise ValueError("missing key 'label_key' (the obs column holding each cell's type)")
    for key in [label_key, *(params[k] for k in ("site_key", "patient_key") if params.get(k))]:
        if key not in data.obs:
            raise ValueError(f"{path}: no obs column {key!r} (obs: {', '.join(map(str, data.obs.columns))})")
    return label_key


def _class_mapping(params: dict[str, Any], task: Task) -> dict[Any, Any]:
    """Source label -> task class; a target that is not a class of the task is refused up front."""
    mapping = dict(params.get("classes") or {})
    wrong = sorted({str(v) for v in mapping.values()} - set(task.classes))
    if wrong:
        raise ValueError(f"classes maps to {wrong}, which are not classes of {task.name} ({', '.join(task.classes)})")
    return mapping


def _cell_class(
    raw: Any,
    expression: np.ndarray,
    mapping: dict[Any, Any],
    task: Task,
    label_key: str,
    where: str,
    problems: Problems,
) -> str | None:
    """The cell's task class, or None after reporting why the cell cannot be a sample."""
    if raw is None or (isinstance(raw, float) and np.isnan(raw)):
        problems.report(where, f"label ({label_key}) is missing")
        return None
    name = mapping.get(raw, mapping.get(str(raw), raw))
    if name not in task.classes:
        problems.report(
            where,
            f"label ({label_key}) is not a class of {task.name} ({', '.join(task.classes)}); map it with `classes:`",
        )
        return None
    if not np.isfinite(expression).all():
        problems.report(where, "expression has NaN or infinite values")
        return None
    return str(name)
