"""model.init_weights: what loads from a weights file, what is reported, and which files are refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from federated.core.models.init_weights import InitReport, WeightsFileError, load_init_weights, read_weights


def toy_model(seed: int) -> nn.Module:
    """Linear, BatchNorm (float buffers and an int64 counter) and Linear: keys 0.*, 1.*, 2.*."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def trained_state(seed: int) -> dict[str, torch.Tensor]:
    """A state dict that differs from a fresh model's in every tensor, buffers included."""
    model = toy_model(seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["1.running_mean"] += 0.5
    state["1.running_var"] *= 2.0
    state["1.num_batches_tracked"] += 7
    return state


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """As federated/server/outputs.py write_final_model does: np.savez of name -> array."""
    with open(path, "wb") as f:
        np.savez(f, allow_pickle=False, **arrays)
    return path


def assert_state_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert list(state) == list(expected)
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name], tensor), name


def test_npz_round_trip_loads_every_key_exactly(tmp_path: Path) -> None:
    source = trained_state(seed=1)
    path = save_npz(tmp_path / "final_model.npz", {k: v.numpy() for k, v in source.items()})
    model = toy_model(seed=2)
    assert not torch.equal(model.state_dict()["0.weight"], source["0.weight"])  # a fresh model differs

    report = load_init_weights(model, path)

    assert_state_equal(model, source)
    assert report.loaded == tuple(source)
    assert report.missing == report.unexpected == report.mismatched == ()
    # parameters are updated in place, not just the state_dict() copy
    assert torch.equal(model[0].weight, source["0.weight"])
    assert model[1].num_batches_tracked.item() == 7


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model"])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_torch_state_dict_layouts(tmp_path: Path, layout: str, suffix: str) -> None:
    source = trained_state(seed=3)
    payload: object = source if layout == "plain" else {layout: source, "epoch": 4, "note": "best"}
    path = tmp_path / f"ckpt{suffix}"
    torch.save(payload, path)
    model = toy_model(seed=4)

    report = load_init_weights(model, path)

    assert_state_equal(model, source)
    assert report.loaded == tuple(source)
    assert report.unexpected == ()


def test_dtypes_cast_to_the_models(tmp_path: Path) -> None:
    # float64 weights and a float32 counter: the model keeps float32 parameters and its int64 counter
    arrays = {k: v.numpy().astype(np.float64) for k, v in trained_state(seed=5).items()}
    arrays["1.num_batches_tracked"] = np.array(9.0, dtype=np.float32)
    model = toy_model(seed=6)
    load_init_weights(model, save_npz(tmp_path / "w.npz", arrays))
    state = model.state_dict()
    assert state["0.weight"].dtype == torch.float32
    assert torch.equal(state["0.weight"], torch.from_numpy(arrays["0.weight"]).float())
    assert state["1.num_batches_tracked"].dtype == torch.int64
    assert state["1.num_batches_tracked"].item() == 9


def partial_file(tmp_path: Path) -> Path:
    """Layer 0 matches; 2.weight has the wrong shape; every 1.* and 2.bias is absent; head.x is extra."""
    arrays = {
        "0.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "0.bias": np.array([1.0, 2.0, 3.0], dtype=np.float32),
        "2.weight": np.ones((5, 3), dtype=np.float32),
        "head.x": np.zeros(2, dtype=np.float32),
    }
    return save_npz(tmp_path / "partial.npz", arrays)


def test_partial_match_reports_missing_unexpected_mismatched(tmp_path: Path) -> None:
    path = partial_file(tmp_path)
    model = toy_model(seed=7)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}

    report = load_init_weights(model, path)

    assert report.path == str(path)
    assert report.loaded == ("0.weight", "0.bias")
    assert report.missing == (
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
        "2.bias",
    )
    assert report.unexpected == ("head.x",)
    assert report.mismatched == (("2.weight", (5, 3), (2, 3)),)
    state = model.state_dict()
    assert torch.equal(state["0.weight"], torch.arange(12, dtype=torch.float32).reshape(3, 4))
    assert torch.equal(state["0.bias"], torch.tensor([1.0, 2.0, 3.0]))
    for name in (*report.missing, "2.weight"):  # everything not loaded keeps its fresh value
        assert torch.equal(state[name], fresh[name]), name


def test_report_as_dict_and_summary_line(tmp_path: Path) -> None:
    path = partial_file(tmp_path)
    report = load_init_weights(toy_model(seed=8), path)

    as_dict = report.as_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["mismatched"] == [{"name": "2.weight", "file_shape": [5, 3], "model_shape": [2, 3]}]
    assert as_dict["loaded"] == ["0.weight", "0.bias"]
    assert as_dict["unexpected"] == ["head.x"]

    # 9 model tensors: 2 loaded, 6 missing + 1 mismatched kept fresh
    assert report.summary_line() == (
        f"init_weights {path}: loaded 2 of 9 tensors; "
        "7 kept fresh (1.weight, 1.bias, 1.running_mean ...); "
        "1 shape mismatches (2.weight [5, 3] vs [2, 3]); "
        "1 file tensors unused (head.x)"
    )


def test_summary_line_of_a_full_load_is_short() -> None:
    report = InitReport(path="runs/a/final_model.npz", loaded=("a", "b"), missing=(), unexpected=(), mismatched=())
    assert report.summary_line() == "init_weights runs/a/final_model.npz: loaded 2 of 2 tensors"


def test_nothing_matching_is_refused_and_model_untouched(tmp_path: Path) -> None:
    path = save_npz(
        tmp_path / "other.npz",
        {"encoder.w": np.ones((3, 4), dtype=np.float32), "0.weight": np.ones((9, 9), dtype=np.float32)},
    )
    model = toy_model(seed=9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsFileError, match="no tensor matches") as info:
        load_init_weights(model, path)
    message = str(info.value)
    assert str(path) in message
    assert "encoder.w" in message  # a few of the file's keys
    assert "0.bias" in message  # and of the model's
    assert_state_equal(model, before)


def test_missing_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "nope.npz"
    with pytest.raises(WeightsFileError, match="no such file") as info:
        read_weights(path)
    assert str(info.value) == f"model.init_weights: no such file {path}"


def test_directory_refused(tmp_path: Path) -> None:
    folder = tmp_path / "run.npz"
    folder.mkdir()
    with pytest.raises(WeightsFileError, match="directory") as info:
        read_weights(folder)
    assert str(folder) in str(info.value)


def test_unknown_extension_refused_listing_valid_ones(tmp_path: Path) -> None:
    path = tmp_path / "weights.h5"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(WeightsFileError, match="unknown extension") as info:
        read_weights(path)
    message = str(info.value)
    assert str(path) in message
    for suffix in (".npz", ".pt", ".pth", ".bin", ".safetensors"):
        assert suffix in message


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_npz_refused(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "bad.npz"
    if damage == "garbage":
        path.write_bytes(b"this is not a zip archive at all" * 4)
    else:
        save_npz(path, {"0.weight": np.ones((300, 300), dtype=np.float32)})
        path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(WeightsFileError, match="corrupt") as info:
        read_weights(path)
    assert str(path) in str(info.value)


def test_corrupt_torch_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(WeightsFileError, match="corrupt") as info:
        read_weights(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_array_refused_naming_key(tmp_path: Path, bad: float) -> None:
    weight = np.ones((3, 4), dtype=np.float32)
    weight[1, 2] = bad
    path = save_npz(tmp_path / "nan.npz", {"0.bias": np.zeros(3, dtype=np.float32), "0.weight": weight})
    with pytest.raises(WeightsFileError, match="non-finite") as info:
        read_weights(path)
    assert "'0.weight'" in str(info.value)
    assert str(path) in str(info.value)


def test_non_numeric_array_refused_naming_key(tmp_path: Path) -> None:
    path = save_npz(tmp_path / "str.npz", {"labels": np.array(["a", "b"])})
    with pytest.raises(WeightsFileError, match="non-numeric") as info:
        read_weights(path)
    assert "'labels'" in str(info.value)


def test_empty_file_refused(tmp_path: Path) -> None:
    path = save_npz(tmp_path / "empty.npz", {})
    with pytest.raises(WeightsFileError, match="no tensors") as info:
        read_weights(path)
    assert str(path) in str(info.value)


def test_non_tensor_entry_in_state_dict_refused(tmp_path: Path) -> None:
    path = tmp_path / "mixed.pt"
    torch.save({"0.weight": torch.ones(3, 4), "0.bias": [1.0, 2.0, 3.0]}, path)
    with pytest.raises(WeightsFileError, match="not a tensor") as info:
        read_weights(path)
    assert "'0.bias'" in str(info.value)


class _Payload:
    """Unpickling this runs exec: it creates the marker file. weights_only loading must never get there."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_malicious_pickle_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"0.weight": torch.ones(3, 4), "0.bias": _Payload(marker)}, path)
    assert not marker.exists()

    with pytest.raises(WeightsFileError, match="refused") as info:
        load_init_weights(toy_model(seed=10), path)
    assert str(path) in str(info.value)
    assert not marker.exists()

    # Control: the payload is real. An unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_safetensors_without_the_package_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(WeightsFileError, match="pip install .multimed-fl.safetensors..") as info:
        read_weights(path)
    assert str(path) in str(info.value)


def test_npz_with_pickled_object_array_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.npz"
    payload = np.empty(1, dtype=object)
    payload[0] = _Payload(marker)
    with open(path, "wb") as f:
        np.savez(f, **{"0.weight": np.ones((3, 4), dtype=np.float32), "0.bias": payload})  # pickles the object
    with pytest.raises(WeightsFileError, match="corrupt") as info:
        read_weights(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_a_safetensors_file_loads_like_an_npz(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    source = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    path = tmp_path / "model.safetensors"
    save_file({k: v.detach().numpy().copy() for k, v in source.state_dict().items()}, str(path))
    target = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    report = load_init_weights(target, path)
    assert sorted(report.loaded) == sorted(source.state_dict()) and not report.kept_fresh
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_only_the_tensors_that_match_the_model_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a model, an .npz member of another name or shape is judged by its header alone: never
    decompressed (so its size cannot cost memory), and its NaN is not the model's concern."""
    from federated.core import npz

    read: list[str] = []
    original = npz.SafeNpz.read

    def recording(self: npz.SafeNpz, name: str) -> np.ndarray:
        read.append(name)
        return original(self, name)

    monkeypatch.setattr(npz.SafeNpz, "read", recording)
    source = trained_state(seed=11)
    arrays = {k: v.numpy() for k, v in source.items() if k.startswith("0.")}
    arrays["2.weight"] = np.full((7, 7), np.nan, dtype=np.float32)  # wrong shape: reported, not read
    arrays["extra"] = np.full(1000, np.nan, dtype=np.float32)  # not the model's: reported, not read
    path = tmp_path / "w.npz"
    np.savez_compressed(path, **arrays)
    report = load_init_weights(toy_model(seed=12), path)
    assert sorted(read) == ["0.bias", "0.weight"]
    assert report.loaded == ("0.weight", "0.bias")
    assert report.mismatched == (("2.weight", (7, 7), (2, 3)),)
    assert report.unexpected == ("extra",)
    # without a model (the preflight), every tensor is read and checked
    read.clear()
    with pytest.raises(WeightsFileError, match="non-finite"):
        read_weights(path)
    assert "2.weight" in read or "extra" in read
