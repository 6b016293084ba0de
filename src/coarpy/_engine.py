"""The shared forward loop: a fixed example set run under many keep-masks.

``collect``, ``evaluate``, the baselines and ``edit`` all do the same thing: put the
model in eval mode, move the examples to the device once, and run the output function
over every example for each of many masks. This module holds that loop and its
prologue (device, eval-mode guard, autocast, progress bar) so the entry points stay
short and behave alike.

Examples that fit the device budget (``device_budget=``, bytes; by default half the
free memory of a CUDA device, unlimited on the CPU) stay on the device. Larger example
sets stay on the host (pinned for CUDA) in the dtype they came in, uint8 images as
uint8, and are moved one *segment* (as many whole batches as the budget holds) at a
time; :func:`run_masks` runs every mask of its call over a segment before moving the
next, so each segment crosses the bus once per call (once per block of masks in
``collect``) rather than once per mask, and a copy stream to overlap it with compute
would save little. The rows are the same either way: the same batches meet the same
masks, only in another order.

Two more things every entry point shares live here: the fallback for models whose
modules see another batch than the examples (a bi-encoder runs 2n sequences for n
examples, so a per-row mask of n rows cannot apply; the loop then runs one shared
mask per pass, detected once and logged), and a process-wide progress clock
(:func:`mark_progress`, :func:`seconds_since_progress`) that block leases are tied to.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from . import _batching as B
from . import _checks
from . import outputs as _outputs
from ._fingerprint import tensors_fingerprint
from .errors import ArgumentError, DataError, MaskError
from .integrations import check_weights_in_memory

log = logging.getLogger(__name__)

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Built-in outputs that read labels as class indices (coarpy.outputs).
CLASS_INDEX_OUTPUTS = ("margin", "logit", "logprob", "loss")

_progress_lock = threading.Lock()
_last_progress = time.monotonic()


def mark_progress() -> None:
    """Note that this process just finished a forward pass (called by the loops here)."""
    global _last_progress
    with _progress_lock:
        _last_progress = time.monotonic()


def seconds_since_progress() -> float:
    """Seconds since this process last finished a forward pass (or imported coarpy).

    Block leases are renewed only while this stays small, so a worker whose main
    thread hangs loses its leases even though its renewal thread lives on.
    """
    with _progress_lock:
        return time.monotonic() - _last_progress


class MaskSetter(Protocol):
    """What the loop needs of an ablator (``coarpy.ablation.Ablator``)."""

    device: torch.device
    supports_rows: bool

    def set(self, keep: Tensor | None) -> None: ...


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for an empty model.

    Every entry point asks this before moving examples anywhere, so it is where a model
    whose weights are not in memory (accelerate's offloading, the meta device) is
    refused, with what to do (``integrations.check_weights_in_memory``).
    """
    check_weights_in_memory(model)
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module, caller: str, *, warn: bool = True) -> Iterator[None]:
    """Run ``model`` in eval mode inside the block and restore its mode afterwards.

    COAR's outputs are those of the deployed model (no dropout, BatchNorm running
    statistics); a model left in training mode is warned about once, by name of the
    entry point that switched it.
    """
    was_training = model.training
    if was_training and warn:
        warnings.warn(
            f"The model is in training mode; {caller} runs it in eval mode (no dropout, "
            "BatchNorm running statistics) and restores the mode afterwards.",
            stacklevel=4,
        )
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def autocast_context(device: torch.device, autocast: str | None):
    """``torch.autocast`` for ``"bf16"``/``"fp16"``, a no-op for None.

    The weight cache stays off: weights change between masks.
    """
    if autocast is None:
        return nullcontext()
    if autocast not in AUTOCAST:
        raise ArgumentError(f"autocast must be one of {tuple(AUTOCAST)} or None, got {autocast!r}.")
    return torch.autocast(device.type, dtype=AUTOCAST[autocast], cache_enabled=False)


def progress_bar(total: int, enabled: bool | None, desc: str, unit: str = "block"):
    """A tqdm bar on stderr; ``enabled=None`` shows it only on a terminal."""
    from tqdm.auto import tqdm

    disable = not (sys.stderr.isatty() if enabled is None else enabled)
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)


def resolve_budget(device_budget: int | None, device: torch.device) -> int | None:
    """The bytes of examples the device may hold; None for no limit.

    ``device_budget`` as given, or by default half the free memory of a CUDA device
    (the other half is left to the model's activations), unlimited elsewhere.
    """
    budget = _checks.device_budget(device_budget)
    if budget is not None or device.type != "cuda":
        return budget
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, free // 2)


def _bytes_per_example(whole: Any, n_examples: int) -> int:
    """Bytes one example takes in the batch ``whole`` (every tensor's row, as stored)."""
    return sum(t.numel() * t.element_size() for t in B.tensors(whole)) // max(1, n_examples)


def _home(batch: Any, device: torch.device) -> Any:
    """A batch where the example set keeps it: on ``device`` if it is already there
    entirely, else on the CPU."""
    ts = B.tensors(batch)
    if ts and all(t.device == device for t in ts):
        return batch
    return B.to_device(batch, "cpu")


class ExampleSet:
    """The fixed examples of a run, in forward-pass-sized batches.

    On the device when they fit ``device_budget`` (bytes; see :func:`resolve_budget`),
    else on the host in their own dtype (pinned for CUDA), moved a segment at a time by
    :meth:`segments`. ``streamed`` says which; ``batches`` are where the examples are
    kept (on the host when streamed), :meth:`device_batches` yields them on the device.

    ``ids`` holds the examples' ids when the data names them (an ``id``/``idx`` field of
    dict rows or batches, which the model never sees), else None.
    """

    def __init__(
        self,
        data: Iterable,
        device: torch.device,
        batch_size: int | None,
        *,
        device_budget: int | None = None,
    ):
        batch_size = _checks.batch_size(batch_size)
        if isinstance(data, (str, bytes)) or not (
            isinstance(data, (Tensor, dict)) or hasattr(data, "__iter__")
        ):
            raise DataError(
                f"data must be a DataLoader, a list of batches or a tuple of tensors "
                f"(inputs, labels), got {type(data).__name__}."
            )
        if B.is_shuffled(data):
            raise DataError(
                "data is a DataLoader that shuffles its examples (shuffle=True or a random "
                "sampler), but every row of a run ties each output to one example by its "
                "position: a shuffled loader gives each mask other examples in each place. "
                "Pass a DataLoader with shuffle=False (the default) and a sequential sampler."
            )
        device = torch.device(device)
        found: list = []
        budget = resolve_budget(device_budget, device)
        try:
            batches = [_home(b, device) for b in B.as_batches(data, batch_size, ids=found)]
            sizes = [B.batch_size(b) for b in batches]
        except TypeError as err:
            raise DataError(f"data cannot be read as batches: {err}") from err
        if not batches:
            raise DataError("data yielded no batches; pass a non-empty DataLoader or list.")
        self.device = device
        self.device_budget = budget
        self.n_examples = sum(sizes)
        self.ids = (
            _checks.example_ids(found, self.n_examples, "the data's id field", error=DataError)
            if found
            else None
        )
        largest = max(sizes)
        self.batch_size = batch_size or largest
        whole = B.concat(batches) if len(batches) > 1 else batches[0]
        del batches
        row_bytes = _bytes_per_example(whole, self.n_examples)
        self.nbytes = row_bytes * self.n_examples
        one_batch = min(self.batch_size, self.n_examples)
        if budget is not None and row_bytes * one_batch > budget:
            dtypes = sorted({str(t.dtype).replace("torch.", "") for t in B.tensors(whole)})
            raise ArgumentError(
                f"device_budget={budget} bytes cannot hold one batch: {one_batch} examples "
                f"of {row_bytes} bytes each ({', '.join(dtypes)}) take "
                f"{row_bytes * one_batch} bytes. Give device_budget >= "
                f"{row_bytes * one_batch}, or a smaller batch_size."
            )
        # Examples given on an accelerator are used there (moving them off would not
        # free the caller's copy); on the CPU an explicit budget still streams them, as
        # views, so the streamed path runs and is tested without an accelerator.
        on_device = device.type != "cpu" and all(t.device == device for t in B.tensors(whole))
        # Streamed: kept on the host, moved a segment of whole batches at a time.
        self.streamed = budget is not None and self.nbytes > budget and not on_device
        if self.streamed:
            if device.type == "cuda":
                whole = B.map_tensors(whole, lambda t: t.pin_memory())
            per_segment = budget // (row_bytes * self.batch_size) if row_bytes else 1
            self.segment_rows = max(1, per_segment) * self.batch_size
            self.whole = whole
        else:
            self.segment_rows = self.n_examples
            self.whole = B.to_device(whole, device)
        self.batches = B.split(self.whole, self.batch_size)
        # Masks per forward pass: pack several when the examples fit in a batch (and
        # the packed copies fit the budget).
        self.pack = max(1, self.batch_size // self.n_examples)
        if budget is not None and self.nbytes:
            self.pack = max(1, min(self.pack, budget // self.nbytes))
        self._packed: dict[int, Any] = {}
        # Whether per-row masks fit the model's batches: None until tried, False for a
        # model whose modules see another batch than the examples (then one shared
        # mask per pass).
        self.rows_ok: bool | None = None
        if self.streamed:
            log.info(
                "examples kept on the host: %d bytes exceed device_budget=%d; moved %d "
                "examples at a time",
                self.nbytes,
                budget,
                self.segment_rows,
            )

    def segments(self) -> Iterator[tuple[int, list[Any]]]:
        """``(first example, batches on the device)`` covering every example in order.

        One segment of every batch when the examples are on the device; else as many
        whole batches as the budget holds, each segment moved when it is reached (and
        freed when the next one is).
        """
        if not self.streamed:
            yield 0, self.batches
            return
        for first in range(0, self.n_examples, self.segment_rows):
            part = B.index(self.whole, slice(first, first + self.segment_rows))
            part = B.to_device(part, self.device)
            yield first, B.split(part, self.batch_size)
            del part

    def device_batches(self) -> Iterator[Any]:
        """Every batch, in order, on the device."""
        for _, batches in self.segments():
            yield from batches

    def subset(self, rows: Tensor, batch_size: int | None) -> ExampleSet:
        """The examples at ``rows`` (a 1-D index tensor), as an ExampleSet with this
        one's device and budget."""
        where = B.tensors(self.whole)[0].device
        picked = B.index(self.whole, rows.to(where))
        return ExampleSet([picked], self.device, batch_size, device_budget=self.device_budget)

    def check_labels(self, output: _outputs.OutputFn) -> None:
        """Refuse labels a class-index output would misread: fractional (2.5 would be
        truncated to class 2), negative or not finite."""
        if _outputs.name_of(output) not in CLASS_INDEX_OUTPUTS:
            return
        try:
            y = B.labels(self.whole)
        except TypeError:
            return  # no labels: the output function says so when it runs
        if not isinstance(y, Tensor) or y.is_complex() or y.dtype == torch.bool:
            return
        if y.is_floating_point():
            bad = ~torch.isfinite(y) | (y != y.round())
            if bad.any():
                i = int(bad.flatten().nonzero()[0])
                raise DataError(
                    f"The labels are {y.dtype} with a non-integer value "
                    f"({y.flatten()[i].item()} at position {i}), but the output "
                    f"{_outputs.name_of(output)!r} reads labels as class indices and would "
                    "truncate it. Give integer class labels (a torch.long tensor)."
                )
        if (y < 0).any():
            raise DataError(
                f"The labels hold a negative value ({int(y.min())}), but the output "
                f"{_outputs.name_of(output)!r} reads labels as class indices 0..C-1. Give "
                "class indices, or an output function for these labels."
            )

    def fingerprint(self) -> str:
        return tensors_fingerprint(B.tensors(self.whole))

    def packed(self, times: int) -> Any:
        if times not in self._packed:
            self._packed[times] = B.repeat(self.whole, times)
        return self._packed[times]

    def outputs(self, model: nn.Module, output: _outputs.OutputFn) -> Tensor:
        """The output of every example with the model as it is: (E,) float32."""
        return torch.cat([_outputs_of(model, batches, output) for _, batches in self.segments()])


def _outputs_of(model: nn.Module, batches: list[Any], output: _outputs.OutputFn) -> Tensor:
    """The outputs of the examples of ``batches``, in order: (rows,) float32."""
    return torch.cat(
        [_outputs.check_values(output(model, b), B.batch_size(b), output) for b in batches]
    )


def run_masks(
    model: nn.Module,
    ablator: MaskSetter,
    examples: ExampleSet,
    keep: Tensor,
    output: _outputs.OutputFn,
) -> Tensor:
    """Outputs of every example under every mask: keep (n, N) -> (n, E) float32.

    ``keep`` may stay on the CPU (masks are sampled there): the ablated units are then
    found without waiting for the device, and the result is on the model's device.
    Examples kept on the host (``examples.streamed``) are moved a segment at a time,
    and every mask runs on a segment before the next is moved.
    When the examples fit in a batch several masks share one pass, each row of the
    packed batch under its own mask; on a model whose modules see another batch than
    the examples (a bi-encoder, a multiple-choice head) per-row masks do not apply, so
    the first such pass switches the example set to one shared mask per pass.
    """
    n, e = keep.shape[0], examples.n_examples
    result = torch.empty(n, e, dtype=torch.float32, device=ablator.device)
    start = 0
    if examples.pack > 1 and ablator.supports_rows and examples.rows_ok is not False:
        while start < n:
            rows = keep[start : start + examples.pack].to(ablator.device, non_blocking=True)
            try:
                ablator.set(rows.repeat_interleave(e, dim=0))  # (p*E, N): row r*E+j is mask r
                batch = examples.packed(rows.shape[0])
                values = _outputs.check_values(output(model, batch), rows.shape[0] * e, output)
            except MaskError as err:
                if examples.rows_ok:  # per-row masks worked before: a real error
                    raise
                examples.rows_ok = False
                log.info(
                    "per-row masks do not apply to this model (%s); running one shared mask "
                    "per forward pass instead",
                    err,
                )
                break
            examples.rows_ok = True
            result[start : start + rows.shape[0]] = values.view(rows.shape[0], e)
            start += rows.shape[0]
            mark_progress()
    if start == n:
        return result
    # Each segment of examples is moved once and meets every remaining mask.
    for first, batches in examples.segments():
        rows = slice(first, first + sum(B.batch_size(b) for b in batches))
        for i in range(start, n):
            ablator.set(keep[i])
            result[i, rows] = _outputs_of(model, batches, output)
            mark_progress()
    return result
