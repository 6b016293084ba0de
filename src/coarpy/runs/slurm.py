"""The SLURM launcher: a submitit job array over shards, requeued and resubmitted on failure.

Task k of an array of K runs the worker on shard k/K (with ``claim``, then any block
no live worker holds). On preemption or timeout submitit requeues the task (see
``SlurmWorker.checkpoint``); this process watches the tasks and resubmits one that
crashed. To leave an array running without a watcher, submit ``coar worker RUN``
yourself (``sbatch --array``): it reads its shard from SLURM's variables. The
contract every launcher keeps is in ``coarpy.runs._launching``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from ..errors import ArgumentError, CoarError, LaunchError
from ..store import ComponentDataset
from ._launching import StoreBar, check_restarts, log_dir, portable, require
from .config import RunConfig, load_config
from .leases import LEASE_S
from .worker import collect_run

log = logging.getLogger(__name__)


class SlurmWorker:
    """What each task of a submitit job array runs: ``collect_run`` on shard k of K.

    submitit calls ``checkpoint`` when SLURM preempts the task or its time runs out;
    returning the same call makes submitit requeue the task, which then skips the
    blocks already done (the block in progress is recomputed). A coarpy error is
    returned as text rather than raised, so that the launcher does not retry it.
    """

    def __init__(self, config: str, *, claim: bool, lease_s: float, device: str | None):
        self.config = config  # TOML text: the task needs no file beyond the store
        self.claim = claim
        self.lease_s = lease_s
        self.device = device

    def __call__(self, k: int, n: int) -> str | None:
        threads = os.environ.get("SLURM_CPUS_PER_TASK")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        try:
            collect_run(
                RunConfig.from_text(self.config),
                shard=(k, n),
                claim=self.claim,
                lease_s=self.lease_s,
                device=self.device,
                progress=False,
            )
        except CoarError as err:
            print(f"coar worker: {type(err).__name__}: {err}", file=sys.stderr)
            return f"{type(err).__name__}: {err}"
        return None

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def launch(
    run: RunConfig | str | os.PathLike,
    *,
    n_workers: int,
    restarts: int = 2,
    progress: bool | None = None,
    claim: bool = True,
    lease_s: float = LEASE_S,
    device: str | None = None,
    executor: Any = None,
    folder: str | os.PathLike | None = None,
    poll_s: float = 5.0,
    **parameters: Any,
) -> ComponentDataset:
    """Collect a run with a SLURM job array of ``n_workers`` tasks, through submitit.

    Parameters
    ----------
    run : a ``RunConfig``, a TOML configuration file, or a run directory.
    n_workers : tasks in the array.
    restarts : resubmissions allowed per task after a crash (preemptions and
        timeouts are requeued by submitit and do not count).
    progress : show the progress bar (default: when stderr is a terminal).
    claim : after its shard, a task takes any block no live task holds (lease files).
    lease_s : seconds after which an unrenewed lease counts as dead.
    device : device inside each task (default: the configuration's), e.g. "cuda".
    executor : a submitit executor (default ``submitit.AutoExecutor(folder)``, which
        is SLURM on a cluster; tests pass ``submitit.LocalExecutor``).
    folder : logs and submission files (default ``RUN/logs/slurm/%j``): one log per task.
    poll_s : seconds between looks at the tasks.
    **parameters : for ``executor.update_parameters``, e.g. ``timeout_min=600,
        slurm_partition="gpu", gpus_per_node=1, slurm_array_parallelism=32``.

    Returns
    -------
    The finished ``ComponentDataset``.

    Raises
    ------
    LaunchError : a task stopped with a coarpy error, failed more than ``restarts``
        times, or the tasks finished with blocks missing.
    """
    submitit = require("submitit", "slurm")
    cfg = load_config(run)
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
        raise ArgumentError(
            f"n_workers must be an int >= 1 (tasks in the array), got {n_workers!r}."
        )
    check_restarts(restarts)
    if executor is None:
        executor = submitit.AutoExecutor(folder=str(folder or log_dir(cfg) / "slurm" / "%j"))
    if parameters:
        executor.update_parameters(**parameters)
    task = SlurmWorker(portable(cfg), claim=claim, lease_s=lease_s, device=device)
    jobs = executor.map_array(task, range(n_workers), [n_workers] * n_workers)
    tries = [0] * n_workers
    finished = [False] * n_workers
    bar = StoreBar(cfg.path, progress)
    try:
        while not all(finished):
            for k, job in enumerate(jobs):
                if finished[k] or not job.done():
                    continue
                error = job.exception()
                if error is None:
                    message = job.result()
                    if message:
                        raise LaunchError(f"Task {k} of {n_workers} stopped: {message}")
                    finished[k] = True
                elif tries[k] < restarts:
                    tries[k] += 1
                    log.warning(
                        "task %d failed (%s); resubmitting it (%d of %d)",
                        k, str(error).splitlines()[0] if str(error) else type(error).__name__,
                        tries[k], restarts,
                    )  # fmt: skip
                    jobs[k] = executor.submit(task, k, n_workers)
                else:
                    raise LaunchError(
                        f"Task {k} of {n_workers} failed {tries[k] + 1} times; the last "
                        f"error:\n{error}\nFix the cause and launch again: finished blocks "
                        "are kept."
                    ) from error
            bar.update()
            if not all(finished):
                time.sleep(poll_s)
    finally:
        bar.close()
    ds = ComponentDataset(cfg.path)
    missing = ds.missing_blocks()
    if missing:
        raise LaunchError(
            f"{cfg.path}: every task finished but {len(missing)} block(s) are missing "
            f"({missing[:10]}). With claim=False a task does only its own shard: launch "
            "again to fill them."
        )
    return ds
