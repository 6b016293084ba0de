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


# -- safety of temporary files, locks and full disks (issue #16) ------------------------------


def test_atomic_write_never_writes_through_a_symlink_at_its_temporary_name(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    planted = tmp_path / ".meta.json.tmp"
    planted.symlink_to(victim)
    monkeypatch.setattr(_fs, "temp_name", lambda path: planted)
    with pytest.raises(StorageError, match=r"Could not write .*meta.json"):
        _fs.atomic_write(tmp_path / "meta.json", b"new")
    assert victim.read_bytes() == b"precious" and planted.is_symlink()


def test_a_failed_exclusive_create_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full_disk(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_fs, "_write_all", full_disk)
    with pytest.raises(StorageError, match="No space left"):
        _fs.write_new(tmp_path / "meta.json", b"x" * 100)
    assert list(tmp_path.iterdir()) == []


def test_sweep_removes_temporary_files_of_dead_writers_and_old_ones_only(tmp_path):
    import platform
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    host = platform.node()
    dead = tmp_path / f".b000001.blk~{host}~{proc.pid}~ab.tmp"
    live = tmp_path / f".b000002.blk~{host}~{os.getpid()}~cd.tmp"
    distant = tmp_path / f".b000003.blk~another-host~{proc.pid}~ef.tmp"
    old = tmp_path / ".b000004.blk~another-host~1~ef.tmp"
    block = tmp_path / "b000005.blk"
    for f in (dead, live, distant, old, block):
        f.write_bytes(b"x")
    then = time.time() - 2 * _fs.STALE_TEMP_S
    os.utime(old, (then, then))
    assert _fs.sweep_temp(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (live, distant, block)
    )


def test_a_lock_is_held_by_one_holder_at_a_time_and_a_long_wait_is_an_error(tmp_path):
    lock = tmp_path / ".meta.lock"
    inside, order = threading.Event(), []

    def hold():
        with _fs.locked(lock):
            order.append("first in")
            inside.set()
            threading.Event().wait(0.3)
            order.append("first out")

    t = threading.Thread(target=hold)
    t.start()
    inside.wait()
    with (
        pytest.raises(StorageError, match=r"Waited 0.05 s for the lock"),
        _fs.locked(lock, timeout_s=0.05),
    ):
        pass
    with _fs.locked(lock, timeout_s=5):
        order.append("second in")
    t.join()
    assert order == ["first in", "first out", "second in"]
