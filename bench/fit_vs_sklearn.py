"""Benchmark: ``coarpy.fit(method="ridge")`` against scikit-learn's ``RidgeCV``.

Both fit the same in-memory component dataset (synthetic keep-masks at alpha=0.05 and
outputs from a sparse linear + nonlinear ground truth with noise) over the same grid of
penalties, choosing one penalty per example (``RidgeCV(alpha_per_target=True)`` by
efficient leave-one-out, coarpy on a 10% validation split). Each fit runs in its own
subprocess so that its peak resident memory (``ru_maxrss``) is its own; the script prints
the time of each, their ratio, the peak memory of each, and the held-out Pearson
correlation of both on fresh masks.

scikit-learn's ``alpha`` penalises the unscaled sum of squares, coarpy's ``l2`` the mean
over rows: the grids are matched as ``alpha = l2 * n_rows``.

Usage::

    python bench/fit_vs_sklearn.py                      # N=1000, E=1000, n=10000 (~3 min)
    python bench/fit_vs_sklearn.py --n-components 2000 --n-examples 2000 --n-masks 20000

RidgeCV's cost grows as n_alphas * n_masks * N**2 (its leave-one-out hat-matrix diagonal
is recomputed per alpha), coarpy's as n_masks * N * (N + E) for the one pass plus N**3 and
N**2 * E terms independent of the grid size, so the ratio grows with the problem.
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

ALPHA = 0.05  # ablation fraction of the synthetic masks


def make_data(n_masks: int, n_test: int, N: int, E: int, seed: int, out: Path) -> dict:
    """Masks, outputs and fresh test masks, written as .npy files under ``out``."""
    rng = np.random.default_rng(seed)
    # Sparse linear truth: every example depends on 40 components.
    k = min(40, N)
    W = np.zeros((E, N), dtype=np.float32)
    for e in range(E):
        idx = rng.choice(N, size=k, replace=False)
        W[e, idx] = rng.normal(0.0, 1.0, size=k) * rng.choice([0.2, 1.0, 3.0], size=k)
    bias = rng.normal(2.0, 1.0, size=E).astype(np.float32)
    # Nonlinear parts: saturation of the linear effect, a threshold effect of how many of
    # 20 components of each example are ablated together, and pairwise interactions.
    member = np.zeros((N, E), dtype=np.float32)  # member[j, e] = 1: j is in e's group
    for e in range(E):
        member[rng.choice(N, size=min(20, N), replace=False), e] = 1.0
    pairs = rng.choice(N, size=(50, 2))
    C = (rng.normal(0.0, 1.0, size=(E, 50)) * (rng.random((E, 50)) < 0.2)).astype(np.float32)

    def outputs(keep: np.ndarray) -> np.ndarray:
        ablated = (~keep).astype(np.float32)  # (n, N)
        lin = ablated @ W.T  # (n, E)
        hits = ablated @ member  # (n, E) ablated members of each example's group
        inter = (ablated[:, pairs[:, 0]] * ablated[:, pairs[:, 1]]) @ C.T
        y = bias - 3.0 * np.tanh(lin / 3.0) - 1.5 * np.maximum(hits - 1.0, 0.0) + 2.0 * inter
        return (y + rng.normal(0.0, 1.0, size=y.shape)).astype(np.float32)

    for name, n in (("train", n_masks), ("test", n_test)):
        keep = rng.random((n, N)) >= ALPHA  # (n, N) bool, True keeps
        np.save(out / f"V_{name}.npy", keep)
        np.save(out / f"Y_{name}.npy", outputs(keep))
    var = float((lambda m: (m * (1 - m)).mean())(np.load(out / "V_train.npy").mean(0)))
    return {"mask_variance": var}


def _pearson_mean(pred: np.ndarray, truth: np.ndarray) -> float:
    p = pred - pred.mean(0)
    t = truth - truth.mean(0)
    r = (p * t).sum(0) / np.sqrt((p * p).sum(0) * (t * t).sum(0))
    return float(np.nanmean(r))


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _start_peak() -> int:
    """Reset the peak-RSS mark (Linux: clear_refs 5) and return the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    rss = _status_kib("VmRSS")
    return rss * 1024 if rss is not None else _maxrss()


def _peak() -> int:
    """Peak RSS in bytes since _start_peak (VmHWM), else the process's ru_maxrss."""
    hwm = _status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else _maxrss()


def _maxrss() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform == "darwin" else 1024)


def child(which: str, data: Path, grid: list[float]) -> None:
    """Run one fit; print a JSON line with its time, memory and held-out correlation."""
    V = np.load(data / "V_train.npy")
    Y = np.load(data / "Y_train.npy")
    Vt = np.load(data / "V_test.npy")
    Yt = np.load(data / "Y_test.npy")
    n = V.shape[0]
    if which == "coarpy":
        import torch

        import coarpy.regression as reg

        V_t, Y_t = torch.from_numpy(V), torch.from_numpy(Y)
        base = _start_peak()
        t0 = time.perf_counter()
        attr = reg.fit((V_t, Y_t), method="ridge", l2_grid=grid, progress=False)
        seconds = time.perf_counter() - t0
        peak = _peak()
        pred = attr.predict(torch.from_numpy(Vt)).numpy()
        chosen = np.asarray(attr.meta["l2"]) * n
    else:
        from sklearn.linear_model import RidgeCV

        X = V.astype(np.float64)
        Y64 = Y.astype(np.float64)
        base = _start_peak()
        t0 = time.perf_counter()
        model = RidgeCV(alphas=np.asarray(grid) * n, alpha_per_target=True).fit(X, Y64)
        seconds = time.perf_counter() - t0
        peak = _peak()
        pred = model.predict(Vt.astype(np.float64))
        chosen = np.asarray(model.alpha_)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss": peak,
                "rss_before_fit": base,
                "pearson": _pearson_mean(pred, Yt),
                "median_alpha": float(np.median(chosen)),
            }
        )
    )


def run_child(which: str, data: Path, grid: list[float], threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    # On a shared machine spinning OpenMP workers (torch/MKL use libgomp) stall whenever a
    # peer thread is descheduled; passive waiting removes that artefact. Both fits get it.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = [sys.executable, __file__, "--child", which, "--data", str(data)]
    cmd += ["--grid", json.dumps(grid)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{which} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-components", type=int, default=1000)
    ap.add_argument("--n-examples", type=int, default=1000)
    ap.add_argument("--n-masks", type=int, default=10000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each fit; the fastest counts")
    ap.add_argument("--child", choices=("coarpy", "sklearn"))
    ap.add_argument("--data", type=Path)
    ap.add_argument("--grid")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.data, json.loads(args.grid))
        return

    import sklearn
    import torch

    N, E, n = args.n_components, args.n_examples, args.n_masks
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        info = make_data(n, args.n_test, N, E, args.seed, data)
        # The same grid for both: coarpy's default relative grid times the mask variance.
        from coarpy.regression import DEFAULT_L2_RELATIVE

        grid = [info["mask_variance"] * r for r in DEFAULT_L2_RELATIVE]
        # Alternate the two fits and keep each one's fastest run: the machine may be shared.
        runs: dict[str, list[dict]] = {"coarpy": [], "sklearn": []}
        for _ in range(args.repeat):
            for which in runs:
                runs[which].append(run_child(which, data, grid, args.threads))
        res = {w: min(r, key=lambda x: x["seconds"]) for w, r in runs.items()}

    c, s = res["coarpy"], res["sklearn"]
    mib = 2**20
    print(f"# fit_vs_sklearn  N={N} components, E={E} examples, n={n} masks (alpha={ALPHA})")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"scikit-learn {sklearn.__version__}, numpy {np.__version__}, {args.threads} threads"
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{os.cpu_count()} CPUs, load average {load:.1f} at the end, best of {args.repeat}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}"
    )
    print(f"grid: {len(grid)} penalties, l2 = {grid[0]:.3g} ... {grid[-1]:.3g} (alpha = l2 * n)")
    print()
    print("| | coarpy fit (ridge, 10% validation) | sklearn RidgeCV (LOO, per target) |")
    print("|---|---|---|")
    print(f"| fit time | {c['seconds']:.1f} s | {s['seconds']:.1f} s |")
    print(
        f"| peak RSS during the fit (data loaded) | {c['peak_rss'] / mib:.0f} MiB | "
        f"{s['peak_rss'] / mib:.0f} MiB |"
    )
    print(
        f"| peak RSS minus RSS before the fit | "
        f"{(c['peak_rss'] - c['rss_before_fit']) / mib:.0f} MiB | "
        f"{(s['peak_rss'] - s['rss_before_fit']) / mib:.0f} MiB |"
    )
    print(f"| held-out Pearson (mean over examples) | {c['pearson']:.4f} | {s['pearson']:.4f} |")
    print(f"| median chosen alpha (= l2 * n) | {c['median_alpha']:.3g} | {s['median_alpha']:.3g} |")
    print()
    print(f"speed-up: {s['seconds'] / c['seconds']:.1f}x (target >= 3x at equal correlation)")


if __name__ == "__main__":
    main()
