"""Block leases: which worker computes which block, so that fast workers take more.

A worker in claim mode takes a block by creating ``RUN/leases/b000017.lease`` with
``O_CREAT | O_EXCL`` (only one creator succeeds), holding ``{"host", "pid", "time",
"token"}``. While it holds leases, a background thread touches them every
``lease_s / 4`` seconds. A lease is stale when its file has not been touched for
``lease_s`` seconds, or when its holder is a dead process on this host (a restarted
worker need not wait). A stale lease is taken over atomically: the taker first creates
``b000017.lease.takeover`` with ``O_EXCL`` (of several racing takers, one succeeds),
checks that the lease file is still the stale one it inspected (same inode, not
renewed since), and renames its own lease file over it. The lease file never goes
missing during a takeover, so no plain claimer can slip in between.

Leases only avoid duplicate work; correctness never depends on them. A block is done
iff its file exists, and two workers computing one block write identical bytes, so a
lost race costs time, never data. Leases need a POSIX filesystem shared by the
workers (local disk, NFS, Lustre); object stores use static shards or Ray instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from .. import _fs
from ..errors import ArgumentError
from ..store import ComponentDataset
from .layout import LEASES

log = logging.getLogger(__name__)

LEASE_S = 120.0  # a lease untouched this long is stale; holders touch it every LEASE_S / 4


def lease_path(run: Path, block: int) -> Path:
    """The lease file of ``block`` in the run directory ``run``."""
    return run / LEASES / f"b{block:06d}.lease"


def _alive(pid: int) -> bool:
    """True if process ``pid`` exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        # /proc/PID/stat: "pid (comm) S ..."; comm may hold spaces, so split after ")"
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    return True


def _read(path: Path) -> dict:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # just created and not yet written, or gone: judge by its age alone
    return info if isinstance(info, dict) else {}


class Claims:
    """Claim blocks of a store one at a time, until every candidate block is done.

    Use as a context manager and pass it to ``coarpy.collect`` as ``blocks=``:
    iterating yields the blocks this worker now holds, in order, skipping finished
    ones and waiting for blocks leased by live workers (taking them over if their
    holder dies). On exit every lease still held is released, so other workers can
    take those blocks at once.

    Parameters
    ----------
    run : the store, or its directory on a local or shared POSIX filesystem. The
        store may not exist yet: it is opened when the iteration starts (``collect``
        creates it first).
    blocks : the candidate blocks, in the order to try them (default: every block of
        the store, those of ``shard`` first, so that workers start apart).
    shard : ``(k, K)``: this worker's share, tried first when ``blocks`` is None.
    lease_s : seconds after which an untouched lease is stale.
    """

    def __init__(
        self,
        run: ComponentDataset | str | os.PathLike,
        blocks: Iterable[int] | None = None,
        *,
        shard: tuple[int, int] | None = None,
        lease_s: float = LEASE_S,
    ):
        self._ds = run if isinstance(run, ComponentDataset) else None
        self.run = _fs.path(run.path if isinstance(run, ComponentDataset) else run)
        if _fs.is_remote(self.run):
            raise ArgumentError(
                f"Claiming blocks needs the store on a POSIX filesystem for its lease files, "
                f"but {self.run} is on a remote filesystem. Use static shards (shard='k/K') "
                "or coarpy.runs.ray, which hands out blocks without lease files."
            )
        if isinstance(lease_s, bool) or not (isinstance(lease_s, (int, float)) and lease_s > 0):
            raise ArgumentError(
                f"lease_s must be a positive number of seconds, got {lease_s!r}. Pass e.g. "
                f"lease_s={LEASE_S:g}."
            )
        self.blocks = None if blocks is None else list(blocks)
        self.shard = shard
        self.lease_s = float(lease_s)
        self.poll_s = min(1.0, self.lease_s / 4)
        self.token = uuid.uuid4().hex
        self.host = platform.node()
        self.held: dict[int, Path] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    @property
    def ds(self) -> ComponentDataset:
        """The store, opened at first use (it must exist by then)."""
        if self._ds is None:
            self._ds = ComponentDataset(self.run)
        return self._ds

    def _order(self) -> list[int]:
        if self.blocks is not None:
            return self.blocks
        every = range(self.ds.n_blocks)
        if self.shard is None:
            return list(every)
        k, n = self.shard
        return [b for b in every if b % n == k] + [b for b in every if b % n != k]

    # -- context ----------------------------------------------------------------------
    def __enter__(self) -> Claims:
        self._keeper = threading.Thread(target=self._keep_alive, name="coar-leases", daemon=True)
        self._keeper.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join()
        with self._lock:
            for block in list(self.held):
                self._release(block)

    def _keep_alive(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            with self._lock:
                for path in self.held.values():
                    if _read(path).get("token") == self.token:  # still ours
                        with contextlib.suppress(OSError):
                            os.utime(path)

    # -- claiming ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[int]:
        remaining = self._order()
        while remaining:
            waiting = []
            for block in remaining:
                self._release_finished()
                if self.ds.is_done(block):
                    continue
                if not self.acquire(block):
                    waiting.append(block)
                elif self.ds.is_done(block):  # finished between the check and the lease
                    with self._lock:
                        self._release(block)
                else:
                    yield block
            remaining = [b for b in waiting if not self.ds.is_done(b)]
            if remaining:  # leased by live workers: wait for them, or for their leases to lapse
                time.sleep(self.poll_s)
        self._release_finished()
        self._sweep()

    def _sweep(self) -> None:
        """Delete leases of finished blocks that dead workers left behind (harmless, untidy)."""
        for path in (self.run / LEASES).glob("b*.lease"):
            block = int(path.stem[1:])
            if block < self.ds.n_blocks and self.ds.is_done(block):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def acquire(self, block: int) -> bool:
        """Take the lease of ``block``: create it, or take over a stale one."""
        if self._create(block):
            return True
        return self._take_over(block)

    def _create(self, block: int) -> bool:
        path = lease_path(self.run, block)
        path.parent.mkdir(exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self._info()))
        with self._lock:
            self.held[block] = path
        return True

    def _info(self) -> dict:
        return {"host": self.host, "pid": os.getpid(), "time": time.time(), "token": self.token}

    def _stale(self, seen: os.stat_result, info: dict) -> bool:
        if time.time() - seen.st_mtime > self.lease_s:
            return True
        pid = info.get("pid")
        return (
            info.get("host") == self.host
            and isinstance(pid, int)
            and pid != os.getpid()
            and not _alive(pid)
        )

    def _take_over(self, block: int) -> bool:
        path = lease_path(self.run, block)
        try:
            seen = os.stat(path)
        except FileNotFoundError:
            return self._create(block)  # released meanwhile
        info = _read(path)
        if not self._stale(seen, info):
            return False
        lock = path.with_name(f"{path.name}.takeover")
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            # another worker is taking it over; a lock left by a dead taker expires too
            with contextlib.suppress(FileNotFoundError):
                if time.time() - os.stat(lock).st_mtime > self.lease_s:
                    os.unlink(lock)
            return False
        try:
            try:
                now = os.stat(path)
            except FileNotFoundError:
                return self._create(block)
            if (now.st_ino, now.st_mtime_ns) != (seen.st_ino, seen.st_mtime_ns):
                return False  # renewed, released or taken since we looked: not stale
            tmp = path.with_name(f".{path.name}.{self.token}.tmp")
            tmp.write_text(json.dumps(self._info()))
            os.replace(tmp, path)  # atomic: the lease is never missing
            with self._lock:
                self.held[block] = path
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
        log.info(
            "block %d: took over the stale lease of %s pid %s",
            block,
            info.get("host", "?"),
            info.get("pid", "?"),
        )
        return True

    # -- releasing --------------------------------------------------------------------
    def _release(self, block: int) -> None:
        """Delete the lease of ``block`` if it is still ours (caller holds the lock)."""
        path = self.held.pop(block)
        if _read(path).get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _release_finished(self) -> None:
        with self._lock:
            for block in [b for b in self.held if self.ds.is_done(b)]:
                self._release(block)
