"""Ingest: turn datasets in the formats they ship in into the corpus format.

`multimed-fl corpus ingest SPEC.yaml --out DIR` reads a spec (federated/data/ingest/spec.py),
settles the corpus's schema (MultiMed's catalogue plus the spec's own `modalities:`, `tasks:`
and shapes: federated/data/ingest/declare.py), runs one adapter per source (ADAPTERS; each
format its own module, filling each modality at its declared shape), and writes one corpus,
atomically (federated/data/format.write_corpus: a temporary folder renamed at the end, so a
failed ingest leaves nothing behind). Every problem is checked in the manner of nnU-Net's
dataset check and reported naming the file (and row): missing or unreadable files, labels
outside the task's classes, NaNs, wrong shapes, classes with no sample. By default the first
problem stops the ingest; with `on_error: skip` each bad item is skipped and listed, with its
reason, in the corpus's spec (provenance.skipped) and on the console.
"""

from federated.data.ingest.core import ADAPTERS, IngestError, Problems, SampleSet, ingest

__all__ = ["ADAPTERS", "IngestError", "Problems", "SampleSet", "ingest"]

# Importing an adapter module registers it.
from federated.data.ingest import ct_slices as _ct_slices  # noqa: F401
from federated.data.ingest import eeg_edf as _eeg_edf  # noqa: F401
from federated.data.ingest import fasta as _fasta  # noqa: F401
from federated.data.ingest import h5ad as _h5ad  # noqa: F401
from federated.data.ingest import image_folders as _image_folders  # noqa: F401
from federated.data.ingest import images_csv as _images_csv  # noqa: F401
from federated.data.ingest import tabular as _tabular  # noqa: F401
from federated.data.ingest import vqa as _vqa  # noqa: F401
