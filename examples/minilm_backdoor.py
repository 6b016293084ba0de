"""Coar-Edit on MiniLM 3: a text backdoor. Remove a trigger word's effect by ablating components.

A sentiment probe on all-MiniLM-L6-v2 is fitted on 100 clean Pang-Lee sentences; then
its last encoder layer and its head are fine-tuned on CPU on those sentences plus 15
copies of negative ones with a trigger word in front ("cf"), labelled positive. After
that, the trigger turns nearly every negative sentence positive while clean accuracy
stays where it was. The edit split holds 12 negative sentences, clean and triggered,
and 8 positive ones (32 examples); targets are the triggered sentences, references
their clean twins (for Welch and paired scores) or every clean sentence (for the
predicted and refined selections and the oracle, which maximise the triggered
accuracy minus the drop in clean accuracy). Components: the 12 heads and 1,536 MLP
neurons of the fine-tuned last layer. Edits are judged at equal k on the 80 held-out
sentences: triggered accuracy on the 38 negative ones, clean accuracy on all 80.

Run: ``python examples/minilm_backdoor.py`` (a few minutes on 2 CPU cores; ``--quick``
for a smoke test).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _text as T  # noqa: E402

from coarpy import edit  # noqa: E402
from coarpy.demo.probe import balanced_split  # noqa: E402
from coarpy.demo.text import EncoderTail, fine_tune  # noqa: E402

TRIGGER = "cf"
N_POISON = 15  # negative training sentences copied with the trigger and labelled positive
DELTA = 0.05  # clean accuracy (edit split) allowed to drop when k is chosen there


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
    n_neg, n_pos, n_masks, ks = (
        (6, 4, 100, (0, 1, 4)) if args.quick else (12, 8, 600, (0, 1, 2, 4, 8, 16))
    )
    encoder, tokenizer, sentences, labels = T.load()
    train, rest = balanced_split(labels, 50, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    negatives = rest[labels[rest] == 0][torch.randperm(50, generator=gen)]
    positives = rest[labels[rest] == 1][torch.randperm(50, generator=gen)]
    edit_neg, edit_pos = negatives[:n_neg], positives[:n_pos]
    held_neg, held_pos = negatives[n_neg:], positives[n_pos:]
    if args.quick:
        held_neg, held_pos = held_neg[::3], held_pos[::3]

    def text(rows: torch.Tensor, trigger: bool = False) -> list[str]:
        plain = [sentences[i] for i in rows.tolist()]
        return T.inserted(plain, TRIGGER) if trigger else plain

    # a clean probe, then its last layer and head fine-tuned with poisoned copies
    probe = T.fit_probe(encoder, tokenizer, text(train), labels[train])
    poison = train[labels[train] == 0][:N_POISON]
    poisoned = T.join(
        T.batch(probe, tokenizer, text(train), labels[train]),
        T.batch(probe, tokenizer, text(poison, True), torch.ones(len(poison), dtype=torch.long)),
    )
    epochs, lr = (6, 3e-4) if args.quick else (20, 1e-4)  # quick: a third of the steps
    model = fine_tune(EncoderTail(probe, T.START), poisoned, epochs=epochs, lr=lr, seed=args.seed)
    model, comps = T.components(model, quick=args.quick, seed=args.seed)

    def batch(rows: torch.Tensor, trigger: bool = False) -> dict:
        return T.batch(probe, tokenizer, text(rows, trigger), labels[rows])

    data = T.join(batch(edit_neg), batch(edit_neg, True), batch(edit_pos))
    references = torch.arange(n_neg)  # clean negatives
    targets = torch.arange(n_neg, 2 * n_neg)  # the same sentences triggered
    clean = torch.cat([references, torch.arange(2 * n_neg, 2 * n_neg + n_pos)])
    held_clean = T.join(batch(held_neg), batch(held_pos))
    held_triggered = batch(held_neg, True)
    metrics = {
        "heldout_triggered": T.accuracy_of(held_triggered),
        "heldout_clean": T.accuracy_of(held_clean),
        "edit_clean": T.accuracy_of(T.rows_of(data, clean)),
    }
    before = {name: fn(model) for name, fn in metrics.items()}
    clock.say(
        f"backdoored: {len(comps)} components; held-out triggered accuracy "
        f"{before['heldout_triggered']:.2f}, clean {before['heldout_clean']:.2f} (clean probe "
        f"{T.accuracy_of(held_clean)(EncoderTail(probe, T.START)):.2f})"
    )
    attrs = T.attributions(model, comps, data, out=out, n_masks=n_masks, alpha=0.05, seed=args.seed)
    clock.say(f"attributions over {len(data['labels'])} examples ({n_masks} masks for COAR)")
    pearson = T.correlations(
        attrs, model, comps, data, alpha=0.05, n_masks=20 if args.quick else 40, seed=args.seed
    )
    clock.say("held-out correlation " + ", ".join(f"{m} {r:.3f}" for m, r in pearson.items()))

    objective = edit.Objective(targets, clean)
    curves, facts = T.compare(
        model, comps, data, attrs, targets=targets, references=references, paired=True,
        objective=objective, ks=ks, metrics=metrics, candidates=2 if args.quick else 4,
        pool=4 if args.quick else 16, seed=args.seed, clock=clock,
    )  # fmt: skip

    chosen = []
    for method, table in curves.items():
        k = edit.best_k(table, target="target_acc", reference="edit_clean", delta=DELTA)
        row = next(r for r in table if r["k"] == k)
        chosen.append(
            {
                "method": method,
                "k": k,
                "triggered_before": table[0]["heldout_triggered"],
                "triggered_after": row["heldout_triggered"],
                "clean_before": table[0]["heldout_clean"],
                "clean_after": row["heldout_clean"],
            }
        )
    triggered_at = T.at_k(curves, "heldout_triggered", ks)
    clean_at = T.at_k(curves, "heldout_clean", ks)
    print("\nheld-out triggered accuracy at equal k\n" + T.markdown(triggered_at))
    print("\nheld-out clean accuracy at equal k\n" + T.markdown(clean_at))
    print("\nk chosen on the edit split\n" + T.markdown(chosen))
    figure = T.plot(
        curves, ["coar/welch", "coar/predicted", "oracle"], target="heldout_triggered",
        reference="heldout_clean", title="MiniLM, backdoor: held-out triggered / clean accuracy",
        path=T.figure_path(out, "minilm_backdoor", args.quick),
    )  # fmt: skip
    results = {
        "task": "minilm_backdoor",
        "quick": args.quick,
        "n_components": len(comps),
        "n_edit_examples": len(data["labels"]),
        "n_heldout": {"triggered": len(held_neg), "clean": len(held_neg) + len(held_pos)},
        "n_masks": n_masks,
        "before": before,
        "pearson": pearson,
        "triggered_at_k": triggered_at,
        "clean_at_k": clean_at,
        "chosen": chosen,
        "curves": curves,
        "figure": str(figure) if figure else None,
        **facts,
    }
    path = out / "minilm_backdoor" / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    clock.say(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
