"""Every config key a user can set, with its type, default, allowed values and meaning.

One source each: the type and default are the dataclass field's; the allowed values are the
field's own declaration (values.one_of, beside the field); the meaning is the comment above or
beside the field in its source (read with tokenize, so the comment a reader of schema.py sees is
the text the reference shows). A strategy's own settings come from the settings classes registered in
STRATEGY_SETTINGS, which the strategies package fills: import `strategies` before calling
`config_keys()` (this layer cannot import it).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import yaml

from federated.core.config.schema import (
    STRATEGY_SETTINGS,
    ExperimentConfig,
    StrategyConfig,
    StrategySettings,
)
from federated.core.config.values import allowed_values

__all__ = ["KeyDoc", "config_keys", "field_comment"]


@dataclass(frozen=True)
class KeyDoc:
    """One key as a user types it (`strategy.server_lr`), for the configuration reference."""

    key: str
    type: str  # e.g. "float", "str | None", "list[str]"
    default: str  # as YAML writes it: 0.002, null, [], ''
    allowed: tuple[str, ...] | None  # the values the key accepts, where it has a fixed set
    meaning: str  # the comment above or beside the field in its source ('' if it has none)
    strategy: str = ""  # for a strategy's own setting, the strategy that reads it ('' = every strategy)


def config_keys(strategy_settings: Mapping[str, type[StrategySettings]] | None = None) -> list[KeyDoc]:
    """Every key of ExperimentConfig in schema order; under `strategy.`, the common keys, then each
    registered strategy's own settings (one KeyDoc per strategy and key). `strategy_settings`:
    name -> settings class, by default those registered in STRATEGY_SETTINGS."""
    registered = dict(STRATEGY_SETTINGS.items()) if strategy_settings is None else dict(strategy_settings)
    docs: list[KeyDoc] = []
    for key, cls, f in _fields(ExperimentConfig, ""):
        if cls is StrategyConfig and f.name == "settings":
            for name, settings_cls in registered.items():
                docs += [
                    _doc(f"strategy.{g.name}", c, g, strategy=name) for _, c, g in _fields(settings_cls, "strategy.")
                ]
            continue
        docs.append(_doc(key, cls, f))
    return docs


def _fields(cls: type, prefix: str) -> Iterator[tuple[str, type, dataclasses.Field[Any]]]:
    """(dotted key, the class declaring it, field) for each leaf field of dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint) and not issubclass(hint, StrategySettings):  # type: ignore[arg-type]
            yield from _fields(hint, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        else:
            yield f"{prefix}{f.name}", cls, f


def _doc(key: str, cls: type, f: dataclasses.Field[Any], strategy: str = "") -> KeyDoc:
    hint = typing.get_type_hints(cls)[f.name]
    allowed = allowed_values(cls, f.name)
    return KeyDoc(key, type_name(hint), _yaml(_default(f)), allowed, field_comment(cls, f.name), strategy)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _yaml(value: Any) -> str:
    """A value as YAML writes it in flow style (what a user types in conf/ or on the command line)."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)  # type: ignore[arg-type]
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def type_name(hint: Any) -> str:
    """A type as a user reads it: Optional[float] -> 'float | None', List[str] -> 'list[str]'."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:
        return " | ".join(type_name(a) for a in args)
    if origin in (list, dict, tuple):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint))


def field_comment(cls: type, name: str) -> str:
    """The comment above (consecutive comment lines) and beside field `name` in the source of the
    class declaring it; for a field a subclass redeclares without one, its base class's."""
    for klass in cls.__mro__:
        if name in vars(klass).get("__annotations__", {}):
            text = _class_comments(klass).get(name, "")
            if text:
                return text
    return ""


@cache
def _class_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment, for the fields `cls`'s own body declares."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):  # a class made at run time has no source
        return {}
    source = textwrap.dedent("".join(lines))
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, whether the line holds only the comment)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            alone = not tok.line[: tok.start[1]].strip()
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), alone)
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    found: dict[str, str] = {}
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        line = node.lineno - 1
        while line in comments and comments[line][1]:
            above.insert(0, comments[line][0])
            line -= 1
        end = node.end_lineno or node.lineno
        beside = [comments[n][0] for n in range(node.lineno, end + 1) if n in comments and not comments[n][1]]
        found[node.target.id] = " ".join(part for part in (*above, *beside) if part)
    return found
