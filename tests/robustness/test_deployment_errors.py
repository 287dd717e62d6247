"""Issue 28, finding 8: deployment errors a hospital can act on. Each test reproduces what the
hand-run deployment with four hospitals met, through Flower 1.42's own code where it matters:

- a SuperNode killed while sending its reply stalled the run ~180 s past engine.round_timeout_s
  (Flower's pull of a reply whose objects never arrive lasts until the SuperLink's push session
  expires): the exchange now ends at its deadline plus REPLY_GRACE_S, and a node that missed the
  round's training deadline is not awaited a whole timeout again in the round's evaluation
  (end to end: tests/engines/test_deployment.py, the killed-SuperNode round);
- "[code: 2004] Failed to activate SuperNode" said nothing of its cause: the SuperLink we run
  tells the SuperNode (not registered / still online), and our SuperNode explains both causes
  when a SuperLink does not;
- a handshake with too few sites did not name the missing one and gave a simulation hint;
- the README said `flwr supernode ls` shows site names: it does not (Flower 1.42); the run's log
  maps node ids to sites.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.serde import message_to_proto
from flwr.proto.message_pb2 import ConfirmMessageReceivedResponse, PullObjectResponse  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import PullAppMessagesResponse  # pylint: disable=E0611
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.run import Run
from flwr.superlink.grid import http_grid
from flwr.superlink.grid.http_grid import HttpGrid

from federated.core.replies import error_reason
from federated.engines.deployment import flower_services
from federated.engines.inprocess import claim_server_identity
from federated.server import transport
from federated.server.site_agreement import FederationError
from federated.server.transport import NodeSubsetGrid, exchange

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _flower_s_own_pull(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_grid, "pull_objects", inflatable_utils.pull_objects)  # restored after each test


def _sent(n: int) -> list[Message]:
    claim_server_identity(run_id=3)  # Flower builds messages only inside a run
    content = RecordDict({"config": ConfigRecord({"x": 1})})
    return [Message(content, dst_node_id=i + 1, message_type=MessageType.TRAIN) for i in range(n)]


class Link(HttpGrid):
    """A SuperLink as the ServerApp's HttpGrid sees it, through Flower's own pull_messages and
    pull_objects: pushed messages get ids m0, m1, ...; node `stuck`'s reply header is there at
    once but its objects never arrive, until the push session expires after `session_s` (then
    they are not found, as on Flower's SuperLink); node `silent` never replies; the others reply
    at once, each reply handed out once."""

    def __init__(self, stuck: int | None = None, silent: int | None = None, session_s: float = 30.0) -> None:
        super().__init__(token="t")
        self.set_run(Run.create_empty(3))
        self._client = self  # type: ignore[assignment]  # connected, to this fake
        self.stuck, self.silent, self.session_s = stuck, silent, session_s
        self.sent: dict[str, Message] = {}
        self.replies: dict[str, Message] = {}  # message id -> its reply
        self.objects: dict[str, bytes] = {}
        self.stuck_objects: set[str] = set()
        self.handed: set[str] = set()
        self.t0 = time.monotonic()

    def push_messages(self, messages: Any) -> list[str]:
        ids = []
        for msg in messages:
            mid = f"m{len(self.sent)}"
            msg.metadata.__dict__["_message_id"] = mid
            self.sent[mid] = msg
            ids.append(mid)
            if msg.metadata.dst_node_id == self.silent:
                continue
            values = np.full(3, msg.metadata.dst_node_id, np.float32)  # objects are content-addressed: one per node
            reply = Message(RecordDict({"arrays": ArrayRecord([values])}), reply_to=msg)
            reply.metadata.__dict__["_message_id"] = reply.object_id
            objects = {k: v.deflate() for k, v in get_all_nested_objects(reply).items()}
            self.objects.update(objects)
            if msg.metadata.dst_node_id == self.stuck:
                self.stuck_objects |= set(objects) - {reply.object_id}
            self.replies[mid] = reply
        return ids

    def PullMessages(self, request: Any) -> PullAppMessagesResponse:
        ready = [m for m in request.message_ids if m in self.replies and m not in self.handed]
        self.handed |= set(ready)
        protos = [message_to_proto(remove_content_from_message(self.replies[m])) for m in ready]
        return PullAppMessagesResponse(
            messages_list=protos, message_object_trees=[get_object_tree(self.replies[m]) for m in ready]
        )

    def PullObject(self, request: Any) -> PullObjectResponse:
        oid = request.object_id
        if oid in self.stuck_objects:
            if time.monotonic() - self.t0 >= self.session_s:
                return PullObjectResponse(object_found=False, object_available=False)
            return PullObjectResponse(object_found=True, object_available=False)
        return PullObjectResponse(object_found=True, object_available=True, object_content=self.objects[oid])

    def ConfirmMessageReceived(self, request: Any) -> ConfirmMessageReceivedResponse:
        return ConfirmMessageReceivedResponse()


def test_a_reply_whose_content_never_arrives_ends_the_exchange_at_its_deadline(monkeypatch):
    """The probe: a SuperNode killed while sending its reply. Before, Flower's pull of its objects
    lasted until the SuperLink's push session expired (here 30 s, Flower's 180 s) whatever the
    round's timeout; now the exchange ends at the deadline plus the grace, the healthy site's
    reply kept and the stuck one that site's error, naming the timeout."""
    monkeypatch.setattr(transport, "REPLY_GRACE_S", 0.5)
    link = Link(stuck=1, session_s=30.0)
    t0 = time.monotonic()
    replies = exchange(link, _sent(2), timeout=1.0)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0 + 0.5 + 1.5, f"the exchange took {elapsed:.1f} s"
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert not by_node[2].has_error()
    np.testing.assert_array_equal(by_node[2].content["arrays"].to_numpy_ndarrays()[0], np.full(3, 2, np.float32))
    assert by_node[1].has_error()
    assert "did not arrive within the round's 1 s (engine.round_timeout_s" in error_reason(by_node[1])


def test_without_a_timeout_the_pull_waits_as_flower_does():
    """round_timeout_s=0 means wait: the stuck reply's pull lasts until its session expires."""
    link = Link(stuck=1, session_s=1.5)
    t0 = time.monotonic()
    replies = exchange(link, _sent(2))
    assert time.monotonic() - t0 >= 1.5
    assert {r.metadata.src_node_id for r in replies if r.has_error()} == {1}


def test_a_node_that_missed_the_round_s_training_is_awaited_briefly_in_its_evaluation(monkeypatch):
    """Training and evaluation in two exchanges (engine.evaluate_with_train=false, SecAgg): a node
    with no training reply in time (dead, or still on that message: a SuperNode handles one at a
    time) is awaited LATE_WAIT_S in the evaluation, not the whole timeout again."""
    monkeypatch.setattr(transport, "LATE_WAIT_S", 0.5)
    t0 = time.monotonic()
    replies = exchange(Link(silent=1), _sent(3), timeout=20.0, late={1})
    assert time.monotonic() - t0 < 3.0
    assert sorted(r.metadata.src_node_id for r in replies) == [2, 3]
    t0 = time.monotonic()
    replies = exchange(Link(silent=1), _sent(3), timeout=1.5)  # not late: the whole timeout
    assert time.monotonic() - t0 >= 1.5


class LateStuckLink(Link):
    """As Link, but node `stuck`'s reply header comes only `after_s` seconds in (its node came back
    while the others had answered), and its objects never arrive."""

    def __init__(self, after_s: float, **kw: Any) -> None:
        super().__init__(**kw)
        self.after_s = after_s

    def PullMessages(self, request: Any) -> PullAppMessagesResponse:
        if time.monotonic() - self.t0 < self.after_s:
            wanted = [m for m in request.message_ids if self.sent[m].metadata.dst_node_id != self.stuck]
            del request.message_ids[:]
            request.message_ids.extend(wanted)
        return super().PullMessages(request)


def test_a_late_node_s_reply_whose_content_never_arrives_gets_the_short_wait_not_the_round_s(monkeypatch):
    """Only late nodes left: the pull of their replies' objects ends REPLY_GRACE_S after the short
    wait, not at the whole round's deadline plus the grace (here 20 s)."""
    monkeypatch.setattr(transport, "LATE_WAIT_S", 0.5)
    monkeypatch.setattr(transport, "REPLY_GRACE_S", 0.5)
    link = LateStuckLink(after_s=0.3, stuck=1, session_s=60.0)
    t0 = time.monotonic()
    replies = exchange(link, _sent(2), timeout=20.0, late={1})
    elapsed = time.monotonic() - t0
    assert elapsed < 3.0, f"the exchange took {elapsed:.1f} s"
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert not by_node[2].has_error()
    assert transport.lost_reply(by_node[1])
    assert "did not arrive within 0.5 s, the wait for a node late in this round" in error_reason(by_node[1])


def test_a_lost_reply_is_told_from_one_the_site_sent(monkeypatch):
    """transport.lost_reply: a reply cut at the deadline (or made by the SuperLink for a node gone)
    is no answer; an error the site's app raised is an answer."""
    from flwr.app import Error
    from flwr.common.constant import ErrorCode

    monkeypatch.setattr(transport, "REPLY_GRACE_S", 0.2)
    replies = {r.metadata.src_node_id: r for r in exchange(Link(stuck=1), _sent(2), timeout=0.3)}
    assert transport.lost_reply(replies[1]) and not transport.lost_reply(replies[2])
    sent = _sent(1)[0]
    raised = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "ValueError: x"), reply_to=sent)
    offline = Message(Error(ErrorCode.NODE_UNAVAILABLE, "Node Unavailable"), reply_to=sent)
    assert not transport.lost_reply(raised) and transport.lost_reply(offline)


def _fed(sites: dict[int, str]) -> Any:
    """The parts of a Federation that collect_replies reads."""
    from types import SimpleNamespace

    from federated.core.config import load_config

    strategy = SimpleNamespace(last_rejections=[], last_update_norms={})
    return SimpleNamespace(site=sites.__getitem__, cfg=load_config(["engine.round_timeout_s=1"]), strategy=strategy)


def test_a_training_reply_whose_content_was_lost_makes_its_node_late_for_the_evaluation(monkeypatch):
    """A node killed while sending its training reply gets an error reply, not none; it is late all
    the same, so the round's evaluation (engine.evaluate_with_train=false) awaits it briefly."""
    from federated.server.round import TrainOutcome, collect_replies

    monkeypatch.setattr(transport, "REPLY_GRACE_S", 0.2)
    messages = _sent(2)
    replies = exchange(Link(stuck=1), messages, timeout=0.3)
    outcome = TrainOutcome(None)
    (stuck,) = [r for r in replies if r.metadata.src_node_id == 1]
    collect_replies(_fed({1: "site_01", 2: "site_02"}), messages[:1], [stuck], outcome)  # node 1's message
    assert outcome.unanswered == {1}
    assert "did not arrive within the round's 0.3 s" in outcome.failures["train:site_01"]


def _profiles(nodes: list[int]) -> dict[int, Any]:
    from federated.core.protocol import Role
    from federated.server.evaluation import SiteProfile

    return {n: SiteProfile(f"site_0{n}", Role.TRAIN, "a", ["ct"], ["t"], 1, 1) for n in nodes}


def test_the_evaluation_says_a_late_node_was_given_the_short_wait(monkeypatch):
    from federated.core.arrays import pack_arrays
    from federated.server.round_evaluation import evaluate_all

    monkeypatch.setattr(transport, "LATE_WAIT_S", 0.3)
    arrays = pack_arrays({"w": np.zeros(2, np.float32)})
    _sent(1)  # Flower builds messages only inside a run
    t0 = time.monotonic()
    _, failures = evaluate_all(Link(silent=1), arrays, 1, _profiles([1, 2]), 20.0, late={1})
    assert time.monotonic() - t0 < 3.0
    assert failures["site_01"].startswith("no reply within 0.3 s (transport.LATE_WAIT_S: it gave none to this round")

    class Simulated(NodeSubsetGrid):  # no SuperLink: a simulated site is only slow, it keeps the whole timeout
        def __init__(self) -> None:
            super().__init__(None, [1, 2])  # type: ignore[arg-type]  # over no grid: send_and_receive is faked
            self.timeouts: list[float | None] = []

        def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
            self.timeouts.append(timeout)
            return []

    grid = Simulated()
    _, failures = evaluate_all(grid, arrays, 1, _profiles([1, 2]), 20.0, late={1})
    assert grid.timeouts == [20.0] and failures["site_01"] == "no reply within 20.0 s"


# ------------------------------------------------------- an unregistered SuperNode key ----


def _link_state() -> Any:
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    return LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()).state()


def _key() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    public = ec.generate_private_key(ec.SECP384R1()).public_key()
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def _activate(state: Any, key: bytes) -> Any:
    from flwr.proto.fleet_pb2 import ActivateNodeRequest  # pylint: disable=E0611
    from flwr.superlink.servicer.fleet import fleet_handlers

    return fleet_handlers.activate_node(request=ActivateNodeRequest(public_key=key, heartbeat_interval=30), state=state)


def test_the_superlink_tells_a_refused_supernode_why(monkeypatch):
    """Flower's activation refusal (code 2004) through Flower's own handler and link state: an
    unregistered key and an early restart (the node still online) now say which they are."""
    from flwr.supercore.error.base import FlowerError
    from flwr.superlink.servicer.fleet import fleet_handlers

    monkeypatch.setattr(fleet_handlers, "activate_node", fleet_handlers.activate_node)  # restored after
    state, stranger, known = _link_state(), _key(), _key()
    with pytest.raises(FlowerError) as before:
        _activate(state, stranger)
    assert before.value.code == 2004 and before.value.public_details is None  # Flower's: no cause given
    assert flower_services.explain_activation_refusals()
    assert flower_services.explain_activation_refusals()  # idempotent
    with pytest.raises(FlowerError) as refused:
        _activate(state, stranger)
    assert refused.value.code == 2004
    assert refused.value.public_details == flower_services.NOT_REGISTERED
    assert (
        "not registered" in refused.value.public_details and "flwr supernode register" in refused.value.public_details
    )
    node = state.create_node("aid", "owner", known, 30, name="site_03")
    assert _activate(state, known).node_id == node  # registered: activates as before
    with pytest.raises(FlowerError) as again:  # an early restart: its earlier session is still online
        _activate(state, known)
    assert again.value.public_details == flower_services.STILL_ONLINE.format(node=node)
    assert "still online" in again.value.public_details


def test_the_supernode_explains_both_causes_when_the_superlink_does_not():
    flower = (
        "Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
        "[code: 2004] Failed to activate SuperNode.\nThe SuperNode could not establish a connection to the SuperLink."
    )
    note = flower_services.explain_supernode_exit(flower)
    assert note == flower_services.BOTH_CAUSES
    for cause in ("not registered", "earlier session", "Still refused after a minute", "No SuperNode found"):
        assert cause in note
    told = flower + "\n" + flower_services.NOT_REGISTERED  # our SuperLink named the cause: nothing to add
    assert flower_services.explain_supernode_exit(told) is None
    assert flower_services.explain_supernode_exit("Exit Code: 305\nServer disconnected") is None


# ----------------------------------------------------- a handshake with too few sites ----


class FourSiteLink(Link):
    """Three of four planned sites connected; each answers the handshake query with its site."""

    def __init__(self, sites: dict[int, str]) -> None:
        super().__init__()
        self.sites = sites

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def get_nodes(self) -> list[Any]:
        from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611

        return [NodeInfo(node_id=n, name=s) for n, s in self.sites.items()]

    def push_messages(self, messages: Any) -> list[str]:
        messages = list(messages)
        ids = super().push_messages(messages)
        for mid in ids:
            msg = self.sent[mid]
            site = self.sites[msg.metadata.dst_node_id]
            reply = Message(RecordDict({"profile": ConfigRecord({"site": site})}), reply_to=msg)
            reply.metadata.__dict__["_message_id"] = reply.object_id
            self.objects.update({k: v.deflate() for k, v in get_all_nested_objects(reply).items()})
            self.replies[mid] = reply
        return ids


def test_a_handshake_timeout_names_the_missing_site_and_the_deployment_remedy(monkeypatch):
    from federated.server import handshake, site_roster

    monkeypatch.setattr(handshake, "wait_for_nodes", lambda grid, expected, timeout_s: list(grid.get_node_ids()))
    link = FourSiteLink({11: "site_00", 22: "site_01", 33: "site_02"})
    with pytest.raises(FederationError) as e:
        handshake.handshake(
            link, expected=4, timeout_s=120, expected_names=["site_00", "site_01", "site_02", "site_03"]
        )
    text = str(e.value)
    assert "3 of the 4 planned sites connected within 120 s" in text
    assert "Connected: site_00 (node 11, registered as site_00)" in text
    assert "Missing: site_03." in text
    assert "--node-config \"site='site_03'" in text and "--name site_03" in text
    assert "flwr supernode ls" in text and "[code: 2004]" in text
    assert "num-supernodes" not in text  # not the simulation hint
    # site-local mode: the server knows the names only of the sites held out by name
    text = site_roster.shortfall_message(4, 120, {11: "site_00", 22: None}, [], True)
    assert "2 of the 4" in text and "node 22 (did not say which site it is)" in text
    assert "2 sites the server cannot name" in text


def test_under_simulation_the_handshake_timeout_keeps_its_hint():
    from federated.server.site_roster import shortfall_message

    text = shortfall_message(4, 120, {1: None, 2: None, 3: None}, ["a", "b", "c", "d"], deployment=False)
    assert '--federation-config "num-supernodes=4"' in text and "3 of the 4" in text


class SilentNodeLink(FourSiteLink):
    """Connected nodes whose ClientApps never answer; a pull after `give_up_s` means nothing bounds
    the wait (the test fails instead of hanging)."""

    def __init__(self, sites: dict[int, str], give_up_s: float) -> None:
        super().__init__(sites)
        self.give_up_s = give_up_s

    def push_messages(self, messages: Any) -> list[str]:
        return Link.push_messages(self, messages)

    def PullMessages(self, request: Any) -> PullAppMessagesResponse:
        if time.monotonic() - self.t0 > self.give_up_s:
            raise AssertionError(f"still waiting for the handshake after {self.give_up_s} s")
        return super().PullMessages(request)


def test_a_handshake_whose_node_never_answers_ends_at_its_deadline_naming_the_site(monkeypatch):
    """Before, the handshake's query had no timeout: a connected SuperNode whose ClientApp never
    answered held the run until Flower's message TTL. Now engine.handshake_timeout_s, counted from
    the wait for nodes, bounds it too, and the error names the node and its registered site."""
    from federated.server import handshake

    monkeypatch.setattr(handshake, "HANDSHAKE_REPLY_MIN_S", 0.5)
    monkeypatch.setattr(handshake, "wait_for_nodes", lambda grid, expected, timeout_s: list(grid.get_node_ids()))
    link = SilentNodeLink({11: "site_00"}, give_up_s=10.0)
    link.silent = 11
    _sent(1)
    t0 = time.monotonic()
    with pytest.raises(FederationError) as e:
        handshake.handshake(link, expected=1, timeout_s=1.0)
    assert time.monotonic() - t0 < 4.0
    text = str(e.value)
    assert "handshake: no reply within engine.handshake_timeout_s=1 from node 11 (registered as site_00)" in text
    assert "ClientApp did not answer" in text


# ------------------------------------------------------------ which node is which site ----


def test_flwr_supernode_ls_shows_no_site_names_so_the_run_s_log_maps_nodes_to_sites(monkeypatch, caplog):
    """Flower 1.42's `flwr supernode ls` (table and JSON) has no column for the registered name; the
    deployment guide (docs/how-to/deploy.md) must not say it shows site names. The handshake logs
    node id -> site (and the registered name), which `flwr log RUN_ID` shows."""
    import importlib

    ls = importlib.import_module("flwr.cli.supernode.ls")  # the module (the package exports a function `ls`)
    from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611

    from federated.server.site_roster import node_site_lines

    info = NodeInfo(node_id=7, owner_name="coord", status="online", registered_at="2026-01-01T00:00:00+00:00")
    info.name = "site_03"
    rows = ls._format_nodes([info], "2026-01-01T00:01:00+00:00")
    assert "site_03" not in ls._to_json(rows, verbose=True)
    assert "site_03" not in str(ls._to_table(rows, verbose=True).columns)
    lines = node_site_lines({7: "site_03", 8: "site_01"}, {7: "train", 8: "held_out"}, {7: "site_03", 8: "site_02"})
    assert lines[0] == "handshake: node 7 is site site_03 (train), registered as site_03"
    assert "registered as 'site_02', not as the site it says it is" in lines[1]
    deployment = " ".join((ROOT / "docs" / "how-to" / "deploy.md").read_text().replace("#", " ").split())
    assert "`flwr supernode ls` shows the names" not in deployment  # what the README said before
    assert "not by the name a key was registered under" in deployment
    assert "`flwr log RUN_ID CONNECTION`" in deployment and "handshake: node 1234... is site site_03" in deployment
