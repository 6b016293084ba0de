"""Coar-Edit task 1: fix single model errors with a few ablated components.

A small CNN trained on Fashion-MNIST misclassifies some test images. Attributions
are computed over a set of test images that holds both misclassified and correctly
classified ones. For each error e, target T = {e} and references R = the correctly
classified images of the set; components are ablated in order of their Welch t
score until e is classified correctly (measured by running the model: the smallest
such k), and the edited model's accuracy on other, held-out test images is compared
with the original's. The paper reports a median change of at most 0.2 points on
ImageNet. COAR is compared with leave-one-out and gradient attributions (all three
ordered by Welch scores), ``edit.select_predicted`` on COAR (the objective: e fixed
minus the share of references broken), ``edit.oracle`` (the greedy choice by running
the model on the same images, same objective) and a random order.

Run: ``python examples/fix_errors.py`` (about 4-5 min of CPU time, one thread; ``--quick``
for a smoke test).
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from coarpy import edit  # noqa: E402
from coarpy.demo import accuracy, fashion_mnist  # noqa: E402


def orders_for(e, correct, model, comps, data, attrs, k_max, seed, pool):
    """``(method, order)`` for fixing error ``e``: up to ``k_max`` components each.

    The oracle runs with growing k (2, 4, 8, ...) until its edit fixes ``e``; with a
    fixed pool its edits of different k agree on their common prefix.
    """
    objective = edit.Objective([e], correct)
    for method, attr in attrs.items():
        yield method, edit.select(edit.scores(attr, [e], correct), k_max)
    base = C.margins(model, data)
    yield "coar/predicted", edit.select_predicted(attrs["coar"], objective, k_max, outputs=base)
    k = 1
    while True:
        k = min(2 * k, k_max)
        order = edit.oracle(
            model, comps, data, objective=objective, k=k, leave_one_out=attrs["leave_one_out"],
            budget=1 + (k - 1) * pool, progress=False,
        ).order  # fmt: skip
        fixed = edit.measure(
            edit.apply(model, comps, order), data, targets=[e], references=correct, progress=False
        )
        if fixed["target_acc"] == 1.0 or k == k_max:
            break
    yield "oracle", order
    gen = torch.Generator().manual_seed(seed * 100_003 + e)
    yield "random", torch.randperm(len(comps), generator=gen)[:k_max]


def main(argv: Sequence[str] | None = None) -> dict:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    out = Path(args.out)
    clock = C.Clock()
    n_train, n_set, n_masks, k_max, n_eval = (
        (3000, 100, 300, 16, 500) if args.quick else (10_000, 200, 800, 40, 2000)
    )
    x_train, y_train = fashion_mnist(split="train", limit=n_train)
    x_test, y_test = fashion_mnist(split="test")
    model = C.train_cnn((x_train, y_train), out=out, seed=args.seed)
    comps = C.components(model)
    data = (x_test[:n_set], y_test[:n_set])  # the attributions' examples
    held = (x_test[5000 : 5000 + n_eval], y_test[5000 : 5000 + n_eval])  # accuracy is measured here
    base_acc = accuracy(model, held)
    pred = C.predictions(model, data[0])
    errors = (pred != data[1]).nonzero().flatten()
    correct = (pred == data[1]).nonzero().flatten()
    if args.quick:
        errors = errors[:5]
    clock.say(
        f"model: {len(comps)} components, held-out accuracy {100 * base_acc:.1f}% "
        f"on {n_eval} images; {len(errors)} errors among the {n_set} attributed images"
    )
    attrs = C.attributions(
        model, comps, data, store=out / "stores",
        n_masks=n_masks, seed=args.seed,
    )  # fmt: skip
    clock.say(f"attributions: COAR from {n_masks} masks, leave-one-out, gradient")
    fixes: list[dict] = []
    pool = 8 if args.quick else C.ORACLE_POOL  # the oracle's candidates per step after the first

    per_error = []
    for e in errors.tolist():
        for method, order in orders_for(
            e, correct, model, comps, data, attrs, k_max, args.seed, pool
        ):
            table = edit.sweep(
                None, model, comps, data, targets=[e], references=correct, order=order,
                ks=range(len(order) + 1), until=lambda row: row["target_acc"] == 1.0,
                progress=False,
            )  # fmt: skip
            k = edit.smallest_k(table, "target_acc", at_least=1.0)
            row = {"method": method, "example": e, "label": int(data[1][e]), "k": k}
            if k is not None:
                edited = edit.apply(model, comps, order[:k])  # weights zeroed: a plain model
                fixed = int(C.predictions(edited, data[0][e : e + 1])[0]) == int(data[1][e])
                delta = 100 * (accuracy(edited, held) - base_acc)
                row.update(fixed_by_weights=fixed, delta_acc_points=delta)
                if method == "coar" and not any(r["method"] == "coar" for r in fixes):
                    made = edit.make(
                        attrs["coar"], model, comps, targets=[e], references=correct, k=k
                    )
                    made.save(out / "fix_errors" / "edits" / f"fix-{e}.json", model=edited)
                fixes.append(row)
            per_error.append(row)
    clock.say(f"fixed errors: every method's order, k <= {k_max}")

    summary = []
    for method in dict.fromkeys(r["method"] for r in per_error):
        rows = [r for r in per_error if r["method"] == method]
        ks = [r["k"] for r in rows if r["k"] is not None]
        deltas = [r["delta_acc_points"] for r in rows if r["k"] is not None]
        summary.append(
            {
                "method": method,
                "errors": len(rows),
                "fixed": len(ks),
                **{f"k<={k}": sum(x <= k for x in ks) for k in (1, 2, 4, 8)},
                "median_k": statistics.median(ks) if ks else None,
                "median_delta_acc_points": statistics.median(deltas) if deltas else None,
                "mean_delta_acc_points": statistics.fmean(deltas) if deltas else None,
                "worst_delta_acc_points": min(deltas) if deltas else None,
            }
        )
    curve = {  # share of the errors fixed with at most k components
        method: [
            {"k": k, "fixed": sum(r["k"] is not None and r["k"] <= k for r in per_error
                                  if r["method"] == method) / len(errors)}
            for k in range(k_max + 1)
        ]
        for method in dict.fromkeys(r["method"] for r in per_error)
    }  # fmt: skip
    figure = C.plot(
        curve, ["coar", "leave_one_out", "gradient", "coar/predicted", "oracle", "random"],
        target="fixed", reference=None,
        title="Fashion-MNIST, single errors: share fixed with at most k components",
        path=C.figure_path(out, "fix_errors", args.quick),
    )  # fmt: skip
    print()
    print(C.markdown(summary))
    results = {
        "task": "fix_errors",
        "quick": args.quick,
        "n_components": len(comps),
        "heldout_accuracy": base_acc,
        "n_heldout": n_eval,
        "summary": summary,
        "per_error": per_error,
        "fixed_curve": curve,
        "figure": str(figure) if figure else None,
    }
    C.save_results(out / "fix_errors", "results", results)
    return results


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
