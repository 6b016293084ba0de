"""Coar-Edit on MiniLM 1: a spurious token. Raise worst-group accuracy by ablating components.

A sentiment probe on all-MiniLM-L6-v2 is trained on 100 Pang-Lee sentences plus
copies of half of the negative ones with a name in front ("marcus"), so the name
appears only in negative training sentences and the probe learns that it means
"negative". Groups are (label, name or not); on sentences it has not seen, the probe
fails the positive sentences that carry the name. The edit split holds 8 negative and
8 positive sentences, each with and without the name (32 examples, 4 groups of 8).
Targets are the worst group of the edit split, references the same sentences without
(or with) the name, so targets and references pair up. Components: the 12 heads and
1,536 MLP neurons of MiniLM's last layer. Every method's edit is judged at equal k on
84 held-out sentences, each with and without the name (4 groups of 42). The oracle
and the predicted/refined selections maximise the edit split's worst-group accuracy
(ties: mean group accuracy, then the examples' shortfall below a zero margin).

Run: ``python examples/minilm_spurious.py`` (a few minutes on 2 CPU cores;
``--quick`` for a smoke test).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _text as T  # noqa: E402

from coarpy.demo.text import EncoderTail  # noqa: E402

NAME = "marcus"
NAMED_SHARE = 0.5  # of the negative training sentences, copied with the name
GROUPS = ("neg", "neg+name", "pos", "pos+name")


def worst_group(groups: Sequence[Tensor]):
    """Objective: worst-group accuracy; ties: mean group accuracy, then the shortfall."""

    def objective(outputs: Tensor, base: Tensor) -> Tensor:
        accs = torch.stack([(outputs[:, g] > 0).double().mean(1) for g in groups], 1)  # (n, G)
        shortfall = outputs.double().clamp(max=0).mean(1)
        return torch.stack([accs.min(1).values, accs.mean(1), shortfall], 1)

    return objective


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny settings (for tests)")
    p.add_argument("--out", default="runs/examples", help="folder for stores, caches, results")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    out = Path(args.out)
    clock = T.Clock()
    n_edit, n_masks, ks = (8, 100, (0, 1, 4)) if args.quick else (16, 600, (0, 1, 2, 4, 8, 16))
    encoder, tokenizer, sentences, labels = T.load()
    train, edit_rows, held = T.three_way_split(labels, n_train=100, n_edit=n_edit, seed=args.seed)
    if args.quick:
        held = held[::3]

    # the probe: every training sentence, plus copies of half the negative ones with the name
    negatives = train[labels[train] == 0]
    copies = negatives[: int(NAMED_SHARE * len(negatives))]
    train_text = [sentences[i] for i in train.tolist()] + T.inserted(
        [sentences[i] for i in copies.tolist()], NAME
    )
    probe = T.fit_probe(encoder, tokenizer, train_text, torch.cat([labels[train], labels[copies]]))
    model = EncoderTail(probe, T.START)
    model, comps = T.components(model, quick=args.quick, seed=args.seed)
    clock.say(
        f"probe trained on {len(train)} sentences and {len(copies)} negative copies with "
        f"{NAME!r}; {len(comps)} components"
    )

    def split(rows: Tensor) -> tuple[dict, list[Tensor]]:
        """Plain versions then named versions; the four groups' rows."""
        text = [sentences[i] for i in rows.tolist()]
        y = labels[rows]
        data = T.join(
            T.batch(probe, tokenizer, text, y), T.batch(probe, tokenizer, T.inserted(text, NAME), y)
        )
        n = len(rows)
        plain, named_ = torch.arange(n), torch.arange(n, 2 * n)
        groups = [plain[y == 0], named_[y == 0], plain[y == 1], named_[y == 1]]
        return data, groups

    data, groups = split(edit_rows)
    held_data, held_groups = split(held)
    before = T.outputs_of(model, data)
    accs = [float((before[g] > 0).double().mean()) for g in groups]
    worst = min(range(4), key=lambda i: (accs[i], i))
    twin = {0: 1, 1: 0, 2: 3, 3: 2}[worst]
    targets, references = groups[worst], groups[twin]
    clock.say(
        "edit split group accuracies "
        + ", ".join(f"{g} {a:.2f}" for g, a in zip(GROUPS, accs, strict=True))
        + f"; targets: {GROUPS[worst]}, references: {GROUPS[twin]} (the same sentences)"
    )
    attrs = T.attributions(model, comps, data, out=out, n_masks=n_masks, alpha=0.05, seed=args.seed)
    clock.say(f"attributions over {len(data['labels'])} examples ({n_masks} masks for COAR)")
    pearson = T.correlations(
        attrs, model, comps, data, alpha=0.05, n_masks=20 if args.quick else 40, seed=args.seed
    )
    clock.say("held-out correlation " + ", ".join(f"{m} {r:.3f}" for m, r in pearson.items()))

    metrics = {
        **{
            f"heldout_{name}": T.accuracy_of(T.rows_of(held_data, g))
            for name, g in zip(GROUPS, held_groups, strict=True)
        },
        **{
            f"edit_{name}": T.accuracy_of(T.rows_of(data, g))
            for name, g in zip(GROUPS, groups, strict=True)
        },
    }
    curves, facts = T.compare(
        model, comps, data, attrs, targets=targets, references=references, paired=True,
        objective=worst_group(groups), ks=ks, metrics=metrics,
        candidates=2 if args.quick else 4, pool=4 if args.quick else 16, seed=args.seed,
        clock=clock,
    )  # fmt: skip
    for table in curves.values():
        for row in table:
            for where in ("heldout", "edit"):
                values = [row[f"{where}_{g}"] for g in GROUPS]
                row[f"{where}_worst"] = min(values)
                row[f"{where}_avg"] = sum(values) / len(values)

    # k chosen on the edit split: the best worst group there (ties: the smaller k)
    chosen = []
    for method, table in curves.items():
        row = max(table, key=lambda r: (r["edit_worst"], -r["k"]))
        chosen.append(
            {
                "method": method,
                "k": row["k"],
                "worst_before": table[0]["heldout_worst"],
                "worst_after": row["heldout_worst"],
                "avg_before": table[0]["heldout_avg"],
                "avg_after": row["heldout_avg"],
            }
        )
    worst_at = T.at_k(curves, "heldout_worst", ks)
    avg_at = T.at_k(curves, "heldout_avg", ks)
    print("\nheld-out worst-group accuracy at equal k\n" + T.markdown(worst_at))
    print("\nheld-out average group accuracy at equal k\n" + T.markdown(avg_at))
    print("\nk chosen on the edit split\n" + T.markdown(chosen))
    figure = T.plot(
        curves, ["coar/paired", "loo/paired", "oracle"], target="heldout_worst",
        reference="heldout_avg", title="MiniLM, spurious name: held-out worst / average group",
        path=T.figure_path(out, "minilm_spurious", args.quick),
    )  # fmt: skip
    results = {
        "task": "minilm_spurious",
        "quick": args.quick,
        "n_components": len(comps),
        "n_edit_examples": len(data["labels"]),
        "n_heldout_examples": len(held_data["labels"]),
        "n_masks": n_masks,
        "pearson": pearson,
        "edit_group_acc": dict(zip(GROUPS, accs, strict=True)),
        "targets": GROUPS[worst],
        "references": GROUPS[twin],
        "worst_at_k": worst_at,
        "avg_at_k": avg_at,
        "chosen": chosen,
        "curves": curves,
        "figure": str(figure) if figure else None,
        **facts,
    }
    path = out / "minilm_spurious" / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    clock.say(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
