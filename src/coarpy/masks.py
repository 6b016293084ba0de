"""Keep-masks: which components stay on in each ablated forward pass.

A mask is a bool tensor of shape (n_masks, n_components); True keeps the component.
Row i of a run depends only on (seed, stream, i), so any worker, on any machine, in
any order, regenerates exactly the same row. Stream 0 is for collection, other
streams (evaluation uses 1) give masks disjoint in distribution from training.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import _checks
from .errors import ArgumentError

SAMPLERS = ("bernoulli", "exact")


def _check(n_components: int, alpha: float, sampler: str) -> None:
    _checks.choice(sampler, "sampler", SAMPLERS)
    _checks.fraction(alpha)
    _checks.positive(n_components, "n_components")


def sample_masks(
    start: int,
    stop: int,
    n_components: int,
    *,
    alpha: float,
    seed: int,
    sampler: str = "bernoulli",
    stream: int = 0,
) -> Tensor:
    """Rows ``start .. stop-1`` of the mask sequence of ``(seed, stream)``.

    ``bernoulli`` ablates each component independently with probability ``alpha``
    (the paper's sampler); ``exact`` ablates exactly ``round(alpha * n_components)``.

    Examples
    --------
    >>> m = sample_masks(0, 4, 10, alpha=0.1, seed=0)
    >>> m.shape, m.dtype
    (torch.Size([4, 10]), torch.bool)
    >>> bool((sample_masks(2, 4, 10, alpha=0.1, seed=0) == m[2:]).all())
    True
    """
    _check(n_components, alpha, sampler)
    _checks.seed(seed)
    _checks.integer(stream, "stream", minimum=0)
    if not (_checks.integer(start, "start") >= 0 and _checks.integer(stop, "stop") >= start):
        raise ArgumentError(
            f"Mask rows start..stop-1 need 0 <= start <= stop, got start={start}, stop={stop}."
        )
    out = np.empty((stop - start, n_components), dtype=bool)
    n_ablate = round(alpha * n_components)
    for r, i in enumerate(range(start, stop)):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream, i])))
        if sampler == "bernoulli":
            out[r] = rng.random(n_components) >= alpha
        else:
            out[r] = True
            out[r, rng.choice(n_components, n_ablate, replace=False)] = False
    return torch.from_numpy(out)


def pack(keep: Tensor | np.ndarray) -> np.ndarray:
    """Bit-pack masks (n, N) bool into (n, ceil(N/8)) uint8, little bit order."""
    keep = keep.cpu().numpy() if isinstance(keep, Tensor) else np.asarray(keep)
    return np.packbits(keep.astype(bool, copy=False), axis=1, bitorder="little")


def unpack(packed: np.ndarray, n_components: int) -> Tensor:
    """Inverse of :func:`pack`: (n, ceil(N/8)) uint8 into (n, N) bool."""
    bits = np.unpackbits(packed, axis=1, count=n_components, bitorder="little")
    return torch.from_numpy(bits.astype(bool))
