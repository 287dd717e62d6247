"""The bottom layer: the MultiMed vocabulary, registries, config, models, metrics, arrays, I/O and
the message protocol. Imports nothing else of the project."""
