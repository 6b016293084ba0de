"""The baselines collection is measured against, and the timing helpers.

- ``plain_inference``: the model's forward + the output function over the example set
  under torch.inference_mode, no hooks, no store; the examples already on the device
  in the same batches ``collect`` uses. This is the ceiling: one mask can cost no less
  than one such pass.
- ``reference_pipeline``: what the paper's research scripts do for every mask: deep
  copy the model, zero the ablated components' weights, and iterate a DataLoader over
  CPU tensors (moving every batch to the device again), under torch.no_grad.

Throughputs are in masks per second (one mask = one pass over every example).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from coarpy import _batching as B
from coarpy.ablation import apply_ablation
from coarpy.components import Components

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def cast(device: torch.device | str, autocast: str | None):
    if autocast is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_AUTOCAST[autocast])


def plain_inference(
    model: nn.Module,
    batches: list,
    output: Callable,
    n_passes: int,
    *,
    device: torch.device | str,
    autocast: str | None = None,
    warmup: bool = True,
) -> float:
    """Passes per second of ``output(model, batch)`` over ``batches`` (already on device)."""
    model.eval()
    with torch.inference_mode(), cast(device, autocast):
        for batch in batches[: int(warmup)]:  # kernel selection, caches
            output(model, batch)
        sync(device)
        start = time.perf_counter()
        for _ in range(n_passes):
            for batch in batches:
                output(model, batch)
        sync(device)
    return n_passes / (time.perf_counter() - start)


def reference_pipeline(
    model: nn.Module,
    components: Components,
    x: Tensor,
    y: Tensor,
    keep: Tensor,
    output: Callable,
    *,
    batch_size: int,
    device: torch.device | str,
    autocast: str | None = None,
) -> tuple[float, Tensor]:
    """(masks per second, outputs (n_masks, E)) of the copy-and-zero approach.

    ``x``, ``y`` stay on the CPU; every mask deep-copies ``model`` (which lives on
    ``device``), zeroes the ablated weights and reloads the data batch by batch.
    """
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=False
    )
    rows = []
    sync(device)
    start = time.perf_counter()
    for mask in keep:
        ablated = apply_ablation(model, components, mask)  # a deep copy, weights zeroed
        ablated.eval()
        values = []
        with torch.no_grad(), cast(device, autocast):
            for xb, yb in loader:
                batch = (xb.to(device), yb.to(device))
                values.append(output(ablated, batch).float().cpu())
        rows.append(torch.cat(values))
        del ablated
    sync(device)
    return len(keep) / (time.perf_counter() - start), torch.stack(rows)


def device_batches(x: Tensor, y: Tensor, batch_size: int, device) -> list:
    """``(x, y)`` cut into batches on ``device``, as collect's ExampleSet holds them."""
    whole = B.to_device((x, y), device)
    return B.split(whole, batch_size)


def collect_rate(model: nn.Module, components: Components, data, n_masks: int, **kwargs) -> float:
    """Masks per second of ``coarpy.collect`` end to end (store writes included)."""
    return collect_rates(model, components, data, n_masks, **kwargs)["end_to_end"]


def collect_rates(
    model: nn.Module,
    components: Components,
    data,
    n_masks: int,
    *,
    n_base: int | None = None,
    **kwargs,
) -> dict[str, float]:
    """Masks per second of ``coarpy.collect``: end to end, and marginal.

    With ``n_base``, a second run of ``n_base`` masks (same fixed costs: weight
    fingerprint, examples to the device, store creation) gives the steady-state
    (marginal) rate ``(n_masks - n_base) / (t(n_masks) - t(n_base))``.
    """
    import shutil
    import tempfile

    from coarpy.collect import collect

    device = next(model.parameters()).device

    def timed(n: int) -> float:
        folder = tempfile.mkdtemp(prefix="coar-bench-")
        try:
            sync(device)
            start = time.perf_counter()
            collect(model, components, data, path=folder, n_masks=n, progress=False, **kwargs)
            sync(device)
            return time.perf_counter() - start
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    t_full = timed(n_masks)
    rates = {"end_to_end": n_masks / t_full}
    if n_base is not None:
        t_base = timed(n_base)
        rates["marginal"] = (n_masks - n_base) / max(t_full - t_base, 1e-9)
    return rates
