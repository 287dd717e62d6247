"""A message's records folded into one ConfigRecord on the wire of a deployment.

Flower 1.42 moves a message as a tree of objects (the Message, its RecordDict, every record,
every Array and each of its 5 MiB chunks), one HTTP request per object on every hop of a
deployment (ServerApp -> SuperLink -> SuperNode -> ClientApp and back); each request to the
SuperLink is authenticated and, with a `--database`, written to SQLite. A packed train message
was 6 objects and its reply 8 (arrays, metrics, what was trained, the evaluation riding along);
folded, each is 3: the Message, its RecordDict and one ConfigRecord holding every record's
values, the arrays' bytes included. Arrays are folded only while the folded record stays within
Flower's own chunk size (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE); a larger ArrayRecord is kept as
it is, for Flower to send in chunks. Unfolding restores every record, its name and order, every
key, value type and array byte, exactly.

The server folds what it sends over a SuperLink and unfolds the replies (server/transport.py);
a site unfolds what it receives and folds its reply only when what it received was folded
(clients/folded_messages.py), so the simulation engines never see a folded message. Written by hand:
Flower has no batched object transfer. A folded record comes from the network, so `unfold`
trusts nothing and names what is wrong (FoldError).
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

FOLDED_RECORD = "multimed-folded"  # the one ConfigRecord of a folded message
LAYOUT_KEY = "layout"  # JSON: [[record name, kind, entries], ...] in the RecordDict's order
ARRAYS, METRICS, CONFIG, KEPT = "arrays", "metrics", "config", "kept"  # a record's kind in the layout


class FoldError(ValueError):
    """A folded message that cannot be unfolded; the text names the record or key."""


def max_folded_bytes() -> int:
    """Flower's chunk size: no folded record is larger than an object Flower itself sends."""
    from federated.core.flower_door import max_array_chunk_size

    return max_array_chunk_size()


def is_folded(content: RecordDict) -> bool:
    return FOLDED_RECORD in content


def fold(content: RecordDict, max_bytes: int | None = None) -> RecordDict:
    """content as one ConfigRecord (FOLDED_RECORD), ArrayRecords beyond max_bytes (default:
    max_folded_bytes) of array data kept as they are."""
    if FOLDED_RECORD in content:
        raise FoldError(f"record {FOLDED_RECORD!r} is reserved for folding; this message already has one")
    budget = max_folded_bytes() if max_bytes is None else max_bytes
    layout: list[list[Any]] = []
    values: dict[str, Any] = {}
    kept: dict[str, ArrayRecord] = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            arrays = list(record.items())
            size = sum(len(a.data) for _, a in arrays)
            if size > budget:
                layout.append([name, KEPT, []])
                kept[name] = record
                continue
            budget -= size
            entries = []
            for key, a in arrays:
                values[f"v{len(values)}"] = a.data
                entries.append([key, a.dtype, list(a.shape), a.stype])
            layout.append([name, ARRAYS, entries])
        else:
            kind = METRICS if isinstance(record, MetricRecord) else CONFIG
            for value in record.values():
                values[f"v{len(values)}"] = value
            layout.append([name, kind, list(record.keys())])
    values[LAYOUT_KEY] = json.dumps(layout)
    return RecordDict({FOLDED_RECORD: ConfigRecord(values), **kept})


def unfold(content: RecordDict) -> RecordDict:
    """The RecordDict `fold` folded (unchanged where it is not folded)."""
    if FOLDED_RECORD not in content:
        return content
    folded = content.config_records.get(FOLDED_RECORD)
    if folded is None:
        raise FoldError(f"record {FOLDED_RECORD!r} is not a ConfigRecord")
    layout = _layout(folded)
    out = RecordDict()
    numbers = itertools.count()  # values are v0, v1, ... in the layout's order
    used = {LAYOUT_KEY}
    kept = {name for name in content if name != FOLDED_RECORD}

    def value(where: str) -> Any:
        key = f"v{next(numbers)}"
        if key not in folded:
            raise FoldError(f"{where}: value {key} is missing from the folded record")
        used.add(key)
        return folded[key]

    for name, kind, entries in layout:
        if name in out:
            raise FoldError(f"record {name!r} appears twice in the folded layout")
        if kind == KEPT:
            if name not in kept or content.array_records.get(name) is None:
                raise FoldError(f"record {name!r} is listed as kept but the message has no such ArrayRecord")
            out[name] = content.array_records[name]
            kept.discard(name)
        elif kind == ARRAYS:
            arrays = [_array(name, entry, value) for entry in entries]
            keys = _keys(name, [entry[0] for entry in entries])
            out[name] = ArrayRecord(dict(zip(keys, arrays, strict=True)))
        else:
            items = {key: value(f"record {name!r}, key {key!r}") for key in _keys(name, entries)}
            try:
                out[name] = MetricRecord(items) if kind == METRICS else ConfigRecord(items)
            except (TypeError, ValueError) as e:
                raise FoldError(f"record {name!r}: {e}") from None
    extra = sorted(kept) + sorted(set(folded.keys()) - used)
    if extra:
        raise FoldError(f"folded message holds what its layout does not list: {', '.join(extra)}")
    return out


def _layout(folded: ConfigRecord) -> list[tuple[str, str, list[Any]]]:
    raw = folded.get(LAYOUT_KEY)
    if not isinstance(raw, str):
        raise FoldError(f"the folded record has no {LAYOUT_KEY!r} string")
    try:
        layout = json.loads(raw)
    except json.JSONDecodeError as e:
        raise FoldError(f"the folded layout is not JSON: {e}") from None
    ok = isinstance(layout, list) and all(
        isinstance(item, list)
        and len(item) == 3
        and isinstance(item[0], str)
        and item[1] in (ARRAYS, METRICS, CONFIG, KEPT)
        and isinstance(item[2], list)
        for item in layout
    )
    if not ok:
        raise FoldError("the folded layout is not a list of [record name, kind, entries]")
    return [(name, kind, entries) for name, kind, entries in layout]


def _keys(record: str, entries: list[Any]) -> list[str]:
    if not all(isinstance(k, str) for k in entries) or len(set(entries)) != len(entries):
        raise FoldError(f"record {record!r}: its folded keys are not distinct strings")
    return entries


def _array(record: str, entry: Any, value: Any) -> Array:
    ok = (
        isinstance(entry, list)
        and len(entry) == 4
        and isinstance(entry[0], str)
        and isinstance(entry[1], str)
        and isinstance(entry[2], list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[2])
        and isinstance(entry[3], str)
    )
    if not ok:
        raise FoldError(f"record {record!r}: an array entry is not [key, dtype, shape, stype]")
    key, dtype, shape, stype = entry
    data = value(f"record {record!r}, array {key!r}")
    if not isinstance(data, bytes):
        raise FoldError(f"record {record!r}: array {key!r} is not bytes")
    return Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data)
