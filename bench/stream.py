"""Streamed examples against examples held on the device: collect's throughput ratio.

``coarpy.collect`` keeps the examples on the device when they fit ``device_budget``
and otherwise keeps them on the host (pinned for CUDA, uint8 as uint8) and moves a
segment of whole batches at a time, once per block. This benchmark runs collect's
loop (``run_masks`` once per block of masks, without the store, whose disk writes are
the same both ways and only add noise) over the same masks both ways, in one process,
alternating the two ``--repeat`` times, and prints masks/s of each and the ratio
streamed / resident (median of the per-repeat ratios, min..max shown), by the wall
clock and by CPU time. Target: >= 0.9. It then checks that ``collect`` stores the same
rows both ways.

The model is a CIFAR ResNet (``bench/_models.py``) behind a layer that turns uint8
pixels into floats, as a model fed uint8 images must; the examples are random uint8
32x32 images. The streamed run's budget holds ``--segment`` batches, so the examples
cross to the device in ``E / (segment * batch)`` segments per block.

    python bench/stream.py                 # CPU (2 threads), the figures in RESULTS.md
    python bench/stream.py --device cuda   # on a GPU (bench/gpu.sh --only stream)

On the CPU a segment is a view (nothing is copied); the ratio measures what the
streamed loop itself costs: a mask set once per segment instead of once.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import _models  # noqa: E402

import coarpy as coar  # noqa: E402
from coarpy import outputs  # noqa: E402
from coarpy._engine import ExampleSet, run_masks  # noqa: E402
from coarpy.ablation import Ablator  # noqa: E402
from coarpy.masks import sample_masks  # noqa: E402


class Scale(nn.Module):
    """uint8 pixels to floats in [0, 1] on the device, inside the model."""

    def forward(self, x):
        return x.float() / 255.0


def setup(n_examples: int, width: int, device: torch.device, seed: int = 0):
    """(model, components, (x uint8, y)) with the examples on the CPU."""
    model = nn.Sequential(Scale(), _models.cifar_resnet(width=width, seed=seed)).to(device)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n_examples, 3, 32, 32), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 10, (n_examples,), generator=gen)
    comps = coar.Components.discover(model, kinds=("conv",))
    return model, comps, (x, y)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(model, ablator, examples, *, n_masks, block_size) -> tuple[float, float]:
    """Masks per second of collect's loop (``run_masks`` once per block of masks, as
    collect calls it; no store, so disk I/O adds no noise): by the wall clock and by
    this process's CPU time (less sensitive to a loaded machine)."""
    device = examples.device
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for first in range(0, n_masks, block_size):
        stop = min(n_masks, first + block_size)
        keep = sample_masks(first, stop, len(ablator.components), alpha=0.05, seed=0)
        run_masks(model, ablator, examples, keep, outputs.margin)
    _sync(device)
    return n_masks / (time.perf_counter() - start), n_masks / (time.process_time() - cpu)


def measure(
    *,
    device: torch.device,
    n_examples: int,
    width: int,
    batch_size: int,
    segment: int,
    n_masks: int,
    block_size: int,
    repeat: int,
) -> dict:
    """Resident and streamed masks/s and their ratio, alternating ``repeat`` times; and
    whether ``collect`` stores the same rows both ways."""
    model, comps, data = setup(n_examples, width, device)
    row_bytes = 3 * 32 * 32 + 8  # uint8 pixels and an int64 label
    budget = segment * batch_size * row_bytes
    sets = {
        "r": ExampleSet(data, device, batch_size, device_budget=n_examples * row_bytes),
        "s": ExampleSet(data, device, batch_size, device_budget=budget),
    }
    assert not sets["r"].streamed and sets["s"].streamed
    rates: dict[str, list] = {"r": [], "s": []}
    ablator = Ablator(model, comps, edit_weights=True)  # as collect makes it
    with ablator, torch.inference_mode():
        _rate(model, ablator, sets["s"], n_masks=block_size, block_size=block_size)  # warm
        for i in range(repeat):  # alternate which goes first
            for kind in ("r", "s") if i % 2 == 0 else ("s", "r"):
                got = _rate(model, ablator, sets[kind], n_masks=n_masks, block_size=block_size)
                rates[kind].append(got)
    with tempfile.TemporaryDirectory() as tmp:
        stored = {}
        for kind, limit in (("r", None), ("s", budget)):
            ds = coar.collect(model, comps, data, path=Path(tmp) / kind, n_masks=2 * block_size,
                              alpha=0.05, seed=0, block_size=block_size,
                              batch_size=batch_size, device_budget=limit,
                              progress=False)  # fmt: skip
            stored[kind] = ds.outputs()
        same = torch.equal(stored["r"], stored["s"])
    resident, streamed = rates["r"], rates["s"]
    ratios = [s[0] / r[0] for s, r in zip(streamed, resident, strict=True)]
    cpu_ratios = [s[1] / r[1] for s, r in zip(streamed, resident, strict=True)]
    return {
        "device": str(device),
        "N": len(comps),
        "E": n_examples,
        "batch": batch_size,
        "segments": -(-n_examples // (segment * batch_size)),
        "masks": n_masks,
        "block": block_size,
        "resident": statistics.median(r[0] for r in resident),
        "streamed": statistics.median(s[0] for s in streamed),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "cpu_ratio": statistics.median(cpu_ratios),
        "cpu_ratio_min": min(cpu_ratios),
        "cpu_ratio_max": max(cpu_ratios),
        "same_rows": same,
    }


def report(r: dict) -> str:
    return (
        f"{r['device']}: N={r['N']} E={r['E']} batch={r['batch']} segments={r['segments']} "
        f"masks={r['masks']} block={r['block']}: resident {r['resident']:.2f} masks/s, "
        f"streamed {r['streamed']:.2f} masks/s, ratio {r['ratio']:.3f} "
        f"({r['ratio_min']:.3f}..{r['ratio_max']:.3f}); by CPU time {r['cpu_ratio']:.3f} "
        f"({r['cpu_ratio_min']:.3f}..{r['cpu_ratio_max']:.3f}); rows identical: {r['same_rows']}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--width", type=int, default=8, help="CIFAR ResNet width")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--segment", type=int, default=2, help="batches per streamed segment")
    ap.add_argument("--masks", type=int, default=16)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(
        device=torch.device(args.device), n_examples=args.examples, width=args.width,
        batch_size=args.batch, segment=args.segment, n_masks=args.masks,
        block_size=args.block, repeat=args.repeat,
    )  # fmt: skip
    print(report(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
