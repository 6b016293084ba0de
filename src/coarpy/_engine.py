"""The shared forward loop: a fixed example set run under many keep-masks.

``collect``, ``evaluate``, the baselines and ``edit`` all do the same thing: put the
model in eval mode, move the examples to the device once, and run the output function
over every example for each of many masks. This module holds that loop and its
prologue (device, eval-mode guard, autocast, progress bar) so the entry points stay
short and behave alike.

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
    """The device of the model's first parameter (or buffer); CPU for an empty model."""
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


class ExampleSet:
    """The fixed examples of a run, on the device, in forward-pass-sized batches.

    ``ids`` holds the examples' ids when the data names them (an ``id``/``idx`` field of
    dict rows or batches, which the model never sees), else None.
    """

    def __init__(self, data: Iterable, device: torch.device, batch_size: int | None):
        batch_size = _checks.batch_size(batch_size)
        if isinstance(data, (str, bytes)) or not (
            isinstance(data, (Tensor, dict)) or hasattr(data, "__iter__")
        ):
            raise DataError(
                f"data must be a DataLoader, a list of batches or a tuple of tensors "
                f"(inputs, labels), got {type(data).__name__}."
            )
        found: list = []
        try:
            batches = [B.to_device(b, device) for b in B.as_batches(data, batch_size, ids=found)]
            sizes = [B.batch_size(b) for b in batches]
        except TypeError as err:
            raise DataError(f"data cannot be read as batches: {err}") from err
        if not batches:
            raise DataError("data yielded no batches; pass a non-empty DataLoader or list.")
        self.n_examples = sum(sizes)
        self.ids = (
            _checks.example_ids(found, self.n_examples, "the data's id field", error=DataError)
            if found
            else None
        )
        largest = max(sizes)
        self.batch_size = batch_size or largest
        self.whole = B.concat(batches) if len(batches) > 1 else batches[0]
        self.batches = B.split(self.whole, self.batch_size)
        # Masks per forward pass: pack several when the examples fit in a batch.
        self.pack = max(1, self.batch_size // self.n_examples)
        self._packed: dict[int, Any] = {}
        # Whether per-row masks fit the model's batches: None until tried, False for a
        # model whose modules see another batch than the examples (then one shared
        # mask per pass).
        self.rows_ok: bool | None = None

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
        return torch.cat(
            [_outputs.check_values(output(model, b), B.batch_size(b), output) for b in self.batches]
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
    for i in range(start, n):
        ablator.set(keep[i])
        result[i] = examples.outputs(model, output)
        mark_progress()
    return result
