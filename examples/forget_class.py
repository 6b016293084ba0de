"""Coar-Edit task 2: forget a class, keep the others.

The same Fashion-MNIST CNN and attributed test images as ``fix_errors.py``. Target
T = the attributed images of one class, references R = the others; the components
with the most positive Welch t scores are ablated (``direction="lower"``) to drive
the class's outputs down relative to the rest. ``sweep`` measures, for each k, the
accuracy on T and R and, on held-out test images, on the class and on the others.
The chosen k is the one with the lowest target accuracy on the attributed images
while their reference accuracy stays within 5 points; it is then judged on the
held-out images. COAR is compared at equal k with leave-one-out and gradient
attributions, ``edit.select_predicted`` on COAR, random components and
``edit.oracle`` (the greedy edit found by running the model on the attributed
images; objective: targets forgotten minus references broken); see ``_common.py``.

Run: ``python examples/forget_class.py [--label 1]`` (about 2 min on 2 CPU cores;
``--quick`` for a smoke test).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from coarpy import edit  # noqa: E402
from coarpy.demo.data import FASHION_MNIST_CLASSES, fashion_mnist  # noqa: E402

DELTA = 0.05  # largest drop of reference accuracy (attributed images) allowed


def main(argv: Sequence[str] | None = None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--label", type=int, default=1, help="the class to forget (default 1, Trouser)")
    args = C.parse_args("", argv, p)
    label = args.label
    out = Path(args.out)
    clock = C.Clock()
    n_train, n_set, n_masks, n_eval = (
        (3000, 100, 300, 500) if args.quick else (10_000, 200, 800, 2000)
    )
    ks = (
        (0, 1, 2, 4, 8, 12, 16, 24, 32) if args.quick else (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48)
    )
    x_train, y_train = fashion_mnist(split="train", limit=n_train)
    x_test, y_test = fashion_mnist(split="test")
    model = C.train_cnn((x_train, y_train), out=out, seed=args.seed)
    comps = C.components(model)
    data = (x_test[:n_set], y_test[:n_set])
    targets = (data[1] == label).nonzero().flatten()
    references = (data[1] != label).nonzero().flatten()
    hx, hy = x_test[5000 : 5000 + n_eval], y_test[5000 : 5000 + n_eval]
    metrics = {
        "heldout_target_acc": C.accuracy_on(hx[hy == label], hy[hy == label]),
        "heldout_reference_acc": C.accuracy_on(hx[hy != label], hy[hy != label]),
    }
    clock.say(
        f"forget class {label} ({FASHION_MNIST_CLASSES[label]}): {len(targets)} target and "
        f"{len(references)} reference images attributed; {int((hy == label).sum())} and "
        f"{int((hy != label).sum())} held out"
    )
    attrs = C.attributions(
        model, comps, data, store=out / "stores",
        n_masks=n_masks, seed=args.seed,
    )  # fmt: skip
    clock.say("attributions: COAR, leave-one-out, gradient")

    objective = edit.Objective(targets, references, direction="lower")
    found, facts, curves = C.compare(
        attrs, model, comps, data, targets=targets, references=references,
        objective=objective, ks=ks, metrics=metrics, clock=clock, quick=args.quick,
        direction="lower", seed=args.seed,
    )  # fmt: skip
    summary = []
    for method, table in curves.items():
        k = edit.best_k(
            table, target="target_acc", reference="reference_acc", delta=DELTA,
            direction="lower",
        )  # fmt: skip
        before, after = table[0], next(r for r in table if r["k"] == k)
        summary.append(
            {
                "method": method,
                "k": k,
                "class_acc_before": before["heldout_target_acc"],
                "class_acc_after": after["heldout_target_acc"],
                "others_acc_before": before["heldout_reference_acc"],
                "others_acc_after": after["heldout_reference_acc"],
            }
        )
        if method == "coar":
            made = edit.make(
                attrs[method], model, comps, targets=targets, references=references, k=k,
                direction="lower",
            )  # fmt: skip
            made = C.with_curve(made, table, k)
            made.save(out / "forget_class" / "edits" / f"forget-{label}.json",
                      model=made.apply_to(model, comps))  # fmt: skip
    class_at = C.at_k(curves, "heldout_target_acc", ks)
    others_at = C.at_k(curves, "heldout_reference_acc", ks)
    print("\nk chosen on the attributed images (reference accuracy within 5 points)")
    print(C.markdown(summary))
    print("\nheld-out accuracy on the class at equal k\n" + C.markdown(class_at))
    print("\nheld-out accuracy on the other classes at equal k\n" + C.markdown(others_at))
    figure = C.plot(
        curves, ["coar", "leave_one_out", "coar/predicted", "oracle"],
        target="heldout_target_acc", reference="heldout_reference_acc",
        title=f"Fashion-MNIST, forget {FASHION_MNIST_CLASSES[label]}: held-out class / others",
        path=C.figure_path(out, "forget_class", args.quick),
    )  # fmt: skip
    results = {
        "task": "forget_class",
        "quick": args.quick,
        "label": label,
        "delta": DELTA,
        "summary": summary,
        "class_at_k": class_at,
        "others_at_k": others_at,
        "curves": curves,
        "orders": {m: [int(j) for j in o.tolist()] for m, o in found.items()},
        "figure": str(figure) if figure else None,
        **facts,
    }
    C.save_results(out / "forget_class", "results", results)
    return results


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
