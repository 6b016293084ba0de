"""A worker: one process collecting its part of a run from the run's configuration.

:func:`collect_run` is the only path from a configuration to ``coarpy.collect``:
``coar collect``, ``coar worker``, and every launcher's processes, tasks and actors go
through it, so they all pass the same settings (:func:`~coarpy.runs.config.collect_settings`)
and fill one store with the same bytes. Around ``collect`` it adds what a run
directory has and a bare store has not: the worker's shard (given, or read from
SLURM's or torchrun's environment), block leases (``claim``), heartbeats, and the
configuration saved next to the store. A new run's ``config.toml`` is written
(atomically) before anything else, so a first ``coar collect`` killed at any point
can be resumed with ``coar worker RUN``.

``python -m coarpy.runs SPEC_JSON`` (:func:`child_main`) is how ``coarpy.runs.local``
starts one in a new process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from .. import _checks, _fs
from .._engine import model_device
from ..errors import ArgumentError, CoarError
from ..store import ComponentDataset
from . import heartbeat, layout
from .config import RunConfig, Setup, collect_settings, load_config, save_config
from .heartbeat import Heartbeat
from .leases import LEASE_S, Claims

USER_ERROR = 2  # a worker's exit status for a CoarError: restarting it would fail again


def shard_from_env() -> tuple[int, int] | None:
    """``(k, K)`` from SLURM_ARRAY_TASK_ID/COUNT or RANK/WORLD_SIZE, else None.

    A SLURM array need not start at 0: SLURM_ARRAY_TASK_MIN is subtracted.
    """
    for idx, count in (("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"), ("RANK", "WORLD_SIZE")):
        if idx in os.environ and count in os.environ:
            names = [idx, count] + (["SLURM_ARRAY_TASK_MIN"] if idx.startswith("SLURM") else [])
            values = [os.environ.get(name, "0").strip() for name in names]
            if not all(v.lstrip("-").isdigit() for v in values):
                raise ArgumentError(
                    f"The environment variables {', '.join(names)} should hold integers, got "
                    f"{values}. Give the shard explicitly (--shard k/K)."
                )
            k, n = int(values[0]), int(values[1])
            if idx.startswith("SLURM"):
                k -= int(values[2])
            return _checks.shard((k, n))
    return None


def parse_shard(shard: tuple[int, int] | str | None) -> tuple[int, int] | None:
    """A worker's shard from ``(k, K)``, ``"k/K"``, ``"env"`` (:func:`shard_from_env`) or None.

    Examples
    --------
    >>> parse_shard("1/4")
    (1, 4)
    """
    if shard == "env":
        shard = shard_from_env()
    if shard is None:
        return None
    if isinstance(shard, str):
        k, sep, n = shard.partition("/")
        if not (sep and k.strip().isdigit() and n.strip().isdigit()):
            raise ArgumentError(
                f"shard must be 'k/K' (this worker's index k of K workers, e.g. '0/4'), "
                f"a tuple (k, K) or 'env', got {shard!r}."
            )
        shard = (int(k), int(n))
    return _checks.shard(shard)


def collect_run(
    config: RunConfig | str | os.PathLike,
    *,
    shard: tuple[int, int] | str | None = None,
    claim: bool = False,
    lease_s: float = LEASE_S,
    device: str | None = None,
    progress: bool | None = None,
    until: Any = None,
    overwrite: bool = False,
) -> ComponentDataset:
    """Collect (or resume) a run in this process, or this worker's part of it.

    Parameters
    ----------
    config : a ``RunConfig``, a TOML configuration file, or a run directory
        (a local path or an fsspec URL such as ``s3://bucket/run``).
    shard : ``(k, K)`` or ``"k/K"`` (only blocks b with b % K == k), ``"env"``
        (SLURM_ARRAY_TASK_ID/COUNT or RANK/WORLD_SIZE when set, else every block), or
        None (every block).
    claim : after the shard's blocks, take any unfinished block no live worker holds,
        through lease files (``RUN/leases``), and return only when the whole run is
        done: fast workers take more, and a dead worker's blocks are taken over.
    lease_s : seconds after which a lease nobody renews counts as dead.
    device : run here instead of the configuration's device (the saved
        configuration keeps its own).
    progress : show a progress bar (default: when stderr is a terminal).
    until : a ``coarpy.StopRule``: stop early once more masks stop paying
        (``coarpy.collect``'s ``until``); one process only, not with ``shard`` or
        ``claim``.
    overwrite : discard a store at the run's path that was built with other settings
        (``coarpy.collect``'s ``overwrite``); its saved configuration is replaced.

    Returns
    -------
    The store, with ``config.toml`` saved next to it.
    """
    cfg = load_config(config)
    here = cfg if device is None else dataclasses.replace(cfg, device=device)
    shard = parse_shard(shard)
    _checks.flag(claim, "claim")
    _checks.number(lease_s, "lease_s", positive_only=True, fix="e.g. lease_s=120.")
    _checks.optional_flag(progress, "progress")
    if until is not None and (shard is not None or claim):
        raise ArgumentError(
            "until= stops the whole run from one process's view; it cannot be combined "
            "with a shard or claim. Collect with one process, or drop until=."
        )
    _checks.flag(overwrite, "overwrite")
    if overwrite and claim:
        raise ArgumentError(
            "overwrite=True with claim=True: a worker that claims blocks shares the run with "
            "other workers and must not discard it. Overwrite with one process first."
        )
    run = layout.where(cfg.path)
    if layout.is_local(run):
        heartbeat.sweep(run)
    if not (run / layout.CONFIG).exists() and not (run / "meta.json").exists():
        # a new run: its configuration first, so that a killed first collect resumes
        # with `coar worker RUN`; an existing store is left to judge the configuration
        run.mkdir(parents=True, exist_ok=True)
        _fs.write_new(run / layout.CONFIG, cfg.to_toml().encode())
    ds = collect_setup(
        here, here.build(), shard=shard, claim=claim, lease_s=lease_s, progress=progress,
        until=until,
        overwrite=overwrite,
    )  # fmt: skip
    save_config(cfg)  # after collect: a configuration the store refused is not kept
    return ds


def collect_setup(
    cfg: RunConfig,
    setup: Setup,
    *,
    data: Any = None,
    blocks: Iterable[int] | None = None,
    shard: tuple[int, int] | None = None,
    claim: bool = False,
    lease_s: float = LEASE_S,
    progress: bool | None = None,
    until: Any = None,
    overwrite: bool = False,
    example_ids: list | None = None,
) -> ComponentDataset:
    """``coarpy.collect`` on a built configuration, with heartbeats (and leases).

    ``data`` replaces the setup's examples (a Ray actor passes them already on its
    device, with their ids as ``example_ids``); ``blocks`` restricts the work to these
    blocks (default: all, or ``shard``'s).
    """
    from ..collect import collect

    model = setup.model
    if cfg.device is not None:
        model.to(cfg.device)  # first, so that the heartbeat names the device used
    run = layout.where(cfg.path)
    beat = Heartbeat(run, shard=shard, device=str(model_device(model)))
    args = (model, setup.components, setup.data if data is None else data)
    settings = collect_settings(cfg, setup.output)
    if overwrite:
        settings["overwrite"] = True
    if example_ids is not None:
        settings["example_ids"] = example_ids
    if claim:
        # this configuration's blocks only: a store another worker has grown holds more
        # blocks than this call's n_masks covers, and collect refuses those
        mine = range(_n_blocks(cfg)) if blocks is None else blocks
        with Claims(run, mine, shard=shard, lease_s=lease_s) as claims:
            return collect(*args, **settings, blocks=beat.around(claims), progress=progress)
    if blocks is None:
        blocks = _every_block(cfg)
    return collect(
        *args, **settings, blocks=beat.around(blocks), shard=shard, progress=progress,
        until=until,
    )  # fmt: skip


def _every_block(cfg: RunConfig) -> Iterator[int]:
    # a generator: the count is taken when collect asks, after it has checked the settings
    yield from range(_n_blocks(cfg))


def _n_blocks(cfg: RunConfig) -> int:
    """The blocks of this configuration's masks (the last one may be short)."""
    return -(-cfg.n_masks // cfg.block_size)


def child_main(argv: Sequence[str]) -> int:
    """A ``coarpy.runs.local`` worker process: ``python -m coarpy.runs SPEC_JSON``.

    The spec holds the configuration's TOML text, the shard, claim, lease_s, device
    and threads. Returns the exit status: 0, or USER_ERROR for a coarpy error, which
    the launcher does not retry.
    """
    spec = json.loads(argv[0])
    import torch

    torch.set_num_threads(int(spec["threads"]))
    try:
        collect_run(
            RunConfig.from_text(spec["config"]),
            shard=tuple(spec["shard"]),
            claim=bool(spec["claim"]),
            lease_s=float(spec["lease_s"]),
            device=spec["device"],
            progress=False,
        )
    except CoarError as err:
        print(f"coar worker: {type(err).__name__}: {err}", file=sys.stderr)
        return USER_ERROR
    return 0
