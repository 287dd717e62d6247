"""The site's side of folded messages (federated/core/folding.py says why they are folded).

`folding_mod` is the ClientApp's outermost mod: a message the server sent folded (a deployment:
server/transport.py) is unfolded before any other mod or the app sees it, and the reply is folded
on its way out; any other message (the simulation engines) passes untouched. A folded message
that cannot be unfolded raises FoldError, which Flower returns to the server as this site's error.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from federated.core.folding import fold, is_folded, unfold


def folding_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if msg.has_error() or not is_folded(msg.content):
        return call_next(msg, context)
    msg.content = unfold(msg.content)
    reply = call_next(msg, context)
    if reply.has_content():
        reply.content = fold(reply.content)
    return reply
