"""Block leases: which worker computes which block, so that fast workers take more.

A worker in claim mode takes a block by creating ``RUN/leases/b000017.lease`` with
``O_CREAT | O_EXCL`` (only one creator succeeds), holding ``{"host", "pid", "time",
"token"}``. While it holds leases, a background thread touches them every
``lease_s / 4`` seconds, but only while the worker makes progress: once it has run no
forward pass for ``stall_s`` seconds (its main thread hangs in a driver call, say) the
thread stops renewing, so the lease lapses although the process lives. A lease is
stale when its file has not been touched for ``lease_s`` seconds, or when its holder
is a dead process on this host (a restarted worker need not wait). A stale lease is
taken over atomically: the taker first creates ``b000017.lease.takeover`` with
``O_EXCL`` (of several racing takers, one succeeds), checks that the lease file is
still the stale one it inspected (same inode, not renewed since), and renames its own
lease file over it. The lease file never goes
missing during a takeover, so no plain claimer can slip in between.

Leases only avoid duplicate work; correctness never depends on them. A block is done
iff its file exists, and two workers computing one block write identical bytes, so a
lost race costs time, never data. Leases need a POSIX filesystem shared by the
workers (local disk, NFS, Lustre); object stores use static shards or Ray instead.

Why leases of our own, not a job queue (Redis, Celery) or ``filelock``: a queue needs a
server that outlives every worker on a cluster, which the run directory alone does
not; ``filelock`` gives a mutex that waits, not a claim that lapses when its holder
stalls and can be taken over. The engines that schedule well (SLURM arrays, Ray) are
used as launchers; leases only let any mix of their workers share one run's blocks,
with ``O_EXCL`` creates and modification times, which shared POSIX filesystems keep.

A worker waiting for blocks that live workers hold says so in the log (which blocks,
whose leases, how fresh) and gives up with a ``CollectError`` when no block of the run
has finished for ``max_wait_s`` seconds. A file in ``leases/`` that is not a lease is
ignored, with a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from .. import _checks, _fs
from .._engine import seconds_since_progress
from ..errors import ArgumentError, CollectError
from ..store import ComponentDataset
from .layout import LEASES

log = logging.getLogger(__name__)

LEASE_S = 120.0  # a lease untouched this long is stale; holders touch it every LEASE_S / 4
STALL_S = 600.0  # a holder with no forward pass this long stops renewing its leases
MAX_WAIT_S = 6 * 3600.0  # a waiting worker gives up when no block finishes this long
_LOG_EVERY_S = 60.0  # how often a waiting worker says what it waits for
_LEASE_NAME = re.compile(r"^b(\d{6,})\.lease$")


def lease_path(run: Path, block: int) -> Path:
    """The lease file of ``block`` in the run directory ``run``."""
    return run / LEASES / f"b{block:06d}.lease"


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
    blocks : the candidate blocks (default: every block of the store), tried in their
        order after those of ``shard``, so that workers start apart.
    shard : ``(k, K)``: this worker's share of the candidates, tried first.
    lease_s : seconds after which an untouched lease is stale.
    stall_s : seconds without a forward pass in this process after which its leases
        are no longer renewed (a hung worker loses its blocks to others).
    max_wait_s : seconds a worker waits for blocks other workers hold while no block
        of the run finishes, before it stops with a ``CollectError``; None waits on.
    """

    def __init__(
        self,
        run: ComponentDataset | str | os.PathLike,
        blocks: Iterable[int] | None = None,
        *,
        shard: tuple[int, int] | None = None,
        lease_s: float = LEASE_S,
        stall_s: float = STALL_S,
        max_wait_s: float | None = MAX_WAIT_S,
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
        fix = "Pass a number of seconds, e.g. 600."
        self.stall_s = _checks.number(stall_s, "stall_s", positive_only=True, fix=fix)
        self.max_wait_s = (
            None
            if max_wait_s is None
            else _checks.number(max_wait_s, "max_wait_s", positive_only=True, fix=fix)
        )
        self.blocks = None if blocks is None else list(blocks)
        self.shard = _checks.shard(shard)
        self.lease_s = float(lease_s)
        self.poll_s = min(1.0, self.lease_s / 4)
        self.token = uuid.uuid4().hex
        self.host = platform.node()
        self.held: dict[int, Path] = {}
        self._acquired: dict[int, float] = {}  # block -> monotonic time it was taken
        self._lapsed: set[int] = set()  # held blocks no longer renewed (no progress)
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
        every = range(self.ds.n_blocks) if self.blocks is None else self.blocks
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
                now = time.monotonic()
                for block, path in self.held.items():
                    idle = min(seconds_since_progress(), now - self._acquired.get(block, now))
                    if idle > self.stall_s:  # hung: let the lease lapse so others take it
                        if block not in self._lapsed:
                            self._lapsed.add(block)
                            log.warning(
                                "no forward pass for %.0f s: no longer renewing the lease of "
                                "block %d, so another worker may take it over",
                                idle,
                                block,
                            )
                        continue
                    if _read(path).get("token") == self.token:  # still ours
                        with contextlib.suppress(OSError):
                            os.utime(path)

    # -- claiming ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[int]:
        remaining = self._order()
        waiting_since, last_log, done_seen = None, float("-inf"), -1
        while remaining:
            waiting = []
            for block in remaining:
                self._release_finished()
                if self.ds.intact(block):  # done, and its bytes pass the checksum
                    continue
                if not self.acquire(block):
                    waiting.append(block)
                elif self.ds.is_done(block):  # finished between the check and the lease
                    with self._lock:
                        self._release(block)
                else:
                    waiting_since = None
                    yield block
            remaining = [b for b in waiting if not self.ds.is_done(b)]
            if not remaining:
                break
            # leased by live workers: wait for them, or for their leases to lapse
            now = time.monotonic()
            done = len(self.ds.done_blocks())
            if waiting_since is None or done != done_seen:
                waiting_since, done_seen = now, done
            if now - last_log >= _LOG_EVERY_S:
                log.info("%s", self._waiting_for(remaining))
                last_log = now
            if self.max_wait_s is not None and now - waiting_since > self.max_wait_s:
                raise CollectError(
                    f"Waited {now - waiting_since:.0f} s (max_wait_s={self.max_wait_s:g}) "
                    f"while no block of {self.run} finished. {self._waiting_for(remaining)} "
                    "Check that those workers still make progress (coar status); a lease "
                    f"nobody renews lapses after lease_s={self.lease_s:g} s, or delete it."
                )
            time.sleep(self.poll_s)
        self._release_finished()
        self._sweep()

    def _waiting_for(self, blocks: list[int]) -> str:
        """Which blocks this worker waits for, and who holds them, in one line."""
        parts = []
        for block in blocks[:5]:
            path = lease_path(self.run, block)
            info = _read(path)
            try:
                age = f"renewed {time.time() - os.stat(path).st_mtime:.0f} s ago"
            except FileNotFoundError:
                age = "just released"
            parts.append(f"block {block} ({info.get('host', '?')}:{info.get('pid', '?')}, {age})")
        more = f" and {len(blocks) - 5} more" if len(blocks) > 5 else ""
        return f"Waiting for blocks other workers hold: {', '.join(parts)}{more}."

    def _sweep(self) -> None:
        """Delete leases of finished blocks that dead workers left behind (harmless, untidy),
        and takeover temporaries of dead workers. Files that are not leases are ignored,
        with a warning."""
        folder = self.run / LEASES
        _fs.sweep_temp(folder, older_than=max(self.lease_s, 60.0))
        if not folder.is_dir():
            return
        for path in folder.iterdir():
            m = _LEASE_NAME.match(path.name)
            if m is None:
                if not path.name.startswith(".") and not path.name.endswith(".takeover"):
                    warnings.warn(
                        f"{path} is not a lease file (leases are named b000017.lease); it is "
                        "ignored. Remove it if nothing of yours needs it.",
                        stacklevel=3,
                    )
                continue
            block = int(m[1])
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
            self._acquired[block] = time.monotonic()
            self._lapsed.discard(block)
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
            and not isinstance(pid, bool)
            and pid != os.getpid()
            and not _fs.pid_alive(pid)
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
            _fs.atomic_write(path, json.dumps(self._info()).encode())  # never missing
            with self._lock:
                self.held[block] = path
                self._acquired[block] = time.monotonic()
                self._lapsed.discard(block)
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
        self._acquired.pop(block, None)
        self._lapsed.discard(block)
        if _read(path).get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _release_finished(self) -> None:
        with self._lock:
            for block in [b for b in self.held if self.ds.is_done(b)]:
                self._release(block)
