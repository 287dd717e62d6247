"""The in-process Grid delivers real Flower messages to a real ClientApp, keeping per-node state."""

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID

from federated.engines.inprocess import InProcessGrid

toy = ClientApp()


@toy.query()
def _query(msg, context):
    calls = int(context.state.config_records.get("s", ConfigRecord({"calls": 0}))["calls"]) + 1
    context.state["s"] = ConfigRecord({"calls": calls})
    if context.node_config["partition-id"] == 2:
        raise RuntimeError("site 2 is down")
    return Message(
        RecordDict({"m": MetricRecord({"pid": context.node_config["partition-id"], "calls": calls})}), reply_to=msg
    )


def _ask(grid):
    msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in grid.get_node_ids()]
    return {r.metadata.src_node_id: r for r in grid.send_and_receive(msgs)}


def test_messages_reach_each_node_with_its_own_persistent_context():
    grid = InProcessGrid(toy, [{"partition-id": i} for i in range(3)], {"k": "v"})
    a, b, c = nodes = list(grid.get_node_ids())
    assert nodes == [a, a + 1, a + 2] and SUPERLINK_NODE_ID not in nodes
    _ask(grid)
    replies = _ask(grid)
    assert replies[a].content["m"]["pid"] == 0 and replies[a].content["m"]["calls"] == 2
    assert replies[b].content["m"]["pid"] == 1
    assert replies[a].metadata.reply_to_message_id  # a proper reply
    # a ClientApp that raises gives an error reply, not a crashed server
    assert replies[c].has_error() and "site 2 is down" in replies[c].error.reason
