"""Coar-Edit task 1: fix single model errors with a few ablated components.

A small CNN trained on Fashion-MNIST misclassifies some test images. Attributions
are computed over a set of test images that holds both misclassified and correctly
classified ones. For each error e, target T = {e} and references R = the correctly
classified images of the set; components are ablated in order of their Welch t
score until e is classified correctly (measured by running the model: the smallest
such k), and the edited model's accuracy on other, held-out test images is compared
with the original's. The paper reports a median change of at most 0.2 points on
ImageNet. COAR is compared with leave-one-out and gradient attributions.

Run: ``python examples/fix_errors.py`` (about 2-3 min on 2 CPU cores; ``--quick``
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

    per_error = []
    summary = []
    for method, attr in attrs.items():
        ks, deltas = [], []
        for e in errors.tolist():
            table = edit.sweep(
                attr, model, comps, data, targets=[e], references=correct,
                ks=range(k_max + 1), until=lambda row: row["target_acc"] == 1.0, progress=False,
            )  # fmt: skip
            k = edit.smallest_k(table, "target_acc", at_least=1.0)
            row = {"method": method, "example": e, "label": int(data[1][e]), "k": k}
            if k is not None:
                made = edit.make(attr, model, comps, targets=[e], references=correct, k=k)
                edited = made.apply_to(model, comps)  # weights zeroed: a plain model
                fixed = int(C.predictions(edited, data[0][e : e + 1])[0]) == int(data[1][e])
                delta = 100 * (accuracy(edited, held) - base_acc)
                row.update(fixed_by_weights=fixed, delta_acc_points=delta)
                ks.append(k)
                deltas.append(delta)
                if method == "coar" and len(ks) == 1:  # keep one edit as an example file
                    made.save(out / "fix_errors" / "edits" / f"fix-{e}.json", model=edited)
            per_error.append(row)
        summary.append(
            {
                "method": method,
                "errors": len(errors),
                "fixed": len(ks),
                "median_k": statistics.median(ks) if ks else None,
                "median_delta_acc_points": statistics.median(deltas) if deltas else None,
                "mean_delta_acc_points": statistics.fmean(deltas) if deltas else None,
                "worst_delta_acc_points": min(deltas) if deltas else None,
            }
        )
        clock.say(f"{method}: fixed {len(ks)} of {len(errors)} errors with k <= {k_max}")
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
    }
    C.save_results(out / "fix_errors", "results", results)
    return results


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
