"""Where a store lives: a local directory, or a folder on any fsspec filesystem.

``path(location)`` gives a ``pathlib.Path`` for a plain path (or a ``file://`` URL), so
local stores keep their POSIX guarantees untouched (temporary file, fsync, atomic
rename). A URL with another scheme (``s3://``, ``gs://``, ``memory://``) gives a
``RemotePath``: the handful of ``pathlib`` operations the store uses, done with fsspec
(imported only then). On an object store a single PUT is atomic by itself, so a block
is written in one call, with no temporary name and no rename.

Why not ``universal-pathlib`` (``UPath``, a pathlib API over fsspec)? Evaluated at 0.3.10
(issue 17), it would replace the naming and plain read/write methods of
:class:`RemotePath` (about 60 lines) but not the rest, so it removes little and adds
risk:

- ``UPath("memory://...").stat().st_mtime`` is 0 (it reads only the ``info`` keys),
  while heartbeats, leases and ``coar status`` need real modification times:
  :meth:`RemotePath.stat` asks ``fs.modified`` first, and would stay.
- Ranged reads of a block's header (:meth:`RemotePath.read_range`) and the exclusive
  create with its fallback for filesystems without mode ``"xb"`` (``_write_new``) are
  not in its API and would stay, as would the local/remote split (a local ``UPath`` is
  a ``PosixUPath``, so ``is_remote`` would test the protocol instead of the type).
- It is 8,500 lines with its own pins (``pathlib-abc<0.6``, ``fsspec>=2024.5``) and an
  API that was rewritten between 0.2 and 0.3; what the store needs from fsspec is the
  dozen calls below, which fsspec itself keeps stable.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import platform
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .errors import ArgumentError, MissingExtraError, StorageError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(location: str | os.PathLike) -> bool:
    """True if ``location`` is a URL with a scheme, such as ``s3://bucket/run``."""
    return isinstance(location, str) and bool(_SCHEME.match(location))


def path(location: str | os.PathLike | RemotePath) -> Path | RemotePath:
    """A ``Path`` for local locations, a ``RemotePath`` for fsspec URLs."""
    if isinstance(location, RemotePath):
        return location
    if is_url(location):
        if location.startswith("file://"):
            return Path(location[len("file://") :])
        return RemotePath(location)
    return Path(location)


def is_remote(location: object) -> bool:
    """True for a ``RemotePath`` (a store on an fsspec filesystem)."""
    return isinstance(location, RemotePath)


_TEMP = re.compile(r"^\.(?P<name>.+)~(?P<host>[^~]*)~(?P<pid>\d+)~[0-9a-f]+\.tmp$")
STALE_TEMP_S = 3600.0  # a temporary file this old is a dead writer's, whoever wrote it


def temp_name(path: Path) -> Path:
    """A fresh temporary name next to ``path``: ``.NAME~HOST~PID~RANDOM.tmp``.

    Host and pid say whose it is, so :func:`sweep_temp` can tell a dead writer's
    leftover from a live writer's file in progress.
    """
    host = platform.node().replace("~", "-").replace("/", "-")
    return path.with_name(f".{path.name}~{host}~{os.getpid()}~{secrets.token_hex(6)}.tmp")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _open_new(tmp: Path) -> int:
    """Create ``tmp`` exclusively, never following a symlink planted at its name."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    return os.open(tmp, flags, 0o666)


def storage_error(err: OSError, path: object, nbytes: int) -> StorageError:
    """A StorageError for a failed write of ``nbytes`` to ``path``, saying what to do."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        why = f"the disk (or your quota) is full ({err.strerror or err})"
        fix = "Free space or move the run to a larger disk, then run the same command again"
    elif err.errno == errno.EROFS:
        why = "the filesystem is read-only"
        fix = "Use a writable directory"
    else:
        why = f"{type(err).__name__}: {err.strerror or err}"
        fix = "Check the directory's permissions and free space, then run again"
    out = StorageError(
        f"Could not write {path} ({nbytes} bytes): {why}. No partial file was left behind; "
        f"finished work is kept. {fix}."
    )
    out.errno = err.errno
    return out


def atomic_write(path: Path | RemotePath, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary name, fsync, rename.

    Readers see the old file or the new one, never a part. If the write fails (a full
    disk, say) the temporary file is removed and a ``StorageError`` raised; the old
    file stays. The temporary file is created exclusively and never through a symlink.
    On an object store (``RemotePath``) one PUT is atomic by itself.
    """
    if isinstance(path, RemotePath):
        path.write_bytes(data)
        return
    tmp = temp_name(path)
    created = False
    try:
        fd = _open_new(tmp)
        created = True
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as err:
        if created:  # never remove what another process put at that name
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, StorageError):
            raise storage_error(err, path, len(data)) from err
        raise
    with contextlib.suppress(OSError):  # make the rename durable where the OS allows it
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_new(target: Path | RemotePath, data: bytes) -> bool:
    """Create ``target`` holding ``data`` unless it exists; False if it already did.

    Locally: a temporary file hard-linked into place, so the file appears whole and
    only one of several racing writers creates it. On fsspec: an exclusive create
    (mode ``"xb"``) where the filesystem offers one, else a check then a PUT, which is
    enough for ``meta.json``: racing writers write the same settings, and a mismatch
    is caught when the store is next opened.
    """
    if isinstance(target, RemotePath):
        return target._write_new(data)
    tmp = temp_name(target)
    created = False
    try:
        fd = _open_new(tmp)
        created = True
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, target)  # fails if another writer created it first
            return True
        except FileExistsError:
            return False
    except OSError as err:
        raise storage_error(err, target, len(data)) from err
    finally:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    with contextlib.suppress(OSError, IndexError):
        # /proc/PID/stat: "pid (comm) S ...": a zombie is dead
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    return True


def sweep_temp(folder: Path | RemotePath, *, older_than: float = STALE_TEMP_S) -> int:
    """Delete temporary files in ``folder`` that no live writer will rename; their count.

    A temporary file is a dead writer's when its pid is not alive on this host, or
    when it is older than ``older_than`` seconds (any writer renames within seconds).
    """
    if isinstance(folder, RemotePath):
        return 0  # object stores write in one PUT: no temporary files
    host = platform.node().replace("~", "-").replace("/", "-")
    now = time.time()
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        m = _TEMP.match(entry.name)
        dead = m is not None and m["host"] == host and not pid_alive(int(m["pid"]))
        if dead or now - info.st_mtime > older_than:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    return removed


@contextlib.contextmanager
def locked(lock: Path | RemotePath, *, timeout_s: float = 60.0, what: str = "") -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` (created if needed) inside the block.

    ``fcntl.flock`` locks are released by the OS when their holder dies, so a killed
    process never leaves the lock held. On an fsspec filesystem, or without fcntl,
    nothing is locked. Waiting longer than ``timeout_s`` raises a ``StorageError``.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        fcntl = None
    if isinstance(lock, RemotePath) or fcntl is None:
        yield
        return
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as err:
        raise storage_error(err, lock, 0) from err
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StorageError(
                        f"Waited {timeout_s:g} s for the lock {lock}{what}, which another "
                        "process holds. If no other coarpy process uses this run, the "
                        "filesystem's locks are broken: collect on a local disk."
                    ) from None
                time.sleep(0.01)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class RemotePath:
    """A path on an fsspec filesystem with the few ``pathlib`` methods a store uses."""

    def __init__(self, url: str, *, fs: Any = None):
        if fs is None:
            try:
                import fsspec
            except ImportError as err:
                raise MissingExtraError(
                    f"The store location {url!r} is a URL, which needs fsspec (and the "
                    "package for its scheme, e.g. s3fs). Install it with "
                    "`pip install coarpy[fsspec]`, or use a local directory."
                ) from err
            try:
                fs, _ = fsspec.core.url_to_fs(url)
            except ImportError as err:  # fsspec knows the scheme; its package is missing
                raise MissingExtraError(
                    f"The store location {url!r} needs a filesystem package that is not "
                    f"installed: {err}. Install it (e.g. `pip install s3fs` for s3://), or "
                    "use a local directory."
                ) from err
            except ValueError as err:
                raise ArgumentError(
                    f"The store location {url!r} has a scheme fsspec does not know ({err}). "
                    "Check the URL (s3://, gs://, ...), or use a local directory."
                ) from err
        self.fs = fs
        self.url = url.rstrip("/")
        self._fs_path = fs._strip_protocol(self.url)

    # -- naming ---------------------------------------------------------------------
    def __truediv__(self, part: str) -> RemotePath:
        return RemotePath(f"{self.url}/{part}", fs=self.fs)

    def joinpath(self, *parts: str) -> RemotePath:
        out = self
        for part in parts:
            out = out / part
        return out

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.url.rsplit("/", 1)[0], fs=self.fs)

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    # -- reading --------------------------------------------------------------------
    def exists(self) -> bool:
        return bool(self.fs.exists(self._fs_path))

    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self._fs_path))

    def stat(self) -> SimpleNamespace:
        """``st_size`` and ``st_mtime`` (seconds); FileNotFoundError if absent."""
        info = self.fs.info(self._fs_path)  # raises FileNotFoundError
        try:
            mtime = self.fs.modified(self._fs_path).timestamp()
        except (NotImplementedError, AttributeError, OSError, ValueError):
            when = info.get("mtime", info.get("LastModified", info.get("created", 0.0)))
            mtime = when.timestamp() if hasattr(when, "timestamp") else float(when)
        return SimpleNamespace(st_size=int(info.get("size") or 0), st_mtime=mtime)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self._fs_path)

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` (exclusive) of the file: one ranged read."""
        return self.fs.cat_file(self._fs_path, start=start, end=end)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def iterdir(self) -> Iterator[RemotePath]:
        if not self.fs.exists(self._fs_path):
            return
        for entry in self.fs.ls(self._fs_path, detail=False):
            yield self / str(entry).rstrip("/").rsplit("/", 1)[-1]

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        for child in self.iterdir():
            if fnmatch.fnmatchcase(child.name, pattern):
                yield child

    # -- writing --------------------------------------------------------------------
    def write_bytes(self, data: bytes) -> int:
        """One PUT: on an object store the object appears whole or not at all."""
        self.fs.pipe_file(self._fs_path, data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def _write_new(self, data: bytes) -> bool:
        try:
            with self.fs.open(self._fs_path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (NotImplementedError, ValueError):
            if self.exists():
                return False
            self.write_bytes(data)
            return True

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        # Object stores have no folders; where folders exist, make them.
        self.fs.makedirs(self._fs_path, exist_ok=True)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self._fs_path)
        except FileNotFoundError:
            if not missing_ok:
                raise
