"""Coar-Edit on MiniLM 2: fix single errors of a sentiment probe with a few components.

A sentiment probe on all-MiniLM-L6-v2 is fitted on 100 Pang-Lee sentences. The edit
split holds 32 other sentences; the probe gets some of them wrong. For each error e
(the first 8): targets = {e}, references = the correctly classified sentences of the
edit split; each method ablates components in its order until e is classified
correctly (the smallest k, up to 8), and the edited model's accuracy is measured on
the 68 held-out sentences. Components: the 12 heads and 1,536 MLP neurons of MiniLM's
last layer. The predicted and refined selections and the oracle maximise "e fixed"
minus the share of references broken (ties: the shortfall of e's margin).

Run: ``python examples/minilm_fix_errors.py`` (a few minutes on 2 CPU cores;
``--quick`` for a smoke test).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _text as T  # noqa: E402

from coarpy import edit  # noqa: E402
from coarpy.demo.text import EncoderTail  # noqa: E402


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny settings (for tests)")
    p.add_argument("--out", default="runs/examples", help="folder for stores, caches, results")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def orders_for(e: int, correct: torch.Tensor, *, model, comps, data, attrs, base, k_max, args):
    """Every method's order of components for fixing example ``e``."""
    objective = edit.Objective([e], correct)
    orders = {}
    for name, attr in attrs.items():
        orders[f"{name}/welch"] = edit.select(edit.scores(attr, [e], correct), k_max)
        orders[f"{name}/predicted"] = edit.select_predicted(attr, objective, k_max, outputs=base)
    orders["coar/refine"] = edit.refine(
        attrs["coar"], model, comps, data, objective=objective, k=k_max, candidates=2,
        progress=False,
    ).order  # fmt: skip
    orders["oracle"] = edit.oracle(
        model, comps, data, objective=objective, k=k_max, leave_one_out=attrs["loo"],
        budget=1 + (k_max - 1) * (4 if args.quick else 16), progress=False,
    ).order  # fmt: skip
    gen = torch.Generator().manual_seed(args.seed * 1000 + e)
    orders["random"] = torch.randperm(len(comps), generator=gen)[:k_max]
    return orders


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    out = Path(args.out)
    clock = T.Clock()
    n_edit, n_masks, k_max, n_errors = (16, 100, 4, 3) if args.quick else (32, 600, 8, 8)
    encoder, tokenizer, sentences, labels = T.load()
    train, edit_rows, held = T.three_way_split(labels, n_train=100, n_edit=n_edit, seed=args.seed)
    if args.quick:
        held = held[::3]
    probe = T.fit_probe(encoder, tokenizer, [sentences[i] for i in train.tolist()], labels[train])
    model = EncoderTail(probe, T.START)
    model, comps = T.components(model, quick=args.quick, seed=args.seed)
    data = T.batch(probe, tokenizer, [sentences[i] for i in edit_rows.tolist()], labels[edit_rows])
    held_data = T.batch(probe, tokenizer, [sentences[i] for i in held.tolist()], labels[held])
    heldout_acc = T.accuracy_of(held_data)
    base = T.outputs_of(model, data)
    errors = (base <= 0).nonzero().flatten()
    correct = (base > 0).nonzero().flatten()
    acc_before = heldout_acc(model)
    clock.say(
        f"{len(comps)} components; {len(errors)} errors among {len(base)} edit sentences; "
        f"held-out accuracy {acc_before:.3f} on {len(held)} sentences"
    )
    attrs = T.attributions(model, comps, data, out=out, n_masks=n_masks, alpha=0.05, seed=args.seed)
    clock.say(f"attributions over {len(base)} examples ({n_masks} masks for COAR)")
    pearson = T.correlations(
        attrs, model, comps, data, alpha=0.05, n_masks=20 if args.quick else 40, seed=args.seed
    )
    clock.say("held-out correlation " + ", ".join(f"{m} {r:.3f}" for m, r in pearson.items()))

    per_error = []
    for e in errors[:n_errors].tolist():
        orders = orders_for(
            e, correct, model=model, comps=comps, data=data, attrs=attrs, base=base,
            k_max=k_max, args=args,
        )  # fmt: skip
        for method, order in orders.items():
            table = edit.sweep(
                None, model, comps, data, targets=[e], references=correct, order=order,
                ks=range(k_max + 1), until=lambda row: row["target_acc"] == 1.0, progress=False,
            )  # fmt: skip
            k = edit.smallest_k(table, "target_acc", at_least=1.0)
            row = {"error": e, "method": method, "k": k, "reference_acc": None, "delta": None}
            if k is not None:
                row["reference_acc"] = table[-1]["reference_acc"]
                edited = edit.apply(model, comps, order[:k])
                row["delta"] = 100 * (heldout_acc(edited) - acc_before)
            per_error.append(row)
        clock.say(
            f"error {e}: "
            + ", ".join(f"{r['method']} k={r['k']}" for r in per_error[-len(orders) :])
        )

    methods = list(dict.fromkeys(r["method"] for r in per_error))
    n_done = len(errors[:n_errors])
    summary = []
    for method in methods:
        rows = [r for r in per_error if r["method"] == method]
        fixed = [r for r in rows if r["k"] is not None]
        deltas = [r["delta"] for r in fixed]
        summary.append(
            {
                "method": method,
                "fixed": f"{len(fixed)} / {n_done}",
                **{f"k<={k}": sum(r["k"] <= k for r in fixed) for k in (1, 2, 4, 8) if k <= k_max},
                "median k": statistics.median(r["k"] for r in fixed) if fixed else None,
                "median delta": statistics.median(deltas) if deltas else None,
                "mean delta": statistics.fmean(deltas) if deltas else None,
                "worst delta": min(deltas) if deltas else None,
            }
        )
    print(
        "\nerrors fixed within k components (edit split), and the held-out accuracy change "
        "(points) at the fixing k\n" + T.markdown(summary)
    )
    curve = {}  # share of the errors fixed with at most k components
    for method in methods:
        ks = [r["k"] for r in per_error if r["method"] == method]
        curve[method] = [
            {"k": k, "fixed": sum(x is not None and x <= k for x in ks) / n_done}
            for k in range(k_max + 1)
        ]
    figure = T.plot(
        curve, ["coar/welch", "coar/predicted", "loo/welch", "oracle"], target="fixed",
        reference=None, title="MiniLM, single errors: share fixed with at most k components",
        path=T.figure_path(out, "minilm_fix_errors", args.quick),
    )  # fmt: skip
    results = {
        "task": "minilm_fix_errors",
        "quick": args.quick,
        "n_components": len(comps),
        "n_edit_examples": len(base),
        "n_errors": len(errors),
        "n_heldout": len(held),
        "heldout_acc_before": acc_before,
        "n_masks": n_masks,
        "pearson": pearson,
        "summary": summary,
        "per_error": per_error,
        "fixed_curve": curve,
        "figure": str(figure) if figure else None,
    }
    path = out / "minilm_fix_errors" / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    clock.say(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
