"""A run factory for the launcher tests (not a test module).

``setup`` builds a tiny seeded CNN and seeded inputs, identical in every process, so
that workers started by any launcher compute the bytes of an in-process run. With
``die_marker`` set, the first process (of all workers) to reach its ``die_after``-th
forward pass creates the marker file and sends itself ``die_signal``: a fault injected
in the middle of a block, exactly once per run.
"""

from __future__ import annotations

import os
import signal
import time

import torch
from torch import nn

from coarpy.components import Components


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
