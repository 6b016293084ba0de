"""The Ray launcher: one actor per GPU that loads the model once; blocks go to idle actors.

Each actor builds the run's setup and moves the examples to its device once (a Ray
task per block would reload the model every time), then computes the blocks it is
sent. A dead actor is replaced and its block sent again. The store must be reachable
from every node: a shared filesystem or an object store URL (``s3://...``). The
contract every launcher keeps is in ``coarpy.runs._launching``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Any

from ..errors import ArgumentError, CoarError, LaunchError
from ..store import ComponentDataset
from ._launching import StoreBar, check_restarts, portable, require
from .config import RunConfig, load_config, save_config
from .worker import collect_setup

log = logging.getLogger(__name__)


class BlockActor:
    """A Ray actor: builds the model and the examples on its device once, then
    computes the blocks it is given (``collect_setup`` with ``blocks=[b]``)."""

    def __init__(self, config: str, device: str, threads: int | None):
        import torch

        from .._engine import ExampleSet

        if threads:
            torch.set_num_threads(threads)
        self.cfg = dataclasses.replace(RunConfig.from_text(config), device=device)
        self.setup = self.cfg.build()
        self.setup.model.to(device)
        # the examples go to the device once, not once per block
        self.examples = ExampleSet(
            self.setup.data, torch.device(device), self.cfg.batch_size,
            device_budget=self.cfg.device_budget,
        )  # fmt: skip

    def run(self, blocks: list[int]) -> list[int]:
        collect_setup(
            self.cfg, self.setup, data=self.examples.batches, blocks=blocks, progress=False,
            example_ids=self.examples.ids,  # the batches have lost the data's id field
        )  # fmt: skip
        return blocks

    def missing(self) -> list[int]:
        """Create (or check) the store; the blocks still to do."""
        self.run([])
        return ComponentDataset(self.cfg.path).missing_blocks()


def launch(
    run: RunConfig | str | os.PathLike,
    *,
    n_workers: int | None = None,
    restarts: int = 2,
    progress: bool | None = None,
    gpus_per_actor: float | None = None,
    address: str | None = None,
) -> ComponentDataset:
    """Collect a run on a Ray cluster: one actor per GPU, blocks sent to idle actors.

    Each actor loads the model and moves the examples to its device once (a Ray task
    per block would reload the model every time). When an actor dies (node lost,
    process killed), a new one replaces it and its block is run again; after
    ``restarts`` such failures in all, the launch stops. The store must be reachable
    from every node: a shared filesystem or an object store URL (``s3://...``). Actors
    start in a directory of Ray's: a relative store path is made absolute, but paths
    in ``factory_args`` must be absolute (or URLs) already.

    Parameters
    ----------
    run : a ``RunConfig``, a TOML configuration file, or a run directory.
    n_workers : actors to start (default: one per GPU of the cluster, or one per CPU
        when it has none).
    restarts : actor failures tolerated over the whole launch.
    progress : show the progress bar (default: when stderr is a terminal).
    gpus_per_actor : GPUs reserved per actor (default: 1 if the cluster has GPUs,
        else 0 and the actor runs on CPU with one thread).
    address : the cluster to join when Ray is not initialised yet (default: a local
        one, or the one in RAY_ADDRESS).

    Returns
    -------
    The finished ``ComponentDataset``.

    Raises
    ------
    LaunchError : actors failed more than ``restarts`` times in all.
    """
    ray_lib = require("ray", "ray")
    cfg = load_config(run)
    check_restarts(restarts)
    if not ray_lib.is_initialized():
        ray_lib.init(address=address)
    resources = ray_lib.cluster_resources()
    if gpus_per_actor is None:
        gpus_per_actor = 1 if resources.get("GPU", 0) >= 1 else 0
    if n_workers is None:
        if gpus_per_actor:
            n_workers = int(resources.get("GPU", 0) // gpus_per_actor)
        else:
            n_workers = int(resources.get("CPU", 1))
    if n_workers < 1:
        raise ArgumentError(
            f"n_workers must be >= 1, got {n_workers} (cluster resources: {resources}). Pass "
            "n_workers, or gpus_per_actor=0 to run on CPUs."
        )
    device = "cuda" if gpus_per_actor else "cpu"
    # max_restarts=0: a dead actor is replaced here, where its block is known
    actor_cls = ray_lib.remote(num_gpus=gpus_per_actor, num_cpus=1, max_restarts=0)(BlockActor)
    text = portable(cfg)

    def new_actor():
        return actor_cls.remote(text, device, None if gpus_per_actor else 1)

    actors = [new_actor() for _ in range(n_workers)]
    failures = 0

    def failed(err: Exception, what: str) -> None:
        nonlocal failures
        if isinstance(err, CoarError):
            raise err  # a RayTaskError that is also the CoarError raised in the actor
        failures += 1
        if failures > restarts:
            raise LaunchError(
                f"Ray actors failed {failures} times ({what}); the last error: {err}. Fix "
                "the cause and launch again: finished blocks are kept."
            ) from err
        log.warning("%s failed (%s); replacing the actor (%d of %d)", what, err, failures, restarts)

    bar = StoreBar(cfg.path, progress)
    try:
        missing = None
        while missing is None:
            try:
                missing = ray_lib.get(actors[0].missing.remote())
            except Exception as err:  # the actor died while loading the model
                failed(err, "preparing the store")
                ray_lib.kill(actors[0])
                actors[0] = new_actor()
        queue = collections.deque(missing)
        idle = list(actors)
        running: dict[Any, tuple[Any, int]] = {}
        while queue or running:
            while queue and idle:
                actor, block = idle.pop(), queue.popleft()
                running[actor.run.remote([block])] = (actor, block)
            ready, _ = ray_lib.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                actor, block = running.pop(ref)
                try:
                    ray_lib.get(ref)
                    idle.append(actor)
                except Exception as err:
                    failed(err, f"block {block}")
                    queue.appendleft(block)
                    ray_lib.kill(actor)
                    actors.remove(actor)
                    actors.append(new_actor())
                    idle.append(actors[-1])
            bar.update()
    finally:
        bar.close()
        for actor in actors:
            ray_lib.kill(actor)
    save_config(cfg)
    return ComponentDataset(cfg.path)
