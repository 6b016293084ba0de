"""The on-disk component dataset: round trips, refused resumes, growth, consolidation,
and damage that is detected instead of read as data."""

from __future__ import annotations

import copy
import errno
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coarpy.collect import collect
from coarpy.components import Components
from coarpy.errors import CoarError, StorageError, StoreCorruptError, StoreMismatchError
from coarpy.masks import sample_masks
from coarpy.store import ComponentDataset

SETTINGS = {"n_masks": 7, "alpha": 0.1, "seed": 0, "block_size": 3}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def block_bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted((path / "blocks").glob("*.blk"))}


@pytest.fixture(scope="module")
def examples(digits):
    _, _, x, y = digits
    return x[:40], y[:40]


@pytest.fixture(scope="module")
def conv(trained_cnn):
    return Components.discover(trained_cnn, kinds=("conv",))


@pytest.fixture(scope="module")
def real_store(tmp_path_factory, trained_cnn, conv, examples):
    """A store written by collect: 7 masks in blocks of 3, 3 and 1 rows, 40 examples."""
    path = tmp_path_factory.mktemp("store") / "run"
    collect(trained_cnn, conv, examples, path=path, progress=False, **SETTINGS)
    return path


@pytest.fixture
def store_copy(real_store, tmp_path):
    path = tmp_path / "run"
    shutil.copytree(real_store, path)
    return path


# -- round trips ------------------------------------------------------------------


def test_write_then_read_round_trip(tmp_path):
    ds = ComponentDataset.create(
        tmp_path / "s",
        components=[["a", "conv", 5], ["b", "linear", 7]],
        n_examples=4,
        n_masks=5,
        alpha=0.2,
        seed=3,
        block_size=2,
    )
    gen = torch.Generator().manual_seed(0)
    written = {}
    for b in (2, 0):  # any order; block 2 is the short last one
        start, stop = ds.block_rows(b)
        keep = torch.rand(stop - start, 12, generator=gen) < 0.5
        out = torch.randn(stop - start, 4, generator=gen)
        ds.write_block(b, keep, out)
        written[b] = (keep, out)
    reopened = ComponentDataset(tmp_path / "s")
    assert len(reopened) == 3 and reopened.rows().tolist() == [0, 1, 4]
    assert reopened.done_blocks() == [0, 2] and reopened.missing_blocks() == [1]
    for b, (keep, out) in written.items():
        got_keep, got_out = reopened.read_block(b)
        assert torch.equal(got_keep, keep) and torch.equal(got_out, out)
    firsts = [first for first, _, _ in reopened.iter_blocks()]
    assert firsts == [0, 4]
    assert torch.equal(reopened.masks(), torch.cat([written[0][0], written[2][0]]))
    assert torch.equal(reopened.outputs(), torch.cat([written[0][1], written[2][1]]))
    assert reopened.names == [f"a:{i}" for i in range(5)] + [f"b:{i}" for i in range(7)]
    assert reopened.progress()["done_rows"] == 3 and reopened.progress()["done_blocks"] == 2


def test_float16_outputs_are_rounded_once(tmp_path):
    ds = ComponentDataset.create(
        tmp_path / "s",
        components=[["a", "conv", 3]],
        n_examples=5,
        n_masks=2,
        alpha=0.5,
        seed=0,
        block_size=2,
        dtype="float16",
    )
    out = torch.randn(2, 5, generator=torch.Generator().manual_seed(1)) * 100
    ds.write_block(0, torch.ones(2, 3, dtype=torch.bool), out)
    got = ds.outputs()
    assert got.dtype == torch.float32
    assert torch.equal(got, out.half().float())


def test_block_shapes_are_checked_before_writing(tmp_path):
    ds = ComponentDataset.create(
        tmp_path / "s",
        components=[["a", "conv", 3]],
        n_examples=5,
        n_masks=3,
        alpha=0.5,
        seed=0,
        block_size=2,
    )
    with pytest.raises(ValueError, match=r"Block 1 needs masks of shape \(1, 3\), got \(2, 3\)"):
        ds.write_block(1, torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"needs outputs of shape \(2, 5\), got \(2, 4\)"):
        ds.write_block(0, torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 4))
    assert not list((tmp_path / "s" / "blocks").iterdir())


def test_stored_masks_are_the_seeded_masks(real_store, conv):
    ds = ComponentDataset(real_store)
    assert len(ds) == 7 and ds.n_blocks == 3 and ds.names == conv.names
    assert torch.equal(ds.masks(), sample_masks(0, 7, len(conv), alpha=0.1, seed=0))
    assert ds.outputs().shape == (7, 40)


# -- refused resumes --------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"alpha": 0.2}, r"alpha: stored 0.1, given 0.2"),
        ({"seed": 1}, r"seed: stored 0, given 1"),
        ({"sampler": "exact"}, r"sampler: stored \"bernoulli\", given \"exact\""),
        ({"block_size": 4}, r"block_size: stored 3, given 4"),
        ({"output": "logit"}, r"output: stored \"margin\", given \"logit\""),
    ],
)
def test_resume_with_other_settings_is_refused_naming_the_field(
    store_copy, trained_cnn, conv, examples, change, field
):
    before = block_bytes(store_copy)
    kwargs = {**SETTINGS, **change}
    with pytest.raises(StoreMismatchError, match=field):
        collect(trained_cnn, conv, examples, path=store_copy, progress=False, **kwargs)
    assert block_bytes(store_copy) == before


def test_resume_with_other_weights_is_refused_by_fingerprint(
    store_copy, trained_cnn, conv, examples
):
    other = copy.deepcopy(trained_cnn)
    with torch.no_grad():
        other.classifier[3].bias[0] += 1e-6
    with pytest.raises(StoreMismatchError, match=r"fingerprint: stored \"[0-9a-f]+\", given"):
        collect(other, conv, examples, path=store_copy, progress=False, **SETTINGS)


def test_resume_with_other_components_is_refused(store_copy, trained_cnn, examples):
    more = Components.discover(trained_cnn, kinds=("conv", "linear"))
    with pytest.raises(StoreMismatchError, match=r"n_components: stored 24, given 66.*components"):
        collect(trained_cnn, more, examples, path=store_copy, progress=False, **SETTINGS)


def test_resume_with_other_examples_is_refused(store_copy, trained_cnn, conv, examples):
    x, y = examples
    with pytest.raises(StoreMismatchError, match=r"data_fingerprint"):
        collect(
            trained_cnn, conv, (x.flip(0), y.flip(0)), path=store_copy, progress=False, **SETTINGS
        )
    with pytest.raises(StoreMismatchError, match=r"n_examples: stored 40, given 39"):
        collect(trained_cnn, conv, (x[:39], y[:39]), path=store_copy, progress=False, **SETTINGS)


def test_overwrite_discards_a_mismatched_store(store_copy, trained_cnn, conv, examples):
    ds = collect(
        trained_cnn,
        conv,
        examples,
        path=store_copy,
        progress=False,
        overwrite=True,
        **{**SETTINGS, "alpha": 0.3},
    )
    assert ds.alpha == 0.3 and len(ds) == 7
    assert torch.equal(ds.masks(), sample_masks(0, 7, 24, alpha=0.3, seed=0))


# -- growth -----------------------------------------------------------------------


def test_growing_n_masks_recomputes_the_partial_last_block(
    store_copy, tmp_path, trained_cnn, conv, examples
):
    old = ComponentDataset(store_copy).meta
    keys = ("components", "n_examples", "fingerprint", "structure", "data_fingerprint")
    identity = {k: old[k] for k in keys}
    grown = ComponentDataset.create(store_copy, **identity, **{**SETTINGS, "n_masks": 11})
    # before the next collect: the old 1-row block 2 is not a finished 3-row block
    assert grown.n_masks == 11 and len(grown) == 6 and grown.missing_blocks() == [2, 3]
    assert grown.rows().tolist() == list(range(6))
    assert grown.masks().shape == (6, 24)
    assert grown.verify() == []

    ds = collect(
        trained_cnn, conv, examples, path=store_copy, progress=False, **{**SETTINGS, "n_masks": 11}
    )
    fresh = collect(
        trained_cnn,
        conv,
        examples,
        path=tmp_path / "fresh",
        progress=False,
        **{**SETTINGS, "n_masks": 11},
    )
    assert len(ds) == 11
    assert block_bytes(store_copy) == block_bytes(tmp_path / "fresh")
    assert torch.equal(ds.outputs(), fresh.outputs())


def test_asking_for_fewer_masks_keeps_the_larger_run(store_copy, trained_cnn, conv, examples):
    ds = collect(
        trained_cnn, conv, examples, path=store_copy, progress=False, **{**SETTINGS, "n_masks": 4}
    )
    assert ds.n_masks == 7 and len(ds) == 7


# -- consolidation ----------------------------------------------------------------


@pytest.mark.filterwarnings("error")
def test_consolidated_memory_mapped_reading_equals_block_reading(store_copy):
    ds = ComponentDataset(store_copy)
    masks, outputs = ds.masks(), ds.outputs()
    ds.consolidate()
    mapped = ds._consolidated()
    assert mapped is not None and all(isinstance(a, np.memmap) for a in mapped)
    assert torch.equal(ds.masks(), masks)
    got = ds.outputs()
    assert torch.equal(got, outputs)
    got += 1  # a writable tensor; the file stays as it was
    assert torch.equal(ComponentDataset(store_copy).outputs(), outputs)


def test_consolidated_copy_is_ignored_once_blocks_change(store_copy):
    ds = ComponentDataset(store_copy)
    ds.consolidate()
    ds.block_path(1).unlink()
    assert ds._consolidated() is None
    assert ds.masks().shape == (4, 24) and ds.rows().tolist() == [0, 1, 2, 6]


# -- damage is detected, never read -----------------------------------------------


@pytest.fixture(scope="module")
def damage_lab(real_store, tmp_path_factory):
    """A private copy of the real store and the pristine bytes of its block 0."""
    path = tmp_path_factory.mktemp("damage") / "run"
    shutil.copytree(real_store, path)
    ds = ComponentDataset(path)
    return ds, ds.block_path(0).read_bytes()


def _truncate(data: bytes, draw) -> bytes:
    return data[: draw(st.integers(0, len(data) - 1))]


def _flip(data: bytes, draw) -> bytes:
    out = bytearray(data)
    for pos in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=4, unique=True)):
        out[pos] ^= draw(st.integers(1, 255))
    return bytes(out)


def _append(data: bytes, draw) -> bytes:
    return data + draw(st.binary(min_size=1, max_size=64))


@settings(max_examples=120, deadline=None)
@given(how=st.sampled_from([_truncate, _flip, _append]), data=st.data())
def test_a_damaged_block_is_detected_never_read(damage_lab, how, data):
    ds, pristine = damage_lab
    good = {first: (k, y) for first, k, y in ds.iter_blocks()}
    damaged = how(pristine, data.draw)
    assert damaged != pristine
    path = ds.block_path(0)
    path.write_bytes(damaged)
    try:
        with pytest.raises(StoreCorruptError, match=r"b000000.blk"):
            ds.read_block(0)
        try:
            blocks = list(ds.iter_blocks())
        except StoreCorruptError:
            assert ds.verify() == [0]
        else:
            # only a truncation to a whole shorter block can look like a stale block of
            # a smaller run; it is then skipped, never read
            assert how is _truncate
            assert [first for first, _, _ in blocks] == [3, 6]
            for first, keep, y in blocks:
                assert torch.equal(keep, good[first][0]) and torch.equal(y, good[first][1])
        if len(damaged) == len(pristine):  # size-preserving flips: caught by content
            with pytest.raises(StoreCorruptError, match=r"checksum|bad magic|describes"):
                ds.read_block(0)
    finally:
        path.write_bytes(pristine)


def test_verify_repair_and_collect_restore_the_exact_bytes(store_copy, trained_cnn, conv, examples):
    before = block_bytes(store_copy)
    ds = ComponentDataset(store_copy)
    data = bytearray(ds.block_path(1).read_bytes())
    data[100] ^= 0xFF
    ds.block_path(1).write_bytes(bytes(data))
    ds.block_path(2).write_bytes(before[ds.block_path(2).name][:-5])
    assert ds.verify(repair=True) == [1, 2]
    assert ds.done_blocks() == [0]
    collect(trained_cnn, conv, examples, path=store_copy, progress=False, **SETTINGS)
    assert block_bytes(store_copy) == before


def test_a_truncated_block_is_recomputed_by_collect(store_copy, trained_cnn, conv, examples):
    before = block_bytes(store_copy)
    ds = ComponentDataset(store_copy)
    ds.block_path(0).write_bytes(before["b000000.blk"][:77])
    with pytest.raises(StoreCorruptError, match=r"b000000.blk has 77 bytes.*truncated"):
        ds.outputs()
    collect(trained_cnn, conv, examples, path=store_copy, progress=False, **SETTINGS)
    assert block_bytes(store_copy) == before


def test_temporary_files_are_not_blocks(store_copy):
    ds = ComponentDataset(store_copy)
    masks = ds.masks()
    (store_copy / "blocks" / ".b000001.blk.123.456.tmp").write_bytes(b"half a block")
    (store_copy / "blocks" / ".b000003.blk.123.457.tmp").write_bytes(b"")
    assert torch.equal(ComponentDataset(store_copy).masks(), masks)
    assert ComponentDataset(store_copy).verify() == []


# -- meta.json --------------------------------------------------------------------


def _edit(field, value):
    def apply(meta):
        meta[field] = value

    return apply


def _drop(field):
    def apply(meta):
        del meta[field]

    return apply


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_edit("n_components", "24"), r"field 'n_components' should be int, got str '24'"),
        (_edit("alpha", "0.1"), r"field 'alpha' should be int, got str"),
        (_edit("seed", True), r"field 'seed' should be int, got bool"),
        (_edit("n_masks", 7.0), r"field 'n_masks' should be int, got float"),
        (_edit("components", {"a": 1}), r"field 'components' should be list, got dict"),
        (_drop("fingerprint"), r"lacks the field 'fingerprint'"),
        (_drop("alpha"), r"lacks the field 'alpha'"),
        (_edit("alpha", 1.5), r"field 'alpha' has an impossible value 1.5"),
        (_edit("alpha", float("nan")), r"field 'alpha' has an impossible value nan"),
        (_edit("n_masks", -1), r"field 'n_masks' has an impossible value -1"),
        (_edit("block_size", 0), r"field 'block_size' has an impossible value 0"),
        (_edit("seed", -3), r"field 'seed' has an impossible value -3"),
        (_edit("sampler", "sobol"), r"field 'sampler' has an impossible value 'sobol'"),
        (_edit("dtype", "int8"), r"field 'dtype' has an impossible value 'int8'"),
        (_edit("n_components", 25), r"groups add up to 24 units, but n_components is 25"),
        (_edit("components", [["features.0", "conv", "8"]]), r"\[module, kind, n_units\]"),
        (_edit("components", ["features.0"]), r"\[module, kind, n_units\].*\"features.0\""),
        (_edit("format_version", 3), r"format version 3; this coarpy reads versions 1, 2"),
    ],
)
def test_hand_edited_meta_is_refused_clearly(store_copy, edit, match):
    meta_path = store_copy / "meta.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreCorruptError, match=match):
        ComponentDataset(store_copy)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b'{"alpha": 0.1,', r"meta.json is not valid JSON"),
        (b"\xff\xfe\x00garbage", r"meta.json is not valid JSON"),
        (b"[1, 2, 3]", r"meta.json should hold a JSON object, got list"),
        (b"", r"meta.json is not valid JSON"),
    ],
)
def test_meta_that_is_not_a_json_object_is_refused(store_copy, raw, match):
    (store_copy / "meta.json").write_bytes(raw)
    with pytest.raises(StoreCorruptError, match=match):
        ComponentDataset(store_copy)


def test_a_directory_without_meta_is_not_a_store(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No component dataset at .*no meta.json"):
        ComponentDataset(tmp_path)


def test_create_refuses_bad_settings(tmp_path):
    common = {"components": [["a", "conv", 3]], "n_examples": 2, "n_masks": 4, "seed": 0}
    with pytest.raises(ValueError, match=r"dtype must be one of \('float32', 'float16'\)"):
        ComponentDataset.create(tmp_path / "a", alpha=0.1, dtype="int8", **common)
    with pytest.raises(ValueError, match=r"block_size must be >= 1"):
        ComponentDataset.create(tmp_path / "b", alpha=0.1, block_size=0, **common)
    with pytest.raises(ValueError, match=r"alpha is the fraction"):
        ComponentDataset.create(tmp_path / "c", alpha=2.0, **common)
    assert not any(tmp_path.iterdir())


# -- nothing is unpickled ---------------------------------------------------------


def test_reading_never_unpickles(store_copy, monkeypatch):
    ds = ComponentDataset(store_copy)
    plain = ds.masks(), ds.outputs()

    def refuse(*args, **kwargs):
        raise AssertionError("the store unpickled something")

    class NoUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(torch, "load", refuse)
    reopened = ComponentDataset(store_copy)
    assert torch.equal(reopened.masks(), plain[0]) and torch.equal(reopened.outputs(), plain[1])
    reopened.consolidate()
    assert torch.equal(reopened.masks(), plain[0]) and torch.equal(reopened.outputs(), plain[1])
    assert reopened.verify() == []


# -- identity: a store's blocks are its own (issue #16) ------------------------------------


def _v1(path: Path) -> None:
    """Rewrite a format-2 store as an older coarpy (format 1) wrote it: no identity."""
    import hashlib
    import struct

    meta = json.loads((path / "meta.json").read_text())
    for key in ("structure", "output_code", "autocast", "prefix", "compile_model", "identity"):
        meta.pop(key)
    meta["format_version"] = 1
    (path / "meta.json").write_text(json.dumps(meta))
    for f in sorted((path / "blocks").glob("*.blk")):
        data = f.read_bytes()
        head = struct.unpack_from("<QQQQQB16s", data, 8)
        body = b"COARBLK1" + struct.pack("<QQQQQB", *head[:6]) + data[8 + 57 : -32]
        f.unlink()
        (path / "blocks" / f"b{head[0]:06d}.blk").write_bytes(body + hashlib.sha256(body).digest())


def test_a_block_copied_from_another_store_is_never_counted_done(
    store_copy, tmp_path, trained_cnn, conv, examples
):
    other = tmp_path / "other"
    collect(trained_cnn, conv, examples, path=other, progress=False, **{**SETTINGS, "seed": 1})
    pristine = block_bytes(store_copy)
    shutil.copy(other / "blocks" / "b000001.blk", store_copy / "blocks" / "b000001.blk")
    ds = ComponentDataset(store_copy)
    assert ds.done_blocks() == [0, 2] and ds.verify() == [1]
    with pytest.raises(StoreCorruptError, match=r"b000001.blk belongs to another store"):
        ds.outputs()
    collect(trained_cnn, conv, examples, path=store_copy, progress=False, **SETTINGS)
    assert block_bytes(store_copy) == pristine


def test_after_meta_loss_a_resume_with_another_model_adopts_none_of_the_old_blocks(
    store_copy, tmp_path, trained_cnn, conv, examples
):
    (store_copy / "meta.json").unlink()
    other = copy.deepcopy(trained_cnn)
    with torch.no_grad():
        other.classifier[3].bias.add_(1.0)  # same architecture, other weights
    ds = collect(other, conv, examples, path=store_copy, progress=False, **SETTINGS)
    fresh = collect(other, conv, examples, path=tmp_path / "fresh", progress=False, **SETTINGS)
    assert block_bytes(store_copy) == block_bytes(tmp_path / "fresh")  # all recomputed
    assert torch.equal(ds.outputs(), fresh.outputs())


def test_after_meta_loss_a_resume_with_the_same_settings_adopts_its_own_blocks(
    store_copy, trained_cnn, conv, examples, monkeypatch
):
    pristine = block_bytes(store_copy)
    (store_copy / "meta.json").unlink()
    calls = []
    monkeypatch.setattr(ComponentDataset, "write_block", lambda *a: calls.append(a))
    collect(trained_cnn, conv, examples, path=store_copy, progress=False, **SETTINGS)
    assert calls == []  # every block proved its own by the identity in its header
    assert block_bytes(store_copy) == pristine


def test_meta_edited_after_creation_is_refused_by_its_identity(store_copy):
    meta = json.loads((store_copy / "meta.json").read_text())
    meta["seed"] = 5  # a valid value, but not the one the blocks were computed with
    (store_copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreCorruptError, match=r"edited after the store was created"):
        ComponentDataset(store_copy)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ("activation", "structure"),
        ("output_body", "output_code"),
        ("autocast", "autocast"),
        ("split", "prefix"),
    ],
)
def test_the_identity_covers_structure_output_code_precision_and_a_split(
    tmp_path, trained_cnn, conv, examples, change, field
):
    from coarpy.prefix import Split

    def first(model, batch):
        return model(batch[0])[:, 0]

    def second(model, batch):  # the same name, another body
        return model(batch[0])[:, 1]

    second.__qualname__ = first.__qualname__
    path = tmp_path / "run"
    collect(trained_cnn, conv, examples, path=path, output=first, progress=False, **SETTINGS)
    model, kwargs = trained_cnn, {"output": first}
    if change == "activation":
        model = copy.deepcopy(trained_cnn)
        model.features[2] = torch.nn.GELU()  # the same weights, another function
    elif change == "output_body":
        kwargs["output"] = second
    elif change == "autocast":
        kwargs["autocast"] = "bf16"
    else:
        kwargs["prefix"] = Split(lambda x: x, trained_cnn, where="identity cut")
    with pytest.raises(StoreMismatchError, match=rf"{field}: stored"):
        collect(model, conv, examples, path=path, progress=False, **kwargs, **SETTINGS)


def test_a_format_1_store_is_read_but_not_resumed(store_copy, trained_cnn, conv, examples):
    plain = ComponentDataset(store_copy)
    masks, outputs = plain.masks(), plain.outputs()
    _v1(store_copy)
    old = ComponentDataset(store_copy)
    assert old.version == 1 and len(old) == 7 and old.verify() == []
    assert torch.equal(old.masks(), masks) and torch.equal(old.outputs(), outputs)
    with pytest.raises(StoreMismatchError, match=r"older coarpy \(store format 1\)"):
        collect(trained_cnn, conv, examples, path=store_copy, progress=False, **SETTINGS)
    ds = collect(
        trained_cnn, conv, examples, path=store_copy, progress=False, overwrite=True, **SETTINGS
    )
    assert ds.version == 2 and torch.equal(ds.outputs(), outputs)


def test_a_bit_flipped_block_is_not_counted_done_on_resume(store_copy, trained_cnn, conv, examples):
    pristine = block_bytes(store_copy)
    path = ComponentDataset(store_copy).block_path(0)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # same size, same header: only the checksum tells
    path.write_bytes(bytes(data))
    assert ComponentDataset(store_copy).is_done(0) and not ComponentDataset(store_copy).intact(0)
    collect(trained_cnn, conv, examples, path=store_copy, progress=False, **SETTINGS)
    assert block_bytes(store_copy) == pristine


# -- growth under concurrency ---------------------------------------------------------------


def test_racing_growers_of_n_masks_end_with_the_largest(store_copy):
    old = ComponentDataset(store_copy).meta
    keys = ("components", "n_examples", "fingerprint", "structure", "data_fingerprint")
    identity = {k: old[k] for k in keys}
    sizes = list(range(8, 40))
    start = threading.Barrier(len(sizes))

    def grow(n):
        start.wait()
        ComponentDataset.create(store_copy, **identity, **{**SETTINGS, "n_masks": n})

    threads = [threading.Thread(target=grow, args=(n,)) for n in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ComponentDataset(store_copy).n_masks == max(sizes)


def test_a_worker_with_the_old_n_masks_never_replaces_a_block_of_the_grown_run(store_copy):
    old = ComponentDataset(store_copy)  # n_masks 7: block 2 holds 1 row
    keys = ("components", "n_examples", "fingerprint", "structure", "data_fingerprint")
    identity = {k: old.meta[k] for k in keys}
    grown = ComponentDataset.create(store_copy, **identity, **{**SETTINGS, "n_masks": 11})
    full = sample_masks(6, 9, 24, alpha=0.1, seed=0)
    grown.write_block(2, full, torch.ones(3, 40))
    keep, y = old.read_block(2)
    old.write_block(2, keep, y)  # the old worker commits its 1-row block 2 afterwards
    reopened = ComponentDataset(store_copy)
    assert reopened.is_done(2) and torch.equal(reopened.read_block(2)[0], full)
    assert reopened.sweep() == 1  # the old short block, useless to the grown run


# -- consolidated copies ---------------------------------------------------------------------


def test_an_edited_consolidated_copy_is_never_read(store_copy):
    ds = ComponentDataset(store_copy)
    truth = ds.outputs()
    ds.consolidate()
    arr = np.load(store_copy / "consolidated" / "outputs.npy")
    arr[0, 0] += 1.0
    np.save(store_copy / "consolidated" / "outputs.npy", arr)
    reopened = ComponentDataset(store_copy)
    with pytest.warns(UserWarning, match=r"outputs.npy fails its checksum"):
        assert torch.equal(reopened.outputs(), truth)
    assert "fails its checksum" in reopened.consolidated_problem()
    reopened.verify(repair=True)
    assert not (store_copy / "consolidated" / "outputs.npy").exists()


def test_consolidate_never_writes_through_a_symlink(store_copy, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (store_copy / "consolidated").symlink_to(target)
    with pytest.raises(StoreCorruptError, match="is a symbolic link"):
        ComponentDataset(store_copy).consolidate()
    assert list(target.iterdir()) == []
    (store_copy / "consolidated").unlink()
    folder = store_copy / "consolidated"
    folder.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    for name in (".masks.npy.tmp", ".outputs.npy.tmp"):  # the fixed names of old
        (folder / name).symlink_to(victim)
    ComponentDataset(store_copy).consolidate()
    assert victim.read_bytes() == b"precious"


# -- leftovers and failed writes ---------------------------------------------------------------


def test_collect_sweeps_temporary_files_of_dead_writers_only(
    store_copy, trained_cnn, conv, examples
):
    blocks = store_copy / "blocks"
    dead = blocks / f".b000001.blk~{platform.node()}~{dead_pid()}~ab12.tmp"
    live = blocks / f".b000002.blk~{platform.node()}~{os.getpid()}~cd34.tmp"
    old = blocks / ".b000003.blk.123.456.tmp"  # an older coarpy's name: judged by age
    for f in (dead, live, old):
        f.write_bytes(b"half a block")
    stale = time.time() - 2 * 3600
    os.utime(old, (stale, stale))
    collect(trained_cnn, conv, examples, path=store_copy, progress=False, **SETTINGS)
    assert not dead.exists() and not old.exists() and live.exists()


def test_a_full_disk_stops_collect_with_a_clear_error_and_no_partial_file(
    tmp_path, trained_cnn, conv, examples, monkeypatch
):
    from coarpy import _fs

    written = []
    real = _fs._write_all

    def fill_up(fd, data):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(len(data))
        real(fd, data)

    monkeypatch.setattr(_fs, "_write_all", fill_up)
    path = tmp_path / "run"
    with pytest.raises(StorageError, match=r"disk \(or your quota\) is full.*No partial file"):
        collect(trained_cnn, conv, examples, path=path, progress=False, **SETTINGS)
    assert isinstance(StorageError("x"), CoarError)
    assert not [f for f in (path / "blocks").iterdir() if f.name.endswith(".tmp")]
    assert ComponentDataset(path).done_blocks() == [0]  # meta.json, then block 0
