"""What the editing examples share: arguments, a cached Fashion-MNIST CNN, attributions.

Every example trains (once, cached under ``--out``) a small ``FashionCNN`` on real
Fashion-MNIST images, computes three attributions over the same examples (COAR from
a component dataset, leave-one-out and gradient from ``coarpy.baselines``) and edits
with each, so the three can be compared on one task.
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
    """Seconds since start, printed with each step."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f} s] {text}", flush=True)


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
