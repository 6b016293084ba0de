"""Run directories: a run's configuration, store, workers and results in one folder.

A run is a directory (local, or an fsspec URL such as ``s3://bucket/run``) laid out
as :mod:`coarpy.runs.layout` says. The command line works on run directories; these
are the functions it calls:

- :func:`load_config`, :func:`build`: the run's configuration and what it builds
  (:mod:`~coarpy.runs.config`, the only place a configuration is read).
- :func:`collect_run`: collect, resume, or do one worker's part, in this process
  (:mod:`~coarpy.runs.worker`: shards, lease claiming, heartbeats).
- :func:`launch`: many workers at once, through one of the launchers
  :mod:`~coarpy.runs.local`, :mod:`~coarpy.runs.slurm` and :mod:`~coarpy.runs.ray`,
  which share one signature and return the finished store.
- :func:`status`, :func:`format_status`: progress, speed, ETA, workers.
- :func:`fit_run`, :func:`evaluate_run`: the steps after collection.
- :func:`verify_run`: check every file of a run, and repair what can be recomputed.

A configuration names a factory that is imported and called: trust it like a pickle
(:mod:`coarpy.runs.config` says which commands import it; ``status``, ``report``,
``verify`` and ``fit`` with ``prior="none"`` never do).
"""

from __future__ import annotations

import os

from ..errors import ArgumentError
from ..store import ComponentDataset
from . import local, ray, slurm
from .config import RunConfig, Setup, build, collect_settings, load_config, save_config
from .layout import ATTRIBUTIONS, CONFIG, EDITS, EVALUATION, LEASES, LOGS, WORKERS
from .monitor import format_status, status
from .steps import evaluate_run, fit_run, verify_run, write_csv
from .worker import collect_run, parse_shard, shard_from_env

LAUNCHERS = ("local", "slurm", "ray")


def launch(
    config: RunConfig | str | os.PathLike,
    launcher: str,
    *,
    devices: str | None = None,
    n_workers: int | None = None,
    restarts: int = 2,
    progress: bool | None = None,
) -> ComponentDataset:
    """Collect a run with many workers: ``launcher`` is ``"local"``, ``"slurm"`` or ``"ray"``.

    ``devices`` is for the local launcher (one process per device, default
    ``"cpu:1"``); ``n_workers`` for SLURM (tasks, default 1) and Ray (actors, default
    one per GPU). For the other options of each engine call its module's ``launch``.
    """
    if launcher not in LAUNCHERS:
        raise ArgumentError(
            f"launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}. For one "
            "process, use collect_run."
        )
    if launcher == "local":
        if n_workers is not None:
            raise ArgumentError(
                "The local launcher starts one worker per device: give devices='cpu:N' or "
                f"'cuda:0,cuda:1', not n_workers={n_workers}."
            )
        return local.launch(
            config, devices=devices or "cpu:1", restarts=restarts, progress=progress
        )
    if devices is not None:
        raise ArgumentError(
            f"devices={devices!r} is for the local launcher; the {launcher} launcher takes "
            "n_workers (its devices come from the cluster)."
        )
    if launcher == "slurm":
        return slurm.launch(config, n_workers=n_workers or 1, restarts=restarts, progress=progress)
    return ray.launch(config, n_workers=n_workers, restarts=restarts, progress=progress)


__all__ = [
    "ATTRIBUTIONS",
    "CONFIG",
    "EDITS",
    "EVALUATION",
    "LAUNCHERS",
    "LEASES",
    "LOGS",
    "WORKERS",
    "RunConfig",
    "Setup",
    "build",
    "collect_run",
    "collect_settings",
    "evaluate_run",
    "fit_run",
    "format_status",
    "launch",
    "load_config",
    "parse_shard",
    "save_config",
    "shard_from_env",
    "status",
    "verify_run",
    "write_csv",
]
