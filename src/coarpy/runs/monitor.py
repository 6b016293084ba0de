"""How a run is doing: progress, speed, ETA, recent workers and settings (``coar status``).

Reads only the run directory (the store's block files and their times, the workers'
heartbeats, the learning curve a stop rule saved, which results exist); imports nothing
from the run's configuration, and writes nothing. A worker is shown as active, stalled
(alive, but no forward pass for a long time), finished or dead (its heartbeat expired,
or its process is gone).
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..stopping import format_curve, read_curve
from ..store import ComponentDataset
from . import heartbeat
from .layout import ATTRIBUTIONS, EVALUATION, where

_RATE_WINDOW_S = 600  # speed is measured over the last 10 minutes of finished blocks


def status(run: str | os.PathLike) -> dict[str, Any]:
    """Progress, speed, ETA and settings of a run, as plain data (JSON-ready).

    Raises
    ------
    FileNotFoundError
        ``run`` holds no component dataset (the message says so).
    """
    folder = where(run)
    ds = ComponentDataset(folder)
    prog = ds.progress()
    now = time.time()
    last = prog["last_block_time"]
    rate = _rate(ds)
    eta = None
    if rate:
        eta = (prog["n_masks"] - prog["done_rows"]) / rate
    recent = last is not None and now - last < heartbeat.RECENT_S
    meta = ds.meta
    settings = {
        k: meta[k]
        for k in (
            "n_components",
            "n_examples",
            "alpha",
            "sampler",
            "seed",
            "block_size",
            "output",
            "mode",
            "dtype",
        )  # fmt: skip
    }
    return {
        "run": str(folder),
        **{k: prog[k] for k in ("done_rows", "n_masks", "done_blocks", "n_blocks", "fraction")},
        "masks_per_s": rate,
        "eta_s": eta,
        "active_recently": recent,
        "last_block_time": last,
        "workers_recent": heartbeat.recent(folder, now),
        "fitted": (folder / ATTRIBUTIONS).exists(),
        "evaluated": (folder / f"{EVALUATION}.json").exists(),
        "settings": settings,
        "learning_curve": read_curve(folder),
    }


def format_status(info: dict[str, Any]) -> str:
    """A few human-readable lines for ``coar status``."""
    pct = 100 * info["fraction"]
    lines = [
        f"run        {info['run']}",
        f"masks      {info['done_rows']} / {info['n_masks']} ({pct:.1f}%), "
        f"blocks {info['done_blocks']} / {info['n_blocks']}",
    ]
    if info["masks_per_s"]:
        eta = info["eta_s"]
        eta_text = "done" if not eta else time.strftime("%H:%M:%S", time.gmtime(eta))
        lines.append(f"speed      {info['masks_per_s']:.2f} masks/s, ETA {eta_text}")
    yes = {True: "yes", False: "no"}
    active = "yes (a block in the last 5 min)" if info["active_recently"] else "no"
    lines.append(f"active     {active}")
    workers = info.get("workers_recent")
    if workers is not None:
        seen = ", ".join(
            f"{w['host']}:{w['pid']}"
            + (f" (shard {w['shard'][0]}/{w['shard'][1]})" if w["shard"] else "")
            + (f" {w['state']}" if w.get("state") else "")
            for w in workers
        )
        lines.append(
            f"workers    {len(workers)} seen in the last 5 min" + (f": {seen}" if seen else "")
        )
        dead = [w for w in workers if w.get("state") in ("dead", "stalled")]
        if dead:
            lines.append(
                f"           {len(dead)} dead or stalled (no heartbeat for "
                f"{heartbeat.EXPIRE_S:g} s, or no forward pass for {heartbeat.STALL_S:g} s): "
                "their blocks are taken over by workers in claim mode, or by the next "
                "`coar worker RUN`"
            )
    if info.get("learning_curve"):
        lines.extend(format_curve(info["learning_curve"]))
    lines.append(f"fitted     {yes[info['fitted']]}; evaluated {yes[info['evaluated']]}")
    s = info["settings"]
    lines.append(
        f"settings   {s['n_components']} components, {s['n_examples']} examples, "
        f"alpha={s['alpha']} ({s['sampler']}), seed={s['seed']}, output={s['output']}, "
        f"mode={s['mode']}, block_size={s['block_size']}, dtype={s['dtype']}"
    )
    return "\n".join(lines)


def _rate(ds: ComponentDataset) -> float | None:
    """Masks per second over the last ``_RATE_WINDOW_S`` of finished blocks, or None.

    Only recent blocks count, so a run resumed after a pause reports its speed now,
    not an average over the pause. The earliest block of the window is left out: its
    compute time lies before the window starts.
    """
    done = sorted(
        (ds.block_path(b).stat().st_mtime, b) for b in ds.done_blocks()
    )  # (mtime, block) by time
    if len(done) < 2:
        return None
    last = done[-1][0]
    window = [(t, b) for t, b in done if t >= last - _RATE_WINDOW_S]
    if len(window) < 2:
        window = done[-2:]
    start = window[0][0]
    if last <= start:
        return None
    rows = sum(ds.block_rows(b)[1] - ds.block_rows(b)[0] for _, b in window[1:])
    return rows / (last - start)
