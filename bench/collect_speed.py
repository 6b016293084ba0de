"""Collection speed on the CPU, as ratios measured in one process.

Sections (``--only`` picks some):

- ``plain``: ``coarpy.collect`` end to end (masks sampled, store written) against plain
  inference (forward + output function, inference_mode, no hooks, no store) over the
  same examples, batch size and precision; the tiny digits CNN, a CIFAR ResNet and a
  small ViT (heads + neurons).
- ``paths``: one mask's cost through the Ablator's two ways of applying a shared mask,
  hooks vs in-place weight slices, against a plain pass.
- ``pack``: few examples, large batches: several masks per forward pass (per-row masks).
- ``reference``: collect against the reference pipeline (deep copy + zeroed weights +
  DataLoader from CPU tensors, per mask).
- ``prefix``: collect with ``prefix=`` (the network before the ablated stage run once)
  against collect without it.
- ``masks``: the cost of ``sample_masks`` per mask for N = 2,304 and 82,944.
- ``fit``: ``coarpy.regression.fit`` against the dense products it needs (VᵀV, VᵀY).
- ``compile`` (only with ``--only compile``): ``collect(compile_model=True)`` vs eager.

Timings alternate between the things compared, ``--repeat`` times; a ratio is the
median of the per-repeat ratios (min..max shown). Run with few threads on a shared box:
``python bench/collect_speed.py --threads 1``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _models  # noqa: E402
from _refpipeline import (  # noqa: E402
    collect_rate,
    device_batches,
    plain_inference,
    reference_pipeline,
)

import coarpy as coar  # noqa: E402
from coarpy import outputs  # noqa: E402
from coarpy.ablation import Ablator  # noqa: E402
from coarpy.collect import ExampleSet, run_masks  # noqa: E402
from coarpy.demo import digits, small_digits_cnn  # noqa: E402
from coarpy.masks import sample_masks  # noqa: E402

CPU = torch.device("cpu")


def _rand_images(n: int, size: int, seed: int, classes: int = 10):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=gen)
    return x, torch.randint(0, classes, (n,), generator=gen)


def setups(quick: bool) -> list[dict]:
    """(name, model, components, x, y, batch size, masks per timing) of each model."""
    x, y = digits(split="test")  # 450 real 8x8 digits
    torch.manual_seed(0)
    cnn = small_digits_cnn().eval()
    resnet = _models.cifar_resnet(width=8 if quick else 16)
    vit = _models.vit(image=32, patch=4, dim=96 if quick else 192, depth=2 if quick else 4,
                      num_heads=3, mlp=384 if quick else 768, n_classes=10)  # fmt: skip
    xr, yr = _rand_images(32 if quick else 64, 32, seed=1)
    return [
        {"name": "digits CNN", "model": cnn,
         "comps": coar.Components.discover(cnn, kinds=("conv", "linear")),
         "x": x, "y": y, "batch_size": 450, "n_masks": 100 if quick else 400},
        {"name": f"CIFAR ResNet (width {8 if quick else 16})", "model": resnet,
         "comps": coar.Components.discover(resnet, kinds=("conv",)),
         "x": xr, "y": yr, "batch_size": len(xr), "n_masks": 8 if quick else 20},
        {"name": "small ViT (heads+neurons)", "model": vit,
         "comps": coar.Components.discover(vit, kinds=("heads", "neurons")),
         "x": xr, "y": yr, "batch_size": len(xr), "n_masks": 8 if quick else 20},
    ]  # fmt: skip


def _median_ratio(pairs: list[tuple[float, float]]) -> str:
    ratios = [a / b for a, b in pairs]
    return f"{statistics.median(ratios):.3f} ({min(ratios):.3f}..{max(ratios):.3f})"


def _table(title: str, head: list[str], rows: list[list]) -> str:
    lines = [f"\n### {title}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


class Clock:
    """Wall time and this thread's CPU time of a block of code.

    On a shared machine the wall clock also counts the time other processes held the
    core; with one torch thread, the CPU time of the main thread does not.
    """

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.thread_time() - self._cpu


def section_plain(cfgs: list[dict], repeat: int) -> str:
    rows = []
    for c in cfgs:
        batches = device_batches(c["x"], c["y"], c["batch_size"], CPU)
        n = c["n_masks"]
        walls, cpu_plain, cpu_collect, rates = [], 0.0, 0.0, []
        plain_inference(c["model"], batches, outputs.margin, 1, device=CPU)  # warm-up
        for _ in range(repeat):
            with Clock() as tp:
                plain_inference(c["model"], batches, outputs.margin, n, device=CPU, warmup=False)
            with Clock() as tc:
                collect_rate(
                    c["model"], c["comps"], (c["x"], c["y"]), n, alpha=0.05,
                    block_size=max(1, n // 4), batch_size=c["batch_size"],
                )  # fmt: skip
            walls.append((tp.wall, tc.wall))  # ratio = collect rate / plain rate
            cpu_plain, cpu_collect = cpu_plain + tp.cpu, cpu_collect + tc.cpu
            rates.append((n / tp.wall, n / tc.wall))
        rows.append([c["name"], len(c["comps"]), len(c["x"]),
                     f"{statistics.median(p for p, _ in rates):.1f}",
                     f"{statistics.median(r for _, r in rates):.1f}",
                     _median_ratio(walls), f"{cpu_plain / cpu_collect:.3f}"])  # fmt: skip
    return _table(
        "collect vs plain inference (masks/s, wall; ratio = collect / plain; CPU = main "
        "thread's CPU time, summed over repeats)",
        ["model", "N", "E", "plain", "collect", "ratio (wall)", "ratio (CPU)"],
        rows,
    )


def section_paths(cfgs: list[dict], repeat: int) -> str:
    """Per mask, alternately: one plain pass, one pass under a mask (set + pass)."""
    rows = []
    for c in cfgs:
        examples = ExampleSet((c["x"], c["y"]), CPU, c["batch_size"])
        n = c["n_masks"] * repeat
        keep = sample_masks(0, n, len(c["comps"]), alpha=0.05, seed=0)
        cells = []
        for edit in (False, True):
            ablator = Ablator(c["model"], c["comps"], edit_weights=edit)
            plain = [0.0, 0.0]
            masked = [0.0, 0.0]
            with ablator, torch.inference_mode():
                for i in range(n):
                    ablator.set(None)
                    with Clock() as tp:
                        for batch in examples.batches:
                            outputs.margin(c["model"], batch)
                    with Clock() as tm:
                        run_masks(c["model"], ablator, examples, keep[i : i + 1], outputs.margin)
                    plain = [plain[0] + tp.wall, plain[1] + tp.cpu]
                    masked = [masked[0] + tm.wall, masked[1] + tm.cpu]
            cells.append(f"{plain[0] / masked[0]:.3f} / {plain[1] / masked[1]:.3f}")
        rows.append([c["name"], n, *cells])
    return _table(
        "applying a shared mask: plain pass / masked pass (set + pass), interleaved per "
        "mask; wall / CPU",
        ["model", "masks", "hooks (edit_weights=False)", "weight slices (collect's default)"],
        rows,
    )


def section_pack(repeat: int, quick: bool) -> str:
    x, y = digits(split="test")
    x, y = x[:100], y[:100]
    torch.manual_seed(0)
    cnn = small_digits_cnn().eval()
    comps = coar.Components.discover(cnn, kinds=("conv", "linear"))
    n = 100 if quick else 400
    rows = []
    plain_batches = device_batches(x, y, 100, CPU)
    for batch_size in (100, 1000, 4000):
        pairs = []
        for _ in range(repeat):
            p = plain_inference(cnn, plain_batches, outputs.margin, n, device=CPU)
            r = collect_rate(cnn, comps, (x, y), n, alpha=0.05, block_size=n // 4,
                             batch_size=batch_size)  # fmt: skip
            pairs.append((r, p))
        rows.append([batch_size, max(1, batch_size // 100), _median_ratio(pairs)])
    return _table(
        "digits CNN, 100 examples: masks per forward pass (ratio = collect / plain at batch 100)",
        ["batch_size", "masks per pass", "ratio"],
        rows,
    )


def section_reference(cfgs: list[dict], repeat: int) -> str:
    rows = []
    for c in cfgs[:2]:
        n = max(4, c["n_masks"] // 4)
        keep = sample_masks(0, n, len(c["comps"]), alpha=0.05, seed=0)
        pairs = []
        for _ in range(repeat):
            ref, _ = reference_pipeline(
                c["model"], c["comps"], c["x"], c["y"], keep, outputs.margin,
                batch_size=c["batch_size"], device=CPU,
            )  # fmt: skip
            r = collect_rate(c["model"], c["comps"], (c["x"], c["y"]), n, alpha=0.05,
                             block_size=n, batch_size=c["batch_size"])  # fmt: skip
            pairs.append((r, ref))
        ref_rate = statistics.median(r for _, r in pairs)
        coar_rate = statistics.median(r for r, _ in pairs)
        rows.append([c["name"], f"{ref_rate:.1f}", f"{coar_rate:.1f}", _median_ratio(pairs)])
    return _table(
        "collect vs the reference pipeline (masks/s; ratio = collect / reference)",
        ["model", "reference", "collect", "ratio"],
        rows,
    )


def section_prefix(repeat: int, quick: bool) -> str:
    rows = []
    resnet = _models.cifar_resnet(width=8 if quick else 16)
    x, y = _rand_images(32 if quick else 64, 32, seed=2)
    vit = _models.vit(image=32, patch=4, dim=96 if quick else 192, depth=4 if quick else 8,
                      num_heads=3, mlp=384 if quick else 768, n_classes=10)  # fmt: skip
    cases = [
        ("ResNet, last stage's filters", resnet, ("conv",), ["4.*"], "4"),
        ("ResNet, head linear units", resnet, ("linear",), ["5.*"], "5"),
        ("ViT, last block's heads+neurons", vit, ("heads", "neurons"),
         [f"{len(vit) - 2}.*"], str(len(vit) - 2)),
    ]  # fmt: skip
    n = 8 if quick else 20
    for name, model, kinds, include, cut in cases:
        comps = coar.Components.discover(model, kinds=kinds, include=include)
        pairs = []
        for _ in range(repeat):
            full = collect_rate(model, comps, (x, y), n, alpha=0.05, block_size=n)
            cached = collect_rate(model, comps, (x, y), n, alpha=0.05, block_size=n, prefix=cut)
            pairs.append((cached, full))
        rows.append([name, len(comps), f"prefix={cut!r}", _median_ratio(pairs)])
    return _table(
        "prefix cache: collect(prefix=...) / collect (speed-up)",
        ["setup", "N", "cut", "speed-up"],
        rows,
    )


def section_masks(repeat: int) -> str:
    rows = []
    for n_comp in (2304, 82944):
        for sampler in ("bernoulli", "exact"):
            costs = []
            for _ in range(repeat):
                start = time.perf_counter()
                sample_masks(0, 200, n_comp, alpha=0.05, seed=0, sampler=sampler)
                costs.append((time.perf_counter() - start) / 200 * 1e6)
            rows.append([n_comp, sampler, f"{statistics.median(costs):.0f}"])
    return _table("sample_masks cost", ["N", "sampler", "µs per mask"], rows)


def section_fit(repeat: int, quick: bool) -> str:
    try:
        from coarpy.regression import fit
    except ImportError:
        return _table("regression", ["note"], [["coarpy.regression.fit not available"]])
    rows = []
    sizes = [(512, 500, 2000)] if quick else [(512, 500, 2000), (2304, 1000, 4000)]
    for n_comp, n_ex, n_rows in sizes:
        gen = torch.Generator().manual_seed(0)
        V = torch.rand(n_rows, n_comp, generator=gen) >= 0.05
        Y = torch.randn(n_rows, n_ex, generator=gen)
        for method, dtype in (("ols", torch.float64), ("ridge", torch.float64)):
            pairs = []
            for _ in range(repeat):
                start = time.perf_counter()
                Vd, Yd = V.to(dtype), Y.to(dtype)
                _ = Vd.T @ Vd, Vd.T @ Yd
                products = time.perf_counter() - start
                start = time.perf_counter()
                fit((V, Y), method=method, dtype=dtype, progress=False)
                pairs.append((time.perf_counter() - start, products))
            prod_s = statistics.median(p for _, p in pairs)
            fit_s = statistics.median(f for f, _ in pairs)
            size = f"{n_comp} x {n_ex} x {n_rows}"
            dname = str(dtype).split(".")[-1]
            rows.append(
                [size, method, dname, f"{prod_s:.2f}", f"{fit_s:.2f}", _median_ratio(pairs)]
            )
    return _table(
        "regression fit vs the dense products VᵀV, VᵀY (seconds; ratio = fit / products)",
        ["N x E x masks", "method", "dtype", "products", "fit", "ratio"],
        rows,
    )


def section_compile(cfgs: list[dict], repeat: int) -> str:
    """collect(compile_model=True) against eager collect on the digits CNN (opt-in)."""
    c = cfgs[0]
    data, n = (c["x"], c["y"]), c["n_masks"]
    kw = {"alpha": 0.05, "block_size": n // 4, "batch_size": c["batch_size"]}
    start = time.perf_counter()
    collect_rate(c["model"], c["comps"], data, 4, compile_model=True, **{**kw, "block_size": 4})
    compile_s = time.perf_counter() - start
    pairs = []
    for _ in range(repeat):
        eager = collect_rate(c["model"], c["comps"], data, n, **kw)
        compiled = collect_rate(c["model"], c["comps"], data, n, compile_model=True, **kw)
        pairs.append((compiled, eager))
    return _table(
        "torch.compile: collect(compile_model=True) / collect (wall)",
        ["model", "first call (compiling) s", "speed-up after"],
        [[c["name"], f"{compile_s:.0f}", _median_ratio(pairs)]],
    )


SECTIONS = ("plain", "paths", "pack", "reference", "prefix", "masks", "fit", "compile")
DEFAULT = SECTIONS[:-1]  # compile: opt-in (--only compile), it compiles for a minute


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smaller models and fewer masks")
    ap.add_argument("--only", nargs="*", choices=SECTIONS, default=list(DEFAULT))
    ap.add_argument("--out", type=Path, help="also append the tables to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    head = (
        f"## collect_speed {time.strftime('%Y-%m-%d %H:%M')} — {platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"repeat {args.repeat}{', quick' if args.quick else ''}"
    )
    print(head, flush=True)
    cfgs = setups(args.quick)
    texts = [head]
    for name in args.only:
        if name == "plain":
            texts.append(section_plain(cfgs, args.repeat))
        elif name == "paths":
            texts.append(section_paths(cfgs, args.repeat))
        elif name == "pack":
            texts.append(section_pack(args.repeat, args.quick))
        elif name == "reference":
            texts.append(section_reference(cfgs, args.repeat))
        elif name == "prefix":
            texts.append(section_prefix(args.repeat, args.quick))
        elif name == "masks":
            texts.append(section_masks(args.repeat))
        elif name == "fit":
            texts.append(section_fit(args.repeat, args.quick))
        elif name == "compile":
            texts.append(section_compile(cfgs, args.repeat))
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(texts) + "\n")


if __name__ == "__main__":
    main()
