"""Real text (clinical reports, VQA questions) -> the token ids of the tokens modality it fills.

The catalogue's `text` modality has a 128-id vocabulary (federated/data/synthetic/vocabulary.py):
0 is padding, then blocks of concept synonyms, "?", then filler words. Real reports use many
words that vocabulary lacks, so:

- a word that is one of the vocabulary's TOKEN_NAMES keeps its id, the id the synthetic
  corpus trained, so a model pre-trained on synthetic text reads "effusion" or "cough" the
  same way in real text;
- any other word is hashed stably (zlib.crc32 of its UTF-8 bytes, never Python's salted
  `hash`) into the ids from FIRST_FILLER_TOKEN up to the modality's declared vocab_size - 1:
  the ids stay inside the model's vocabulary, and the same word gets the same id in every run,
  on every site and machine. A larger declared vocabulary (`notes: {kind: tokens, vocab_size:
  4096}`) gives the hash more room, so fewer words collide.

Words are lowercased; a word is a run of letters/digits, hyphenated words are kept whole
("follow-up") and "?" is a token of its own. Two adjacent words whose hyphenated form is a
vocabulary token are joined first ("how many" -> "how-many", "pleural fluid" ->
"pleural-fluid"), since the vocabulary spells its multi-word synonyms with hyphens. The ids
are truncated to the modality's declared length, or padded with 0.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

from federated.core.corpus_schema import CorpusSchema, Modality, Task
from federated.core.multimed import CATALOGUE, PAD_TOKEN
from federated.core.targets import TOKENS
from federated.data.synthetic.vocabulary import FIRST_FILLER_TOKEN, TOKEN_NAMES

_WORD = re.compile(r"[^\W_]+(?:-[^\W_]+)*|\?")
_IDS = {name: i for i, name in enumerate(TOKEN_NAMES) if i != PAD_TOKEN}
TEXT = CATALOGUE.modality("text")  # the catalogue's text modality: 32 ids of a 128-id vocabulary
# tokens modalities that hold sequences (read by the fasta adapter), not words
SEQUENCE_MODALITIES = ("genomic_sequence", "protein_sequence")


def check_text_modality(modality: Modality) -> None:
    """Refuse, by name, a modality the tokenizer cannot fill: not tokens, or a vocabulary too small
    to keep the clinical vocabulary's ids and leave at least one id for hashed words."""
    if modality.kind != TOKENS:
        raise ValueError(f"modality {modality.name} is {modality.kind}, not tokens: text cannot fill it")
    if modality.vocab_size <= FIRST_FILLER_TOKEN:
        raise ValueError(
            f"modality {modality.name} has vocab_size {modality.vocab_size}; text needs more than "
            f"{FIRST_FILLER_TOKEN} (the clinical vocabulary's ids, then at least one for other words)"
        )


def text_modality(task: Task, schema: CorpusSchema) -> Modality:
    """The tokens input of `task` that text fills: its one tokens input that is not a sequence."""
    names = [m for m in task.inputs if schema.modality(m).kind == TOKENS and m not in SEQUENCE_MODALITIES]
    if len(names) != 1:
        raise ValueError(
            f"task {task.name} needs exactly one tokens input for text (its inputs: {', '.join(task.inputs)})"
        )
    modality = schema.modality(names[0])
    check_text_modality(modality)
    return modality


def words(text: str) -> list[str]:
    """Lowercased words and "?" tokens, adjacent pairs joined when the vocabulary has them."""
    raw = _WORD.findall(str(text).lower())
    out: list[str] = []
    i = 0
    while i < len(raw):
        pair = f"{raw[i]}-{raw[i + 1]}" if i + 1 < len(raw) else ""
        if pair in _IDS:
            out.append(pair)
            i += 2
        else:
            out.append(raw[i])
            i += 1
    return out


def token_id(word: str, vocab_size: int = TEXT.vocab_size) -> int:
    """The vocabulary id of a known word; a stable hash into FIRST_FILLER_TOKEN..vocab_size-1 otherwise."""
    if word in _IDS:
        return _IDS[word]
    return FIRST_FILLER_TOKEN + zlib.crc32(word.encode("utf-8")) % (vocab_size - FIRST_FILLER_TOKEN)


def tokenize(text: str, modality: Modality = TEXT) -> np.ndarray:
    """int64 array of the modality's length: the text's token ids, truncated or padded with 0."""
    check_text_modality(modality)
    length = modality.shape[0]
    ids = [token_id(w, modality.vocab_size) for w in words(text)][:length]
    out = np.full(length, PAD_TOKEN, dtype=np.int64)
    out[: len(ids)] = ids
    return out
