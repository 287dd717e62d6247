"""Replies read alike under every engine: attribution to the silent node, one-line reasons."""

from flwr.app import Error, Message, MessageType, RecordDict

from federated.core.replies import attribute, error_reason
from federated.engines.inprocess import claim_server_identity

claim_server_identity(1)  # Flower stamps new messages with the sender's task identity


def _sent(dst: int, msg_id: str) -> Message:
    m = Message(RecordDict(), dst_node_id=dst, message_type=MessageType.TRAIN)
    m.metadata.__dict__["_message_id"] = msg_id
    return m


def test_a_superlink_error_stub_is_charged_to_the_silent_node():
    sent = [_sent(7, "a"), _sent(9, "b")]
    stub = Message(Error(code=3, reason="Message Unavailable - may have expired due to its TTL"), reply_to=sent[1])
    stub.metadata.__dict__["_src_node_id"] = 1  # what a SuperLink-made stub carries
    (fixed,) = attribute(sent, [stub])
    assert fixed.metadata.src_node_id == 9


def test_error_reason_finds_the_exception_under_a_ray_banner():
    ray = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()"
        ' (pid=1, ip=1.2.3.4)\n  File "x.py", line 3\n    raise X\n'
        "clients.faults.SimulatedCrash: site site_00 crashed in round 2"
    )
    msg = Message(Error(code=2, reason=ray), reply_to=_sent(3, "c"))
    assert error_reason(msg) == "clients.faults.SimulatedCrash: site site_00 crashed in round 2"
    plain = Message(Error(code=2, reason="RuntimeError: boom\nTraceback ..."), reply_to=_sent(3, "d"))
    assert error_reason(plain) == "RuntimeError: boom"
    assert error_reason(Message(Error(code=4, reason=""), reply_to=_sent(3, "e"))) == "error code 4"
