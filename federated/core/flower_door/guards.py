"""How the door changes Flower: every private thing it replaces is a `Target` that names the exact
signature it relies on; `replace_all` changes a group of targets only when every one still looks
as expected, and otherwise leaves Flower as it is and says once what differed and what is lost.

Imports nothing of the project and no flwr at import time: the ClientApp worker script
(clientapp_worker.py) loads this package by path, so that no module of the project is loaded
before a ClientApp bundle is."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# The switch: set to 1 (in the environment of every process of a deployment, the ServerApp's
# included), no patch is applied and Flower runs as shipped; `replace_all` says what is lost.
STOCK_FLOWER_ENV = "MULTIMED_FL_STOCK_FLOWER"
_MARK = "_multimed_door"  # on a replacement: the group that put it there (idempotence)
_LOG = logging.getLogger("flwr")  # Flower's own logger: the line lands where Flower's own do
_said: set[str] = set()
_said_lock = threading.Lock()


class FlowerInternalsChanged(RuntimeError):
    """A private part of Flower the framework cannot do without is not as this door expects; the
    text names it, the Flower file it lives in, and the checklist to follow (CONTRIBUTING)."""


def stock_flower() -> bool:
    """Whether this process runs Flower untouched (STOCK_FLOWER_ENV set to 1, true or yes)."""
    return os.environ.get(STOCK_FLOWER_ENV, "").strip().lower() in ("1", "true", "yes")


def say_once(key: str, text: str) -> None:
    """Log `text` as a warning on Flower's logger, once per process for `key`."""
    with _said_lock:
        if key in _said:
            return
        _said.add(key)
    _LOG.warning("%s", text)


def forget_said() -> None:
    """Tests: let every line be said again."""
    with _said_lock:
        _said.clear()


@dataclass(frozen=True)
class Target:
    """One private thing of Flower's: `module`'s attribute `name` (dotted for a class member),
    with exactly `params` as its parameter names where it is called (None: not checked), as in
    Flower's file `source`."""

    module: str
    name: str
    params: tuple[str, ...] | None = None
    source: str = ""

    @property
    def where(self) -> str:
        return f"{self.module}.{self.name}"

    def _owner(self) -> tuple[Any, str]:
        owner: Any = importlib.import_module(self.module)
        *path, attr = self.name.split(".")
        for part in path:
            owner = getattr(owner, part)
        return owner, attr

    def current(self) -> Any:
        """The target as it is now (raises ImportError or AttributeError where it is gone)."""
        owner, attr = self._owner()
        return inspect.getattr_static(owner, attr) if inspect.isclass(owner) else getattr(owner, attr)

    def differs(self) -> str | None:
        """What differs from what the door relies on, or None."""
        try:
            value = self.current()
        except (ImportError, AttributeError) as e:
            return f"{self.where} is gone ({type(e).__name__}: {e})"
        if self.params is None:
            return None
        try:
            got = tuple(inspect.signature(value).parameters)
        except (TypeError, ValueError):
            return f"{self.where} has no signature"
        if got != self.params:
            return f"{self.where} takes ({', '.join(got)}), not ({', '.join(self.params)})"
        return None

    def replace(self, value: Any) -> None:
        owner, attr = self._owner()
        setattr(owner, attr, value)


def ours(value: Any, group: str) -> bool:
    """Whether `value` is a replacement this door put in place for `group`."""
    return getattr(value, _MARK, None) == group


def _current_or_none(target: Target) -> Any:
    try:
        return target.current()
    except (ImportError, AttributeError):
        return None


def replace_all(
    group: str,
    lost: str,
    changes: Mapping[Target, Callable[[Any], Any] | None],
    also: Callable[[], list[str]] = list,
) -> bool:
    """Replace each target of `changes` by `make(current)` (None: checked, not replaced), all
    or none: only where every target is as its Target says and `also()` (further checks of the
    same Flower code) finds nothing. Otherwise, or under STOCK_FLOWER_ENV, nothing changes and
    the first time a line says why and what is `lost`. Idempotent; False where not applied."""
    if stock_flower():
        say_once(group, f"{group} not applied ({STOCK_FLOWER_ENV}=1, stock Flower): {lost}")
        return False
    todo = {t: make for t, make in changes.items() if make is not None and not ours(_current_or_none(t), group)}
    if not todo:
        return True  # every replacement is ours already
    problems = [d for t in changes if not ours(_current_or_none(t), group) and (d := t.differs()) is not None]
    if not problems:
        problems = also()
    if problems:
        say_once(
            group,
            f"{group} not applied: this Flower is not shaped as the door expects ({'; '.join(problems)}); "
            f"Flower runs unchanged there: {lost} (CONTRIBUTING.md: Upgrading Flower)",
        )
        return False
    made = {target: make(target.current()) for target, make in todo.items()}  # all made before any is put in
    for target, new in made.items():
        setattr(new, _MARK, group)
        target.replace(new)
    return True


def source_of(value: Any) -> str:
    """The source text of a Flower function or module ('' where there is none)."""
    try:
        return inspect.getsource(value)
    except (OSError, TypeError):
        return ""
