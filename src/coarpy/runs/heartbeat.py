"""Heartbeats: ``RUN/workers/<host>-<pid>.json`` says who is collecting, where, and whether
it still lives.

Each collecting worker keeps one small JSON file, replaced atomically::

    {"host", "pid", "shard": [k, K] or null, "device", "time": unix seconds, "state",
     "progress_s": seconds since the worker last finished a forward pass}

``state`` is ``"collecting"`` or ``"finished"``. While a worker collects, a background
thread rewrites the file every :data:`BEAT_S` seconds, so a heartbeat older than
:data:`EXPIRE_S` means the worker is gone (killed, preempted, its machine lost);
``progress_s`` tells a hung worker (alive, beating, but no forward pass for long) from
a working one. ``coar status`` shows each recent worker as active, stalled, finished
or dead. A failed write is logged and never stops the collection. Heartbeats of dead
or finished workers older than :data:`SWEEP_S` are deleted when a worker starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .. import _fs
from .._engine import seconds_since_progress
from .layout import WORKERS

log = logging.getLogger(__name__)

RECENT_S = 300  # a block or heartbeat this recent counts as "recent"
BEAT_S = 10.0  # a collecting worker rewrites its heartbeat this often
EXPIRE_S = 60.0  # a collecting worker silent this long is dead
STALL_S = 600.0  # a live worker with no forward pass this long is stalled
SWEEP_S = 3600.0  # heartbeats of dead or finished workers this old are deleted
_EVERY_S = 1.0  # at most one heartbeat write per second (tiny blocks finish faster)


class Heartbeat:
    """The heartbeat file of this process in the run directory ``run``."""

    def __init__(
        self,
        run: Path | _fs.RemotePath,
        *,
        shard: tuple[int, int] | None = None,
        device: str = "cpu",
        beat_s: float = BEAT_S,
    ):
        self.host, self.pid = platform.node(), os.getpid()
        self.path = run / WORKERS / f"{self.host}-{self.pid}.json"
        self.shard = list(shard) if shard else None
        self.device = str(device)
        self.beat_s = float(beat_s)
        self.last = float("-inf")
        self._lock = threading.Lock()

    def write(self, state: str, *, force: bool = False) -> None:
        """Record ``state`` now (skipped if the last write is under a second old)."""
        with self._lock:
            now = time.time()
            if not force and now - self.last < _EVERY_S:
                return
            beat = {
                "host": self.host, "pid": self.pid, "shard": self.shard,
                "device": self.device, "time": now, "state": state,
                "progress_s": round(seconds_since_progress(), 1),
            }  # fmt: skip
            try:
                self.path.parent.mkdir(exist_ok=True)
                _fs.atomic_write(self.path, json.dumps(beat).encode())
                self.last = now
            except OSError as err:
                log.warning("could not write the heartbeat %s: %s", self.path, err)

    def around(self, blocks: Iterable[int]) -> Iterator[int]:
        """Yield ``blocks``, beating before the first, after each, every ``beat_s``
        seconds in between (a background thread), and when they run out.

        ``coarpy.collect`` asks for the next block only when it is ready for it, so a
        beat after each yielded block follows that block's computation.
        """
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.beat_s):
                self.write("collecting", force=True)

        self.write("collecting", force=True)
        thread = threading.Thread(target=beat, name="coar-heartbeat", daemon=True)
        thread.start()
        try:
            for block in blocks:
                yield block
                self.write("collecting")
        finally:
            stop.set()
            thread.join()
        self.write("finished", force=True)


def _alive_here(host: Any, pid: Any) -> bool | None:
    """Whether ``pid`` lives, if ``host`` is this machine; None if it cannot be told."""
    if host != platform.node() or not isinstance(pid, int) or isinstance(pid, bool):
        return None
    return _fs.pid_alive(pid)


def _read(path: Path | _fs.RemotePath) -> dict[str, Any] | None:
    try:
        beat = json.loads(path.read_text())
        float(beat["time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # being replaced right now, or not a heartbeat: not evidence of a worker
    return beat if isinstance(beat, dict) else None


def state_of(beat: dict[str, Any], now: float) -> str:
    """``"active"``, ``"stalled"``, ``"finished"`` or ``"dead"`` for a heartbeat read at ``now``."""
    if beat.get("state") == "finished":
        return "finished"
    if _alive_here(beat.get("host"), beat.get("pid")) is False:
        return "dead"
    if now - float(beat["time"]) > EXPIRE_S:
        return "dead"
    progress = beat.get("progress_s")
    if isinstance(progress, (int, float)) and progress > STALL_S:
        return "stalled"
    return "active"


def recent(run: Path | _fs.RemotePath, now: float) -> list[dict[str, Any]] | None:
    """Heartbeats in ``RUN/workers/`` younger than RECENT_S, each with its state (see
    :func:`state_of`); None if no worker wrote one."""
    folder = run / WORKERS
    if not folder.is_dir():
        return None
    seen = []
    for path in sorted(folder.glob("*.json"), key=str):
        beat = _read(path)
        if beat is None:
            continue
        when = float(beat["time"])
        if now - when < RECENT_S:
            shard = beat.get("shard")
            seen.append(
                {
                    "host": str(beat.get("host", "?")),
                    "pid": beat.get("pid"),
                    "shard": list(shard) if isinstance(shard, list) and len(shard) == 2 else None,
                    "seconds_ago": round(now - when, 1),
                    "state": state_of(beat, now),
                }
            )
    return seen


def sweep(run: Path | _fs.RemotePath, now: float | None = None) -> int:
    """Delete heartbeats of dead or finished workers older than SWEEP_S, and temporary
    files of dead writers; how many heartbeats were deleted."""
    folder = run / WORKERS
    if not folder.is_dir():
        return 0
    now = time.time() if now is None else now
    _fs.sweep_temp(folder)
    removed = 0
    for path in folder.glob("*.json"):
        beat = _read(path)
        if beat is None:
            continue
        if now - float(beat["time"]) > SWEEP_S and state_of(beat, now) in ("dead", "finished"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed
