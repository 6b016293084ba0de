"""What the editing examples share: arguments, a cached Fashion-MNIST CNN, attributions,
the comparison of editing methods, tables and plots.

Every example trains (once, cached under ``--out``) a small ``FashionCNN`` on real
Fashion-MNIST images, computes three attributions over the same examples (COAR from
a component dataset, leave-one-out and gradient from ``coarpy.baselines``) and edits
with each. :func:`orders` adds, at equal k on the same edit split:

- ``coar/predicted``: ``edit.select_predicted`` on COAR (the greedy choice on the
  attributions' own predictions of target gain and reference damage);
- ``coar/paired``: paired scores on COAR, where targets and references pair up;
- ``oracle``: ``edit.oracle``, the greedy edit chosen by running the model on the
  edit split (its first step read off leave-one-out, later steps limited to the
  ``ORACLE_POOL`` best candidates);
- ``random``: random components (the mean of ``N_RANDOM`` random orders).

``examples/_text.py`` (the MiniLM examples) reuses the clock, tables and plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import coarpy as coar
from coarpy import baselines, edit
from coarpy._fingerprint import model_fingerprint
from coarpy.demo import FashionCNN, accuracy, train_classifier

WIDTH, HIDDEN = 8, 64  # FashionCNN(width=8, hidden=64): 56 conv channels + 64 neurons
METHODS = ("coar", "leave_one_out", "gradient")
N_RANDOM = 3  # random orders averaged
ORACLE_POOL = 16  # candidates the oracle measures at each step after the first
FIGURES = Path(__file__).resolve().parent / "figures"  # where full runs put their plots


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every example takes; a script may add its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny settings (for tests)")
    p.add_argument("--out", default="runs/examples", help="folder for stores, caches, results")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_args(
    description: str, argv: Sequence[str] | None, p: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    args = (p or parser(description)).parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


class Clock:
    """Seconds since start, wall-clock and CPU (this process), printed with each step."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.cpu = time.process_time()

    def say(self, text: str) -> None:
        wall, cpu = time.perf_counter() - self.start, time.process_time() - self.cpu
        print(f"[{wall:6.1f} s, CPU {cpu:6.1f} s] {text}", flush=True)


def _digest(*tensors: Tensor) -> str:
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def train_cnn(
    train: tuple[Tensor, Tensor],
    *,
    out: Path,
    n_classes: int = 10,
    epochs: int = 3,
    seed: int = 0,
    width: int = WIDTH,
    hidden: int = HIDDEN,
) -> FashionCNN:
    """A FashionCNN trained on ``train`` with Adam; cached by data and settings."""
    x, y = train
    key = f"fashioncnn-w{width}-h{hidden}-c{n_classes}-e{epochs}-s{seed}-{_digest(x, y)}"
    path = out / "cache" / f"{key}.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FashionCNN(n_classes, width=width, hidden=hidden)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    train_classifier(
        model, (x, y), epochs=epochs, lr=3e-3, batch_size=128, seed=seed, lr_schedule="constant"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def components(model: nn.Module) -> coar.Components:
    return coar.Components.discover(model, kinds=("conv", "neurons"))


def attributions(
    model: nn.Module,
    comps: coar.Components,
    data: tuple[Tensor, Tensor],
    *,
    store: Path,
    n_masks: int,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, coar.Attributions]:
    """COAR (collect + ridge fit), leave-one-out and gradient attributions over ``data``.

    The component dataset goes to a folder of ``store`` named by the model and the
    settings, so a rerun (or another example with the same model) reuses it.
    """
    name = f"{model_fingerprint(model)[:12]}-e{len(data[1])}-m{n_masks}-a{alpha}-s{seed}"
    ds = coar.collect(
        model, comps, data, path=Path(store) / name, n_masks=n_masks, alpha=alpha, seed=seed,
        batch_size=len(data[1]), progress=False,
    )  # fmt: skip
    return {
        # ridge, not fit's default group model: examples/RESULTS.md was measured with it
        "coar": coar.fit(ds, method="ridge", progress=False),
        "leave_one_out": baselines.leave_one_out(model, comps, data, progress=False),
        "gradient": baselines.gradient(model, comps, data, progress=False),
    }


def with_curve(made: edit.Edit, table: list[dict], k: int) -> edit.Edit:
    """The edit with a sweep table as its curve, and that table's rows k=0 and k as
    its before and after metrics (the sweep already ran these edits)."""
    rows = {r["k"]: {c: v for c, v in r.items() if c != "k"} for r in table}
    return dataclasses.replace(made, before=rows[0], after=rows[k], curve=table)


def accuracy_on(x: Tensor, y: Tensor) -> Callable[[nn.Module], float]:
    """A sweep metric: accuracy of the (edited) model on ``(x, y)``."""
    return lambda model: accuracy(model, (x, y))


def predictions(model: nn.Module, x: Tensor) -> Tensor:
    with torch.inference_mode():
        return torch.cat([model(x[i : i + 1024]).argmax(1) for i in range(0, len(x), 1024)])


def markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows as a GitHub markdown table (floats with 3 decimals)."""
    columns = list(columns or rows[0])

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def save_results(out: Path, name: str, results: Mapping[str, Any]) -> Path:
    path = out / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    return path


def figure_path(out: Path, task: str, quick: bool) -> Path:
    """``examples/figures/<task>.png`` for a full run, a file under ``out`` for a quick one."""
    return out / task / "curve.png" if quick else FIGURES / f"{task}.png"


def margins(model: nn.Module, data: Any) -> Tensor:
    """The margin of every example with the model as it is: (n,) float32."""
    with torch.inference_mode():
        return coar.outputs.margin(model, data)


def orders(
    attrs: Mapping[str, coar.Attributions],
    model: nn.Module,
    comps: coar.Components,
    data: Any,
    *,
    targets: Tensor,
    references: Tensor,
    objective: Any,
    k: int,
    direction: str = "raise",
    paired: bool = False,
    seed: int = 0,
    pool: int = ORACLE_POOL,
    n_random: int = N_RANDOM,
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Every method's first ``k`` components, on the edit split ``data``.

    Returns ``({method: order}, {"oracle_evaluations": edits the oracle ran})``. The
    attributions' own orders (Welch scores) keep their names (``"coar"``,
    ``"leave_one_out"``, ``"gradient"``); random orders are ``"random/<i>"`` (see
    :func:`sweep_all`, which averages them).
    """
    found: dict[str, Tensor] = {}
    for name, attr in attrs.items():
        found[name] = edit.select(edit.scores(attr, targets, references), k, direction=direction)
    if paired:
        s = edit.scores(attrs["coar"], targets, references, statistic="paired")
        found["coar/paired"] = edit.select(s, k, direction=direction)
    base = margins(model, data)
    found["coar/predicted"] = edit.select_predicted(attrs["coar"], objective, k, outputs=base)
    best = edit.oracle(
        model, comps, data, objective=objective, k=k, leave_one_out=attrs["leave_one_out"],
        budget=1 + max(k - 1, 0) * pool, progress=False,
    )  # fmt: skip
    found["oracle"] = best.order
    gen = torch.Generator().manual_seed(seed)
    for i in range(n_random):
        found[f"random/{i}"] = torch.randperm(len(comps), generator=gen)[:k]
    return found, {"oracle_evaluations": best.n_evaluations}


def compare(
    attrs: Mapping[str, coar.Attributions],
    model: nn.Module,
    comps: coar.Components,
    data: Any,
    *,
    targets: Tensor,
    references: Tensor,
    objective: Any,
    ks: Sequence[int],
    metrics: Mapping[str, Callable[[nn.Module], float]],
    clock: Any,
    quick: bool,
    **options: Any,
) -> tuple[dict[str, Tensor], dict[str, int], dict[str, list[dict]]]:
    """:func:`orders` up to ``max(ks)`` then :func:`sweep_all`, saying what each took:
    ``(orders, facts, curves)``. ``quick`` runs one random order and a smaller oracle
    pool; ``options`` go to :func:`orders` (``direction``, ``paired``, ``seed``)."""
    found, facts = orders(
        attrs, model, comps, data, targets=targets, references=references,
        objective=objective, k=max(ks), n_random=1 if quick else N_RANDOM,
        pool=8 if quick else ORACLE_POOL, **options,
    )  # fmt: skip
    clock.say(f"orders: {', '.join(found)}; the oracle ran {facts['oracle_evaluations']} edits")
    curves = sweep_all(
        found, model, comps, data, targets=targets, references=references, ks=ks,
        metrics=metrics,
    )  # fmt: skip
    clock.say(f"swept {len(found)} orders over k in {ks}")
    return found, facts, curves


def sweep_all(
    found: Mapping[str, Tensor],
    model: nn.Module,
    comps: coar.Components,
    data: Any,
    *,
    targets: Tensor,
    references: Tensor,
    ks: Sequence[int],
    metrics: Mapping[str, Callable[[nn.Module], float]],
) -> dict[str, list[dict]]:
    """Each order swept over ``ks``; the ``random/<i>`` curves averaged into ``"random"``."""
    curves = {
        name: edit.sweep(
            None,
            model,
            comps,
            data,
            targets=targets,
            references=references,
            order=order,
            ks=ks,
            metrics=metrics,
            progress=False,
        )  # fmt: skip
        for name, order in found.items()
    }
    randoms = [curves.pop(name) for name in list(curves) if name.startswith("random/")]
    if randoms:
        curves["random"] = [
            {c: (v if c == "k" else sum(r[i][c] for r in randoms) / len(randoms))
             for c, v in row.items()}
            for i, row in enumerate(randoms[0])
        ]  # fmt: skip
    return curves


def at_k(curves: Mapping[str, list[dict]], column: str, ks: Sequence[int]) -> list[dict]:
    """Rows ``{"method", "k=0", "k=1", ...}`` of ``column`` (for a markdown table)."""
    rows = []
    for method, table in curves.items():
        by_k = {r["k"]: r for r in table}
        rows.append({"method": method, **{f"k={k}": by_k[k][column] for k in ks}})
    return rows


def plot(
    curves: Mapping[str, list[dict]],
    methods: Sequence[str],
    *,
    target: str,
    reference: str | None,
    title: str,
    path: Path,
) -> Path | None:
    """Target (solid) and reference (dashed) metrics of a few methods against k."""
    try:
        from coarpy.report import plot_edit_curve
    except ImportError:  # matplotlib is an optional extra
        return None
    rows = []
    for i, k in enumerate(r["k"] for r in curves[methods[0]]):
        row = {"k": k}
        for m in methods:
            row[f"{m} {target}"] = curves[m][i][target]
            if reference:
                row[f"{m} {reference}"] = curves[m][i][reference]
        rows.append(row)
    fig = plot_edit_curve(
        rows, target=[f"{m} {target}" for m in methods],
        reference=[f"{m} {reference}" for m in methods] if reference else [], title=title,
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
