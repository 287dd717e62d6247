"""An import-linter contract type: no module but the allowed ones imports the given subpackages of
an external package (pyproject.toml uses it to keep flwr.supercore, flwr.superlink, flwr.supernode,
flwr.proto and flwr.server.superlink inside federated/core/flower_door).

import-linter's own `forbidden` contract sees an external package only whole (`flwr`), since
grimp squashes external imports to their top-level package; so this contract reads each
module's source itself: every `import` and `from ... import` anywhere in it (inside functions
and `if TYPE_CHECKING:` too) and every `importlib.import_module("...")` / `__import__("...")`
with a literal name. `lint-imports` imports this module by its dotted path with the working
directory on sys.path: run it from the repository root (as CI does). A top-level package of its
own: `tests` is shadowed by a `tests` package some distributions install into site-packages."""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


def _within(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def source_file(module: str) -> Path | None:
    """The file of an internal module, found from its top-level package's folder (nothing of the
    project is imported)."""
    spec = importlib.util.find_spec(module.split(".")[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        base = Path(folder).joinpath(*module.split(".")[1:])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def imports_of(module: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in the file, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            yield from ((node.lineno, f"{base}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


class ForbiddenExternalSubpackages(Contract):
    """Modules outside `allowed_modules` (each with its submodules) may not import any of
    `forbidden_modules` (each with its submodules), directly, lazily or by name."""

    type_name = "forbidden_external"

    forbidden_modules = fields.ListField(subfield=fields.StringField())
    allowed_modules = fields.ListField(subfield=fields.StringField())

    def check(self, graph: Any, verbose: bool) -> ContractCheck:
        forbidden: list[str] = list(self.forbidden_modules)  # type: ignore[call-overload]
        allowed: list[str] = list(self.allowed_modules)  # type: ignore[call-overload]
        violations: list[tuple[str, int, str]] = []
        unread: list[str] = []
        for module in sorted(graph.modules):
            if _within(module, allowed):
                continue
            path = source_file(module)
            if path is None:
                unread.append(module)
                continue
            for line, imported in imports_of(module, path):
                if _within(imported, forbidden):
                    violations.append((module, line, imported))
        return ContractCheck(kept=not violations and not unread, metadata={"violations": violations, "unread": unread})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for module, line, imported in check.metadata["violations"]:
            output.print_error(f"{module}:{line} imports {imported}", bold=False)
        for module in check.metadata["unread"]:
            output.print_error(f"{module}: its source file was not found, so its imports were not checked")
        output.new_line()
        allowed = ", ".join(self.allowed_modules)  # type: ignore[arg-type]
        output.print(f"Only {allowed} may import these: call the door's functions instead.")
