"""exchange() against a SuperLink (HttpGrid): replies pulled on short waits, and a reply that came
in while a pull was blocked still counts."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.superlink.grid.http_grid import HttpGrid

from federated.core.folding import FOLDED_RECORD, fold
from federated.core.replies import error_reason
from federated.engines.inprocess import claim_server_identity
from federated.server import transport
from federated.server.transport import exchange


class FakeSuperLink(HttpGrid):
    """An HttpGrid whose first pull blocks past the round's deadline (as Flower's pull does while
    it retries a reply whose objects never arrive) and returns nothing; the healthy site's reply
    is there on the next pull."""

    def __init__(self, block_s: float) -> None:  # no connection: push and pull are faked
        self.block_s, self.pulls, self.sent = block_s, 0, []

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            self.sent.append(msg)
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        if self.pulls == 1:
            if self.block_s:
                time.sleep(self.block_s)
            return []
        return [Message(RecordDict(), reply_to=m) for m in self.sent if m.metadata.message_id in set(message_ids)]


def _messages(n: int) -> list[Message]:
    claim_server_identity(run_id=1)  # Flower builds messages only inside a run
    content = RecordDict({"config": ConfigRecord({"x": 1})})
    return [Message(content, dst_node_id=i + 1, message_type=MessageType.EVALUATE) for i in range(n)]


def test_a_reply_that_arrived_during_a_blocked_pull_is_kept() -> None:
    grid = FakeSuperLink(block_s=0.3)
    replies = exchange(grid, _messages(2), timeout=0.1)  # the first pull outlasts the deadline
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert grid.pulls == 2  # one more pull at the deadline, not a wait-and-poll loop


def test_replies_are_pulled_on_short_waits_not_flower_s_3_s(monkeypatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(transport.time, "sleep", waits.append)
    grid = FakeSuperLink(block_s=0.0)
    replies = exchange(grid, _messages(3))
    assert len(replies) == 3 and waits == [transport.PULL_WAITS_S[0]]
    assert max(transport.PULL_WAITS_S) < 3


class OneReplyAtATime(FakeSuperLink):
    """Replies come in one by one: the first after 7 empty pulls, the next after 2 more."""

    def __init__(self, empty_before: list[int]) -> None:
        super().__init__(block_s=0.0)
        self.empty_before = empty_before

    def pull_messages(self, message_ids):
        if self.empty_before[0]:
            self.empty_before[0] -= 1
            return []
        self.empty_before.pop(0)
        wanted = set(message_ids)
        return [Message(RecordDict(), reply_to=m) for m in self.sent if m.metadata.message_id in wanted][:1]


def test_the_waits_start_short_again_after_each_reply(monkeypatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(transport.time, "sleep", waits.append)
    replies = exchange(OneReplyAtATime([7, 2]), _messages(2))
    assert len(replies) == 2
    w = transport.PULL_WAITS_S
    ramp = [w[min(k, len(w) - 1)] for k in range(7)]
    # 7 empty pulls on the ramp up to its cap, the first reply, then the ramp from its start again
    assert waits == [*ramp, w[0], w[1], w[2]]


class FoldingSuperLink(FakeSuperLink):
    """Records what was pushed (as it was at push time) and replies folded, as a site does; the
    reply to the message numbered `broken` comes with a folded record that does not unfold."""

    def __init__(self, broken: int | None = None) -> None:
        super().__init__(block_s=0.0)
        self.pushed: list[list[str]] = []
        self.broken = broken

    def push_messages(self, messages):
        messages = list(messages)
        self.pushed = [list(m.content.keys()) for m in messages]
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        replies = []
        for i, m in enumerate(self.sent):
            content = fold(RecordDict({"metrics": MetricRecord({"num-examples": 10 + i})}))
            if i == self.broken:
                content[FOLDED_RECORD] = ConfigRecord({**content[FOLDED_RECORD], "v9": 1})
            replies.append(Message(content, reply_to=m))
        return replies


def test_messages_travel_folded_and_keep_their_own_content() -> None:
    messages = _messages(2)
    replies = exchange(FoldingSuperLink(), messages)
    assert all(list(m.content.keys()) == ["config"] for m in messages)  # the caller's content is back
    assert sorted(r.content["metrics"]["num-examples"] for r in replies) == [10, 11]


def test_what_is_pushed_is_folded() -> None:
    grid = FoldingSuperLink()
    exchange(grid, _messages(2))
    assert grid.pushed == [[FOLDED_RECORD], [FOLDED_RECORD]]


def test_a_reply_that_does_not_unfold_is_that_site_s_error_naming_why() -> None:
    replies = exchange(FoldingSuperLink(broken=1), _messages(2))
    good, bad = sorted(replies, key=lambda r: r.metadata.reply_to_message_id)
    assert good.content["metrics"]["num-examples"] == 10
    assert bad.has_error() and not bad.has_content()
    assert "FoldError" in error_reason(bad) and "does not list: v9" in error_reason(bad)
