"""A message's records folded into one ConfigRecord (federated/core/folding.py): exact round
trips, fewer objects on the wire, and a hostile folded record refused with its problem named."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from federated.core.arrays import pack_arrays
from federated.core.folding import FOLDED_RECORD, LAYOUT_KEY, FoldError, fold, is_folded, unfold
from federated.engines.inprocess import claim_server_identity


def _reply_content() -> RecordDict:
    """What a training site replies with: its packed model, a plain Array record, metrics, what it
    trained, the evaluation that rode along, and an empty record."""
    model = pack_arrays({"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, -2], dtype=np.int64)})
    plain = ArrayRecord({"c": Array(np.linspace(0, 1, 5)), "d": Array(np.zeros((0, 2), dtype=np.float16))})
    return RecordDict(
        {
            "arrays": model,
            "control-delta": plain,
            "metrics": MetricRecord({"num-examples": 96, "train_loss": 0.25, "per-step": [0.5, 0.25]}),
            "trained": ConfigRecord({"groups": '["ct"]', "ok": True, "blob": b"\x00\xff", "ints": [1, 2, 3]}),
            "evaluated-metrics": MetricRecord({"ct/accuracy": 0.75}),
            "empty": ConfigRecord({}),
        }
    )


def _assert_same(a: RecordDict, b: RecordDict) -> None:
    assert list(a.keys()) == list(b.keys())
    for name in a:
        x, y = a[name], b[name]
        assert type(x) is type(y), name
        assert list(x.keys()) == list(y.keys()), name
        for key in x:
            if isinstance(x, ArrayRecord):
                u, v = x[key], y[key]
                assert (u.dtype, tuple(u.shape), u.stype, u.data) == (v.dtype, tuple(v.shape), v.stype, v.data)
            else:
                assert x[key] == y[key] and type(x[key]) is type(y[key]), (name, key)


def test_a_folded_reply_unfolds_to_exactly_the_same_records() -> None:
    content = _reply_content()
    folded = fold(content)
    assert list(folded.keys()) == [FOLDED_RECORD] and is_folded(folded)
    _assert_same(unfold(folded), content)


def test_folding_survives_flower_s_own_serialisation() -> None:
    """What a SuperLink moves is the deflated objects, not the Python ones."""
    claim_server_identity(run_id=1)
    msg = Message(fold(_reply_content()), dst_node_id=7, message_type=MessageType.TRAIN)
    objects = get_all_nested_objects(msg)
    record = next(o for o in objects.values() if isinstance(o, ConfigRecord))
    rebuilt = ConfigRecord.inflate(record.deflate())
    _assert_same(unfold(RecordDict({FOLDED_RECORD: rebuilt})), _reply_content())


def test_a_folded_message_is_three_objects_on_the_wire() -> None:
    claim_server_identity(run_id=1)
    content = _reply_content()
    plain = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
    folded = Message(fold(content), dst_node_id=7, message_type=MessageType.TRAIN)
    # Message, RecordDict, 6 records, 3 Arrays, 3 chunks before; Message, RecordDict, 1 record after
    assert len(get_all_nested_objects(plain)) == 14
    assert len(get_all_nested_objects(folded)) == 3


def test_arrays_beyond_the_budget_keep_their_own_record_and_the_order_is_kept() -> None:
    content = _reply_content()
    model_bytes = len(content["arrays"][next(iter(content["arrays"]))].data)
    folded = fold(content, max_bytes=model_bytes)  # the packed model fits, the plain record no longer
    assert list(folded.keys()) == [FOLDED_RECORD, "control-delta"]
    assert folded["control-delta"] is content["control-delta"]
    _assert_same(unfold(folded), content)
    assert list(fold(content, max_bytes=0).keys()) == [FOLDED_RECORD, "arrays", "control-delta"]


def test_content_that_is_not_folded_is_returned_as_it_is() -> None:
    content = _reply_content()
    assert not is_folded(content) and unfold(content) is content


def test_a_message_that_already_has_the_folded_record_is_refused() -> None:
    with pytest.raises(FoldError, match="reserved"):
        fold(RecordDict({FOLDED_RECORD: ConfigRecord({"x": 1})}))


def _tampered(change) -> RecordDict:
    folded = fold(_reply_content(), max_bytes=0)
    values = dict(folded[FOLDED_RECORD])
    layout = json.loads(values[LAYOUT_KEY])
    change(values, layout)
    if LAYOUT_KEY in values:
        values[LAYOUT_KEY] = values[LAYOUT_KEY] if isinstance(values[LAYOUT_KEY], bytes) else json.dumps(layout)
    return RecordDict({FOLDED_RECORD: ConfigRecord(values), **{k: v for k, v in folded.items() if k != FOLDED_RECORD}})


def _set(key, value):
    def change(values, layout):
        values[key] = value

    return change


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda v, lay: v.pop(LAYOUT_KEY), "no 'layout' string"),
        (_set(LAYOUT_KEY, b"not a string"), "no 'layout' string"),
        (lambda v, lay: lay.append(["x", "tensor", []]), "list of \\[record name, kind, entries\\]"),
        (lambda v, lay: lay.append(["metrics", "metrics", ["n"]]), "'metrics' appears twice"),
        (lambda v, lay: v.pop("v0"), "value v0 is missing"),
        (_set("v99", 1), "does not list: v99"),
        (lambda v, lay: lay.pop(0), "does not list: arrays"),
        (lambda v, lay: lay.append(["ghost", "kept", []]), "'ghost' is listed as kept"),
        (_set("v0", "text"), "record 'metrics': "),
        (lambda v, lay: lay[-1][2].append("v"), "record 'empty', key 'v': value v8 is missing"),
        (lambda v, lay: lay[3].__setitem__(2, ["a", "a"]), "record 'trained': its folded keys are not distinct"),
    ],
)
def test_a_tampered_folded_record_is_refused_naming_what_is_wrong(change, named) -> None:
    with pytest.raises(FoldError, match=named):
        unfold(_tampered(change))


def test_a_tampered_folded_array_is_refused_naming_it() -> None:
    folded = fold(_reply_content())
    values = dict(folded[FOLDED_RECORD])
    layout = json.loads(values[LAYOUT_KEY])
    assert layout[0][1] == "arrays"
    bad_shape = json.loads(values[LAYOUT_KEY])
    bad_shape[0][2][0][2] = [-1]
    with pytest.raises(FoldError, match="record 'arrays': an array entry is not"):
        unfold(RecordDict({FOLDED_RECORD: ConfigRecord({**values, LAYOUT_KEY: json.dumps(bad_shape)})}))
    with pytest.raises(FoldError, match="array '__multimed_packed__' is not bytes"):
        unfold(RecordDict({FOLDED_RECORD: ConfigRecord({**values, "v0": "text"})}))
    with pytest.raises(FoldError, match="not a ConfigRecord"):
        unfold(RecordDict({FOLDED_RECORD: MetricRecord({"x": 1})}))
