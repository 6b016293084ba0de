"""The paper's four setups by name: model, component set, examples, output, α, masks.

============================ ================================== ========== ======= =======
factory                      model, components                  examples   α       masks
============================ ================================== ========== ======= =======
:func:`cifar10_resnet`       MiniResNet, 2,304 conv filters     10,000     0.05    50,000
:func:`imagenet_resnet50`    ResNet-50, 22,720 conv filters     50,000     0.05    100,000
:func:`imagenet_vit_b16`     ViT-B/16, 82,944 linear rows       5,000      0.05    5,000
:func:`tinystories_gpt2`     GPT-2 small, 64,512 Conv1D rows    500        0.025   100,000
============================ ================================== ========== ======= =======

Each factory returns what a run configuration's factory returns (``model``, ``data``,
``components``, ``output``) and the paper's ``alpha`` and ``n_masks``, so a setup runs
by name::

    factory = "coarpy.recipes:imagenet_resnet50"
    path = "runs/rn50"
    n_masks = 100000
    alpha = 0.05

    [factory_args]
    data_dir = "/data/imagenet/val"

:func:`run_config` writes that configuration for you. Data and weights are read from
paths (an argument or an environment variable); a missing one raises an error that
says what to download and where to put it; nothing is downloaded. ``random_weights=True``
builds the architecture with random weights and random inputs of the real shapes, for
tests and benchmarks. The paper's numbers live in :data:`SETUPS`
(:mod:`coarpy.recipes.paper`), the component sets in :mod:`coarpy.recipes.specs`.
"""

from __future__ import annotations

import os
from typing import Any

from .cifar import MiniResNet, cifar10, cifar10_resnet, train_mini_resnet
from .gpt2 import tinystories, tinystories_gpt2
from .imagenet import imagenet_margin, imagenet_resnet50, imagenet_val, imagenet_vit_b16
from .paper import SETUPS, PaperSetup
from .specs import gpt2_reference_spec, resnet_reference_spec, vit_reference_spec

__all__ = [
    "SETUPS",
    "MiniResNet",
    "PaperSetup",
    "cifar10",
    "cifar10_resnet",
    "gpt2_reference_spec",
    "imagenet_margin",
    "imagenet_resnet50",
    "imagenet_val",
    "imagenet_vit_b16",
    "resnet_reference_spec",
    "run_config",
    "tinystories",
    "tinystories_gpt2",
    "train_mini_resnet",
    "vit_reference_spec",
]


def run_config(name: str, path: str | os.PathLike, **factory_args: Any):
    """The run configuration of the paper's setup ``name``, with its α and mask count.

    Parameters
    ----------
    name : a key of :data:`SETUPS` (``"cifar10_resnet"``, ``"imagenet_resnet50"``,
        ``"imagenet_vit_b16"``, ``"tinystories_gpt2"``).
    path : the run directory.
    factory_args : arguments of the setup's factory (``data_dir=...``, ...).

    Returns
    -------
    coarpy.runs.RunConfig; ``.to_toml()`` gives the file ``coar collect`` takes.

    Examples
    --------
    >>> print(run_config("cifar10_resnet", "runs/cifar", data_dir="/data/cifar").to_toml())
    factory = "coarpy.recipes:cifar10_resnet"
    path = "runs/cifar"
    n_masks = 50000
    alpha = 0.05
    seed = 0
    sampler = "bernoulli"
    block_size = 100
    mode = "zero"
    dtype = "float32"
    compile_model = false
    <BLANKLINE>
    [factory_args]
    data_dir = "/data/cifar"
    <BLANKLINE>
    """
    from ..errors import ArgumentError
    from ..runs.config import RunConfig

    if name not in SETUPS:
        raise ArgumentError(f"Unknown setup {name!r}. The paper's setups are {', '.join(SETUPS)}.")
    setup = SETUPS[name]
    return RunConfig(
        factory=setup.factory, path=str(path), n_masks=setup.n_masks, alpha=setup.alpha,
        factory_args={k: str(v) if isinstance(v, os.PathLike) else v
                      for k, v in factory_args.items()},
    )  # fmt: skip
