"""Text writers: radiology-style reports and VQA questions over the shared vocabulary.

A text sample is a few *phrases* (a concept token, optionally preceded by a negation) placed
at random among filler words, tail-padded with 0 to 32 tokens. Which synonym expresses each
concept, which fillers appear and how many, are the site's habits (acquisition.py); the
concepts themselves carry the label information.

Reports (disease_classification): fever and cough are mentioned (sometimes negated) at the
same rate in every class; an exposure/contact history is mentioned in 80% of novel
coronavirus pneumonia reports but also in 10% of the others, whose reports often state it
negated ("denies contact", 30%). Questions (medical_vqa): "[ask_presence] [finding] ?" or
"[ask_count] [abnormality] ?", after a few fillers.
"""

from __future__ import annotations

import numpy as np

from federated.core.multimed import PAD_TOKEN
from federated.data.synthetic import vocabulary as voc
from federated.data.synthetic.acquisition import TextAcquisition

REPORT_FILLERS = 14.0  # mean filler words per report at verbosity 1
QUESTION_FILLERS = 4.0
NCP = 2  # disease_classification class index of novel coronavirus pneumonia


def _draw_synonyms(rng: np.random.Generator, n: int, acq: TextAcquisition) -> np.ndarray:
    """[n, concepts] token ids: this sample's chosen synonym for every concept."""
    cdf = np.cumsum(acq.synonym_probs, axis=1)
    u = rng.random((n, len(voc.CONCEPTS)))
    choice = np.minimum((u[:, :, None] >= cdf[None]).sum(axis=2), voc.N_SYNONYMS - 1)
    first = np.array([voc.concept_token(c, 0) for c in voc.CONCEPT_NAMES])
    return first[None, :] + choice


def _compose(
    rng: np.random.Generator,
    phrases: list[list[list[int]]],
    suffixes: list[list[int]],
    mean_fillers: float,
    acq: TextAcquisition,
) -> np.ndarray:
    """Interleave each sample's phrases with site-typical fillers; append its suffix; pad."""
    n = len(phrases)
    cdf = np.cumsum(acq.filler_probs)
    fillers = voc.FIRST_FILLER_TOKEN + np.minimum(
        np.searchsorted(cdf / cdf[-1], rng.random((n, voc.MAX_LEN)), side="right"), voc.N_FILLERS - 1
    )
    n_fill = np.maximum(rng.poisson(mean_fillers * acq.verbosity, size=n), 2)
    slots = rng.random((n, 8))  # where each phrase goes among the fillers
    out = np.full((n, voc.MAX_LEN), PAD_TOKEN, dtype=np.int64)
    for i in range(n):
        used = sum(len(p) for p in phrases[i]) + len(suffixes[i])
        k = int(min(n_fill[i], voc.MAX_LEN - used))
        words: list[int] = fillers[i, :k].tolist()
        at = np.floor(slots[i, : len(phrases[i])] * (k + 1)).astype(int)
        for pos, phrase in sorted(zip(at.tolist(), phrases[i], strict=True), key=lambda z: -z[0]):
            words[pos:pos] = phrase  # insert from the back so earlier positions stay valid
        words += suffixes[i]
        out[i, : len(words)] = words
    return out


def write_reports(rng: np.random.Generator, disease: np.ndarray, acq: TextAcquisition) -> np.ndarray:
    """[n, 32] report tokens for disease_classification class indices `disease`."""
    n = len(disease)
    syn = _draw_synonyms(rng, n, acq)
    u = rng.random((n, 6))
    ncp = disease == NCP
    mention = {
        "exposure": u[:, 0] < np.where(ncp, 0.8, 0.1),
        "fever": u[:, 1] < 0.5,
        "cough": u[:, 2] < 0.5,
    }
    negated = {
        "exposure": ~mention["exposure"] & (u[:, 3] < np.where(ncp, 0.05, 0.3)),
        "fever": ~mention["fever"] & (u[:, 4] < 0.25),
        "cough": ~mention["cough"] & (u[:, 5] < 0.25),
    }
    neg = voc.concept_index("negation")
    phrases: list[list[list[int]]] = [[] for _ in range(n)]
    for concept in ("exposure", "fever", "cough"):
        c = voc.concept_index(concept)
        for i in np.flatnonzero(mention[concept]):
            phrases[i].append([int(syn[i, c])])
        for i in np.flatnonzero(negated[concept]):
            phrases[i].append([int(syn[i, neg]), int(syn[i, c])])
    return _compose(rng, phrases, [[] for _ in range(n)], REPORT_FILLERS, acq)


def write_questions(rng: np.random.Generator, asked: np.ndarray, acq: TextAcquisition) -> np.ndarray:
    """[n, 32] VQA question tokens; asked[i] = finding index, or -1 for "how many findings"."""
    n = len(asked)
    syn = _draw_synonyms(rng, n, acq)
    presence = voc.concept_index("ask_presence")
    count = voc.concept_index("ask_count")
    noun = voc.concept_index("abnormality")
    finding_cols = np.array([voc.concept_index(f) for f in voc.FINDINGS])
    suffixes = []
    for i in range(n):
        q = [syn[i, presence], syn[i, finding_cols[asked[i]]]] if asked[i] >= 0 else [syn[i, count], syn[i, noun]]
        suffixes.append([int(t) for t in q] + [voc.QUESTION_MARK_TOKEN])
    return _compose(rng, [[] for _ in range(n)], suffixes, QUESTION_FILLERS, acq)
