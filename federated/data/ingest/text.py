"""Real text (clinical reports, VQA questions) -> the `text` modality's 32 token ids.

The model's text encoder has a 128-id vocabulary (federated/data/synthetic/vocabulary.py):
0 is padding, then blocks of concept synonyms, "?", then filler words. Real reports use many
words that vocabulary lacks, so:

- a word that is one of the vocabulary's TOKEN_NAMES keeps its id, the id the synthetic
  corpus trained, so a model pre-trained on synthetic text reads "effusion" or "cough" the
  same way in real text;
- any other word is hashed stably (zlib.crc32 of its UTF-8 bytes, never Python's salted
  `hash`) into the filler id range FIRST_FILLER_TOKEN..127: the ids stay inside the model's
  vocabulary, and the same word gets the same id in every run, on every site and machine.

Words are lowercased; a word is a run of letters/digits, hyphenated words are kept whole
("follow-up") and "?" is a token of its own. Two adjacent words whose hyphenated form is a
vocabulary token are joined first ("how many" -> "how-many", "pleural fluid" ->
"pleural-fluid"), since the vocabulary spells its multi-word synonyms with hyphens. The ids
are truncated to 32, or padded with 0.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

from federated.core.multimed import PAD_TOKEN, modality
from federated.data.synthetic.vocabulary import FIRST_FILLER_TOKEN, MAX_LEN, TOKEN_NAMES

_WORD = re.compile(r"[^\W_]+(?:-[^\W_]+)*|\?")
_IDS = {name: i for i, name in enumerate(TOKEN_NAMES) if i != PAD_TOKEN}
_N_HASHED = modality("text").vocab_size - FIRST_FILLER_TOKEN


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


def token_id(word: str) -> int:
    """The vocabulary id of a known word; a stable hash into the filler range otherwise."""
    if word in _IDS:
        return _IDS[word]
    return FIRST_FILLER_TOKEN + zlib.crc32(word.encode("utf-8")) % _N_HASHED


def tokenize(text: str) -> np.ndarray:
    """int64 array of shape (32,): the text's token ids, truncated or padded with 0."""
    ids = [token_id(w) for w in words(text)][:MAX_LEN]
    out = np.full(MAX_LEN, PAD_TOKEN, dtype=np.int64)
    out[: len(ids)] = ids
    return out
