"""Coar-Edit task 4: localise a backdoor and remove it with a few ablated components.

A small CNN is trained on Fashion-MNIST where 5% of the training images carry a
trigger (a bright 3x3 patch in the bottom-right corner) and are relabelled as the
attacker's class. On test images the trigger then sends most predictions to that
class. Attributions are computed over held-out images of the other classes in both
versions, clean and triggered. Target T = the triggered versions, references R =
the clean versions of the same images; the components with the most negative Welch
t scores are ablated (they hold the correct-class margin down only when the trigger
is there). The paper reports triggered accuracy 37% -> 84% with 25 components while
clean accuracy goes 89% -> 88%. k is chosen on the attributed images (the best
triggered accuracy while clean accuracy stays within 2 points) and judged on other
held-out images. COAR is compared at equal k with leave-one-out and gradient
attributions, COAR's paired scores (each triggered image against its clean copy),
``edit.select_predicted`` on COAR, random components and ``edit.oracle`` (the greedy
edit found by running the model on the attributed images); see ``_common.py``.

Run: ``python examples/backdoor.py`` (about 4-5 min of CPU time, one thread; ``--quick`` for a
smoke test).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from coarpy import edit  # noqa: E402
from coarpy.demo import fashion_mnist  # noqa: E402

ATTACK_CLASS = 0  # T-shirt/top
POISON_RATE = 0.05
WIDTH, HIDDEN = 16, 128  # wider than the other examples: a backdoor needs room to hide
DELTA = 0.02  # largest drop of clean accuracy (attributed images) allowed


def add_trigger(x: Tensor) -> Tensor:
    """The images with a bright 3x3 patch in the bottom-right corner."""
    x = x.clone()
    x[..., 24:27, 24:27] = 1.0
    return x


def main(argv: Sequence[str] | None = None) -> dict:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    out = Path(args.out)
    clock = C.Clock()
    n_train, n_set, n_masks, n_eval = (
        (3000, 50, 200, 300) if args.quick else (10_000, 100, 800, 2000)
    )
    ks = (0, 4, 8, 12, 16) if args.quick else (0, 1, 2, 3, 4, 6, 8, 10, 12, 16, 24, 32)
    gen = torch.Generator().manual_seed(args.seed)

    x_train, y_train = fashion_mnist(split="train", limit=n_train)
    poison = torch.rand(n_train, generator=gen) < POISON_RATE
    x_train, y_train = x_train.clone(), y_train.clone()
    x_train[poison] = add_trigger(x_train[poison])
    y_train[poison] = ATTACK_CLASS
    x_test, y_test = fashion_mnist(split="test")
    other = y_test != ATTACK_CLASS  # images whose label the trigger can flip
    x_test, y_test = x_test[other], y_test[other]
    # the attributed images: n_set clean test images, then the same images triggered
    xa, ya = x_test[:n_set], y_test[:n_set]
    data = (torch.cat([xa, add_trigger(xa)]), torch.cat([ya, ya]))
    references = torch.arange(n_set)  # clean
    targets = torch.arange(n_set, 2 * n_set)  # triggered
    hx, hy = x_test[4500 : 4500 + n_eval], y_test[4500 : 4500 + n_eval]  # held out
    metrics = {
        "heldout_target_acc": C.accuracy_on(add_trigger(hx), hy),  # triggered
        "heldout_reference_acc": C.accuracy_on(hx, hy),  # clean
    }

    model = C.train_cnn((x_train, y_train), out=out, seed=args.seed, width=WIDTH, hidden=HIDDEN)
    comps = C.components(model)
    clock.say(
        f"model: {len(comps)} components, trained with {int(poison.sum())} poisoned of "
        f"{n_train} images (trigger -> class {ATTACK_CLASS})"
    )
    attrs = C.attributions(
        model, comps, data, store=out / "stores",
        n_masks=n_masks, seed=args.seed,
    )  # fmt: skip
    clock.say(f"attributions over {n_set} clean + {n_set} triggered images")

    objective = edit.Objective(targets, references)  # triggered fixed minus clean broken
    found, facts, curves = C.compare(
        attrs, model, comps, data, targets=targets, references=references,
        objective=objective, ks=ks, metrics=metrics, clock=clock, quick=args.quick,
        paired=True, seed=args.seed,
    )  # fmt: skip
    summary = []
    for method, table in curves.items():
        k = edit.best_k(table, target="target_acc", reference="reference_acc", delta=DELTA)
        before, after = table[0], next(r for r in table if r["k"] == k)
        summary.append(
            {
                "method": method,
                "k": k,
                "triggered_acc_before": before["heldout_target_acc"],
                "triggered_acc_after": after["heldout_target_acc"],
                "clean_acc_before": before["heldout_reference_acc"],
                "clean_acc_after": after["heldout_reference_acc"],
            }
        )
        if method == "coar":
            made = edit.make(
                attrs[method], model, comps, targets=targets, references=references, k=k
            )
            made = C.with_curve(made, table, k)
            made.save(out / "backdoor" / "edits" / "backdoor.json",
                      model=made.apply_to(model, comps))  # fmt: skip
    triggered_at = C.at_k(curves, "heldout_target_acc", ks)
    clean_at = C.at_k(curves, "heldout_reference_acc", ks)
    print("\nk chosen on the attributed images (clean accuracy within 2 points)")
    print(C.markdown(summary))
    print("\nheld-out triggered accuracy at equal k\n" + C.markdown(triggered_at))
    print("\nheld-out clean accuracy at equal k\n" + C.markdown(clean_at))
    figure = C.plot(
        curves, ["coar", "leave_one_out", "coar/predicted", "oracle"],
        target="heldout_target_acc", reference="heldout_reference_acc",
        title="Fashion-MNIST backdoor: held-out triggered / clean accuracy",
        path=C.figure_path(out, "backdoor", args.quick),
    )  # fmt: skip
    results = {
        "task": "backdoor",
        "quick": args.quick,
        "n_components": len(comps),
        "n_poisoned": int(poison.sum()),
        "delta": DELTA,
        "summary": summary,
        "triggered_at_k": triggered_at,
        "clean_at_k": clean_at,
        "curves": curves,
        "orders": {m: [int(j) for j in o.tolist()] for m, o in found.items()},
        "figure": str(figure) if figure else None,
        **facts,
    }
    C.save_results(out / "backdoor", "results", results)
    return results


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
