"""The site's folding mod: a folded message is unfolded before the app sees it and the reply is
folded; any other message passes untouched (the simulation engines)."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from clients.folded_messages import folding_mod
from federated.core.folding import FOLDED_RECORD, FoldError, fold
from federated.engines.inprocess import claim_server_identity


def _context() -> Context:
    return Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})


def _app(seen: list[list[str]]):
    def call_next(msg: Message, context: Context) -> Message:
        seen.append(list(msg.content.keys()))
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 5})}), reply_to=msg)

    return call_next


def _message(content: RecordDict) -> Message:
    claim_server_identity(run_id=1)
    msg = Message(content, dst_node_id=2, message_type=MessageType.EVALUATE)
    msg.metadata.__dict__["_message_id"] = "m0"
    return msg


def test_a_folded_message_is_unfolded_for_the_app_and_its_reply_folded() -> None:
    seen: list[list[str]] = []
    reply = folding_mod(_message(fold(RecordDict({"config": ConfigRecord({"x": 1})}))), _context(), _app(seen))
    assert seen == [["config"]]
    assert list(reply.content.keys()) == [FOLDED_RECORD]


def test_a_message_that_is_not_folded_passes_untouched() -> None:
    seen: list[list[str]] = []
    reply = folding_mod(_message(RecordDict({"config": ConfigRecord({"x": 1})})), _context(), _app(seen))
    assert seen == [["config"]] and list(reply.content.keys()) == ["metrics"]


def test_a_folded_message_that_does_not_unfold_raises_naming_why() -> None:
    bad = fold(RecordDict({"config": ConfigRecord({"x": 1})}))
    bad[FOLDED_RECORD] = ConfigRecord({**bad[FOLDED_RECORD], "v7": 0})
    with pytest.raises(FoldError, match="does not list: v7"):
        folding_mod(_message(bad), _context(), _app([]))
