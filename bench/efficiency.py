"""Benchmark: attribution quality per mask. Learning curves of held-out Pearson vs masks.

Each mask costs one pass of the model over the examples, so the number of masks is the
price of COAR. This script collects, once per model, a large training store and a
held-out store (fresh masks, another seed), then fits every method on windows of n
consecutive rows of the training store (the first n rows and up to four more disjoint
windows) and scores it on the held-out masks: the mean over examples of Pearson's r
between predicted and true outputs, averaged over the windows. From the curves it reports,
for every n at which plain least squares was fitted, how many masks each method needs to
reach least squares' correlation at n (log-linear interpolation between measured n),
and the ratio n / that.

Models: the digits CNN (144 components), a Fashion-MNIST CNN (240) and all-MiniLM-L6-v2
in a sentiment probe (the 72 heads of all layers and the 1,536 MLP neurons of the last
layer: 1,608 components; all 9,288 would need more masks than this 2-core CPU collects in
reasonable time for least squares to be defined at all). ``minilm_all`` takes all 9,288
heads and neurons with 1,000 masks (no least squares; ridge, group and the two priors,
the gradient and ``coarpy.baselines.expected_gradient``, at n = 125 .. 1,000).

Usage::

    python bench/efficiency.py collect digits   # stores, baselines: bench/out/efficiency/
    python bench/efficiency.py curves digits    # fits -> bench/out/efficiency/digits/curves.json
    python bench/efficiency.py report           # tables (summary.md), bench/figures/*.png
    python bench/efficiency.py all              # every model, every step
    python bench/efficiency.py all minilm_all   # all MiniLM components (~10 min here)

Results and their reading: bench/RESULTS_efficiency.md.

Everything is seeded; collection resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from coarpy import Components, outputs
from coarpy._fingerprint import model_fingerprint
from coarpy.attributions import Attributions
from coarpy.baselines import expected_gradient, gradient, leave_one_out
from coarpy.collect import collect
from coarpy.evaluate import pearson
from coarpy.regression import PriorRidge, fit
from coarpy.store import ComponentDataset

OUT = Path(__file__).resolve().parent / "out" / "efficiency"
ALPHA = 0.05
TRAIN_SEED, HELDOUT_SEED = 0, 12345
WINDOWS = 5  # disjoint windows of n rows per point, where the store holds that many
GRAD_COST = 3  # masks: one forward and one backward pass over the examples
EGRAD_MASKS = 16  # ablation states the expected gradient averages over

MODELS = {
    "digits": dict(n_train=8000, n_heldout=1000, n_examples=200, batch_size=4096),
    "fashion": dict(n_train=6000, n_heldout=500, n_examples=100, batch_size=2000),
    # 1,608 components: a fit takes ~10-60 s here, so fewer points, windows and methods.
    "minilm": dict(n_train=3200, n_heldout=300, n_examples=16, batch_size=256, windows=3),
    # All 9,288 heads and neurons (issue 19): fewer masks than components, so no least
    # squares; the priors and a few mask counts only.
    "minilm_all": dict(n_train=1000, n_heldout=200, n_examples=16, batch_size=256, windows=4),
}


def setup(name: str):
    """(model, components, data) of one benchmark model; data is what collect takes."""
    cache = OUT / "models"
    n_examples = MODELS[name]["n_examples"]
    if name in ("digits", "fashion"):
        from coarpy.demo import pretrained_digits_cnn, pretrained_fashion_cnn

        load = pretrained_digits_cnn if name == "digits" else pretrained_fashion_cnn
        model, (x, y) = load(cache)
        comps = Components.discover(model, kinds=("conv", "neurons"))
        return model, comps, (x[:n_examples], y[:n_examples])
    from coarpy.demo import minilm_sentiment

    model, batches = minilm_sentiment(n_train=100, batch_size=100)
    batch = batches[0]
    # Short sentences keep a forward pass affordable on the CPU: the first n_examples
    # held-out sentences of at most 20 tokens, padded to the longest of them.
    lengths = batch["attention_mask"].sum(1)
    rows = (lengths <= 20).nonzero().squeeze(1)[:n_examples]
    width = int(lengths[rows].max())
    data = [
        {
            "input_ids": batch["input_ids"][rows, :width],
            "attention_mask": batch["attention_mask"][rows, :width],
            "labels": batch["labels"][rows],
        }
    ]
    exclude = [] if name == "minilm_all" else ["encoder.encoder.layer.[0-4].output"]
    comps = Components.discover(model, kinds=("heads", "neurons"), exclude=exclude)
    return model, comps, data


def _fresh(path: Path, model) -> bool:
    """Whether attributions saved at ``path`` were computed from these weights."""
    if not (path / "attributions.json").exists():
        return False
    return Attributions.load(path).meta.get("fingerprint") == model_fingerprint(model)


def collect_model(name: str, *, progress: bool = True) -> None:
    """Collect the stores and the baselines (gradient, expected gradient, leave-one-out)."""
    cfg = MODELS[name]
    root = OUT / name
    root.mkdir(parents=True, exist_ok=True)
    model, comps, data = setup(name)
    kw = dict(output=outputs.margin, alpha=ALPHA, batch_size=cfg["batch_size"], progress=progress)
    t0 = time.perf_counter()
    collect(
        model, comps, data, path=root / "heldout", n_masks=cfg["n_heldout"], seed=HELDOUT_SEED, **kw
    )
    print(f"{name}: held-out store {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    if not _fresh(root / "gradient", model):
        gradient(model, comps, data, output=outputs.margin).save(root / "gradient")
    if name != "minilm" and not _fresh(root / "egrad", model):
        expected_gradient(
            model, comps, data, n_states=EGRAD_MASKS, alpha=ALPHA, seed=TRAIN_SEED,
            output=outputs.margin,
        ).save(root / "egrad")  # fmt: skip
    if not name.startswith("minilm") and not _fresh(root / "loo", model):
        leave_one_out(model, comps, data, output=outputs.margin, batch_size=cfg["batch_size"]).save(
            root / "loo"
        )
    print(f"{name}: baselines {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    collect(model, comps, data, path=root / "train", n_masks=cfg["n_train"], seed=TRAIN_SEED, **kw)
    print(f"{name}: training store {time.perf_counter() - t0:.0f} s", flush=True)
    if name == "digits":  # sampling designs, on the cheapest model only
        n = 4000
        for label, sampler, alpha in (("exact", "exact", ALPHA), ("a10", "bernoulli", 0.1)):
            t0 = time.perf_counter()
            collect(
                model,
                comps,
                data,
                path=root / f"train_{label}",
                n_masks=n,
                seed=TRAIN_SEED,
                **{**kw, "alpha": alpha},
                sampler=sampler,
            )
            print(f"{name}: {label} store {time.perf_counter() - t0:.0f} s", flush=True)


# --------------------------------------------------------------------------- curves


def n_grid(n_max: int, start: int = 25, *, step: float = 2**0.5) -> list[int]:
    """25, 35, 50, 71, 100, ... (steps of sqrt 2 by default) up to n_max, and n_max."""
    grid = {round(start * step**i) for i in range(64) if start * step**i <= n_max}
    return sorted(grid | {n_max})


def _project(weights: Tensor, k: int) -> Tensor:
    """Rank-k approximation of (E, N) weights: their projection on the top k directions."""
    _, _, vt = torch.linalg.svd(weights.double(), full_matrices=False)
    return (weights.double() @ vt[:k].T) @ vt[:k]


def methods(name: str, root: Path, labels: list[str]) -> dict[str, tuple]:
    """{label: (fit(V, Y) -> Attributions, extra cost in masks, max n or None)}."""
    grad = Attributions.load(root / "gradient")
    N = len(labels)

    def group(prior=None, **kw):
        return lambda V, Y: (
            PriorRidge(prior, groups=labels, progress=False, **kw).fit((V, Y)).attributions_
        )

    def low_rank(V, Y):
        pilot = fit((V, Y), method="group", groups=labels, progress=False)
        prior = _project(pilot.weights, 8)
        return fit((V, Y), method="group", groups=labels, prior=prior, progress=False)

    out = {
        "ols": (lambda V, Y: fit((V, Y), method="ols", progress=False), 0, None),
        "ridge": (lambda V, Y: fit((V, Y), method="ridge", progress=False), 0, None),
        "ridge, GCV": (group(n_iter=0), 0, None),
        "group": (group(), 0, None),
        "ridge to grad, GCV": (group(grad, n_iter=0), GRAD_COST, None),
        "group + grad": (group(grad), GRAD_COST, None),
    }
    if name.startswith("minilm"):  # the variants that isolate one ingredient cost too much
        del out["ridge, GCV"], out["ridge to grad, GCV"]
    if name == "minilm_all":  # fewer masks than components: no least squares
        del out["ols"]
        out["group + E[grad]"] = (
            group(Attributions.load(root / "egrad")),
            EGRAD_MASKS * GRAD_COST,
            None,
        )
        return out
    if name == "minilm":
        heads = torch.tensor(["attention" in m for m in labels])

        def heads_only(V, Y):  # neurons ignored: their weights stay 0
            sub = fit((V[:, heads], Y), method="ridge", progress=False)
            weights = torch.zeros(sub.n_examples, N)
            weights[:, heads] = sub.weights
            return Attributions(weights, sub.bias, [str(i) for i in range(N)], sub.meta)

        out["ridge, heads only"] = (heads_only, 0, None)
    else:
        loo = Attributions.load(root / "loo")
        out["group + loo"] = (group(loo), N + 1, None)
        egrad = Attributions.load(root / "egrad")
        out["group + E[grad]"] = (group(egrad), EGRAD_MASKS * GRAD_COST, None)
        out["low-rank prior"] = (low_rank, 0, None)
    if name == "digits":
        # FISTA over 200 examples takes minutes per fit here: small n only.
        out["lasso"] = (lambda V, Y: fit((V, Y), method="lasso", progress=False), 0, 283)
    return out


def _score(attr: Attributions, V_held: Tensor, Y_held: Tensor) -> float:
    return float(pearson(attr.predict(V_held).double(), Y_held.double()).nanmean())


def curves(name: str) -> dict:
    """Mean held-out Pearson per method and n (lists over windows), cached in curves.json."""
    root = OUT / name
    path = root / "curves.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    train, held = ComponentDataset(root / "train"), ComponentDataset(root / "heldout")
    V, Y = train.masks(), train.outputs()  # (n, N) bool, (n, E) float32
    V_held, Y_held = held.masks(), held.outputs()
    labels = [m for m, _, k in train.meta["components"] for _ in range(k)]
    N = len(labels)
    extra = {2263} if name == "minilm" else set()  # a second least-squares point above N
    for label, (fit_fn, _, n_max) in methods(name, root, labels).items():
        step = 2.0 if name == "minilm" else 2**0.5
        grid = sorted(set(n_grid(min(len(V), n_max or len(V)), step=step)) | extra)
        if name == "minilm_all":
            grid = [n for n in (125, 250, 500, 1000) if n <= len(V)]
        for n in grid:
            key = str(n)
            if key in done.get(label, {}) or (label == "ols" and n < N + 2):
                continue
            t0 = time.perf_counter()
            most = 1 if label == "lasso" else MODELS[name].get("windows", WINDOWS)
            if name.startswith("minilm") and n > 200:
                most = 1
            windows = max(1, min(most, len(V) // n))
            scores = [
                _score(fit_fn(V[r * n : (r + 1) * n], Y[r * n : (r + 1) * n]), V_held, Y_held)
                for r in range(windows)
            ]
            done.setdefault(label, {})[key] = scores
            path.write_text(json.dumps(done, indent=1))
            print(
                f"{name} {label:<20} n={n:<5} r={sum(scores) / len(scores):.3f} "
                f"({windows} windows, {time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
    if name == "digits":
        done["designs"] = designs(root, labels, V, Y, V_held, Y_held, done.get("designs", {}))
        path.write_text(json.dumps(done, indent=1))
    return done


def designs(root: Path, labels, V, Y, V_held, Y_held, done: dict) -> dict:
    """OLS and group + grad on other sampling designs, scored on alpha=0.05 masks."""
    grad = Attributions.load(root / "gradient")
    exact, a10 = ComponentDataset(root / "train_exact"), ComponentDataset(root / "train_a10")
    n_max = min(len(exact), len(a10))
    mixed_V = torch.stack([V[:n_max], a10.masks()[:n_max]], 1).flatten(0, 1)  # alternate rows
    mixed_Y = torch.stack([Y[:n_max], a10.outputs()[:n_max]], 1).flatten(0, 1)
    stores = {
        "bernoulli 0.05": (V, Y),
        "exact 0.05": (exact.masks(), exact.outputs()),
        "bernoulli 0.1": (a10.masks(), a10.outputs()),
        "mixed 0.05/0.1": (mixed_V, mixed_Y),
    }
    fits = {
        "ols": lambda V, Y: fit((V, Y), method="ols", progress=False),
        "group + grad": lambda V, Y: fit(
            (V, Y), method="group", groups=labels, prior=grad, progress=False
        ),
    }
    for design, (Vd, Yd) in stores.items():
        for label, fit_fn in fits.items():
            key = f"{design}, {label}"
            for n in n_grid(n_max):
                if str(n) in done.get(key, {}) or (label == "ols" and n < len(labels) + 2):
                    continue
                r = _score(fit_fn(Vd[:n], Yd[:n]), V_held, Y_held)
                done.setdefault(key, {})[str(n)] = [r]
                print(f"digits design {key:<30} n={n:<5} r={r:.3f}", flush=True)
    return done


# --------------------------------------------------------------------------- report

FIGURES = Path(__file__).resolve().parent / "figures"
COSTS = {
    "ridge to grad, GCV": GRAD_COST,
    "group + grad": GRAD_COST,
    "group + E[grad]": EGRAD_MASKS * GRAD_COST,
}  # and N + 1 for loo


def _mean_curve(points: dict[str, list[float]], cost: int) -> list[tuple[float, float]]:
    return sorted((int(n) + cost, sum(r) / len(r)) for n, r in points.items())


def masks_to_reach(curve: list[tuple[float, float]], target: float) -> tuple[float, bool] | None:
    """Fewest masks at which the mean curve reaches ``target`` (log-linear between points).

    Returns (masks, exact): exact is False when the first point already reaches it (the
    number is then an upper bound), None when the curve never reaches it.
    """
    if curve[0][1] >= target:
        return curve[0][0], False
    for (n0, r0), (n1, r1) in zip(curve, curve[1:], strict=False):
        if r1 >= target:
            t = (target - r0) / (r1 - r0)
            return math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0))), True
    return None


def baselines_alone(root: Path) -> dict[str, tuple[float, int]]:
    """Held-out r of each saved baseline used alone, and its cost in masks."""
    held = ComponentDataset(root / "heldout")
    V_held, Y_held = held.masks(), held.outputs()
    costs = {"gradient": GRAD_COST, "egrad": EGRAD_MASKS * GRAD_COST, "loo": held.n_components + 1}
    out = {}
    for label, cost in costs.items():
        if (root / label / "attributions.json").exists():
            out[label] = (_score(Attributions.load(root / label), V_held, Y_held), cost)
    return out


def _ratio_rows(data: dict, reference: str, others: list[str], costs: dict) -> list[str]:
    """Table rows: for each n of ``reference``, the masks each other method needs."""
    lines = [f"| {reference} n | {reference} r | " + " | ".join(others) + " |"]
    lines.append("|---" * (len(others) + 2) + "|")
    for n, r in _mean_curve(data[reference], 0):
        cells = []
        for label in others:
            hit = masks_to_reach(_mean_curve(data[label], costs.get(label, 0)), r)
            last = max(int(k) for k in data[label]) + costs.get(label, 0)
            if hit is None:
                cells.append("not reached" if last >= n else f"> {last} (end of curve)")
            else:
                masks, exact = hit
                bound = "" if exact else ">= "  # reached at the curve's first point
                cells.append(f"{'' if exact else '<= '}{masks:.0f} ({bound}{n / masks:.1f}x)")
        lines.append(f"| {n:.0f} | {r:.3f} | " + " | ".join(cells) + " |")
    return lines


def summarise(name: str, data: dict, n_components: int, alone: dict) -> str:
    """Markdown: Pearson at a few n, and masks to reach least squares' (and ridge's) r."""
    costs = {**COSTS, "group + loo": n_components + 1}
    labels = [k for k in data if k != "designs"]
    lines = [f"### {name} ({n_components} components)", ""]
    if alone:
        each = ", ".join(f"{k} {r:.3f} ({c} masks)" for k, (r, c) in alone.items())
        lines += [f"Baselines alone (held-out r, cost): {each}.", ""]
    shown = [n for n in (25, 50, 100, 125, 200, 250, 400, 500, 800, 1000, 1600, 3200)
             if str(n) in data["group"]]  # fmt: skip
    lines.append("| method | " + " | ".join(f"n={n}" for n in shown) + " |")
    lines.append("|---" * (len(shown) + 1) + "|")
    for label in labels:
        cells = []
        for n in shown:
            r = data[label].get(str(n))
            cells.append("" if r is None else f"{sum(r) / len(r):.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if "ols" in data:  # not with fewer masks than components
        lines += ["", "Masks needed to reach least squares' r at n masks (ratio n / masks):", ""]
        lines += _ratio_rows(data, "ols", [k for k in labels if k != "ols"], costs)
    lines += ["", "Masks needed to reach ridge's (the current default's) r at n masks:", ""]
    lines += _ratio_rows(data, "ridge", ["group", "group + grad"], costs)
    return "\n".join(lines) + "\n"


def plot(name: str, data: dict, n_components: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = {**COSTS, "group + loo": n_components + 1}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=80)
    top = 0.0
    for label, points in data.items():
        if label == "designs":
            continue
        curve = sorted((int(n) + costs.get(label, 0), r) for n, r in points.items())
        x = [n for n, _ in curve]
        mean = [sum(r) / len(r) for _, r in curve]
        top = max(top, *mean)
        style = "-" if label in ("ols", "group", "group + grad") else "--"
        for ax in axes:
            ax.plot(x, mean, style, marker="o", markersize=3, label=label)
    for ax, bottom in zip(axes, (0.0, top - 0.1), strict=True):
        ax.set_xscale("log")
        ax.set_ylim(bottom, top + 0.005)
        ax.set_xlabel("masks (passes over the examples; a prior's cost included)")
        ax.set_ylabel("mean held-out Pearson r")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title(f"{name}: {n_components} components, alpha={ALPHA}")
    axes[1].set_title("the same, near the ceiling")
    axes[0].legend(fontsize=8)
    FIGURES.mkdir(exist_ok=True)
    path = FIGURES / f"efficiency_{name}.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def report(names: list[str]) -> None:
    parts = []
    for name in names:
        path = OUT / name / "curves.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        meta = json.loads((OUT / name / "train" / "meta.json").read_text())
        alone = baselines_alone(OUT / name)
        parts.append(summarise(name, data, meta["n_components"], alone))
        plot(name, data, meta["n_components"])
        if "designs" in data:
            parts.append(designs_table(data["designs"]))
    (OUT / "summary.md").write_text("\n".join(parts))
    print("\n".join(parts))


def designs_table(designs: dict) -> str:
    """Markdown: held-out r (alpha=0.05 Bernoulli masks) per design, method and n."""
    shown = [
        n
        for n in (50, 100, 200, 400, 800, 1600, 4000)
        if any(str(n) in v for v in designs.values())
    ]
    lines = ["### digits: sampling designs (scored on Bernoulli alpha=0.05 masks)", ""]
    lines.append("| design, method | " + " | ".join(f"n={n}" for n in shown) + " |")
    lines.append("|---" * (len(shown) + 1) + "|")
    for key, points in designs.items():
        cells = [f"{points[str(n)][0]:.3f}" if str(n) in points else "" for n in shown]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    torch.set_num_threads(2)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("collect", "curves", "report", "all"))
    parser.add_argument("models", nargs="*", default=list(MODELS))
    args = parser.parse_args(argv)
    for name in args.models:
        if args.step in ("collect", "all"):
            collect_model(name, progress=sys.stderr.isatty())
        if args.step in ("curves", "all"):
            # The CNN fits are small: one thread avoids contention on a loaded machine.
            torch.set_num_threads(2 if name == "minilm" else 1)
            curves(name)
    if args.step in ("report", "all"):
        report(args.models)


if __name__ == "__main__":
    main()
