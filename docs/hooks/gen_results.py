"""The results pages, generated from `experiments/results/` when the site is built.

One page per folder of recorded results (a study, the benchmarks, ...) and per loose table: its
Markdown reports as written, its images beside it (so a report's `![](scores.png)` works in the
site), links to its data files (copied too), and the command that wrote it. The recorded files
stay the one source; nothing here is committed under docs/. No mkdocs import: the fast tests
build the same pages in-process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

IMAGES = {".png", ".jpg", ".jpeg", ".svg", ".gif"}
MAIN_REPORTS = ("report.md", "README.md")  # a folder's main page, where it has one
PREFIX = "results"  # where the pages go in the site
NAV_TITLE_MAX = 30  # a report's own title names its nav entry when it is this short; else the folder's name
ACRONYMS = {"ood": "OOD", "id": "ID", "dp": "DP", "fl": "FL"}


@dataclass
class ResultsSite:
    """What the build adds under results/: pages (uri -> Markdown), files to copy (uri -> source),
    and the nav entries that follow results/index.md."""

    pages: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    nav: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class Unit:
    """One page: a folder of results, or one loose Markdown table with its data files."""

    rel: str  # the folder, or the table file, relative to experiments/results
    markdown: tuple[Path, ...]
    other: tuple[Path, ...]  # images and data files shown or linked on the page
    uri: str


def humanise(name: str) -> str:
    """leave_one_site_out -> Leave one site out; ood_methods -> OOD methods."""
    words = [ACRONYMS.get(w, w) for w in name.replace("-", "_").split("_") if w]
    text = " ".join(words)
    return text[:1].upper() + text[1:]


def results_site(root: Path, history: Path | None = None) -> ResultsSite:
    """The pages for `root`/experiments/results (`root` is the repository); `history`: a committed
    page (docs/results/history.md) listed after the index."""
    results = root / "experiments" / "results"
    site = ResultsSite()
    units = list(_units(results))
    for unit in units:
        site.pages[unit.uri] = _page(unit, root)
        base = unit.uri.rsplit("/", 1)[0]
        for path in unit.other:
            site.files[f"{base}/{path.name}"] = path
    site.pages[f"{PREFIX}/index.md"] = _index(units, root, history is not None)
    if history is not None:
        site.nav.append({"History": f"{PREFIX}/history.md"})
    site.nav += _nav(units)
    return site


def _units(results: Path) -> list[Unit]:
    """The folders (studies first), then the loose tables with the data files of their family."""
    units = []
    folders = sorted(p.relative_to(results) for p in results.rglob("*") if p.is_dir())
    for folder in sorted((results / f for f in folders), key=lambda p: p.relative_to(results).parts[0] != "studies"):
        files = sorted(p for p in folder.iterdir() if p.is_file())
        if not files:
            continue
        md = sorted((p for p in files if p.suffix == ".md"), key=lambda p: (p.name not in MAIN_REPORTS, p.name))
        rel = folder.relative_to(results).as_posix()
        units.append(Unit(rel, tuple(md), tuple(p for p in files if p.suffix != ".md"), f"{PREFIX}/{rel}/index.md"))
    loose = sorted(p for p in results.iterdir() if p.is_file())
    for table in (p for p in loose if p.suffix == ".md"):
        key = _family(table.stem)
        data = tuple(p for p in loose if p.suffix != ".md" and _family(p.stem) == key)
        units.append(Unit(table.name, (table,), data, f"{PREFIX}/{table.stem}.md"))
    return units


def _family(stem: str) -> str:
    """strategies_table and strategies_results are one family: the stem less its last word."""
    return stem.rsplit("_", 1)[0]


def _page(unit: Unit, root: Path) -> str:
    texts = [p.read_text() for p in unit.markdown]
    title, first = _split_title(texts[0]) if texts else ("", "")
    name = Path(unit.rel).stem
    out = [f"# {title or humanise(name)}", "", _provenance(unit, root), ""]
    if first.strip():
        out += [first.strip(), ""]
    for path, text in zip(unit.markdown[1:], texts[1:], strict=True):
        body = text.strip()
        if body and body not in first:  # a summary the report already quotes is not shown twice
            out += [f"## {path.name}", "", _demote(body), ""]
    shown = "\n".join(texts)
    for path in unit.other:
        if path.suffix.lower() in IMAGES and f"]({path.name})" not in shown:
            out += [f"![{path.stem}]({path.name})", ""]
    data = [p for p in unit.other if p.suffix.lower() not in IMAGES]
    if data:
        out += ["Data: " + ", ".join(f"[{p.name}]({p.name})" for p in data), ""]
    return "\n".join(out)


def _split_title(text: str) -> tuple[str, str]:
    """(the first-level heading, the rest) of a Markdown text that starts with one, else ('', text)."""
    match = re.match(r"\s*# (.+)\n", text)
    return (match.group(1).strip(), text[match.end() :]) if match else ("", text)


def _demote(text: str) -> str:
    """Headings one level down, so a second report's sections sit under its own heading."""
    return re.sub(r"^(#{1,5}) ", r"#\1 ", text, flags=re.MULTILINE)


def _provenance(unit: Unit, root: Path) -> str:
    where = f"`experiments/results/{unit.rel}`"
    command, _ = producer(unit, root)
    said = "\n".join(p.read_text() for p in unit.markdown)
    if "Command:" in said or (command and " ".join(command.split()[:2]) in said):  # the report says it itself
        command = ""
    return f"Recorded in {where}" + (f"; written by `{command}`." if command else ".")


def producer(unit: Unit, root: Path) -> tuple[str, str]:
    """(the command that writes a unit's results, a one-line description) from what lies in
    experiments/: a study's YAML, the benchmarks, or the script whose name the unit's name holds."""
    experiments = root / "experiments"
    parts = Path(unit.rel).parts
    if parts[0] == "studies" and len(parts) == 2:
        study = experiments / "studies" / f"{parts[1]}.yaml"
        if study.is_file():
            data = yaml.safe_load(study.read_text()) or {}
            return f"multimed-fl study {parts[1]} --out runs/{parts[1]}", str(data.get("title", ""))
    if parts[0] == "bench":
        return (
            "multimed-fl bench --out runs/bench",
            "The benchmarks of experiments/bench/: speed and memory against targets.",
        )
    words = Path(unit.rel).stem.split("_")
    scripts = [p for p in experiments.glob("*.py") if _in_order(p.stem.split("_"), words)]
    if scripts:
        script = max(scripts, key=lambda p: len(p.stem))
        doc = _docstring(script)
        usage = next((line.strip() for line in doc.splitlines() if line.strip().startswith("python ")), "")
        return usage.split(" [", 1)[0] or f"python experiments/{script.name}", _first_line(doc)
    return "", ""


def _in_order(needle: list[str], words: list[str]) -> bool:
    it = iter(words)
    return all(w in it for w in needle)


def _docstring(script: Path) -> str:
    import ast

    return ast.get_docstring(ast.parse(script.read_text())) or ""


def _first_line(doc: str) -> str:
    return " ".join(doc.split("\n\n", 1)[0].split())


def _describe(unit: Unit, root: Path) -> str:
    """A unit's line on the index: its report's title, else its script's, else its first prose line."""
    if unit.markdown:
        title = _split_title(unit.markdown[0].read_text())[0]
        if title:
            return title
    _, described = producer(unit, root)
    if described:
        return described
    if unit.markdown:
        prose = [line for line in unit.markdown[0].read_text().splitlines() if line.strip() and line[0] not in "|#"]
        if prose:
            return prose[0]
    return humanise(Path(unit.rel).stem)


def _index(units: list[Unit], root: Path, history: bool) -> str:
    out = [
        "<!-- Generated by docs/hooks/gen_results.py from experiments/results/ when the site is built. -->",
        "# Results",
        "",
        "What the studies and benchmarks recorded in `experiments/results/`, one page per folder or",
        "table, shown as the files are in the repository (each page names the command that wrote them).",
        "Unless a page says otherwise the data are the synthetic MultiMed corpus: the numbers describe",
        "the framework's behaviour, not medical findings.",
        "",
    ]
    if history:
        out += ["- [History](history.md): how the framework's performance changed, with the figures measured.", ""]
    for unit in units:
        link = unit.uri.removeprefix(f"{PREFIX}/")
        label = (
            humanise(Path(unit.rel).stem) if "/" not in unit.rel else " / ".join(map(humanise, Path(unit.rel).parts))
        )
        out.append(f"- [{label}]({link}): {_describe(unit, root).replace('|', '/')}")
    return "\n".join([*out, ""])


def _nav(units: list[Unit]) -> list[Any]:
    """Nested nav entries: a folder that only holds folders (studies/) becomes a section."""
    nav: list[Any] = []
    sections: dict[str, list[Any]] = {}
    for unit in units:
        parts = Path(unit.rel).parts
        title = _split_title(unit.markdown[0].read_text())[0] if unit.markdown else ""
        entry = {title if 0 < len(title) <= NAV_TITLE_MAX else humanise(Path(parts[-1]).stem): unit.uri}
        if len(parts) == 1:
            nav.append(entry)
        else:
            section = sections.setdefault(parts[0], [])
            if not section:
                nav.append({humanise(parts[0]): section})
            section.append(entry)
    return nav
