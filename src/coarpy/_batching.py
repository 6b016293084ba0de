"""Batches as coarpy sees them: a tensor, a tuple/list ``(inputs, labels, ...)``, or a
dict (``input_ids``, ``attention_mask``, ``labels``, ...).

Row i of every tensor in a batch belongs to example i. The model is called on the
*inputs* of a batch: a tensor as it is, the first item of a tuple, or the dict without
its ``labels`` as keyword arguments.

Data may also come one example at a time, as a Hugging Face ``datasets.Dataset`` (or a
list of its rows) yields it: a dict of unbatched tensors, lists and numbers, or an
``(x, y)`` pair whose label is a scalar. :func:`as_batches` collates such rows into
batches (:func:`collate`), right-padding token sequences the way a tokenizer does.
This module is the one place data is turned into batches; :func:`is_shuffled` tells
whether a DataLoader would give the examples in a different order each time.

An ``id`` or ``idx`` field of a dict row or batch (``ID_KEYS``: what ``datasets`` names
a row's key, e.g. GLUE's ``idx``) names the example, not an input: :func:`as_batches`
takes it out of every batch, so the model never sees it, and hands its values over.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import ArgumentError, DataError

Batch = Any
LABEL_KEYS = ("labels", "label")
ID_KEYS = ("id", "idx")  # the example's identity: never passed to the model
# Token sequences of one example: 1-D in a row, 2-D in a batch.
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask")
# What a tokenizer pads each token field with (input_ids: pad_token_id).
PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0, "special_tokens_mask": 1, "labels": -100}


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
        raise DataError(
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
        raise DataError(
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


def as_batches(
    data: Iterable | tuple,
    batch_size_hint: int | None = None,
    *,
    pad_token_id: int = 0,
    ids: list | None = None,
) -> Iterator[Batch]:
    """Yield the batches of ``data``, without their ``id``/``idx`` fields.

    A tuple of tensors with equal first dimensions is one data set ``(inputs, labels)``
    and is cut into batches of ``batch_size_hint`` (all of it if None). Anything else
    is iterated: batches are yielded as they are (a DataLoader, a list of batches);
    rows (one example each, see :func:`is_row`) are collated into one data set, cut the
    same way; an item that is a list of rows (a DataLoader with ``collate_fn=list``) is
    collated into one batch.

    The ``id``/``idx`` field of dict rows and batches (``ID_KEYS``) is removed; its
    values, one per example in order, are appended to ``ids`` when a list is given.

    Raises
    ------
    DataError : rows and batches are mixed, or rows cannot be collated.
    """
    sink: list = [] if ids is None else ids
    if isinstance(data, (Tensor, dict)) or _is_tensor_tuple(data):
        data = _pop_ids(data, sink)
        if batch_size_hint is None:
            yield data
        else:
            yield from split(data, batch_size_hint)
        return
    rows: list = []
    batches = 0
    for item in data:
        if is_row(item):
            rows.append(_pop_ids(item, sink))
            continue
        if rows:
            raise _mixed(item)
        batches += 1
        rows_in_item = isinstance(item, list) and item and all(is_row(r) for r in item)
        if rows_in_item:
            yield collate([_pop_ids(r, sink) for r in item], pad_token_id=pad_token_id)
        else:
            yield _pop_ids(item, sink)
    if rows:
        if batches:
            raise _mixed(rows[0])
        whole = collate(rows, pad_token_id=pad_token_id)
        yield from split(whole, batch_size_hint or len(rows))


def _pop_ids(item: Any, sink: list) -> Any:
    """``item`` without its id field (a dict row or batch); the ids go to ``sink``."""
    if not _is_mapping(item):
        return item
    key = next((k for k in ID_KEYS if k in item), None)
    if key is None:
        return item
    value = item[key]
    if isinstance(value, (Tensor, np.ndarray)):
        value = value.tolist()
    sink.extend(value if isinstance(value, (list, tuple)) else [value])
    return {k: v for k, v in item.items() if k != key}


def _mixed(item: Any) -> DataError:
    return DataError(
        f"data mixes single examples (rows such as a datasets.Dataset yields) with "
        f"batches (got a {type(item).__name__} after the other kind). Give one kind: all "
        "rows, or all batches."
    )


def _is_mapping(item: Any) -> bool:
    return isinstance(item, dict) or (hasattr(item, "items") and hasattr(item, "keys"))


def _is_scalar(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.ndim == 0
    if isinstance(value, np.ndarray):
        return value.ndim == 0
    return isinstance(value, (numbers.Number, np.generic)) and not isinstance(value, str)


def _ndim(value: Any) -> int:
    if isinstance(value, (Tensor, np.ndarray)):
        return value.ndim
    return np.ndim(value) if isinstance(value, (list, tuple)) else 0


def is_row(item: Any) -> bool:
    """Whether ``item`` is one example rather than a batch.

    A dict is one example when a value is a scalar (a 0-d tensor, a Python or numpy
    number, a string) or a token field (``input_ids``, ``attention_mask``, ...) is 1-D:
    what iterating a ``datasets.Dataset`` gives, with or without
    ``.with_format("torch")``. A tuple is one example when an item is a scalar: the
    ``(x, y)`` pairs of a ``TensorDataset``. Batches have a batch axis everywhere.
    """
    if _is_mapping(item):
        if any(k in TOKEN_KEYS and _ndim(v) >= 2 for k, v in item.items()):
            return False  # batched token fields: a batch, whatever else it holds
        return any(
            _is_scalar(v) or isinstance(v, str) or (k in TOKEN_KEYS and _ndim(v) == 1)
            for k, v in item.items()
        )
    if isinstance(item, tuple):
        return len(item) >= 2 and any(_is_scalar(v) for v in item)
    return False


def collate(rows: Sequence, *, pad_token_id: int = 0) -> Batch:
    """One batch from a list of rows (dicts, or ``(x, y, ...)`` tuples), stacked in order.

    Values become tensors (``torch.as_tensor``) and are stacked along a new first
    axis. Token fields of different lengths are right-padded as a tokenizer pads
    them: ``input_ids`` with ``pad_token_id``, ``attention_mask`` and
    ``token_type_ids`` with 0, ``special_tokens_mask`` with 1 and ``labels`` with -100
    (ignored by the language-model outputs). Rows with ``input_ids`` and no
    ``attention_mask`` get one, as from a tokenizer (1 for real tokens, 0 for
    padding), so the model does not attend to the padding.

    Raises
    ------
    DataError : rows have different fields, a field holds text, or a field other than
        those above has different shapes across rows.

    Examples
    --------
    >>> batch = collate([{"input_ids": [5, 6, 7], "label": 1}, {"input_ids": [8], "label": 0}])
    >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["label"].tolist()
    ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]], [1, 0])
    """
    if not rows:
        raise DataError("collate got no rows; pass a non-empty list of examples.")
    first = rows[0]
    if _is_mapping(first):
        keys = list(first.keys())
        for i, row in enumerate(rows):
            if list(row.keys()) != keys:
                raise DataError(
                    f"Row {i} has fields {list(row.keys())}, row 0 has {keys}. Give every "
                    "example the same fields."
                )
        batch = {k: _stack([row[k] for row in rows], k, pad_token_id) for k in keys}
        if "input_ids" in keys and "attention_mask" not in keys:
            lengths = torch.tensor([len(row["input_ids"]) for row in rows])
            width = batch["input_ids"].shape[-1]
            batch["attention_mask"] = (torch.arange(width) < lengths[:, None]).long()
        return batch
    if isinstance(first, (tuple, list)):
        for i, row in enumerate(rows):
            if len(row) != len(first):
                raise DataError(
                    f"Row {i} has {len(row)} items, row 0 has {len(first)}. Give every "
                    "example the same (inputs, label, ...) layout."
                )
        return type(first)(_stack([row[j] for row in rows], None, 0) for j in range(len(first)))
    raise DataError(
        f"Cannot collate rows of type {type(first).__name__}; expected dicts (as a "
        "datasets.Dataset yields) or (inputs, label) tuples."
    )


def _stack(values: list, key: str | None, pad_token_id: int) -> Tensor:
    """Stack one field of every row; right-pad token fields of different lengths."""
    where = f"field {key!r}" if key is not None else "an item"
    if any(isinstance(v, str) or (isinstance(v, list) and v and isinstance(v[0], str))
           for v in values):  # fmt: skip
        raise DataError(
            f"Rows hold text in {where}; the model would get it as an argument. Tokenize "
            "it, or drop the column (dataset.remove_columns([...]) or "
            "dataset.with_format('torch', columns=[...]))."
        )
    parts = [torch.as_tensor(v) for v in values]
    if all(p.shape == parts[0].shape for p in parts):
        return torch.stack(parts)
    pad = pad_token_id if key == "input_ids" else PAD_VALUES.get(key)
    if pad is None or any(p.ndim != 1 for p in parts):
        shapes = sorted({tuple(p.shape) for p in parts})
        raise DataError(
            f"Rows differ in the shape of {where}: {shapes[:4]}. Only token fields "
            f"({', '.join(TOKEN_KEYS)}, labels) are padded; pad or resize the others to "
            "one shape before passing them."
        )
    width = max(p.shape[0] for p in parts)
    return torch.stack([nn.functional.pad(p, (0, width - p.shape[0]), value=pad) for p in parts])


def is_shuffled(data: Any) -> bool:
    """Whether ``data`` is a DataLoader that draws its examples in a random order.

    A component dataset's rows are tied to a fixed example order, so a shuffled loader
    gives each mask different examples. True for a random sampler (``shuffle=True``,
    ``SubsetRandomSampler``, ``WeightedRandomSampler``, a sampler with
    ``shuffle=True`` such as ``DistributedSampler``), directly or inside the batch
    sampler; False for anything that is not a DataLoader.
    """
    from torch.utils.data import (
        DataLoader,
        RandomSampler,
        SubsetRandomSampler,
        WeightedRandomSampler,
    )

    if not isinstance(data, DataLoader):
        return False
    random = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)
    for sampler in (data.sampler, getattr(data.batch_sampler, "sampler", None)):
        if isinstance(sampler, random) or getattr(sampler, "shuffle", False) is True:
            return True
    return False


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
    raise DataError(
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
    raise DataError(
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
    raise ArgumentError(
        f"Expected the model to return logits (a tensor, or an object with .logits), got "
        f"{type(result).__name__}. Write an output function for this model."
    )
