"""Reading replies the same way under every engine.

Flower engines differ in small ways that matter to a round loop (measured on flwr 1.42):
- an error the SuperLink generates itself (a message that expired, a node gone offline) comes
  from node 1 (the SuperLink), not from the node that never answered;
- a ClientApp exception's reason starts with a Ray banner under simulation, with the
  exception itself on a later line;
- replies arrive in arrival order, not send order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from flwr.app import Message

from federated.core.flower_door import set_src_node_id

_EXCEPTION_LINE = re.compile(r"\b\w*(Error|Exception|Crash)\b[:'>]")


def attribute(sent: Iterable[Message], replies: Iterable[Message]) -> list[Message]:
    """Make every reply's src_node_id the node its message went to (matched by message id),
    so a SuperLink-made error stub is charged to the silent site, not to the SuperLink."""
    dst = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
    out = []
    for reply in replies:
        node = dst.get(reply.metadata.reply_to_message_id)
        if node is not None and reply.metadata.src_node_id != node:
            set_src_node_id(reply, node)  # Metadata has no public setter
        out.append(reply)
    return out


def error_reason(msg: Message) -> str:
    """One line saying what went wrong: the exception line if there is one."""
    text = (msg.error.reason or "").strip()
    if not text:
        return f"error code {msg.error.code}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    found = [ln for ln in lines if _EXCEPTION_LINE.search(ln)]
    line = found[-1] if found and _EXCEPTION_LINE.search(lines[0]) is None else lines[0]
    return re.sub(r"\x1b\[[0-9;]*m", "", line)[:500]
