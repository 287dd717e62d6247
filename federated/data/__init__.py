"""Corpora: the on-disk format, the synthetic MultiMed generator, and (later) ingest adapters."""

from federated.data.format import Corpus, CorpusFormatError, write_corpus

__all__ = ["Corpus", "CorpusFormatError", "write_corpus"]
