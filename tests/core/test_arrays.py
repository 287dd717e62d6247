"""pack_arrays / record_to_numpy: exact round trips, the byte layout, and every refusal of a
malformed buffer (the unpacker reads bytes that came over the network)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from federated.core.arrays import (
    ALIGN,
    PACK_MAGIC,
    PACKED_KEY,
    PACKED_STYPE,
    is_packed,
    pack_arrays,
    plain_record,
    record_to_numpy,
    record_to_torch,
    to_numpy,
    unpack_arrays,
)

DTYPES = [np.float32, np.float64, np.int64, np.bool_, np.uint8]

arrays_st = st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
)
dicts_st = st.dictionaries(st.text(max_size=12), arrays_st, max_size=8)


def assert_exact(out: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(out) == list(expected)
    for k, a in expected.items():
        assert out[k].dtype == a.dtype, k
        assert out[k].shape == a.shape, k
        assert out[k].tobytes() == a.tobytes(), k  # bitwise: NaN payloads and -0.0 kept


def raw(
    entries: Any, data: bytes, *, magic: bytes = PACK_MAGIC, version: int = 1, header: bytes | None = None
) -> bytes:
    """A buffer in the packed layout with any header, for the refusal tests."""
    head = json.dumps(entries).encode() if header is None else header
    pre = magic + version.to_bytes(4, "little") + len(head).to_bytes(4, "little") + head
    return pre + b"\0" * (-len(pre) % ALIGN) + data


def entry(name: str = "a", dtype: str = "<f4", shape: Any = (2,), offset: int = 0, nbytes: int = 8) -> dict:
    return {"name": name, "dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": nbytes}


# --- round trips ---------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(dicts_st)
def test_round_trip_is_exact(arrays: dict[str, np.ndarray]) -> None:
    record = pack_arrays(arrays)
    assert list(record) == [PACKED_KEY] and is_packed(record)
    assert_exact(record_to_numpy(record), arrays)


@settings(max_examples=30, deadline=None)
@given(dicts_st)
def test_round_trip_through_flower_objects(arrays: dict[str, np.ndarray]) -> None:
    """Deflated and inflated as Flower moves it: still exact, and never more than 3 objects."""
    record = pack_arrays(arrays)
    objects = get_all_nested_objects(record)
    assert len(objects) <= 3  # ArrayRecord, its Array, one ArrayChunk (under 5 MiB)
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    inflated = inflate_object_from_contents(record.object_id, contents)
    assert isinstance(inflated, ArrayRecord)
    assert_exact(record_to_numpy(inflated), arrays)


def test_special_values_and_edge_shapes() -> None:
    arrays = {
        "nan": np.array([np.nan, -0.0, np.inf, -np.inf], dtype=np.float32),
        "scalar": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 3), dtype=np.float64),
        "flag": np.array([True, False, True]),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        "big_endian": np.array([1.5, 2.5], dtype=">f8"),
    }
    out = record_to_numpy(pack_arrays(arrays))
    assert out["scalar"].shape == () and int(out["scalar"]) == 7
    assert out["empty"].shape == (0, 3)
    assert out["fortran"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert out["big_endian"].dtype == np.dtype("<f8") and out["big_endian"].tolist() == [1.5, 2.5]
    assert np.isnan(out["nan"][0]) and np.signbit(out["nan"][1]) and out["nan"][2] == np.inf
    assert out["flag"].tolist() == [True, False, True]


def test_layout_is_as_documented() -> None:
    """The exact bytes of a one-array pack, computed by hand."""
    data = pack_arrays({"w": np.array([1, 2], dtype=np.int64)})[PACKED_KEY].data
    header = b'{"arrays":[{"name":"w","dtype":"<i8","shape":[2],"offset":0,"nbytes":16}]}'
    assert len(header) == 74
    assert data[:8] == b"MMFLPAK\x00"
    assert data[8:12] == b"\x01\x00\x00\x00" and data[12:16] == b"\x4a\x00\x00\x00"  # version 1, 74 bytes
    assert data[16:90] == header
    assert data[90:128] == b"\0" * 38  # padding up to 128 = 2 * ALIGN
    assert data[128:] == b"\x01" + b"\0" * 7 + b"\x02" + b"\0" * 7
    assert len(data) == 144


def test_arrays_are_aligned_views() -> None:
    arrays = {"a": np.ones(3, dtype=np.uint8), "b": np.arange(5, dtype=np.float64)}
    out = record_to_numpy(pack_arrays(arrays))
    assert out["b"].ctypes.data % 8 == 0 and not out["b"].flags.writeable


def test_torch_state_dict_round_trip() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    state = model.state_dict()
    out = record_to_torch(pack_arrays(state))
    assert list(out) == list(state)
    for k, t in state.items():
        assert out[k].dtype == t.dtype and torch.equal(out[k], t), k
    assert out["1.num_batches_tracked"].dtype == torch.int64


def test_ordinary_records_read_as_before() -> None:
    arrays = {"x": np.arange(4, dtype=np.float32).reshape(2, 2), "y": np.array([3], dtype=np.int64)}
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    assert not is_packed(record)
    assert_exact(record_to_numpy(record), arrays)
    assert to_numpy(record["x"]).tolist() == [[0.0, 1.0], [2.0, 3.0]]


def test_packed_key_with_another_stype_is_an_ordinary_record() -> None:
    record = ArrayRecord({PACKED_KEY: Array(np.array([1.0, 2.0]))})
    assert not is_packed(record)
    assert record_to_numpy(record)[PACKED_KEY].tolist() == [1.0, 2.0]


def test_plain_record_is_one_flower_array_per_tensor() -> None:
    arrays = {"w": np.arange(3, dtype=np.float32), "n": np.array(2, dtype=np.int64)}
    plain = plain_record(pack_arrays(arrays))
    assert list(plain) == ["w", "n"] and not is_packed(plain)
    assert plain["w"].numpy().tolist() == [0.0, 1.0, 2.0] and plain["n"].numpy().dtype == np.int64
    ordinary = ArrayRecord({"w": Array(arrays["w"])})
    assert plain_record(ordinary) is ordinary


def test_pack_refuses_object_dtype() -> None:
    with pytest.raises(TypeError, match="'o'"):
        pack_arrays({"o": np.array([object()], dtype=object)})


def test_packed_array_is_one_uint8_buffer() -> None:
    packed = pack_arrays({"a": np.zeros(10, dtype=np.float32)})[PACKED_KEY]
    assert packed.stype == PACKED_STYPE and packed.dtype == "uint8" and packed.shape == (len(packed.data),)


# --- refusals ------------------------------------------------------------------------------


def test_valid_raw_buffer_is_accepted() -> None:
    """The helper's buffers are well formed when nothing is broken (so each refusal below is
    caused by the one thing it changes)."""
    out = unpack_arrays(raw({"arrays": [entry()]}, np.array([1.0, 2.0], np.float32).tobytes()))
    assert out["a"].tolist() == [1.0, 2.0]


@pytest.mark.parametrize(
    ("buffer", "message"),
    [
        (raw({"arrays": [entry()]}, b"\0" * 8, magic=b"NOTPACK\x00"), "wrong magic"),
        (b"MMFL", "wrong magic"),
        (raw({"arrays": [entry()]}, b"\0" * 8, version=2), "unsupported version 2"),
        (PACK_MAGIC + (1).to_bytes(4, "little") + (1000).to_bytes(4, "little") + b"{}", "runs past"),
        (raw(None, b"", header=b"{not json"), "not valid JSON"),
        (raw(None, b"", header=b"\xff\xfe"), "not valid JSON"),
        (raw(None, b"", header=b"[" * 100_000 + b"]" * 100_000), "not valid JSON"),
        (raw([entry()], b"\0" * 8), "the layout is not"),
        (raw({"arrays": [entry()], "extra": 1}, b"\0" * 8), "the layout is not"),
        (raw({"arrays": {"a": 1}}, b""), "the layout is not"),
        (raw({"arrays": ["a"]}, b""), "entry 0 is not an object"),
        (raw({"arrays": [{k: v for k, v in entry().items() if k != "nbytes"}]}, b"\0" * 8), "entry 0"),
        (raw({"arrays": [{**entry(), "pickle": True}]}, b"\0" * 8), "entry 0"),
        (raw({"arrays": [{**entry(), "name": 3}]}, b"\0" * 8), "non-string name"),
        (raw({"arrays": [entry(), entry(offset=64)]}, b"\0" * 72), "appears twice"),
    ],
)
def test_refuses_malformed_header(buffer: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        unpack_arrays(buffer)


@pytest.mark.parametrize("dtype", ["|O", "O", ">f4", "|V8", "<U1", "|S4", "<M8[s]", "float32", 5])
def test_refuses_non_numeric_dtypes(dtype: Any) -> None:
    with pytest.raises(ValueError, match="not a plain numeric dtype"):
        unpack_arrays(raw({"arrays": [entry(dtype=dtype)]}, b"\0" * 8))


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([-1], "negative or huge"),
        ([2**41], "negative or huge"),
        ([2**40 + 1, 0], "negative or huge"),
        ([2.0], "not a list"),
        ([True], "not a list"),
        ("2", "not a list"),
        ([1] * 33, "not a list"),
    ],
)
def test_refuses_bad_shapes(shape: Any, message: str) -> None:
    bad = {**entry(), "shape": shape}
    with pytest.raises(ValueError, match=message):
        unpack_arrays(raw({"arrays": [bad]}, b"\0" * 8))


@pytest.mark.parametrize(
    ("entries", "data", "message"),
    [
        ([entry(nbytes=12)], b"\0" * 12, "declares 12 bytes"),
        ([entry(shape=(2**40, 2**40))], b"\0" * 8, "declares 8 bytes"),  # dims allowed, product absurd
        ([entry(offset=-64)], b"\0" * 8, "non-negative"),
        ([entry(nbytes=True)], b"\0" * 8, "non-negative"),
        ([entry(offset=4)], b"\0" * 12, "not a multiple of 64"),
        ([entry(shape=(20,), nbytes=80), entry("b", offset=64)], b"\0" * 144, "overlaps"),
        ([entry(), entry("b", offset=128)], b"\0" * 136, "unexplained bytes"),
        ([entry(shape=(4,), nbytes=16)], b"\0" * 8, "runs past the data"),
        ([entry(), entry("b", offset=64)], b"\0" * 64, "runs past the data"),
        ([entry()], b"\0" * 9, "1 bytes longer"),
        ([entry()], b"\0" * 8 + b"\0" * 64, "64 bytes longer"),
        ([], b"\0", "1 bytes longer"),
        ([entry(dtype="|b1", shape=(2,), nbytes=2)], b"\x01\x02", "bytes other than 0 and 1"),
    ],
)
def test_refuses_bad_offsets_and_sizes(entries: list[dict], data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        unpack_arrays(raw({"arrays": entries}, data))


def test_refuses_buffer_ending_inside_header_padding() -> None:
    buffer = raw({"arrays": []}, b"")
    assert len(buffer) == 64  # a header of 14 bytes, padded to one ALIGN block
    with pytest.raises(ValueError, match="inside the header's padding"):
        unpack_arrays(buffer[:40])


def test_record_to_numpy_refuses_a_corrupt_packed_record() -> None:
    bad = Array(dtype="uint8", shape=(4,), stype=PACKED_STYPE, data=b"junk")
    with pytest.raises(ValueError, match="wrong magic"):
        record_to_numpy(ArrayRecord({PACKED_KEY: bad}))
