"""Where stores live (coarpy._fs): local paths stay pathlib paths, URLs go through
fsspec, and writes appear whole or not at all."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from coarpy import _fs
from coarpy.errors import ArgumentError, StorageError

fsspec = pytest.importorskip("fsspec")


@pytest.fixture
def memory(tmp_path):
    """A folder of fsspec's in-memory filesystem, removed afterwards."""
    url = f"memory://coar-fs-{tmp_path.name}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/coar-fs-{tmp_path.name}"):
        fs.rm(f"/coar-fs-{tmp_path.name}", recursive=True)


# -- naming ------------------------------------------------------------------------------


def test_plain_paths_and_file_urls_are_local_paths():
    assert _fs.path("runs/x") == Path("runs/x")
    assert _fs.path(Path("/tmp/r")) == Path("/tmp/r")
    assert _fs.path("file:///tmp/r") == Path("/tmp/r")
    assert not _fs.is_remote(_fs.path("runs/x"))


def test_a_url_stays_a_url_instead_of_becoming_a_local_folder(memory):
    where = _fs.path(f"{memory}/run")
    assert _fs.is_remote(where) and str(where) == f"{memory}/run"
    assert str(where / "blocks" / "b000001.blk") == f"{memory}/run/blocks/b000001.blk"
    assert (where / "meta.json").parent == where and where.name == "run"
    assert _fs.is_url("s3://bucket/run") and not _fs.is_url("s3:/bucket/run")


def test_a_url_of_an_unknown_scheme_is_refused_by_name():
    with pytest.raises(ArgumentError, match="'nosuch://b/run' has a scheme fsspec does not know"):
        _fs.path("nosuch://b/run")


# -- atomic writes -------------------------------------------------------------------------


def test_atomic_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "meta.json"
    target.write_bytes(b"old")
    _fs.atomic_write(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "meta.json"
    target.write_bytes(b"old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(StorageError, match="disk .* is full .*No space left.*No partial file"):
        _fs.atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


# -- exclusive creation ------------------------------------------------------------------------


def test_write_new_creates_once_and_never_overwrites(tmp_path):
    target = tmp_path / "meta.json"
    assert _fs.write_new(target, b"first")
    assert not _fs.write_new(target, b"second")
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_of_racing_creators_exactly_one_wins_and_its_bytes_are_whole(tmp_path):
    target = tmp_path / "meta.json"
    n = 16
    start = threading.Barrier(n)
    won = [False] * n
    payloads = [bytes([i]) * 100_000 for i in range(n)]

    def create(i):
        start.wait()
        won[i] = _fs.write_new(target, payloads[i])

    threads = [threading.Thread(target=create, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(won) == 1
    assert target.read_bytes() == payloads[won.index(True)]
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


# -- fsspec filesystems ---------------------------------------------------------------------------


def test_memory_filesystem_round_trip(memory):
    run = _fs.path(f"{memory}/run")
    run.mkdir(parents=True, exist_ok=True)
    _fs.atomic_write(run / "config.toml", b'path = "x"\n')
    assert (run / "config.toml").read_text() == 'path = "x"\n'
    assert _fs.write_new(run / "meta.json", b"{}")
    assert not _fs.write_new(run / "meta.json", b"[]")
    assert (run / "meta.json").read_bytes() == b"{}"
    assert sorted(p.name for p in run.iterdir()) == ["config.toml", "meta.json"]
    assert [p.name for p in run.glob("*.toml")] == ["config.toml"]
    assert run.is_dir() and (run / "meta.json").stat().st_size == 2
    (run / "meta.json").unlink()
    assert not (run / "meta.json").exists()
    (run / "meta.json").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        (run / "meta.json").unlink()
