"""The one clinical vocabulary behind every text sample (reports and VQA questions).

Layout of the 128 token ids: 0 is padding; then each *concept* owns a block of synonymous
tokens (4 per concept: "effusion", "fluid", "pleural-fluid", "blunting" all mean effusion);
then "?"; then filler words that carry no label information. Disease reports and VQA
questions draw from the same concepts and fillers, so a shared text encoder transfers
between them, and a site's word-use habits (which synonym, which fillers) apply to both.
"""

from __future__ import annotations

from federated.core.multimed import MULTIMED, PAD_TOKEN

FINDINGS: tuple[str, ...] = MULTIMED.task("radiographic_findings").classes

CONCEPTS: dict[str, tuple[str, ...]] = {
    # radiographic findings (VQA questions name them)
    "atelectasis": ("atelectasis", "collapse", "volume-loss", "atelectatic"),
    "cardiomegaly": ("cardiomegaly", "enlarged-heart", "cardiac-enlargement", "big-heart"),
    "effusion": ("effusion", "fluid", "pleural-fluid", "blunting"),
    "nodule": ("nodule", "mass", "spot", "nodular-opacity"),
    "pneumothorax": ("pneumothorax", "air-leak", "collapsed-lung", "ptx"),
    # disease reports
    "exposure": ("contact", "exposure", "travel", "pcr-positive"),
    "negation": ("no", "denies", "without", "negative-for"),
    "fever": ("fever", "febrile", "pyrexia", "temperature"),
    "cough": ("cough", "coughing", "sputum", "tussis"),
    # question templates
    "ask_presence": ("is-there", "any", "shows", "present"),
    "ask_count": ("how-many", "count", "number-of", "total"),
    "abnormality": ("findings", "abnormalities", "lesions", "signs"),
}
N_SYNONYMS = 4
QUESTION_MARK = "?"

FILLERS: tuple[str, ...] = (
    "the",
    "a",
    "of",
    "and",
    "with",
    "in",
    "on",
    "is",
    "was",
    "for",
    "to",
    "at",
    "this",
    "that",
    "patient",
    "scan",
    "image",
    "study",
    "view",
    "exam",
    "chest",
    "lung",
    "lungs",
    "lobe",
    "left",
    "right",
    "upper",
    "lower",
    "middle",
    "bilateral",
    "mild",
    "moderate",
    "small",
    "stable",
    "noted",
    "seen",
    "observed",
    "appears",
    "compared",
    "prior",
    "history",
    "year",
    "old",
    "male",
    "female",
    "presents",
    "evaluation",
    "follow-up",
    "clinical",
    "impression",
    "report",
    "technique",
    "contrast",
    "portable",
    "ap",
    "pa",
    "supine",
    "please",
    "shown",
    "here",
    "case",
    "day",
    "admission",
    "ward",
    "referred",
    "by",
    "physician",
    "request",
    "routine",
    "screening",
    "indication",
    "comparison",
    "interval",
    "unchanged",
    "otherwise",
    "within",
    "limits",
    "normal-size",
)

TOKEN_NAMES: tuple[str, ...] = (
    "<pad>",
    *(w for syns in CONCEPTS.values() for w in syns),
    QUESTION_MARK,
    *FILLERS,
)
CONCEPT_NAMES: tuple[str, ...] = tuple(CONCEPTS)
_FIRST_CONCEPT_TOKEN = PAD_TOKEN + 1
QUESTION_MARK_TOKEN = _FIRST_CONCEPT_TOKEN + N_SYNONYMS * len(CONCEPTS)
FIRST_FILLER_TOKEN = QUESTION_MARK_TOKEN + 1
N_FILLERS = len(FILLERS)
MAX_LEN = MULTIMED.modality("text").shape[0]

if len(TOKEN_NAMES) != MULTIMED.modality("text").vocab_size:  # the layout must fill the registry's vocab
    raise RuntimeError(
        f"text vocabulary has {len(TOKEN_NAMES)} tokens, the registry says {MULTIMED.modality('text').vocab_size}"
    )
if any(len(s) != N_SYNONYMS for s in CONCEPTS.values()):
    raise RuntimeError(f"every concept needs exactly {N_SYNONYMS} synonyms")


def concept_index(concept: str) -> int:
    return CONCEPT_NAMES.index(concept)


def concept_token(concept: str, synonym: int) -> int:
    """Token id of one synonym of a concept."""
    return _FIRST_CONCEPT_TOKEN + N_SYNONYMS * concept_index(concept) + synonym


def decode(tokens: list[int]) -> str:
    """Human-readable text of a token row (padding dropped), for debugging and docs."""
    return " ".join(TOKEN_NAMES[t] for t in tokens if t != PAD_TOKEN)
