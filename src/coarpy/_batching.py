"""Batches as coarpy sees them: a tensor, a tuple/list ``(inputs, labels, ...)``, or a
dict (``input_ids``, ``attention_mask``, ``labels``, ...).

Row i of every tensor in a batch belongs to example i. The model is called on the
*inputs* of a batch: a tensor as it is, the first item of a tuple, or the dict without
its ``labels`` as keyword arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

Batch = Any
LABEL_KEYS = ("labels", "label")


def map_tensors(batch: Batch, fn) -> Batch:
    """Apply ``fn`` to every tensor of a (nested) batch, keeping its structure."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    if hasattr(batch, "items") and hasattr(batch, "keys"):  # transformers BatchEncoding
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    return batch


def tensors(batch: Batch) -> list[Tensor]:
    found: list[Tensor] = []
    map_tensors(batch, lambda t: found.append(t) or t)
    return found


def batch_size(batch: Batch) -> int:
    ts = tensors(batch)
    if not ts:
        raise TypeError(
            f"A batch must hold at least one tensor, got {type(batch).__name__}. Pass a "
            "tensor, a tuple (inputs, labels) or a dict of tensors."
        )
    return ts[0].shape[0]


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True))


def concat(batches: list[Batch], key: str | None = None) -> Batch:
    """Concatenate batches of the same structure along the example axis.

    Token tensors of different lengths are right-padded: labels with -100, anything
    else (input ids, attention masks) with 0, so padding stays out of every output.
    """
    first = batches[0]
    if isinstance(first, Tensor):
        return _cat_padded(batches, -100 if key in LABEL_KEYS else 0)
    if isinstance(first, dict) or (hasattr(first, "items") and hasattr(first, "keys")):
        return {k: concat([b[k] for b in batches], k) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat([b[i] for b in batches]) for i in range(len(first)))
    return first


def _cat_padded(parts: list[Tensor], pad_value: int) -> Tensor:
    if all(p.shape[1:] == parts[0].shape[1:] for p in parts):
        return torch.cat(parts)
    if any(p.ndim != 2 for p in parts):
        raise ValueError(
            "Batches differ in shape beyond the sequence axis: "
            f"{[tuple(p.shape) for p in parts]}. Give every batch the same example shape."
        )
    width = max(p.shape[1] for p in parts)
    return torch.cat(
        [torch.nn.functional.pad(p, (0, width - p.shape[1]), value=pad_value) for p in parts]
    )


def index(batch: Batch, rows: slice | Tensor) -> Batch:
    return map_tensors(batch, lambda t: t[rows])


def repeat(batch: Batch, times: int) -> Batch:
    """Stack ``times`` copies of the batch: row r of copy c is row c*B + r."""
    if times == 1:
        return batch
    return map_tensors(batch, lambda t: t.repeat(times, *([1] * (t.ndim - 1))))


def split(batch: Batch, size: int) -> list[Batch]:
    n = batch_size(batch)
    return [index(batch, slice(i, i + size)) for i in range(0, n, size)]


def as_batches(data: Iterable | tuple, batch_size_hint: int | None = None) -> Iterator[Batch]:
    """Yield the batches of ``data``.

    A tuple of tensors with equal first dimensions is one data set ``(inputs, labels)``
    and is cut into batches of ``batch_size_hint`` (all of it if None). Anything else
    is iterated as it is (a DataLoader, a list of batches).
    """
    if isinstance(data, (Tensor, dict)) or _is_tensor_tuple(data):
        if batch_size_hint is None:
            yield data
        else:
            yield from split(data, batch_size_hint)
        return
    yield from data


def _is_tensor_tuple(data: Any) -> bool:
    return (
        isinstance(data, tuple)
        and len(data) > 0
        and all(isinstance(t, Tensor) for t in data)
        and len({t.shape[0] for t in data}) == 1
    )


def batches_on(data: Iterable, device: torch.device | str) -> Iterator[Batch]:
    for batch in as_batches(data):
        yield to_device(batch, device)


def model_inputs(batch: Batch) -> tuple[tuple, dict]:
    """``(args, kwargs)`` to call the model with on this batch."""
    if isinstance(batch, Tensor):
        return (batch,), {}
    if isinstance(batch, dict) or (hasattr(batch, "items") and hasattr(batch, "keys")):
        return (), {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    if isinstance(batch, (tuple, list)):
        return (batch[0],), {}
    raise TypeError(
        f"Cannot call a model on a batch of type {type(batch).__name__}. Expected a "
        "tensor, a tuple (inputs, labels) or a dict of tensors."
    )


def labels(batch: Batch) -> Tensor:
    """The labels of a batch: the second item of a tuple or the dict's ``labels``."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        for key in LABEL_KEYS:
            if key in batch:
                return batch[key]
    raise TypeError(
        f"This output function needs labels, but the batch ({type(batch).__name__}) has "
        "none. Pass (inputs, labels) tuples or dicts with a 'labels' entry."
    )


def run_model_input(model: nn.Module, batch: Batch) -> Any:
    args, kwargs = model_inputs(batch)
    return model(*args, **kwargs)


def logits_of(result: Any) -> Tensor:
    """The logits of a model's result: the tensor itself, ``.logits``, or item 0."""
    if isinstance(result, Tensor):
        return result
    found = getattr(result, "logits", None)
    if isinstance(found, Tensor):
        return found
    if isinstance(result, (tuple, list)) and result and isinstance(result[0], Tensor):
        return result[0]
    raise TypeError(
        f"Expected the model to return logits (a tensor, or an object with .logits), got "
        f"{type(result).__name__}. Write an output function for this model."
    )
