"""What the launchers share: their contract, and the plumbing they all use.

Every launcher is a module with one function of one shape::

    launch(run, *, restarts=2, progress=None, <engine options>) -> ComponentDataset

``run`` is a ``RunConfig``, a TOML configuration file, or a run directory; the
function returns the finished store, or raises ``LaunchError`` saying which workers
failed and why. Every worker runs ``coarpy.runs.worker.collect_run`` (or, in a Ray
actor, the same ``collect_setup``), and the store does the coordinating: a block is
done iff its file exists, so any mix of launchers, one after another or at the same
time, fills one store with the same bytes as a single uninterrupted run. Errors
coarpy raises on purpose (a bad configuration, a mismatched store, a failing block)
stop a launch at once; crashes, kills and preemptions are retried.
"""

from __future__ import annotations

import dataclasses
import importlib
import signal
import sys
from pathlib import Path
from typing import Any

from .. import _fs
from ..errors import ArgumentError, CoarError, MissingExtraError
from ..store import ComponentDataset
from .config import RunConfig
from .layout import LOGS, where


def check_restarts(restarts: int) -> int:
    """``restarts`` if it is a count of restarts (an int >= 0); an ArgumentError otherwise."""
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
        raise ArgumentError(
            f"restarts must be an int >= 0 (restarts allowed per worker), got {restarts!r}."
        )
    return restarts


def portable(cfg: RunConfig) -> str:
    """The configuration as TOML for workers that may start in another directory
    (SLURM tasks, Ray actors): a relative store path is made absolute. Paths inside
    ``factory_args`` are the factory's business: make them absolute in the file."""
    if not _fs.is_url(cfg.path) and not Path(cfg.path).is_absolute():
        cfg = dataclasses.replace(cfg, path=str(Path(cfg.path).resolve()))
    return cfg.to_toml()


def log_dir(cfg: RunConfig) -> Path:
    """Where worker logs go: ``RUN/logs`` for a local run, else ``./coar-logs/NAME``."""
    run = where(cfg.path)
    # worker logs are local files: next to a local store, else in the working directory
    folder = Path.cwd() / "coar-logs" / run.name if _fs.is_remote(run) else run / LOGS
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def describe_exit(code: int) -> str:
    """``"status 3"`` or ``"signal SIGKILL"`` for a process's return code."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def require(module: str, extra: str) -> Any:
    """Import an engine (``submitit``, ``ray``), or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"This launcher needs {module}, which is not installed. Install it with "
            f"`pip install coarpy[{extra}]`, or use coarpy.runs.local on one machine."
        ) from err


class StoreBar:
    """One progress bar over the blocks of a store that other processes fill."""

    def __init__(self, path: str, enabled: bool | None):
        from tqdm.auto import tqdm

        disable = not (sys.stderr.isatty() if enabled is None else enabled)
        self.path = path
        self.bar = tqdm(desc=f"collect {where(path).name}", unit="block", disable=disable)

    def update(self) -> None:
        if self.bar.disable:
            return
        try:
            prog = ComponentDataset(self.path).progress()
        except (FileNotFoundError, CoarError):
            return  # no store yet: the first worker is still starting
        self.bar.total = prog["n_blocks"]
        self.bar.n = prog["done_blocks"]
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
