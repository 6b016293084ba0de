"""The local launcher: one worker process per device on this machine, restarted if it dies.

Worker k of K takes shard k/K first and, with ``claim`` (the default), then any block
no live worker holds, so fast devices do more. Each worker is a fresh Python process
(``python -m coarpy.runs``) that sees only its own GPU, logs to
``RUN/logs/worker-k.log``, and exits with ``USER_ERROR`` on a coarpy error, which is
not retried. The contract every launcher keeps is in ``coarpy.runs._launching``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .. import _checks
from ..errors import ArgumentError, LaunchError
from ..store import ComponentDataset
from ._launching import StoreBar, check_restarts, describe_exit, log_dir
from .config import RunConfig, load_config
from .leases import LEASE_S
from .worker import USER_ERROR

log = logging.getLogger(__name__)


def parse_devices(devices: str | Sequence[str]) -> list[str]:
    """One entry per worker: ``"cuda:0,cuda:1"`` -> two GPUs; ``"cpu:2"`` -> two CPU workers.

    Examples
    --------
    >>> parse_devices("cpu:2")
    ['cpu', 'cpu']
    >>> parse_devices("cuda:0,cuda:3")
    ['cuda:0', 'cuda:3']
    """
    items = devices.split(",") if isinstance(devices, str) else list(devices)
    out: list[str] = []
    for item in (str(i).strip() for i in items):
        kind, _, number = item.partition(":")
        if kind == "cpu" and (not number or number.isdigit()) and number != "0":
            out += ["cpu"] * int(number or 1)
        elif kind == "cuda" and number.isdigit():
            out.append(f"cuda:{int(number)}")
        else:
            raise ArgumentError(
                f"devices must list cuda:INDEX entries or cpu:N (N CPU workers), separated "
                f"by commas, e.g. 'cuda:0,cuda:1' or 'cpu:2'; got {item!r} in {devices!r}."
            )
    if not out:
        raise ArgumentError(f"devices names no device: {devices!r}. Use e.g. 'cpu:2' or 'cuda:0'.")
    return out


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _child_env(device: str, threads: int) -> tuple[dict[str, str], str]:
    """The environment of a worker process and the device it names inside it.

    The GPU is pinned with CUDA_VISIBLE_DEVICES before the child imports torch, so the
    child sees exactly one GPU, ``cuda:0``; indices follow the parent's visible list.
    """
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        return env, "cpu"
    index = int(device.split(":")[1])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = visible.split(",") if visible else [str(i) for i in range(index + 1)]
    if index >= len(physical):
        raise ArgumentError(
            f"{device} is not visible: CUDA_VISIBLE_DEVICES={visible!r} lists "
            f"{len(physical)} device(s). Name a visible index."
        )
    env["CUDA_VISIBLE_DEVICES"] = physical[index].strip()
    return env, "cuda:0"


@dataclasses.dataclass
class _Slot:
    """One worker process of ``local`` and its history."""

    index: int
    device: str
    log: Path
    proc: subprocess.Popen | None = None
    starts: int = 0
    exit_codes: list[int] = dataclasses.field(default_factory=list)
    done: bool = False


def launch(
    run: RunConfig | str | os.PathLike,
    *,
    devices: str | Sequence[str] = "cpu:1",
    restarts: int = 2,
    claim: bool = True,
    lease_s: float = LEASE_S,
    threads: int | None = None,
    progress: bool | None = None,
    poll_s: float = 0.5,
) -> ComponentDataset:
    """Collect a run with one worker process per device on this machine.

    Worker k of K takes shard k/K first and, with ``claim`` (the default), then any
    block no live worker holds, so fast devices do more. A worker that dies (killed,
    crashed, out of memory) is started again, up to ``restarts`` times; one that stops
    with a coarpy error (bad configuration, mismatched store) is not. Each worker
    logs to ``RUN/logs/worker-k.log``; this process shows one progress bar, read from
    the store.

    Parameters
    ----------
    run : a ``RunConfig``, a TOML configuration file, or a run directory.
    devices : ``"cuda:0,cuda:1"`` (one worker per GPU; each sees only its GPU) or
        ``"cpu:N"`` (N CPU workers sharing this machine's cores), or a list of these.
    restarts : how many times each worker may be restarted.
    claim : dynamic claiming of blocks (lease files); False keeps static shards.
    lease_s : seconds after which an unrenewed lease counts as dead.
    threads : torch threads per worker (default: this machine's cores divided by the
        number of workers, so that the workers never oversubscribe it).
    progress : show the progress bar (default: when stderr is a terminal).
    poll_s : seconds between looks at the workers and the store.

    Returns
    -------
    The finished ``ComponentDataset``.

    Raises
    ------
    LaunchError : workers failed for good and blocks are still missing; the message
        names them, their exit codes and the end of their logs.
    """
    cfg = load_config(run)
    slots_devices = parse_devices(devices)
    check_restarts(restarts)
    n = len(slots_devices)
    if threads is None:
        threads = max(1, _cores() // n)
    else:
        _checks.positive(threads, "threads", fix="Or None: this machine's cores shared out.")
    _checks.flag(claim, "claim")
    _checks.number(lease_s, "lease_s", positive_only=True, fix="e.g. lease_s=120.")
    _checks.number(poll_s, "poll_s", positive_only=True, fix="e.g. poll_s=0.5.")
    _checks.optional_flag(progress, "progress")
    logs = log_dir(cfg)  # the first thing written: after every argument is checked
    slots = [_Slot(k, dev, logs / f"worker-{k}.log") for k, dev in enumerate(slots_devices)]
    text = cfg.to_toml()

    def start(slot: _Slot) -> None:
        env, inside = _child_env(slot.device, threads)
        spec = {
            "config": text,
            "shard": [slot.index, n],
            "claim": claim,
            "lease_s": lease_s,
            "device": inside,
            "threads": threads,
        }
        slot.starts += 1
        with open(slot.log, "a") as out:
            out.write(f"--- coar worker {slot.index}/{n} on {slot.device}, start {slot.starts}\n")
            out.flush()
            slot.proc = subprocess.Popen(
                [sys.executable, "-m", "coarpy.runs", json.dumps(spec)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    bar = StoreBar(cfg.path, progress)
    try:
        for slot in slots:
            start(slot)
        while not all(s.done for s in slots):
            time.sleep(poll_s)
            for slot in slots:
                if slot.done or slot.proc is None or slot.proc.poll() is None:
                    continue
                code = slot.proc.returncode
                slot.exit_codes.append(code)
                if code == 0 or code == USER_ERROR or slot.starts > restarts:
                    slot.done = True
                    continue
                log.warning(
                    "worker %d on %s exited with %s; restarting it (%d of %d restarts), log: %s",
                    slot.index, slot.device, describe_exit(code), slot.starts, restarts, slot.log,
                )  # fmt: skip
                start(slot)
            bar.update()
        bar.update()
    finally:
        bar.close()
        _stop(slots)
    return _finished(cfg, slots)


def _stop(slots: list[_Slot]) -> None:
    """Terminate workers still running (after an error or Ctrl-C in this process)."""
    live = [s.proc for s in slots if s.proc is not None and s.proc.poll() is None]
    for proc in live:
        proc.terminate()
    for proc in live:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _finished(cfg: RunConfig, slots: list[_Slot]) -> ComponentDataset:
    """The store if every block is done; else a LaunchError that says why not."""
    failed = [s for s in slots if s.exit_codes and s.exit_codes[-1] != 0]
    try:
        ds = ComponentDataset(cfg.path)
        missing = ds.missing_blocks()
    except FileNotFoundError:
        ds, missing = None, ["all"]
    if ds is not None and not missing:
        for s in failed:
            log.warning(
                "worker %d failed for good (%s) but the others finished its blocks",
                s.index,
                ", ".join(describe_exit(c) for c in s.exit_codes),
            )
        return ds
    lines = [
        f"worker {s.index} on {s.device}: {', '.join(describe_exit(c) for c in s.exit_codes)}; "
        f"log {s.log}:\n{_tail(s.log)}"
        for s in failed
    ]
    raise LaunchError(
        f"{cfg.path}: {len(missing)} block(s) still missing after the workers stopped.\n"
        + "\n".join(lines)
        + "\nFix the cause shown in the logs and launch again: finished blocks are kept."
    )


def _tail(path: Path, n: int = 12) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in lines[-n:])
