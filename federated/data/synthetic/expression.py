"""Single-cell RNA expression: cell types as gene programs, sampled as overdispersed counts.

The world (per seed) has 256 genes with a baseline log-rate, three lineages with 16 lineage
markers each (types 0-3, 4-6 and 7-9), and 8 type markers per type drawn from the remaining
genes (so markers overlap by chance, and sibling types differ only by their type markers).
A cell-cycle program switches on in ~30% of cells regardless of type (a nuisance). A cell's
counts are Poisson(library size x gamma noise x softmax(log-rates)), then normalised to
1,000 counts and log1p-transformed, as in a standard scRNA pipeline. The site acts through
gene-wise log-scale batch effects and its sequencing depth (acquisition.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from federated.core.multimed import MULTIMED
from federated.data.synthetic.acquisition import ExpressionAcquisition
from federated.data.synthetic.seeding import rng_for

N_GENES = MULTIMED.modality("scrna").shape[0]
N_TYPES = len(MULTIMED.task("cell_type").classes)
LINEAGE_OF_TYPE = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
MEAN_LIBRARY = 1000.0
NORMALISED_DEPTH = 1000.0
DISPERSION_SHAPE = 4.0  # gamma shape of the per-gene biological noise (negative binomial)


@dataclass(frozen=True)
class ExpressionWorld:
    baseline: np.ndarray  # [genes] log-rate
    programs: np.ndarray  # [types, genes] log-fold changes of lineage + type markers
    cycling: np.ndarray  # [genes] log-fold change of the cell-cycle program


@lru_cache(maxsize=8)
def expression_world(seed: int) -> ExpressionWorld:
    rng = rng_for(seed, "world", "scrna")
    genes = rng.permutation(N_GENES)
    lineage_markers = genes[:48].reshape(3, 16)
    rest = genes[48:]
    programs = np.zeros((N_TYPES, N_GENES))
    for t in range(N_TYPES):
        programs[t, lineage_markers[LINEAGE_OF_TYPE[t]]] += 1.2
        markers = rng.choice(rest, size=8, replace=False)
        programs[t, markers] += rng.uniform(0.5, 1.1, size=8)
    cycling = np.zeros(N_GENES)
    cycling[rng.choice(rest, size=16, replace=False)] = 1.2
    return ExpressionWorld(baseline=rng.normal(0.0, 0.8, N_GENES), programs=programs, cycling=cycling)


def sample_cells(
    rng: np.random.Generator, cell_type: np.ndarray, world: ExpressionWorld, acq: ExpressionAcquisition
) -> np.ndarray:
    """[n, genes] log1p-normalised expression (float32) of cells of the given types."""
    n = len(cell_type)
    cycling = (rng.random(n) < 0.3) * rng.uniform(0.5, 1.0, n)
    log_rate = (
        world.baseline[None]
        + world.programs[cell_type]
        + cycling[:, None] * world.cycling[None]
        + acq.gene_log_shift[None]
    )
    p = np.exp(log_rate - log_rate.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    library = MEAN_LIBRARY * acq.library_factor * np.exp(rng.normal(0.0, 0.35, n))
    noise = rng.gamma(DISPERSION_SHAPE, 1.0 / DISPERSION_SHAPE, size=(n, N_GENES))
    counts = rng.poisson(library[:, None] * p * noise)
    total = np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return np.log1p(counts / total * NORMALISED_DEPTH).astype(np.float32)
