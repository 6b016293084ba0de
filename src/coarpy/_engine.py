"""The shared forward loop: a fixed example set run under many keep-masks.

``collect``, ``evaluate``, the baselines and ``edit`` all do the same thing: put the
model in eval mode, move the examples to the device once, and run the output function
over every example for each of many masks. This module holds that loop and its
prologue (device, eval-mode guard, autocast, progress bar) so the entry points stay
short and behave alike.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from . import _batching as B
from . import outputs as _outputs
from ._fingerprint import tensors_fingerprint
from .errors import ArgumentError, DataError

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
    """The fixed examples of a run, on the device, in forward-pass-sized batches."""

    def __init__(self, data: Iterable, device: torch.device, batch_size: int | None):
        batches = [B.to_device(b, device) for b in B.as_batches(data, batch_size)]
        if not batches:
            raise DataError("data yielded no batches; pass a non-empty DataLoader or list.")
        self.n_examples = sum(B.batch_size(b) for b in batches)
        largest = max(B.batch_size(b) for b in batches)
        self.batch_size = batch_size or largest
        self.whole = B.concat(batches) if len(batches) > 1 else batches[0]
        self.batches = B.split(self.whole, self.batch_size)
        # Masks per forward pass: pack several when the examples fit in a batch.
        self.pack = max(1, self.batch_size // self.n_examples)
        self._packed: dict[int, Any] = {}

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
    """
    n, e = keep.shape[0], examples.n_examples
    result = torch.empty(n, e, dtype=torch.float32, device=ablator.device)
    if examples.pack > 1 and ablator.supports_rows:
        for i in range(0, n, examples.pack):
            rows = keep[i : i + examples.pack].to(ablator.device, non_blocking=True)
            ablator.set(rows.repeat_interleave(e, dim=0))  # (p*E, N): row r*E+j is mask r
            batch = examples.packed(rows.shape[0])
            values = _outputs.check_values(output(model, batch), rows.shape[0] * e, output)
            result[i : i + rows.shape[0]] = values.view(rows.shape[0], e)
        return result
    for i in range(n):
        ablator.set(keep[i])
        result[i] = examples.outputs(model, output)
    return result
