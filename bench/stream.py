"""Streamed examples against examples held on the device: collect's throughput ratio.

``coarpy.collect`` keeps the examples on the device when they fit ``device_budget``
and otherwise keeps them on the host (pinned for CUDA, uint8 as uint8) and moves a
segment of whole batches at a time, once per block. This benchmark collects the same
masks both ways, in one process, alternating the two ``--repeat`` times, and prints
masks/s of each and the ratio streamed / resident (median of the per-repeat ratios,
min..max shown). Target: >= 0.9.

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


def _rate(model, comps, data, *, budget, n_masks, block_size, batch_size, where) -> float:
    """Masks per second of one collect (fresh store), the examples' setup included."""
    device = next(model.parameters()).device
    _sync(device)
    start = time.perf_counter()
    coar.collect(model, comps, data, path=where, n_masks=n_masks, alpha=0.05, seed=0,
                 block_size=block_size, batch_size=batch_size, device_budget=budget,
                 overwrite=True, progress=False)  # fmt: skip
    _sync(device)
    return n_masks / (time.perf_counter() - start)


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
    """Resident and streamed masks/s and their ratio, alternating ``repeat`` times."""
    model, comps, data = setup(n_examples, width, device)
    row_bytes = 3 * 32 * 32 + 8  # uint8 pixels and an int64 label
    budget = segment * batch_size * row_bytes
    # resident: enough for all of it (the default on the CPU is no limit; on CUDA it
    # is half the free memory, which these examples fit)
    resident_budget = n_examples * row_bytes
    common = {"n_masks": n_masks, "block_size": block_size, "batch_size": batch_size}
    resident, streamed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        _rate(model, comps, data, budget=budget, where=Path(tmp) / "warm", **common)
        for i in range(repeat):  # alternate which goes first
            for kind in ("r", "s") if i % 2 == 0 else ("s", "r"):
                got = resident if kind == "r" else streamed
                limit = resident_budget if kind == "r" else budget
                where = Path(tmp) / kind
                got.append(_rate(model, comps, data, budget=limit, where=where, **common))
        same = torch.equal(
            coar.ComponentDataset(Path(tmp) / "r").outputs(),
            coar.ComponentDataset(Path(tmp) / "s").outputs(),
        )
    ratios = [s / r for s, r in zip(streamed, resident, strict=True)]
    return {
        "device": str(device),
        "N": len(comps),
        "E": n_examples,
        "batch": batch_size,
        "segments": -(-n_examples // (segment * batch_size)),
        "masks": n_masks,
        "block": block_size,
        "resident": statistics.median(resident),
        "streamed": statistics.median(streamed),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "same_rows": same,
    }


def report(r: dict) -> str:
    return (
        f"{r['device']}: N={r['N']} E={r['E']} batch={r['batch']} segments={r['segments']} "
        f"masks={r['masks']} block={r['block']}: resident {r['resident']:.2f} masks/s, "
        f"streamed {r['streamed']:.2f} masks/s, ratio {r['ratio']:.3f} "
        f"({r['ratio_min']:.3f}..{r['ratio_max']:.3f}), rows identical: {r['same_rows']}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--examples", type=int, default=1024)
    ap.add_argument("--width", type=int, default=8, help="CIFAR ResNet width")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--segment", type=int, default=2, help="batches per streamed segment")
    ap.add_argument("--masks", type=int, default=24)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
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
