"""What the MiniLM editing examples share: the encoder, the sentences, attributions, the comparison.

Every MiniLM example edits the last layer of all-MiniLM-L6-v2 (its 12 attention heads
and 1,536 MLP neurons: 1,548 components) inside a sentiment probe, on real movie-review
sentences (Pang-Lee, from the gensim wheel), on the CPU. Layers 0-4 are frozen and
never edited, so they run once per sentence (``coarpy.demo.text.encode``) and every
edit runs only the last layer, the pooling and the head
(``coarpy.demo.text.EncoderTail``). With ``--quick`` the components are the 12 heads
and ``QUICK_NEURONS`` seeded neurons (see :func:`quick_components`): leave-one-out and
the oracle's first step cost one run per component.

Each example compares, at equal k, on held-out sentences:

- COAR (a lasso fit, as in the paper, to a component dataset of masks at alpha =
  0.05), leave-one-out and gradient attributions over the same edit split, each turned
  into an edit by Welch scores, by paired scores (where targets and references pair
  up) and by ``edit.select_predicted`` (the greedy choice on the attributions' own
  predictions of target gain and reference damage);
- ``edit.refine`` on COAR (the attributions propose, the model decides, a few runs
  per step);
- random components (the mean of three random orders);
- ``edit.oracle``: the greedy edit chosen by running the model on the edit split
  (its first step read off leave-one-out, later steps limited to the best
  candidates of the step before).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# the clock, tables and plots are the Fashion examples' (examples/ is on sys.path)
from _common import Clock, at_k, figure_path, markdown, plot  # noqa: F401
from torch import Tensor, nn

import coarpy as coar
from coarpy import baselines, edit
from coarpy._fingerprint import model_fingerprint
from coarpy.demo import minilm, pang_lee_sentences
from coarpy.demo.probe import SentenceProbe, balanced_split, sentiment_probe
from coarpy.demo.text import encode, with_word

START = 5  # the first (and only) encoder layer edited: the last of six
MAX_LENGTH = 24  # tokens kept per sentence (with [CLS] and [SEP]); the median sentence has 27
N_RANDOM = 3  # random orders averaged
QUICK_NEURONS = 52  # --quick edits the 12 heads and this many seeded neurons (64 components)


def load() -> tuple[Any, Any, list[str], Tensor]:
    """(encoder, tokenizer, the 200 sentences, their labels: 0 negative, 1 positive)."""
    encoder, tokenizer = minilm()
    sentences, labels = pang_lee_sentences()
    return encoder, tokenizer, sentences, labels


def three_way_split(
    labels: Tensor, *, n_train: int, n_edit: int, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(train, edit, held-out) sentence rows, each balanced by class where it can be."""
    train, rest = balanced_split(labels, n_train // 2, seed)
    chosen, _ = balanced_split(labels[rest], n_edit // 2, seed + 1)
    edit_rows = rest[chosen]
    held = rest[~torch.isin(rest, edit_rows)]
    return train, edit_rows, held


def fit_probe(encoder, tokenizer, sentences: Sequence[str], labels: Tensor) -> SentenceProbe:
    return sentiment_probe(encoder, tokenizer, list(sentences), labels, max_length=MAX_LENGTH)


def batch(probe, tokenizer, sentences: Sequence[str], labels: Tensor) -> dict[str, Tensor]:
    """An EncoderTail batch: hidden states at the input of layer START."""
    return encode(probe, tokenizer, list(sentences), labels, start=START, max_length=MAX_LENGTH)


def inserted(sentences: Sequence[str], word: str) -> list[str]:
    """The sentences with ``word`` in front (it survives the cut to MAX_LENGTH tokens)."""
    return [with_word(s, word) for s in sentences]


def join(*batches: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Batches stacked, padded to one length (the mask keeps the padding out)."""
    width = max(b["attention_mask"].shape[1] for b in batches)
    out: dict[str, list[Tensor]] = {"hidden_states": [], "attention_mask": [], "labels": []}
    for b in batches:
        pad = width - b["attention_mask"].shape[1]
        out["hidden_states"].append(nn.functional.pad(b["hidden_states"], (0, 0, 0, pad)))
        out["attention_mask"].append(nn.functional.pad(b["attention_mask"], (0, pad)))
        out["labels"].append(b["labels"])
    return {k: torch.cat(v) for k, v in out.items()}


def rows_of(data: Mapping[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    return {k: v[rows] for k, v in data.items()}


def components(
    tail: nn.Module, *, quick: bool = False, seed: int = 0
) -> tuple[nn.Module, coar.Components]:
    """(the model to edit, its components): the tail's 12 heads and 1,536 MLP neurons, or
    for ``quick`` a copy of the tail with its heads and ``QUICK_NEURONS`` seeded neurons
    (see :func:`quick_components`)."""
    if quick:
        return quick_components(tail, QUICK_NEURONS, seed)
    return tail, coar.Components.discover(tail, kinds=("heads", "neurons"))


class _SplitDown(nn.Module):
    """An MLP's down projection split in two: the columns of some neurons, and the rest.

    ``forward(h) == down(h)`` (up to the order of the sums): ``edited`` holds the
    columns of the neurons in ``rows``, ``kept`` the others and the bias. Ablating
    input feature ``j`` of ``edited`` (zeroing its weight column) is ablating neuron
    ``rows[j]`` exactly as the ``neurons`` kind does.
    """

    def __init__(self, down: nn.Linear, rows: Tensor):
        super().__init__()
        rest = torch.ones(down.in_features, dtype=torch.bool)
        rest[rows] = False
        self.register_buffer("rows", rows.clone())
        self.register_buffer("rest", rest.nonzero().flatten())
        self.edited = nn.Linear(len(rows), down.out_features, bias=False)
        self.kept = nn.Linear(len(self.rest), down.out_features)
        with torch.no_grad():
            self.edited.weight.copy_(down.weight[:, self.rows])
            self.kept.weight.copy_(down.weight[:, self.rest])
            self.kept.bias.copy_(down.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.edited(h[..., self.rows]) + self.kept(h[..., self.rest])


def quick_components(
    tail: nn.Module, n_neurons: int, seed: int
) -> tuple[nn.Module, coar.Components]:
    """(a copy of the tail, its 12 heads and ``n_neurons`` seeded MLP neurons): for --quick.

    Leave-one-out and the oracle's first step run the model once per component, so
    the quick runs edit a seeded subset of the layer's 1,536 neurons (the others are
    always kept). The copy computes the same function: its down projection is split
    into the chosen neurons' columns (``layer.5.output.dense.edited``, whose input
    features are the components) and the rest.
    """
    model = copy.deepcopy(tail)
    layer = model.layer[str(START)]
    down = layer.output.dense
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(down.in_features, generator=gen)[:n_neurons].sort().values
    layer.output.dense = _SplitDown(down, rows)
    spec = {f"layer.{START}.attention": "heads", f"layer.{START}.output.dense.edited": "inputs"}
    return model, coar.Components.from_spec(model, spec)


def outputs_of(model: nn.Module, data: Mapping[str, Tensor]) -> Tensor:
    """The margin of every example with the model as it is: (n,) float32."""
    with torch.inference_mode():
        return coar.outputs.margin(model, data)


def accuracy_of(data: Mapping[str, Tensor]) -> Callable[[nn.Module], float]:
    """A sweep metric: the (edited) model's accuracy on ``data``."""

    def metric(model: nn.Module) -> float:
        with torch.inference_mode():
            logits = model(data["hidden_states"], data["attention_mask"])
        return float((logits.argmax(1) == data["labels"]).double().mean())

    return metric


def attributions(
    model: nn.Module,
    comps: coar.Components,
    data: Mapping[str, Tensor],
    *,
    out: Path,
    n_masks: int,
    alpha: float,
    seed: int,
) -> dict[str, coar.Attributions]:
    """COAR (collect + ridge fit), leave-one-out and gradient over ``data``, cached in ``out``.

    The component dataset and the baselines go to folders named by the model's
    fingerprint and the settings, so a rerun reuses them.
    """
    key = f"{model_fingerprint(model)[:12]}-e{len(data['labels'])}"
    n = len(data["labels"])
    batch_size = n * max(1, 192 // n)  # several masks per forward pass
    ds = coar.collect(
        model, comps, data, path=out / "stores" / f"{key}-m{n_masks}-a{alpha}-s{seed}",
        n_masks=n_masks, alpha=alpha, seed=seed, batch_size=batch_size, progress=False,
    )  # fmt: skip
    # The lasso, as in the paper: most of the 1,536 neurons matter little, and with
    # fewer masks than components a sparse fit recovers the few that matter far better
    # than ridge (measured: mean held-out Pearson 0.90 against 0.60 with 600 masks).
    found = {"coar": coar.fit(ds, method="lasso", max_iter=1000, tol=1e-4, progress=False)}
    makers = {
        "loo": lambda: baselines.leave_one_out(
            model, comps, data, batch_size=batch_size, progress=False
        ),
        "gradient": lambda: baselines.gradient(model, comps, data, progress=False),
    }
    for name, make in makers.items():
        path = out / "cache" / f"{key}-{name}"
        if (path / "attributions.json").is_file():
            found[name] = coar.Attributions.load(path)
        else:
            found[name] = make()
            found[name].save(path)
    return found


def correlations(
    attrs: Mapping[str, coar.Attributions],
    model: nn.Module,
    comps: coar.Components,
    data: Mapping[str, Tensor],
    *,
    alpha: float,
    n_masks: int,
    seed: int,
) -> dict[str, float]:
    """Mean held-out Pearson correlation of each attribution, on fresh masks at ``alpha``."""
    n = len(data["labels"])
    res = coar.evaluate(
        dict(attrs), model, comps, data, alphas=(alpha,), n_masks=n_masks, seed=seed + 1000,
        batch_size=n * max(1, 192 // n), progress=False,
    )  # fmt: skip
    return {name: float(res.per_example(name).pearson.nanmean()) for name in attrs}


def compare(
    model: nn.Module,
    comps: coar.Components,
    data: Mapping[str, Tensor],
    attrs: Mapping[str, coar.Attributions],
    *,
    targets: Tensor,
    references: Tensor,
    paired: bool,
    objective: Any,
    ks: Sequence[int],
    metrics: Mapping[str, Callable[[nn.Module], float]],
    candidates: int,
    pool: int,
    seed: int,
    clock: Clock,
) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """Every method's order of components, swept over ``ks`` with the held-out ``metrics``.

    Returns (curves by method, facts: edits run by the refinement and the oracle).
    """
    k_max = max(ks)
    base = outputs_of(model, data)
    orders: dict[str, Tensor] = {}
    for name, attr in attrs.items():
        orders[f"{name}/welch"] = edit.select(edit.scores(attr, targets, references), k_max)
        if paired:
            s = edit.scores(attr, targets, references, statistic="paired")
            orders[f"{name}/paired"] = edit.select(s, k_max)
        orders[f"{name}/predicted"] = edit.select_predicted(attr, objective, k_max, outputs=base)
    refined = edit.refine(
        attrs["coar"], model, comps, data, objective=objective, k=k_max, candidates=candidates,
        progress=False,
    )  # fmt: skip
    orders["coar/refine"] = refined.order
    clock.say(f"coar/refine: {refined.n_evaluations} edits run")
    best = edit.oracle(
        model, comps, data, objective=objective, k=k_max, leave_one_out=attrs["loo"],
        budget=1 + (k_max - 1) * pool, progress=False,
    )  # fmt: skip
    orders["oracle"] = best.order
    clock.say(f"oracle: {best.n_evaluations} edits run")
    gen = torch.Generator().manual_seed(seed)
    for i in range(N_RANDOM):
        orders[f"random/{i}"] = torch.randperm(len(comps), generator=gen)[:k_max]
    curves: dict[str, list[dict]] = {}
    for name, order in orders.items():
        curves[name] = edit.sweep(
            None, model, comps, data, targets=targets, references=references, order=order,
            ks=ks, metrics=metrics, progress=False,
        )  # fmt: skip
    clock.say(f"swept {len(orders)} orders over k in {tuple(ks)}")
    randoms = [curves.pop(f"random/{i}") for i in range(N_RANDOM)]
    curves["random"] = [
        {c: (v if c == "k" else sum(r[i][c] for r in randoms) / N_RANDOM) for c, v in row.items()}
        for i, row in enumerate(randoms[0])
    ]
    facts = {
        "refine_evaluations": refined.n_evaluations,
        "oracle_evaluations": best.n_evaluations,
        "orders": {name: [int(j) for j in order.tolist()] for name, order in orders.items()},
    }
    return curves, facts
