"""Biological sequences: promoters with regulatory motifs, and proteins with 3-state structure.

Genomic (expression_prediction): 128 bases (A, C, G, T = tokens 1-4) drawn from the site's
background composition, with 0-3 planted copies of each of 6 motifs (6-8 bases, drawn per
seed; 4 activators and 2 repressors with weights of magnitude 0.5-1.2). The target (log
expression) is intercept + sum_k weight_k * (occurrences of motif k, counted in the final
sequence, so overlaps and chance matches count honestly) + N(0, 0.5) noise.

Protein (protein_structure): 64 residues (tokens 1-20 in "ACDEFGHIKLMNPQRSTVWY" order) made
of segments: helix (5 + Poisson(5) residues), strand (3 + Poisson(3)), coil (2 + Poisson(3)).
Coil alternates with helix or strand (55/45); a helix or strand is followed by coil with
probability 0.85, else by the other element. Each residue comes from its state's favoured
set with probability 0.6 (helix: AELMQKRH, strand: VIYFWTC, coil: GPNDS), else from the
site's background. Half the chains are shorter than 64 (32-63 residues): their tail is
padding (token 0) with label IGNORE_LABEL (-1).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from federated.core.multimed import IGNORE_LABEL, MULTIMED, PAD_TOKEN, SECONDARY_STRUCTURE
from federated.data.synthetic.acquisition import SequenceAcquisition
from federated.data.synthetic.seeding import rng_for

GENOMIC_LEN = MULTIMED.modality("genomic_sequence").shape[0]
PROTEIN_LEN = MULTIMED.modality("protein_sequence").shape[0]
BASES = "ACGT"
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
MOTIF_SIGNS = np.array([1.0, 1.0, 1.0, -1.0, -1.0, 1.0])
EXPRESSION_NOISE = 0.5
EXPRESSION_INTERCEPT = 1.0

FAVOURED = {"H": "AELMQKRH", "E": "VIYFWTC", "C": "GPNDS"}
EMISSION = 0.6  # probability that a residue comes from its state's favoured set
SEGMENT_BASE = np.array([5, 3, 2])  # minimum segment length of H, E, C
SEGMENT_EXTRA = np.array([5.0, 3.0, 3.0])  # Poisson mean added to it
N_SEGMENTS = 30  # enough segments to always cover 64 residues (minimum 2 + 3 per pair)
H, E, C = (SECONDARY_STRUCTURE.index(s) for s in ("H", "E", "C"))


@dataclass(frozen=True)
class GenomicWorld:
    motifs: tuple[np.ndarray, ...]  # token arrays
    weights: np.ndarray  # effect of one occurrence on log expression


@lru_cache(maxsize=8)
def genomic_world(seed: int) -> GenomicWorld:
    rng = rng_for(seed, "world", "genomic")
    lengths = rng.integers(6, 9, size=len(MOTIF_SIGNS))
    motifs = tuple(rng.integers(1, 5, size=length).astype(np.int64) for length in lengths)
    return GenomicWorld(motifs=motifs, weights=MOTIF_SIGNS * rng.uniform(0.5, 1.2, len(MOTIF_SIGNS)))


def count_motif(seqs: np.ndarray, motif: np.ndarray) -> np.ndarray:
    """Occurrences of `motif` in each row of `seqs` (overlapping matches count)."""
    windows = sliding_window_view(seqs, len(motif), axis=1)
    return (windows == motif).all(axis=-1).sum(axis=1)


def _categorical(rng: np.random.Generator, probs: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Vectorised draws from one categorical distribution (inverse CDF)."""
    cdf = np.cumsum(probs)
    return np.minimum(np.searchsorted(cdf / cdf[-1], rng.random(size), side="right"), len(probs) - 1)


def sample_promoters(
    rng: np.random.Generator, n: int, world: GenomicWorld, acq: SequenceAcquisition
) -> tuple[np.ndarray, np.ndarray]:
    """([n, 128] int64 base tokens, [n] float32 log expression)."""
    seqs = 1 + _categorical(rng, acq.base_probs, (n, GENOMIC_LEN))
    copies = np.minimum(rng.poisson(0.8, size=(n, len(world.motifs))), 3)
    for k, motif in enumerate(world.motifs):
        for j in range(3):
            starts = rng.integers(0, GENOMIC_LEN - len(motif) + 1, size=n)
            rows = np.flatnonzero(copies[:, k] > j)
            seqs[rows[:, None], starts[rows, None] + np.arange(len(motif))] = motif
    counts = np.stack([count_motif(seqs, m) for m in world.motifs], axis=1)
    target = EXPRESSION_INTERCEPT + counts @ world.weights + rng.normal(0.0, EXPRESSION_NOISE, size=n)
    return seqs.astype(np.int64), target.astype(np.float32)


def _favoured_table() -> tuple[np.ndarray, np.ndarray]:
    """[3, 8] favoured residue tokens per state (row-padded) and each row's real length."""
    table = np.zeros((3, max(len(v) for v in FAVOURED.values())), dtype=np.int64)
    sizes = np.zeros(3, dtype=np.int64)
    for state, residues in FAVOURED.items():
        i = SECONDARY_STRUCTURE.index(state)
        table[i, : len(residues)] = [1 + AMINO_ACIDS.index(r) for r in residues]
        sizes[i] = len(residues)
    return table, sizes


def sample_proteins(rng: np.random.Generator, n: int, acq: SequenceAcquisition) -> tuple[np.ndarray, np.ndarray]:
    """([n, 64] int64 residue tokens, [n, 64] int64 labels H=0/E=1/C=2, -1 on padding)."""
    u = rng.random((n, N_SEGMENTS))
    states = np.empty((n, N_SEGMENTS), dtype=np.int64)
    states[:, 0] = C
    for j in range(1, N_SEGMENTS):  # a Markov chain over segments, vectorised over proteins
        prev = states[:, j - 1]
        from_coil = np.where(u[:, j] < 0.55, H, E)
        from_element = np.where(u[:, j] < 0.85, C, np.where(prev == H, E, H))
        states[:, j] = np.where(prev == C, from_coil, from_element)
    lengths = SEGMENT_BASE[states] + rng.poisson(SEGMENT_EXTRA[states])
    ends = np.cumsum(lengths, axis=1)
    segment = (ends[:, :, None] <= np.arange(PROTEIN_LEN)[None, None, :]).sum(axis=1)
    labels = np.take_along_axis(states, segment, axis=1)

    table, sizes = _favoured_table()
    pick = (rng.random((n, PROTEIN_LEN)) * sizes[labels]).astype(np.int64)
    favoured = table[labels, pick]
    background = 1 + _categorical(rng, np.exp(acq.residue_logit_shift), (n, PROTEIN_LEN))
    tokens = np.where(rng.random((n, PROTEIN_LEN)) < EMISSION, favoured, background)

    chain_len = np.where(rng.random(n) < 0.5, PROTEIN_LEN, rng.integers(32, PROTEIN_LEN, size=n))
    pad = np.arange(PROTEIN_LEN)[None, :] >= chain_len[:, None]
    tokens[pad] = PAD_TOKEN
    labels[pad] = IGNORE_LABEL
    return tokens.astype(np.int64), labels.astype(np.int64)
