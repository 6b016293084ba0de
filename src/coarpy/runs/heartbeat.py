"""Heartbeats: ``RUN/workers/<host>-<pid>.json`` says who is collecting, where, and when.

Each collecting worker keeps one small JSON file, replaced atomically::

    {"host", "pid", "shard": [k, K] or null, "device", "time": unix seconds, "state"}

``state`` is ``"collecting"`` or ``"finished"``. A worker writes it when it asks for
its first block, after each block (at most once a second) and when it runs out of
blocks; ``coar status`` lists the heartbeats younger than :data:`RECENT_S`. A failed
write is logged and never stops the collection.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .. import _fs
from .layout import WORKERS

log = logging.getLogger(__name__)

RECENT_S = 300  # a block or heartbeat this recent counts as "active"
_EVERY_S = 1.0  # at most one heartbeat write per second (tiny blocks finish faster)


class Heartbeat:
    """The heartbeat file of this process in the run directory ``run``."""

    def __init__(
        self,
        run: Path | _fs.RemotePath,
        *,
        shard: tuple[int, int] | None = None,
        device: str = "cpu",
    ):
        self.host, self.pid = platform.node(), os.getpid()
        self.path = run / WORKERS / f"{self.host}-{self.pid}.json"
        self.shard = list(shard) if shard else None
        self.device = str(device)
        self.last = float("-inf")

    def write(self, state: str, *, force: bool = False) -> None:
        """Record ``state`` now (skipped if the last write is under a second old)."""
        now = time.time()
        if not force and now - self.last < _EVERY_S:
            return
        beat = {
            "host": self.host, "pid": self.pid, "shard": self.shard,
            "device": self.device, "time": now, "state": state,
        }  # fmt: skip
        try:
            self.path.parent.mkdir(exist_ok=True)
            _fs.atomic_write(self.path, json.dumps(beat).encode())
            self.last = now
        except OSError as err:
            log.warning("could not write the heartbeat %s: %s", self.path, err)

    def around(self, blocks: Iterable[int]) -> Iterator[int]:
        """Yield ``blocks``, beating before the first, after each, and when they run out.

        ``coarpy.collect`` asks for the next block only when it is ready for it, so a
        beat after each yielded block follows that block's computation.
        """
        self.write("collecting", force=True)
        for block in blocks:
            yield block
            self.write("collecting")
        self.write("finished", force=True)


def recent(run: Path | _fs.RemotePath, now: float) -> list[dict[str, Any]] | None:
    """Heartbeats in ``RUN/workers/`` younger than RECENT_S; None if no worker wrote one."""
    folder = run / WORKERS
    if not folder.is_dir():
        return None
    seen = []
    for path in sorted(folder.glob("*.json"), key=str):
        try:
            beat = json.loads(path.read_text())
            when = float(beat["time"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced right now, or not a heartbeat: not evidence of a worker
        if now - when < RECENT_S:
            shard = beat.get("shard")
            seen.append(
                {
                    "host": str(beat.get("host", "?")),
                    "pid": beat.get("pid"),
                    "shard": list(shard) if shard else None,
                    "seconds_ago": round(now - when, 1),
                }
            )
    return seen
