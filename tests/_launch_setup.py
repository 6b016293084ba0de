"""A run factory and run helpers for the runs, leases and launcher tests (not a test module).

``setup`` builds a tiny seeded CNN and seeded inputs, identical in every process, so
that workers started by any launcher compute the bytes of an in-process run. With
``die_marker`` set, the first process (of all workers) to reach its ``die_after``-th
forward pass creates the marker file and sends itself ``die_signal``: a fault injected
in the middle of a block, exactly once per run.

``config`` makes a run configuration naming ``setup`` (``FACTORY``), ``empty_store``
creates a run's store with no block done, ``block_bytes`` reads its blocks, and
``write_lease`` / ``dead_pid`` fake the lease of another (dead or distant) worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from coarpy.collect import collect
from coarpy.components import Components
from coarpy.runs import RunConfig, leases
from coarpy.store import ComponentDataset

FACTORY = "_launch_setup:setup"
SETTINGS = {"n_masks": 24, "alpha": 0.2, "seed": 3, "block_size": 3}  # 8 blocks


def setup(
    *,
    n_examples: int = 24,
    seed: int = 0,
    delay: float = 0.0,
    die_marker: str = "",
    die_after: int = 5,
    die_signal: str = "SIGKILL",
) -> dict:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_examples, 1, 8, 8, generator=gen)
    y = torch.randint(0, 4, (n_examples,), generator=gen)
    calls = [0]

    def hook(module, args):
        calls[0] += 1
        if delay:
            time.sleep(delay)
        if die_marker and calls[0] == die_after:
            try:
                os.close(os.open(die_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return  # another worker already died once
            os.kill(os.getpid(), getattr(signal, die_signal))
            time.sleep(5)  # a handled signal (SIGUSR2 under submitit) exits from here

    if delay or die_marker:
        model.register_forward_pre_hook(hook)
    return {
        "model": model,
        "data": (x, y),
        "components": Components.discover(model, kinds=("conv",)),
    }


def config(path, *, n_masks: int = SETTINGS["n_masks"], **factory_args) -> RunConfig:
    """The test run's configuration, with its store at ``path`` (a folder or a URL)."""
    settings = {**SETTINGS, "n_masks": n_masks}
    return RunConfig(factory=FACTORY, path=str(path), factory_args=factory_args, **settings)


def empty_store(path) -> ComponentDataset:
    """The test run's store at ``path`` with no block done (meta.json only)."""
    made = setup()
    return collect(
        made["model"], made["components"], made["data"], path=path, blocks=[],
        progress=False, **SETTINGS,
    )  # fmt: skip


def block_bytes(path) -> dict[str, bytes]:
    """``{block file name: its bytes}`` of every finished block of the store at ``path``."""
    ds = ComponentDataset(path)
    return {ds.block_path(b).name: ds.block_path(b).read_bytes() for b in ds.done_blocks()}


def dead_pid() -> int:
    """The process id of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lease(ds: ComponentDataset, block: int, *, host: str, pid: int, age: float = 0.0):
    """A lease of ``block`` held by ``host``/``pid``, last touched ``age`` seconds ago."""
    path = leases.lease_path(Path(ds.path), block)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "time": time.time(), "token": "x"}))
    if age:
        then = time.time() - age
        os.utime(path, (then, then))
    return path
