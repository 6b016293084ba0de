"""Fingerprints of model weights and example data, to refuse mismatched resumes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import Tensor, nn


def _update(h, t: Tensor) -> None:
    t = t.detach()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.dtype == torch.bfloat16:
        t = t.float()
    h.update(t.cpu().contiguous().numpy().tobytes())


def model_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter and buffer (names, dtypes, shapes, values)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        if isinstance(t, Tensor):
            h.update(name.encode())
            _update(h, t)
    return h.hexdigest()


def tensors_fingerprint(tensors: Iterable[Tensor]) -> str:
    """A hash of a sequence of tensors (the example set of a run)."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        _update(h, t)
    return h.hexdigest()
