"""Benchmark: ``coarpy.fit`` at the paper's shapes, against its own dense products and himalaya.

For each shape (components x masks: ViT-B/16 82,944 x 5,000; GPT-2 64,512 x 20,000;
ResNet-50 22,720 x 20,000; MiniLM 9,288 x 1,000) the script writes a synthetic store with
the real :class:`coarpy.store.ComponentDataset` (Bernoulli masks at alpha=0.05 from
``coarpy.masks.sample_masks``, outputs from a planted sparse linear truth plus unit noise,
so held-out Pearson means something), then runs, each in a fresh subprocess:

- ``fit``: ``coarpy.fit(store)`` (default settings: ``solver="auto"``, 21 penalties, a
  10% validation split), timed; peak memory is the child's ``ru_maxrss`` (it counts
  torch's allocations, which tracemalloc does not); held-out Pearson on fresh masks.
- ``dense``: the products no dual fit can avoid at that shape, timed on the same masks:
  the kernel ``V @ V.T`` (float32, exact for 0/1), one eigendecomposition of the
  ``n x n`` centred kernel (float64), and the weights product ``V.T @ A`` (float64,
  ``n x N`` by ``n x E``). The ratio fit / (kernel + eigendecomposition) is the
  target (<= 2); the ratio to all three is printed too.

``--vs-himalaya`` compares, at one shape both can run, with himalaya's
``KernelRidgeCV`` (linear kernel, one eigendecomposition for all penalties, many
targets at once): the same masks (in memory for himalaya, from the store for coarpy),
the same 21 penalties (``alpha = l2 * n_train``), the same validation rows as the one
CV fold, intercept fitted. What differs: himalaya scores folds by R^2 (same argmin as
coarpy's mean squared error on one fold), and its refit on all rows keeps
``alpha = l2 * n_train`` where coarpy's per-row penalty becomes ``l2 * n``.

Shapes that would take more than ~20 minutes on the machine at hand are run with fewer
masks (``--masks``); the script then models the full shape from the flop rates it
measured (kernel ``2 n**2 N``, eigendecomposition ``n**3``) assuming the fit keeps its
ratio to them, and says so. Examples are scaled too (``--examples``); every scaled
number is printed.

Usage::

    python bench/fit_scale.py --shape minilm                  # one shape, default scale
    python bench/fit_scale.py --shape all                     # all four (~30 min on 2 cores)
    python bench/fit_scale.py --shape minilm --vs-himalaya
    python bench/fit_scale.py --shape resnet50 --masks 20000  # the full shape (hours here)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ALPHA = 0.05
ACTIVE = 64  # components each example's planted truth depends on
N_TEST = 300  # fresh masks for held-out Pearson

# name: (component groups [(module, count)], full masks, default masks here, examples here)
SHAPES: dict[str, tuple[list[tuple[str, int]], int, int, int]] = {
    "vit": (
        [
            (f"encoder.layers.{i}.{m}", c)
            for i in range(12)
            for m, c in (
                ("self_attention.in_proj", 2304),
                ("self_attention.out_proj", 768),
                ("mlp.0", 3072),
                ("mlp.3", 768),
            )
        ],
        5000,
        5000,
        500,
    ),
    "gpt2": (
        [
            (f"transformer.h.{i}.{m}", c)
            for i in range(12)
            for m, c in (
                ("attn.c_attn", 768),
                ("attn.c_proj", 768),
                ("mlp.c_fc", 768),
                ("mlp.c_proj", 3072),
            )  # fmt: skip
        ],
        20000,
        3000,
        500,
    ),
    "resnet50": (
        [("conv1", 64)]
        + [
            (f"layer{s + 1}.{b}.conv{k + 1}", w * (4 if k == 2 else 1))
            for s, (blocks, w) in enumerate(((3, 64), (4, 128), (6, 256), (3, 512)))
            for b in range(blocks)
            for k in range(3)
        ],
        20000,
        4000,
        500,
    ),
    "minilm": (
        [
            (f"encoder.layer.{i}.{m}", c)
            for i in range(6)
            for m, c in (("attention.self", 12), ("intermediate.dense", 1536))
        ],
        1000,
        1000,
        1000,
    ),
}


def _n_components(name: str) -> int:
    return sum(c for _, c in SHAPES[name][0])


# --------------------------------------------------------------------------- data


def make_store(root: Path, name: str, n: int, E: int, seed: int) -> Path:
    """A ComponentDataset of ``n`` masks and a held-out set, from a planted truth."""
    import torch

    from coarpy.masks import sample_masks
    from coarpy.store import ComponentDataset

    groups, _, _, _ = SHAPES[name]
    N = _n_components(name)
    rng = np.random.default_rng(seed)
    cols = np.stack([rng.choice(N, ACTIVE, replace=False) for _ in range(E)])  # (E, ACTIVE)
    vals = (rng.normal(size=(E, ACTIVE)) * rng.choice([0.3, 1.0, 3.0], size=(E, ACTIVE))).astype(
        np.float32
    )
    bias = rng.normal(5.0, 1.0, size=E).astype(np.float32)

    def outputs(keep: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        k = keep.numpy()
        lin = (k[:, cols] * vals[None]).sum(2)  # (b, E): the planted linear effect
        y = bias + lin + rng.normal(size=lin.shape).astype(np.float32)
        return torch.from_numpy(y.astype(np.float32))

    path = root / f"store_{name}"
    ds = ComponentDataset.create(
        path,
        components=[[m, "linear", c] for m, c in groups],
        n_examples=E,
        n_masks=n,
        alpha=ALPHA,
        seed=seed,
        block_size=500,
        output="synthetic",
    )
    for b in range(ds.n_blocks):
        r0, r1 = ds.block_rows(b)
        keep = sample_masks(r0, r1, N, alpha=ALPHA, seed=seed)
        ds.write_block(b, keep, outputs(keep, rng))
    test = sample_masks(0, N_TEST, N, alpha=ALPHA, seed=seed, stream=1)
    np.save(root / f"test_masks_{name}.npy", test.numpy())
    np.save(root / f"test_outputs_{name}.npy", outputs(test, rng).numpy())
    return path


def _pearson(pred: np.ndarray, truth: np.ndarray) -> float:
    p = pred - pred.mean(0)
    t = truth - truth.mean(0)
    return float(np.nanmean((p * t).sum(0) / np.sqrt((p * p).sum(0) * (t * t).sum(0))))


def _maxrss() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform == "darwin" else 1024)


# --------------------------------------------------------------------------- children


def child_fit(root: Path, name: str, method: str) -> dict:
    import torch

    import coarpy
    from coarpy.store import ComponentDataset

    ds = ComponentDataset(root / f"store_{name}")
    before = _maxrss()
    t0 = time.perf_counter()
    attr = coarpy.fit(ds, method=method, progress=False)
    seconds = time.perf_counter() - t0
    peak = _maxrss()
    test = torch.from_numpy(np.load(root / f"test_masks_{name}.npy"))
    pred = attr.predict(test).numpy()
    return {
        "seconds": seconds,
        "peak_rss": peak,
        "rss_before_fit": before,
        "pearson": _pearson(pred, np.load(root / f"test_outputs_{name}.npy")),
        "solver": attr.meta["solver"],
        "reason": attr.meta["solver_reason"],
        "median_l2": float(np.median(attr.meta["l2"])),
    }


def child_dense(root: Path, name: str) -> dict:
    """Time the kernel, one n x n eigendecomposition and the weights product."""
    import torch

    from coarpy.store import ComponentDataset

    ds = ComponentDataset(root / f"store_{name}")
    V = ds.masks().to(torch.float32)  # (n, N) 0/1
    n, N, E = V.shape[0], V.shape[1], ds.n_examples
    t0 = time.perf_counter()
    K = V @ V.T  # (n, n) exact in float32
    t_kernel = time.perf_counter() - t0
    m = K.sum(1, dtype=torch.float64) / n
    Kc = K.double() - m[:, None] - m[None, :] + float(m.mean())
    del K
    t0 = time.perf_counter()
    torch.linalg.eigh(Kc)
    t_eig = time.perf_counter() - t0
    del Kc
    A = torch.randn(n, E, dtype=torch.float64)
    t0 = time.perf_counter()
    out = torch.zeros(N, E, dtype=torch.float64)
    step = max(1, 2**28 // (8 * N))
    for a in range(0, n, step):
        out.addmm_(V[a : a + step].double().T, A[a : a + step])
    t_weights = time.perf_counter() - t0
    return {
        "kernel": t_kernel,
        "eig": t_eig,
        "weights": t_weights,
        "kernel_rate": 2.0 * n * n * N / t_kernel,
        "eig_rate": n**3 / t_eig,
        "peak_rss": _maxrss(),
    }


def child_himalaya(root: Path, name: str, backend: str) -> dict:
    import himalaya.backend
    import torch
    from himalaya.kernel_ridge import KernelRidgeCV

    from coarpy.regression import DEFAULT_L2_RELATIVE
    from coarpy.regression._stats import validation_rows
    from coarpy.store import ComponentDataset

    himalaya.backend.set_backend(backend)
    ds = ComponentDataset(root / f"store_{name}")
    V, Y = ds.masks(), ds.outputs()
    is_val = validation_rows(ds.rows(), seed=0, val_fraction=0.1).numpy()
    train, val = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    mv = V[train].double().mean(0)
    var = float((mv * (1 - mv)).mean())
    alphas = np.array(DEFAULT_L2_RELATIVE) * var * len(train)  # coarpy's default grid
    X = V.numpy().astype(np.float64)
    Yn = Y.numpy().astype(np.float64)
    before = _maxrss()
    t0 = time.perf_counter()
    model = KernelRidgeCV(
        alphas=alphas, kernel="linear", fit_intercept=True, cv=[(train, val)], warn=False
    )
    model.fit(X, Yn)
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    model.get_primal_coef()  # (N, E): the weights, which coarpy's fit returns
    primal = time.perf_counter() - t1
    peak = _maxrss()
    test = np.load(root / f"test_masks_{name}.npy").astype(np.float64)
    pred = np.asarray(himalaya.backend.get_backend().to_numpy(model.predict(test)))
    del torch
    return {
        "seconds": seconds,
        "primal_seconds": primal,
        "peak_rss": peak,
        "rss_before_fit": before,
        "pearson": _pearson(pred, np.load(root / f"test_outputs_{name}.npy")),
        "median_l2": float(np.median(np.asarray(model.best_alphas_)) / len(train)),
    }


def run_child(args: list[str], threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    # Spinning OpenMP workers stall on a shared machine; both sides get passive waiting.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def one_shape(name: str, args: argparse.Namespace, root: Path) -> None:
    _, full_n, default_n, default_e = SHAPES[name]
    N = _n_components(name)
    n = args.masks or default_n
    E = args.examples or default_e
    t0 = time.perf_counter()
    make_store(root, name, n, E, args.seed)
    t_store = time.perf_counter() - t0
    scaled = [] if n == full_n else [f"masks {n} of {full_n}"]
    print(
        f"\n## {name}: N={N} components, n={n} masks, E={E} examples (alpha={ALPHA}), "
        f"best of {args.repeat}"
    )
    note = f"; scaled: {', '.join(scaled)}" if scaled else ""
    print(f"store written in {t_store:.0f} s{note}")
    # Alternate the runs and keep each one's fastest: the machine may be shared.
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeat):
        for m in args.methods:
            runs.setdefault(m, []).append(run_child(["fit", str(root), name, m], args.threads))
        runs.setdefault("dense", []).append(run_child(["dense", str(root), name], args.threads))
        if args.vs_himalaya:
            for backend in ("torch", "numpy"):
                h = run_child(["himalaya", str(root), name, backend], args.threads)
                h["total"] = h["seconds"] + h["primal_seconds"]
                runs.setdefault(backend, []).append(h)
    fits = {m: min(runs[m], key=lambda r: r["seconds"]) for m in args.methods}
    dense = {k: min(r[k] for r in runs["dense"]) for k in ("kernel", "eig", "weights", "peak_rss")}
    dense["kernel_rate"] = max(r["kernel_rate"] for r in runs["dense"])
    dense["eig_rate"] = max(r["eig_rate"] for r in runs["dense"])
    core = dense["kernel"] + dense["eig"]
    print()
    print("| | seconds | peak RSS | held-out Pearson | solver | fit / (kernel + eig) "
          "| fit / (kernel + eig + weights) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for m, f in fits.items():
        print(
            f"| fit, method={m} | {f['seconds']:.1f} | {gib(f['peak_rss'])} | "
            f"{f['pearson']:.4f} | {f['solver']} | {f['seconds'] / core:.2f} | "
            f"{f['seconds'] / (core + dense['weights']):.2f} |"
        )
    print(
        f"| dense: kernel V V.T (f32) | {dense['kernel']:.1f} | | | "
        f"{dense['kernel_rate'] / 1e9:.0f} GFLOP/s | | |"
    )
    print(
        f"| dense: eigh n x n (f64) | {dense['eig']:.1f} | | | "
        f"{dense['eig_rate'] / 1e9:.2f} G n^3/s | | |"
    )
    print(
        f"| dense: weights V.T A (f64) | {dense['weights']:.1f} | {gib(dense['peak_rss'])} "
        "| | | | |"
    )
    for m, f in fits.items():
        print(f"\nmethod={m}: solver_reason: {f['reason']}")
    if n != full_n:
        k_full = 2.0 * full_n**2 * N / dense["kernel_rate"]
        e_full = full_n**3 / dense["eig_rate"]
        from coarpy.regression import _cost

        shape = _cost.Shape(n=full_n, n_val=full_n // 10, N=N, E=E, K=21, s=8, y_bytes=4,
                            l2_ratio=1e-8, max_iter=1000)  # fmt: skip
        mem = _cost.dual(shape, None).bytes
        ridge = fits.get("ridge")
        ratio = ridge["seconds"] / core if ridge else float("nan")
        print(
            f"\nmodel of the full shape (n={full_n}) from the rates measured here: kernel "
            f"{k_full / 60:.0f} min + eigh {e_full / 60:.0f} min = {(k_full + e_full) / 60:.0f} "
            f"min of dense products; the ridge fit at its measured ratio {ratio:.2f}: "
            f"~{ratio * (k_full + e_full) / 60:.0f} min. Memory (coarpy's own estimate, "
            f"float64): {gib(mem)}."
        )
    if args.vs_himalaya:
        best = None
        for backend in ("torch", "numpy"):
            h = min(runs[backend], key=lambda r: r["total"])
            print(
                f"\nhimalaya KernelRidgeCV ({backend} backend): fit {h['seconds']:.1f} s + "
                f"primal weights {h['primal_seconds']:.1f} s, peak {gib(h['peak_rss'])}, "
                f"held-out Pearson {h['pearson']:.4f}, median l2 {h['median_l2']:.3g}"
            )
            best = h if best is None or h["total"] < best["total"] else best
        c = fits.get("ridge")
        if c and best:
            print(
                f"coarpy ridge (weights included): {c['seconds']:.1f} s, Pearson "
                f"{c['pearson']:.4f}, median l2 {c['median_l2']:.3g}; speed-up vs the faster "
                f"himalaya backend: {best['total'] / c['seconds']:.1f}x with its primal "
                f"weights, {best['seconds'] / c['seconds']:.1f}x on its dual fit alone "
                "(target >= 2x at equal Pearson)"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="minilm", choices=[*SHAPES, "all"])
    ap.add_argument("--masks", type=int, help="masks in the store (default: per shape)")
    ap.add_argument("--examples", type=int, help="examples (default: per shape)")
    ap.add_argument("--methods", nargs="+", default=["ridge"], choices=("ridge", "group"))
    ap.add_argument("--vs-himalaya", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each; the fastest counts")
    ap.add_argument("--tmp", type=Path, help="where to write the stores (default: a temp dir)")
    ap.add_argument("--child", nargs="+")
    args = ap.parse_args()
    if args.child:
        kind, root, name, *rest = args.child
        fn = {"fit": child_fit, "dense": child_dense, "himalaya": child_himalaya}[kind]
        print(json.dumps(fn(Path(root), name, *rest)))
        return

    import torch

    names = list(SHAPES) if args.shape == "all" else [args.shape]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# fit_scale {time.strftime('%Y-%m-%d')}")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, numpy "
        f"{np.__version__}; {os.cpu_count()} CPUs, {args.threads} threads, load average "
        f"{load:.1f} at the start"
    )
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for name in names:
            one_shape(name, args, Path(tmp))
            for p in Path(tmp).iterdir():  # free the disk before the next shape
                if p.is_dir():
                    import shutil

                    shutil.rmtree(p)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nload average {load:.1f} at the end")


if __name__ == "__main__":
    main()
