"""Benchmark: does a second-order model over the top components raise held-out r? (issue 19)

At larger ablation fractions the linear model loses correlation (the demo: 0.932 at
alpha = 0.1, 0.877 at 0.2). This prototype adds pairwise interactions over the top
``k`` components of each example (chosen by the size of its linear attributions),
fitted from the same masks, and measures the held-out Pearson with and without them.

Model (``coarpy.regression.interactions.PairwiseInteractions``), per example ``e``:
the linear fit ``b + w . v`` (``coarpy.fit``, method "group" with the gradient prior)
plus
``sum_{i<j in top_k(e)} u_ij (a_i - abar_i)(a_j - abar_j)``, ``a = 1 - v`` the
ablated indicator and ``abar`` its mean over the training masks. For independent
masks the centred products are orthogonal to the linear terms (the best linear
approximation of ``a_i a_j`` is ``abar a_i + abar a_j - abar**2``), so fitting them to
the linear fit's residuals approximates the joint fit. ``u`` is a ridge fit per example
with the penalty chosen by GCV from a grid that includes "no pairs" (an infinite
penalty), so the pairs are only used where GCV says they predict.

Usage::

    python bench/interactions.py            # digits and fashion CNNs, alpha 0.1 and 0.2

Results: bench/RESULTS_efficiency.md ("Beyond linear").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from coarpy import Components, outputs
from coarpy.baselines import gradient
from coarpy.collect import collect
from coarpy.evaluate import pearson
from coarpy.regression import fit
from coarpy.regression.interactions import PairwiseInteractions

OUT = Path(__file__).resolve().parent / "out" / "interactions"
MODELS = {"digits": 200, "fashion": 100}  # examples


def setup(name: str):
    from coarpy.demo import pretrained_digits_cnn, pretrained_fashion_cnn

    load = pretrained_digits_cnn if name == "digits" else pretrained_fashion_cnn
    model, (x, y) = load(OUT / "models")
    comps = Components.discover(model, kinds=("conv", "neurons"))
    n = MODELS[name]
    return model, comps, (x[:n], y[:n])


def run(name: str, alpha: float, n_train: int, n_held: int, ks: list[int]) -> list[str]:
    model, comps, data = setup(name)
    root = OUT / name
    kw = dict(output=outputs.margin, alpha=alpha, batch_size=4096, progress=False)
    t0 = time.perf_counter()
    tr = collect(model, comps, data, path=root / f"train_{alpha}", n_masks=n_train, seed=0, **kw)
    he = collect(model, comps, data, path=root / f"held_{alpha}", n_masks=n_held, seed=99, **kw)
    t_collect = time.perf_counter() - t0
    V, Y = tr.masks(), tr.outputs()
    Vh, Yh = he.masks(), he.outputs()
    grad = gradient(model, comps, data, output=outputs.margin)
    lines = []
    for n in (500, n_train):
        lin = fit((V[:n], Y[:n]), prior=grad, groups=[g.partition(":")[0] for g in comps.names],
                  progress=False)  # fmt: skip
        r_lin = float(pearson(lin.predict(Vh).double(), Yh.double()).nanmean())
        cells = [f"{r_lin:.4f}"]
        for k in ks:
            t1 = time.perf_counter()
            pw = PairwiseInteractions(lin, top=k).fit((V[:n], Y[:n]))
            r = float(pearson(pw.predict(Vh), Yh.double()).nanmean())
            used = float((pw.weights_.abs().sum(1) > 0).double().mean())
            cells.append(f"{r:.4f} ({r - r_lin:+.4f}; pairs used for {used:.0%} of examples, "
                         f"{time.perf_counter() - t1:.0f} s)")  # fmt: skip
        lines.append(f"| {name} | {alpha} | {n} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    print(f"({name} alpha={alpha}: collection {t_collect:.0f} s)", flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    torch.set_num_threads(2)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=list(MODELS))
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.1, 0.2])
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-held", type=int, default=500)
    ap.add_argument("--top", nargs="+", type=int, default=[10, 20])
    args = ap.parse_args(argv)
    print(
        "| model | alpha | masks | linear (group + grad) | "
        + " | ".join(f"+ pairs of top {k}" for k in args.top)
        + " |"
    )
    print("|---" * (4 + len(args.top)) + "|")
    for name in args.models:
        for alpha in args.alphas:
            run(name, alpha, args.n_train, args.n_held, args.top)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
