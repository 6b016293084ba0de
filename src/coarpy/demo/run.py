"""The demo run: all of COAR on real data (scikit-learn's digits) in a few minutes on a CPU.

``coar demo`` trains (once, cached) a small CNN with BatchNorm on the digits, collects
a component dataset over its conv channels and hidden dense units, fits attributions,
evaluates them on fresh masks against leave-one-out and gradient baselines, and shows
the components behind one misclassified digit. Re-running resumes what is there.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..components import Components
from ..runs import write_csv
from .train import pretrained_digits_cnn

ALPHA = 0.1
N_MASKS = 2000
EVAL_MASKS = 100
BATCH_SIZE = 4096


def digits_setup(
    *, cache_dir: str = "runs/cache", seed: int = 0, n_examples: int | None = None
) -> dict[str, Any]:
    """Factory for run configurations: the demo's model, components and held-out digits.

    Usable from a TOML config as ``factory = "coarpy.demo:digits_setup"``.

    Parameters
    ----------
    cache_dir : where the trained CNN's weights are cached.
    seed : seed of the CNN's initialisation and training.
    n_examples : keep only the first ``n_examples`` test digits (default: all 450).

    Returns
    -------
    ``{"model": DigitsCNN, "data": (images, labels), "components": Components}``: the
    conv channels and hidden units of the trained CNN, and the held-out digits.
    """
    model, (x, y) = pretrained_digits_cnn(cache_dir, seed=seed)
    if n_examples is not None:
        x, y = x[:n_examples], y[:n_examples]
    comps = Components.discover(model, kinds=("conv", "neurons"))
    return {"model": model, "data": (x, y), "components": comps}


def _say(text: str) -> None:
    print(text, flush=True)


def run_demo(
    out: str | Path = "runs/demo",
    *,
    n_masks: int | None = None,
    eval_masks: int | None = None,
    n_examples: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run the demo into ``out`` and return its headline numbers.

    Writes ``out/store`` (the component dataset), ``out/attributions``,
    ``out/evaluation.json`` and ``.csv``, ``out/top_components.csv`` and, when
    matplotlib is installed, ``out/report.html`` with the plots.
    """
    from .. import outputs
    from ..baselines import gradient, leave_one_out
    from ..collect import collect
    from ..evaluate import evaluate
    from ..regression import fit

    n_masks = N_MASKS if n_masks is None else n_masks
    eval_masks = EVAL_MASKS if eval_masks is None else eval_masks
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(seed)

    _say(f"coar demo -> {out}")
    setup = digits_setup(cache_dir=str(out / "model"), seed=seed, n_examples=n_examples)
    model, comps, (x, y) = setup["model"], setup["components"], setup["data"]
    with torch.inference_mode():
        pred = model(x).argmax(1)
        margins = outputs.margin(model, (x, y))
    acc = (pred == y).float().mean().item()
    _say(
        f"model      DigitsCNN, held-out accuracy {100 * acc:.1f}% on {len(y)} digits; "
        f"{len(comps)} components ({_count_kinds(comps)})"
    )

    store = out / "store"
    if (store / "meta.json").exists():
        from ..store import ComponentDataset

        done = len(ComponentDataset(store))
        if done:
            _say(f"resuming   {done} of {n_masks} masks already collected in {store}")
    t0 = time.perf_counter()
    ds = collect(
        model, comps, (x, y), output=outputs.margin, path=store, n_masks=n_masks,
        alpha=ALPHA, seed=seed, batch_size=BATCH_SIZE, progress=progress,
    )  # fmt: skip
    _say(f"collect    {len(ds)} masks x {ds.n_examples} digits, alpha={ALPHA} "
         f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip

    t0 = time.perf_counter()
    # Ridge on purpose, not fit's default group model: the figures the README prints for
    # the demo were measured with ridge.
    attr = fit(ds, method="ridge", progress=bool(progress))
    attr.save(out / "attributions")
    loo = leave_one_out(model, comps, (x, y), output=outputs.margin, batch_size=BATCH_SIZE)
    grad = gradient(model, comps, (x, y), output=outputs.margin)
    _say(f"fit        ridge attributions + leave-one-out + gradient "
         f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip

    t0 = time.perf_counter()
    methods = {"coar": attr, "leave_one_out": loo, "gradient": grad}
    result = evaluate(
        methods, model, comps, (x, y), output=outputs.margin, alphas=(ALPHA, 2 * ALPHA),
        n_masks=eval_masks, seed=seed + 1, batch_size=BATCH_SIZE, progress=progress,
    )  # fmt: skip
    result.save(out / "evaluation.json")
    write_csv(out / "evaluation.csv", result.to_rows())
    _say(f"evaluate   {eval_masks} fresh masks per alpha ({time.perf_counter() - t0:.1f} s)\n")
    _say(result.summary())

    wrong = (pred != y).nonzero().flatten()
    example = int(wrong[0]) if len(wrong) else 0
    what = "misclassified" if len(wrong) else "first (none is misclassified)"
    top = attr.top(example, k=8)
    write_csv(
        out / "top_components.csv",
        [
            {"example": example, "rank": r + 1, "component": n, "weight": w}
            for r, (n, w) in enumerate(top)
        ],
    )
    label, guess = int(y[example]), int(pred[example])
    _say(
        f"\n{what} example {example}: a {label} the model reads as {guess} "
        f"(margin {float(margins[example]):+.2f})"
    )
    _say("  top components (weight = change in margin when the component is kept):")
    for name, weight in top:
        _say(f"    {name:<16} {weight:+.3f}")

    report = _maybe_report(out, example)
    elapsed = time.perf_counter() - started
    files = "store/, attributions/, evaluation.json, evaluation.csv, top_components.csv"
    files += ", report.html" if report else ""
    _say(f"\nwrote {out}/: {files}  ({elapsed:.0f} s in all)")
    return {
        "accuracy": acc,
        "n_components": len(comps),
        "n_masks": len(ds),
        "evaluation": result,
        "example": example,
        "seconds": elapsed,
    }


def _count_kinds(comps: Components) -> str:
    counts: dict[str, int] = {}
    for g in comps.groups:
        counts[g.kind] = counts.get(g.kind, 0) + g.n_units
    return ", ".join(f"{n} {k}" for k, n in counts.items())


def _maybe_report(out: Path, example: int) -> Path | None:
    """``out/report.html`` as ``coar report`` writes it, if matplotlib is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    from ..report import report_run

    return report_run(out, examples=[example], title="coar demo: digits CNN")
