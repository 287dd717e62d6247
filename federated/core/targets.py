"""The fixed words of a corpus schema: the kinds of input and the kinds of target.

These are what code knows how to handle (an encoder family per kind, a loss and metrics per
target type); everything else about a task or modality -- its name, shape, classes, metrics --
is data, declared by the corpus (federated/core/corpus_schema.py).
"""

from __future__ import annotations

# Kinds of input, which decide the encoder family.
IMAGE, SIGNAL, TOKENS, VECTOR = "image", "signal", "tokens", "vector"
KINDS = (IMAGE, SIGNAL, TOKENS, VECTOR)
# Per-sample array rank of each kind: image [C, H, W], signal [C, T], tokens [L], vector [F].
KIND_RANK = {IMAGE: 3, SIGNAL: 2, TOKENS: 1, VECTOR: 1}
KIND_DTYPE = {IMAGE: "float32", SIGNAL: "float32", TOKENS: "int64", VECTOR: "float32"}

# Target types.
BINARY = "binary"
MULTICLASS = "multiclass"
MULTILABEL = "multilabel"
REGRESSION = "regression"
PER_RESIDUE = "per_residue"
CLOSED_SET = "closed_set"
TARGET_TYPES = (BINARY, MULTICLASS, MULTILABEL, REGRESSION, PER_RESIDUE, CLOSED_SET)
# Targets whose scalar label is a class index (argmax / threshold predictions).
CLASS_TARGETS = (BINARY, MULTICLASS, CLOSED_SET)

PAD_TOKEN = 0  # token id 0 is padding in every token modality
IGNORE_LABEL = -1  # per-residue label of a padded position
