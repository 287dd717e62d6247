"""MkDocs hook: the pages generated from the code and from experiments/results/, made at build time.

reference/config.md, reference/cli.md (gen_reference.py), reference/registries.md
(gen_registries.py) and every page under results/ (gen_results.py) are added to the build's
files, never written under docs/, so they cannot go stale; a committed copy of one would be a
second source and stops the build.
The Results section of the nav is extended here with one entry per results page.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gen_reference
import gen_registries
import gen_results
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.reference")
RESULTS_NAV_TITLE = "Results"
HISTORY = "results/history.md"  # a written page (docs/results/history.md), listed when present


def _root(config: MkDocsConfig) -> Path:
    return Path(config.config_file_path).resolve().parent


def _results(config: MkDocsConfig) -> gen_results.ResultsSite:
    history = Path(config.docs_dir) / HISTORY
    return gen_results.results_site(_root(config), history if history.is_file() else None)


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Add the results pages to the nav's Results section, after its index."""
    section = next(
        (entry for entry in config.nav or [] if isinstance(entry, dict) and RESULTS_NAV_TITLE in entry), None
    )
    if section is None:
        raise PluginError(f"mkdocs.yml: the nav has no '{RESULTS_NAV_TITLE}' section for the results pages")
    entries: list[Any] = section[RESULTS_NAV_TITLE]
    section[RESULTS_NAV_TITLE] = [*entries, *_results(config).nav]
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the generated pages and the results' images and data files."""
    root = _root(config)
    pages = {
        "reference/config.md": gen_reference.config_page(root / "conf"),
        "reference/cli.md": gen_reference.cli_page(),
        "reference/registries.md": gen_registries.registries_page(),
    }
    site = _results(config)
    pages.update(site.pages)
    for uri in [*pages, *site.files]:
        if files.get_file_from_path(uri) is not None:
            raise PluginError(f"docs/{uri} is generated when the site is built; remove the committed copy")
    for uri, text in pages.items():
        files.append(File.generated(config, uri, content=text))
    for uri, path in site.files.items():
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    log.debug("generated %d pages and %d files", len(pages), len(site.files))
    return files
