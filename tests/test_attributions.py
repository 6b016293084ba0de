"""Tests of coarpy.attributions: predict, top, validation, and the on-disk format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from coarpy.attributions import Attributions
from coarpy.errors import ArgumentError, FitError, MaskError, StoreCorruptError


def make(E=3, N=5, seed=0, meta=None):
    g = torch.Generator().manual_seed(seed)
    return Attributions(
        weights=torch.randn(E, N, generator=g),
        bias=torch.randn(E, generator=g),
        names=[f"block.{i // 2}:{i % 2}" for i in range(N)],
        meta=meta if meta is not None else {"method": "ridge", "l2": [0.1] * E},
    )


# ----------------------------------------------------------------- predict and top


def test_predict_is_keep_times_weights_plus_bias():
    attr = Attributions(
        weights=torch.tensor([[1.0, 2.0, 4.0], [-1.0, 0.0, 0.5]]),
        bias=torch.tensor([10.0, 0.0]),
        names=["a:0", "a:1", "a:2"],
    )
    keep = torch.tensor([[True, True, True], [False, True, False], [False, False, False]])
    expected = torch.tensor([[17.0, -0.5], [12.0, 0.0], [10.0, 0.0]])
    assert torch.equal(attr.predict(keep), expected)
    assert torch.equal(attr.predict(keep[0]), expected[0])
    assert torch.equal(attr.predict(keep.float()), expected)


def test_predict_refuses_a_mask_of_the_wrong_width():
    attr = make(N=5)
    with pytest.raises(MaskError, match=r"shape \(n_masks, 5\).*got \(2, 4\)"):
        attr.predict(torch.ones(2, 4, dtype=torch.bool))


def test_predict_refuses_integer_masks_and_non_tensors():
    attr = make(N=5)
    with pytest.raises(MaskError, match="dtype torch.int64"):
        attr.predict(torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(MaskError, match="torch.Tensor"):
        attr.predict([[1, 1, 1, 1, 1]])


def test_top_sorts_by_absolute_weight_and_keeps_signs():
    attr = Attributions(
        weights=torch.tensor([[0.5, -3.0, 2.0, -0.1, 2.0]]),
        bias=torch.zeros(1),
        names=["c:0", "c:1", "c:2", "c:3", "c:4"],
    )
    assert attr.top(0, k=3) == [("c:1", -3.0), ("c:2", 2.0), ("c:4", 2.0)]  # ties: index order
    assert attr.top(0, k=10) == [
        ("c:1", -3.0),
        ("c:2", 2.0),
        ("c:4", 2.0),
        ("c:0", 0.5),
        ("c:3", pytest.approx(-0.1)),
    ]
    assert attr.top(-1, k=1) == [("c:1", -3.0)]
    with pytest.raises(IndexError, match="out of range for 1 examples"):
        attr.top(1)


def test_shape_properties():
    attr = make(E=4, N=7)
    assert (attr.n_examples, attr.n_components) == (4, 7)
    assert attr.weights.dtype == torch.float32
    assert "n_examples=4" in repr(attr)


# ----------------------------------------------------------------- validation


def test_bias_of_the_wrong_length_is_refused():
    with pytest.raises(FitError, match=r"bias must have shape \(3,\).*got \(2,\)"):
        Attributions(weights=torch.zeros(3, 4), bias=torch.zeros(2), names=list("abcd"))


def test_names_must_match_the_number_of_components():
    with pytest.raises(FitError, match="3 names but weights has 4 columns"):
        Attributions(weights=torch.zeros(2, 4), bias=torch.zeros(2), names=list("abc"))


def test_meta_must_be_jsonable():
    with pytest.raises(FitError, match="JSON-able"):
        Attributions(
            weights=torch.zeros(1, 2),
            bias=torch.zeros(1),
            names=["a", "b"],
            meta={"t": torch.ones(1)},
        )


# ----------------------------------------------------------------- save / load


def test_save_load_round_trip_is_exact(tmp_path):
    attr = make(E=6, N=9, meta={"method": "ridge", "l2": [1e-3] * 6, "source": {"alpha": 0.05}})
    attr.save(tmp_path / "attr")
    back = Attributions.load(tmp_path / "attr")
    assert torch.equal(back.weights, attr.weights)
    assert torch.equal(back.bias, attr.bias)
    assert back.names == attr.names
    assert back.meta == attr.meta


def test_saving_twice_overwrites(tmp_path):
    make(seed=1).save(tmp_path)
    second = make(seed=2)
    second.save(tmp_path)
    assert torch.equal(Attributions.load(tmp_path).weights, second.weights)


def test_load_refuses_a_missing_directory(tmp_path):
    with pytest.raises(StoreCorruptError, match="does not exist"):
        Attributions.load(tmp_path / "nothing")


def test_load_refuses_a_truncated_array_file(tmp_path):
    make().save(tmp_path)
    path = tmp_path / "weights.f32"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(StoreCorruptError, match="truncated"):
        Attributions.load(tmp_path)


def test_load_refuses_altered_weights(tmp_path):
    attr = make()
    attr.save(tmp_path)
    w = attr.weights.numpy().copy()
    w[0, 0] += 1.0
    w.astype("<f4").tofile(tmp_path / "weights.f32")
    with pytest.raises(StoreCorruptError, match="do not match the checksum"):
        Attributions.load(tmp_path)
    with pytest.raises(StoreCorruptError, match="do not match the checksum"):
        Attributions.load(tmp_path, mmap=False)


def test_load_refuses_a_foreign_json_file(tmp_path):
    make().save(tmp_path)
    (tmp_path / "attributions.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(StoreCorruptError, match="not a coarpy attributions file"):
        Attributions.load(tmp_path)
    (tmp_path / "attributions.json").write_text("{not json")
    with pytest.raises(StoreCorruptError, match="not valid JSON"):
        Attributions.load(tmp_path)


def test_load_refuses_a_missing_array_file(tmp_path):
    make().save(tmp_path)
    (tmp_path / "bias.f32").unlink()
    with pytest.raises(StoreCorruptError, match=r"bias.f32 does not exist"):
        Attributions.load(tmp_path)


def test_the_arrays_are_raw_little_endian_float32_readable_with_numpy(tmp_path):
    attr = make(E=4, N=6)
    attr.save(tmp_path)
    header = json.loads((tmp_path / "attributions.json").read_text())
    assert header["version"] == 2
    assert header["arrays"]["weights"] == {"file": "weights.f32", "dtype": "<f4", "shape": [4, 6]}
    w = np.fromfile(tmp_path / "weights.f32", "<f4").reshape(4, 6)
    assert np.array_equal(w, attr.weights.numpy())
    assert np.array_equal(np.fromfile(tmp_path / "bias.f32", "<f4"), attr.bias.numpy())


def _mapped_files() -> str:
    with open("/proc/self/maps") as fh:
        return fh.read()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_load_memory_maps_the_weights_and_round_trips_exactly(tmp_path):
    attr = make(E=64, N=300, meta={"method": "ridge"})
    attr.save(tmp_path / "big")
    back = Attributions.load(tmp_path / "big")
    assert str(tmp_path / "big" / "weights.f32") in _mapped_files()
    assert torch.equal(back.weights, attr.weights) and torch.equal(back.bias, attr.bias)
    back.weights[0, 0] = 123.0  # copy-on-write: the tensor is writable, the file unchanged
    again = Attributions.load(tmp_path / "big", mmap=False)
    assert torch.equal(again.weights, attr.weights)
    # Saving a loaded (mapped) result writes it straight from the map.
    again.save(tmp_path / "copy")
    assert torch.equal(Attributions.load(tmp_path / "copy").weights, attr.weights)


def test_saving_over_a_version_1_directory_leaves_version_2_only(tmp_path):
    _save_v1(make(seed=3), tmp_path)
    second = make(seed=4)
    second.save(tmp_path)
    assert not (tmp_path / "arrays.npz").exists()
    assert torch.equal(Attributions.load(tmp_path).weights, second.weights)


# ----------------------------------------------------------------- format version 1


def _save_v1(attr, root):
    """Write ``attr`` exactly as coarpy's format version 1 did (arrays.npz + json)."""
    import hashlib

    w, b = attr.weights.numpy(), attr.bias.numpy()
    np.savez(root / "arrays.npz", weights=w, bias=b)
    header = {
        "format": "coarpy.attributions",
        "version": 1,
        "n_examples": attr.n_examples,
        "n_components": attr.n_components,
        "sha256": {
            k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in (("weights", w), ("bias", b))
        },
        "names": attr.names,
        "meta": attr.meta,
    }
    (root / "attributions.json").write_text(json.dumps(header))


def test_a_version_1_file_still_loads(tmp_path):
    attr = make(E=5, N=7, meta={"method": "lasso"})
    _save_v1(attr, tmp_path)
    back = Attributions.load(tmp_path)
    assert torch.equal(back.weights, attr.weights) and torch.equal(back.bias, attr.bias)
    assert back.names == attr.names and back.meta == attr.meta


def test_a_version_1_file_with_a_truncated_npz_is_refused(tmp_path):
    _save_v1(make(), tmp_path)
    path = tmp_path / "arrays.npz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(StoreCorruptError, match="truncated or corrupted"):
        Attributions.load(tmp_path)


def test_a_version_1_file_with_altered_weights_is_refused(tmp_path):
    attr = make()
    _save_v1(attr, tmp_path)
    w = attr.weights.numpy().copy()
    w[0, 0] += 1.0
    np.savez(tmp_path / "arrays.npz", weights=w, bias=attr.bias.numpy())
    with pytest.raises(StoreCorruptError, match="do not match the checksum"):
        Attributions.load(tmp_path)


def test_a_version_1_file_with_a_foreign_npz_is_refused(tmp_path):
    _save_v1(make(), tmp_path)
    np.savez(tmp_path / "arrays.npz", other=np.zeros(3))
    with pytest.raises(StoreCorruptError, match=r"expected \['bias', 'weights'\]"):
        Attributions.load(tmp_path)


def test_a_version_1_file_is_never_unpickled(tmp_path):
    attr = make()
    _save_v1(attr, tmp_path)
    np.savez(tmp_path / "arrays.npz", weights=np.array([object()]), bias=attr.bias.numpy())
    with pytest.raises(StoreCorruptError, match="cannot be read"):
        Attributions.load(tmp_path)


def test_an_unknown_version_is_refused(tmp_path):
    make().save(tmp_path)
    header = json.loads((tmp_path / "attributions.json").read_text())
    header["version"] = 99
    (tmp_path / "attributions.json").write_text(json.dumps(header))
    with pytest.raises(StoreCorruptError, match="reads versions 1 and 2"):
        Attributions.load(tmp_path)


def test_top_refuses_a_negative_k_with_the_fix():
    with pytest.raises(ArgumentError, match="k must be an int >= 0") as err:
        make().top(0, k=-1)
    assert isinstance(err.value, ValueError)


# -- exports readable without coarpy ------------------------------------------------------


def named(ids=("cat-1", "dog-7", "cat-3")):
    attr = make(E=3, N=5, seed=2, meta={"method": "ridge", "l2": [0.1, 0.2, 0.3]})
    return Attributions(
        weights=attr.weights, bias=attr.bias, names=attr.names, meta=attr.meta,
        example_ids=list(ids) if ids is not None else None,
    )  # fmt: skip


@pytest.mark.parametrize("ids", [("cat-1", "dog-7", "cat-3"), None])
def test_safetensors_export_reads_back_exactly_with_the_safetensors_package(tmp_path, ids):
    safetensors = pytest.importorskip("safetensors")
    from safetensors.numpy import load_file

    attr = named(ids)
    path = attr.save_safetensors(tmp_path / "attr.safetensors")
    arrays = load_file(path)
    assert np.array_equal(arrays["weights"], attr.weights.numpy())
    assert np.array_equal(arrays["bias"], attr.bias.numpy())
    assert arrays["weights"].dtype == np.float32
    with safetensors.safe_open(path, "np") as f:
        meta = f.metadata()
    assert meta["format"] == "coarpy.attributions"
    assert json.loads(meta["names"]) == attr.names
    assert json.loads(meta["example_ids"]) == (list(ids) if ids else None)
    assert json.loads(meta["meta"]) == attr.meta


def test_the_tidy_frame_holds_every_weight_once_keyed_by_example_id_and_component():
    pytest.importorskip("pandas")
    attr = named()
    frame = attr.to_pandas()
    assert list(frame.columns) == ["example", "component", "weight"]
    assert len(frame) == attr.n_examples * attr.n_components
    back = frame.pivot(index="example", columns="component", values="weight")
    back = back.loc[attr.example_ids, attr.names].to_numpy()
    assert np.array_equal(back, attr.weights.numpy())
    assert frame.loc[6, "example"] == "dog-7" and frame.loc[6, "component"] == attr.names[1]


def test_the_wide_frame_equals_the_weight_tensor():
    pytest.importorskip("pandas")
    attr = named(None)
    wide = attr.to_pandas(wide=True)
    assert np.array_equal(wide.to_numpy(), attr.weights.numpy())
    assert list(wide.columns) == attr.names and list(wide.index) == [0, 1, 2]
    assert wide.index.name == "example"


def test_the_csv_reads_back_to_the_exact_float32_weights(tmp_path):
    pd = pytest.importorskip("pandas")
    attr = named((10, 20, 30))
    table = pd.read_csv(attr.to_csv(tmp_path / "attr.csv"))
    assert table["example"].tolist() == np.repeat([10, 20, 30], 5).tolist()
    assert table["component"].tolist() == attr.names * 3
    weights = table["weight"].to_numpy().reshape(3, 5)
    assert np.array_equal(weights.astype(np.float32), attr.weights.numpy())
    assert np.array_equal(weights, attr.weights.numpy().astype(np.float64))  # no rounding


def test_an_export_without_its_package_names_the_extra(monkeypatch, tmp_path):
    from coarpy.errors import MissingExtraError

    monkeypatch.setitem(__import__("sys").modules, "pandas", None)
    monkeypatch.setitem(__import__("sys").modules, "safetensors.numpy", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'coarpy\[export\]'"):
        named().to_pandas()
    with pytest.raises(MissingExtraError, match="save_safetensors needs safetensors"):
        named().save_safetensors(tmp_path / "x.safetensors")
