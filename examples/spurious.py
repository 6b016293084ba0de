"""Coar-Edit task 3: subpopulation robustness against a spurious feature.

Fashion-MNIST dresses (label 1) against T-shirts/tops (label 0), with a spurious
feature: a bright 4x4 patch near the top-left corner. In training, 95% of the
dresses carry the patch and 5% of the T-shirts do, so the patch predicts the label;
in the validation and test images it is independent of the label (half of each
class). The four groups are (class, patch). The model leans on the patch, and its
worst group (T-shirts with the patch, or dresses without) is much less accurate than
the average, as on Waterbirds and CelebA in the paper (Waterbirds: worst group
64% -> 83% with 210 of 22,720 components; CelebA 47% -> 85% with 26).

Attributions are computed over validation images, 50 per group. Target T = the
validation images of the worst group. References R = the validation images of the
same class with the other patch status (``--references same-class``, the default):
T and R then differ only in the patch, so the components that score apart are the
ones that read it. With R = every other validation image (``--references rest``)
the scores also favour components that merely move the class boundary, trading one
class for the other (see examples/RESULTS.md). The components with the most
negative Welch t scores are ablated. k is chosen on the
validation images (the best worst-group accuracy) and judged on the test images.
COAR is compared at equal k with leave-one-out and gradient attributions,
``edit.select_predicted`` on COAR and ``edit.oracle`` (the greedy edit found by
running the model on the validation images), both maximising the validation
worst-group accuracy, and random components; see ``_common.py``.

Run: ``python examples/spurious.py`` (about 1-2 min on 2 CPU cores; ``--quick`` for a
smoke test).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from coarpy import edit  # noqa: E402
from coarpy.demo import fashion_mnist  # noqa: E402

CLASSES = (0, 3)  # T-shirt/top -> label 0, Dress -> label 1
PATCH_RATE = (0.05, 0.95)  # P(patch | label) in training
GROUPS = ("tshirt/no patch", "tshirt/patch", "dress/no patch", "dress/patch")


def add_patch(x: Tensor, on: Tensor) -> Tensor:
    """Images with a bright 4x4 patch near the top-left corner where ``on`` is True."""
    x = x.clone()
    patched = x[on]
    patched[..., 1:5, 1:5] = 1.0
    x[on] = patched
    return x


def binary(split: str) -> tuple[Tensor, Tensor]:
    x, y = fashion_mnist(split=split)
    keep = (y == CLASSES[0]) | (y == CLASSES[1])
    return x[keep], (y[keep] == CLASSES[1]).long()


def group_accuracies(model: nn.Module, x: Tensor, y: Tensor, g: Tensor) -> list[float]:
    correct = C.predictions(model, x) == y
    return [float(correct[g == i].float().mean()) for i in range(len(GROUPS))]


def worst_group(groups: Sequence[Tensor]):
    """Objective: worst-group accuracy; ties: mean group accuracy, then the shortfall."""

    def objective(outputs: Tensor, base: Tensor) -> Tensor:
        accs = torch.stack([(outputs[:, g] > 0).double().mean(1) for g in groups], 1)  # (n, G)
        shortfall = outputs.double().clamp(max=0).mean(1)
        return torch.stack([accs.min(1).values, accs.mean(1), shortfall], 1)

    return objective


def main(argv: Sequence[str] | None = None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--references",
        choices=("rest", "same-class"),
        default="same-class",
        help="R = the validation images of the worst group's class with the other patch "
        "status (same-class, the default), or every other validation image (rest)",
    )
    args = C.parse_args("", argv, p)
    out = Path(args.out)
    clock = C.Clock()
    n_train, per_group, n_masks = (4000, 50, 300) if args.quick else (4000, 50, 800)
    ks = (0, 1, 4, 8) if args.quick else (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20)
    gen = torch.Generator().manual_seed(args.seed)

    x_all, y_all = binary("train")
    order = torch.randperm(len(y_all), generator=gen)
    x_all, y_all = x_all[order], y_all[order]
    # training: the patch follows the label
    xt, yt = x_all[:n_train], y_all[:n_train]
    patch_p = torch.tensor(PATCH_RATE)[yt]
    xt = add_patch(xt, torch.rand(len(yt), generator=gen) < patch_p)
    # validation (the attributed images): per_group images of each (class, patch) group
    rest_x, rest_y = x_all[n_train:], y_all[n_train:]
    rows, groups = [], []
    for label in (0, 1):
        idx = (rest_y == label).nonzero().flatten()[: 2 * per_group]
        rows.append(idx)
        groups += [2 * label] * per_group + [2 * label + 1] * per_group
    rows = torch.cat(rows)
    gv = torch.tensor(groups)
    xv, yv = add_patch(rest_x[rows], gv % 2 == 1), rest_y[rows]
    # test: the patch on a random half of each class
    xs, ys = binary("test")
    ps = torch.rand(len(ys), generator=gen) < 0.5
    xs, gs = add_patch(xs, ps), 2 * ys + ps.long()
    if args.quick:  # every other test image
        xs, ys, gs = xs[::2], ys[::2], gs[::2]

    model = C.train_cnn((xt, yt), out=out, n_classes=2, seed=args.seed)
    comps = C.components(model)
    val_groups = group_accuracies(model, xv, yv, gv)
    worst = min(range(len(GROUPS)), key=lambda i: val_groups[i])
    targets = (gv == worst).nonzero().flatten()
    if args.references == "rest":
        references = (gv != worst).nonzero().flatten()
    else:  # the same class, the other patch status: differs from T only in the patch
        references = (gv == (worst ^ 1)).nonzero().flatten()
    clock.say(
        f"model: {len(comps)} components; validation group accuracies "
        + ", ".join(f"{n} {a:.2f}" for n, a in zip(GROUPS, val_groups, strict=True))
        + f"; worst: {GROUPS[worst]}; references: {args.references}"
    )
    attrs = C.attributions(
        model, comps, (xv, yv), store=out / "stores",
        n_masks=n_masks, seed=args.seed,
    )  # fmt: skip
    clock.say(f"attributions over {len(yv)} validation images: COAR, leave-one-out, gradient")

    metrics = {}
    for i in range(len(GROUPS)):
        metrics[f"val_group{i}"] = C.accuracy_on(xv[gv == i], yv[gv == i])
        metrics[f"test_group{i}"] = C.accuracy_on(xs[gs == i], ys[gs == i])
    objective = worst_group([(gv == i).nonzero().flatten() for i in range(len(GROUPS))])
    found, facts, curves = C.compare(
        attrs, model, comps, (xv, yv), targets=targets, references=references,
        objective=objective, ks=ks, metrics=metrics, clock=clock, quick=args.quick,
        seed=args.seed,
    )  # fmt: skip
    summary = []
    for method, table in curves.items():
        for row in table:
            for split in ("val", "test"):
                accs = [row[f"{split}_group{i}"] for i in range(len(GROUPS))]
                row[f"{split}_worst_group_acc"] = min(accs)
                row[f"{split}_avg_group_acc"] = sum(accs) / len(accs)
        best = max(table, key=lambda r: (r["val_worst_group_acc"], -r["k"]))  # chosen on val
        before = table[0]
        summary.append(
            {
                "method": method,
                "k": best["k"],
                "test_worst_before": before["test_worst_group_acc"],
                "test_worst_after": best["test_worst_group_acc"],
                "test_avg_before": before["test_avg_group_acc"],
                "test_avg_after": best["test_avg_group_acc"],
            }
        )
        if method == "coar":
            made = edit.make(
                attrs[method], model, comps, targets=targets, references=references, k=best["k"]
            )
            made = C.with_curve(made, table, best["k"])
            made.save(out / "spurious" / "edits" / f"worst-group-{args.references}.json",
                      model=made.apply_to(model, comps))  # fmt: skip
    worst_at = C.at_k(curves, "test_worst_group_acc", ks)
    avg_at = C.at_k(curves, "test_avg_group_acc", ks)
    print("\nk chosen on validation (the best worst-group accuracy there)")
    print(C.markdown(summary))
    print("\ntest worst-group accuracy at equal k\n" + C.markdown(worst_at))
    print("\ntest average group accuracy at equal k\n" + C.markdown(avg_at))
    figure = C.plot(
        curves, ["coar", "leave_one_out", "coar/predicted", "oracle"],
        target="test_worst_group_acc", reference="test_avg_group_acc",
        title=f"Fashion-MNIST, spurious patch (R: {args.references}): test worst / average group",
        path=C.figure_path(out, f"spurious-{args.references}", args.quick),
    )  # fmt: skip
    results = {
        "task": "spurious",
        "quick": args.quick,
        "references": args.references,
        "n_components": len(comps),
        "groups": GROUPS,
        "validation_group_acc": val_groups,
        "test_group_acc": group_accuracies(model, xs, ys, gs),
        "worst_group": GROUPS[worst],
        "summary": summary,
        "worst_at_k": worst_at,
        "avg_at_k": avg_at,
        "curves": curves,
        "orders": {m: [int(j) for j in o.tolist()] for m, o in found.items()},
        "figure": str(figure) if figure else None,
        **facts,
    }
    C.save_results(out / "spurious", f"results-{args.references}", results)
    return results


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
