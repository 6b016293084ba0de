"""Coar-Edit: change a model's behaviour on some examples by ablating a few components.

Given attributions over a set of examples, *targets* T (the behaviour to change) and
*references* R (the behaviour to keep), every component gets Welch's t statistic
between its attribution weights on T and on R::

    score_j = (mean_T w_j - mean_R w_j) / sqrt(var_T w_j / |T| + var_R w_j / |R|)

with population variances, as in the paper. A weight is the output gained by keeping
a component, so a very negative score marks a component that holds the targets down
relative to the references: ablating the ``k`` most negative ones raises the target
outputs relative to the references (``direction="raise"``), ablating the ``k`` most
positive lowers them (``"lower"``).

An edit is applied by zeroing the selected components' weights (``apply``), so the
edited model is a plain ``nn.Module`` that runs without coarpy. ``sweep`` measures
the effect of ``k`` by really running the model under each edit (with hooks, which
reproduce weight zeroing exactly), never by the linear prediction alone. ``Edit``
records what was ablated and why, with the measured metrics before and after, and
saves as JSON next to a standard ``state_dict`` file.

Any :class:`~coarpy.attributions.Attributions` works, COAR's or a baseline's, so
editing with COAR can be compared with leave-one-out and gradient attributions.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import _batching as B
from . import _fs
from . import outputs as _outputs
from ._engine import ExampleSet, eval_mode, model_device, run_masks
from ._fingerprint import model_fingerprint
from .ablation import Ablator, apply_ablation
from .attributions import Attributions
from .components import Components
from .errors import ComponentError, EditError

log = logging.getLogger(__name__)

DIRECTIONS = ("raise", "lower")
FORMAT = "coarpy.edit"
VERSION = 1
EDITS = "edits"  # the folder of a run directory that holds saved edits

Metric = Callable[[nn.Module], float]
Rows = Sequence[int] | Tensor


# -- example sets --------------------------------------------------------------------------


def _as_rows(rows: Rows | None, n_examples: int, what: str) -> Tensor:
    """Example indices (int64, in the order given) from indices or a bool mask."""
    if rows is None:
        raise EditError(f"{what} is None; give example indices or a bool mask over examples.")
    t = torch.as_tensor(rows)
    if t.numel() == 0:  # torch.as_tensor([]) is float32
        t = t.long()
    if t.dtype == torch.bool:
        if t.shape != (n_examples,):
            raise EditError(
                f"{what} is a bool mask of shape {tuple(t.shape)}, but the attributions cover "
                f"{n_examples} examples. Give a mask of shape ({n_examples},) or indices."
            )
        return t.nonzero().flatten().cpu()
    if t.is_floating_point() or t.is_complex() or t.ndim > 1:
        raise EditError(
            f"{what} must be example indices (a list of int or an int tensor) or a bool mask, "
            f"got {t.dtype} of shape {tuple(t.shape)}."
        )
    t = t.flatten().long().cpu()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n_examples):
        bad = int(t[(t < 0) | (t >= n_examples)][0])
        raise EditError(
            f"{what} holds the index {bad}, outside the {n_examples} examples the attributions "
            f"cover. Use indices 0 ... {n_examples - 1}."
        )
    if t.unique().numel() != t.numel():
        values, counts = t.unique(return_counts=True)
        raise EditError(
            f"{what} lists example {int(values[counts > 1][0])} more than once. Give each "
            "example once."
        )
    return t


def _example_sets(targets: Rows, references: Rows | None, n_examples: int) -> tuple[Tensor, Tensor]:
    """Checked ``(targets, references)`` as int64 index tensors.

    ``references=None`` means every example that is not a target.

    Raises
    ------
    EditError
        If a set is empty, an index is out of range or repeated, or the sets overlap.
    """
    t = _as_rows(targets, n_examples, "targets")
    if references is None:
        keep = torch.ones(n_examples, dtype=torch.bool)
        keep[t] = False
        r = keep.nonzero().flatten()
    else:
        r = _as_rows(references, n_examples, "references")
    for label, rows in (("targets", t), ("references", r)):
        if rows.numel() == 0:
            raise EditError(
                f"{label} is empty. Coar-Edit compares the attributions of at least one target "
                "and one reference example."
            )
    both = t[torch.isin(t, r)]
    if both.numel():
        raise EditError(
            f"targets and references share {both.numel()} example(s), e.g. {int(both[0])}. "
            "An example is either changed (target) or kept (reference); remove it from one set."
        )
    return t, r


# -- compatibility ---------------------------------------------------------------------------


def _recorded(attr: Attributions, key: str) -> Any:
    """A setting recorded by a baseline (``meta[key]``) or by fit (``meta["source"][key]``)."""
    if key in attr.meta:
        return attr.meta[key]
    source = attr.meta.get("source")
    return source.get(key) if isinstance(source, Mapping) else None


def check_compatible(attr: Attributions, model: nn.Module, components: Components) -> None:
    """Refuse attributions that were not fitted on this model and these components.

    The component names must match one for one. Where the attributions record a
    fingerprint of the model's weights (COAR's store and the baselines do), it must be
    this model's; attributions fitted on in-memory arrays record none.

    Raises
    ------
    EditError
        If the names differ, the weights differ, or the attributions used mean ablation
        (an edit zeroes weights, which is zero ablation).
    """
    names = list(components.names)
    if attr.names != names:
        if len(attr.names) != len(names):
            detail = f"{attr.n_components} components, but these Components have {len(names)}"
        else:
            j = next(i for i, (a, b) in enumerate(zip(attr.names, names, strict=True)) if a != b)
            detail = (
                f"component {j} named {attr.names[j]!r}, where these Components have {names[j]!r}"
            )
        raise EditError(
            f"The attributions cover {detail}. Edit with the model and Components the "
            "attributions were fitted on."
        )
    fingerprint = _recorded(attr, "fingerprint")
    if fingerprint and fingerprint != model_fingerprint(model):
        raise EditError(
            "The attributions were fitted on a model with other weights (their meta records "
            f"fingerprint {fingerprint}, this model's is {model_fingerprint(model)}). Edit the "
            "model they were fitted on, or fit attributions for this model."
        )
    mode = _recorded(attr, "mode")
    if mode not in (None, "zero"):
        raise EditError(
            f"The attributions were fitted with mode={mode!r} ablation, but an edit zeroes "
            "weights (mode='zero'). Fit attributions collected with mode='zero'."
        )


# -- scores and selection ------------------------------------------------------------------


def scores(attr: Attributions, targets: Rows, references: Rows | None = None) -> Tensor:
    """Welch's t statistic of every component between target and reference weights.

    ``(mean_T w - mean_R w) / sqrt(var_T / |T| + var_R / |R|)`` with population
    variances (divided by the group size, as in the paper). Where both variances are
    zero the statistic is the limit: ``+inf`` or ``-inf`` by the sign of the mean
    difference, and 0 when the means are equal too.

    Parameters
    ----------
    attr : the attributions (any method).
    targets, references : example indices (rows of ``attr.weights``) or bool masks over
        them; ``references=None`` takes every example that is not a target.

    Returns
    -------
    Tensor, shape (n_components,), float64 on the CPU.

    Raises
    ------
    EditError
        If a set is empty, holds a bad index, or the sets overlap.

    Examples
    --------
    >>> import torch
    >>> attr = Attributions(
    ...     weights=torch.tensor([[-2.0, 1.0], [-4.0, 1.0], [1.0, 1.0], [3.0, 1.0]]),
    ...     bias=torch.zeros(4), names=["fc:0", "fc:1"])
    >>> scores(attr, [0, 1], [2, 3]).tolist()
    [-5.0, 0.0]
    """
    t, r = _example_sets(targets, references, attr.n_examples)
    w = attr.weights.detach().cpu().double()  # (E, N)
    wt, wr = w[t], w[r]  # (|T|, N), (|R|, N)
    diff = wt.mean(0) - wr.mean(0)  # (N,)
    var = wt.var(0, correction=0) / len(t) + wr.var(0, correction=0) / len(r)  # (N,)
    out = diff / var.sqrt()
    flat = var == 0  # constant weights in both groups: the t statistic's limit
    out[flat] = torch.sign(diff[flat]) * math.inf
    out[flat & (diff == 0)] = 0.0
    return out


def select(scores: Tensor, k: int, *, direction: str = "raise") -> Tensor:
    """The ``k`` components to ablate: most negative scores to raise, most positive to lower.

    Parameters
    ----------
    scores : Tensor, shape (n_components,), from :func:`scores`.
    k : how many components, ``0 <= k <= n_components``.
    direction : ``"raise"`` (raise target outputs relative to the references) or
        ``"lower"``.

    Returns
    -------
    Tensor, shape (k,), int64: flat component indices, strongest first (ties keep
    index order).

    Examples
    --------
    >>> s = torch.tensor([0.5, -3.0, 2.0, -1.0])
    >>> select(s, 2).tolist(), select(s, 2, direction="lower").tolist()
    ([1, 3], [2, 0])
    """
    _check_direction(direction)
    if not isinstance(scores, Tensor) or scores.ndim != 1:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise EditError(
            f"scores must be a 1-D tensor (one score per component), got {got}. Compute them "
            "with coarpy.edit.scores(attr, targets, references)."
        )
    n = scores.shape[0]
    _check_k(k, n)
    if bool(torch.isnan(scores).any()):
        raise EditError(
            f"scores holds NaN at component {int(torch.isnan(scores).nonzero()[0])}; a score "
            "must be a number to rank components. Check the attributions for NaN weights."
        )
    order = torch.sort(scores.cpu(), descending=direction == "lower", stable=True).indices
    return order[:k].clone()


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise EditError(
            f"direction must be 'raise' (raise the target outputs relative to the references) "
            f"or 'lower', got {direction!r}."
        )


def _check_k(k: Any, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise EditError(f"k must be an int (the number of components to ablate), got {k!r}.")
    if not 0 <= k <= n:
        raise EditError(
            f"k={k} components cannot be ablated: the model has {n} components. Choose "
            f"0 <= k <= {n}."
        )
    return k


def _check_selected(selected: Any, n: int) -> Tensor:
    idx = torch.as_tensor(selected)
    if idx.numel() == 0:  # torch.as_tensor([]) is float32
        idx = idx.long()
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.ndim > 1:
        raise EditError(
            f"selected must be flat component indices (ints), got {idx.dtype} of shape "
            f"{tuple(idx.shape)}. Use coarpy.edit.select(...)."
        )
    idx = idx.flatten().long().cpu()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise EditError(
            f"selected holds indices in [{int(idx.min())}, {int(idx.max())}], outside the "
            f"{n} components. Select from the same Components the model uses."
        )
    if idx.unique().numel() != idx.numel():
        raise EditError("selected lists a component more than once; give each component once.")
    return idx


def apply(model: nn.Module, components: Components, selected: Rows) -> nn.Module:
    """A copy of ``model`` with the ``selected`` components' weights zeroed.

    The copy is a plain module (no hooks), so it runs, saves and loads without coarpy;
    the original is untouched. This is the paper's ablation, the one ``ablate`` and
    ``collect`` reproduce with hooks (a conv channel followed by BatchNorm becomes a
    constant channel).

    Parameters
    ----------
    model, components : the model and its components.
    selected : flat component indices, e.g. from :func:`select`.
    """
    idx = _check_selected(selected, len(components))
    return apply_ablation(model, components, idx)


# -- measuring -----------------------------------------------------------------------------


def _keep_rows(order: Tensor, ks: Sequence[int], n: int, device: torch.device) -> Tensor:
    keep = torch.ones(len(ks), n, dtype=torch.bool)  # (len(ks), N)
    for i, k in enumerate(ks):
        keep[i, order[:k]] = False
    return keep.to(device)


def _check_ks(ks: Iterable[int], n: int) -> list[int]:
    ks = list(ks)
    if not ks:
        raise EditError("ks is empty; give the numbers of components to try, e.g. (0, 1, 2, 4).")
    for k in ks:
        _check_k(k, n)
    return sorted(set(ks))


def _check_data(attr: Attributions, examples: ExampleSet) -> None:
    if examples.n_examples != attr.n_examples:
        raise EditError(
            f"data holds {examples.n_examples} examples but the attributions cover "
            f"{attr.n_examples}. Pass the examples the attributions were fitted on, in order."
        )
    recorded = _recorded(attr, "data_fingerprint")
    if recorded and recorded != examples.fingerprint():
        raise EditError(
            "data differs from the examples the attributions were fitted on (their meta "
            "records another data fingerprint). Pass the same examples, in the same order."
        )


def sweep(
    model: nn.Module,
    components: Components,
    attr: Attributions,
    targets: Rows,
    references: Rows | None = None,
    *,
    data: Any,
    ks: Iterable[int] = (0, 1, 2, 4, 8, 16, 32),
    direction: str = "raise",
    output: _outputs.OutputFn | str = _outputs.margin,
    metrics: Mapping[str, Metric] | None = None,
    until: Callable[[dict[str, float]], bool] | None = None,
    batch_size: int | None = None,
) -> list[dict[str, float]]:
    """Measure the edit of every size in ``ks`` by running the edited model.

    For each ``k`` the ``k`` components chosen by ``select(scores(...), k)`` are
    ablated (the edits are nested: each extends the one before) and the model really
    runs, with hooks that reproduce :func:`apply`'s weight zeroing exactly, on the
    target and reference examples of ``data``, and inside every metric function.

    Parameters
    ----------
    model, components : the model the attributions were fitted on, and its components.
    attr : attributions (COAR or a baseline) over the examples of ``data``.
    targets, references : example indices (or bool masks) into ``data``;
        ``references=None`` takes every other example.
    data : the examples the attributions were fitted on, in the same order (as for
        ``collect``). Only the targets and references are run.
    ks : edit sizes; sorted, duplicates dropped; each in ``[0, n_components]``.
    direction : ``"raise"`` or ``"lower"`` (see :func:`select`).
    output : the output function (as for ``collect``; use the attributions' own).
    metrics : ``{column: fn}``; ``fn(model) -> float`` is called with the edited model
        (e.g. accuracy on held-out data) and its value goes in ``column``.
    until : stop after the first row for which ``until(row)`` is true (a stop rule such
        as "the target is fixed"), skipping larger ``k``.
    batch_size : examples per forward pass; a batch larger than the targets and
        references together runs several edits per pass.

    Returns
    -------
    list of dict, one per ``k`` (ascending), with columns ``k``, ``target_output`` and
    ``reference_output`` (mean output), ``target_acc`` and ``reference_acc`` (share of
    examples whose output is positive: for the margin, the share classified
    correctly), then one column per metric. ``report.plot_edit_curve`` draws it.

    Raises
    ------
    EditError
        Bad example sets, a bad ``k``, data or attributions of another model.
    """
    _check_direction(direction)
    check_compatible(attr, model, components)
    n = len(components)
    ks = _check_ks(ks, n)
    t, r = _example_sets(targets, references, attr.n_examples)
    output_fn = _outputs.resolve(output)
    metrics = dict(metrics or {})
    for name in metrics:
        if name in ("k", "target_output", "reference_output", "target_acc", "reference_acc"):
            raise EditError(f"The metric name {name!r} is a built-in column; rename the metric.")
    device = model_device(model)
    every = ExampleSet(data, device, None)
    _check_data(attr, every)
    rows = torch.cat([t, r])  # run the targets and references only
    examples = ExampleSet([B.index(every.whole, rows.to(device))], device, batch_size)
    order = select(scores(attr, t, r), max(ks), direction=direction)
    keep = _keep_rows(order, ks, n, device)  # (len(ks), N)
    table: list[dict[str, float]] = []
    ablator = Ablator(model, components)
    with eval_mode(model, "sweep", warn=False), ablator:
        step = examples.pack
        for start in range(0, len(ks), step):
            chunk = keep[start : start + step]  # (<= pack, N)
            with torch.inference_mode():
                values = run_masks(model, ablator, examples, chunk, output_fn).cpu()
            # values: (chunk, |T| + |R|), targets first
            for i in range(values.shape[0]):
                vt, vr = values[i, : len(t)], values[i, len(t) :]
                row = {
                    "k": ks[start + i],
                    "target_output": float(vt.mean()),
                    "reference_output": float(vr.mean()),
                    "target_acc": float((vt > 0).double().mean()),
                    "reference_acc": float((vr > 0).double().mean()),
                }
                if metrics:
                    ablator.set(keep[start + i])
                    for name, fn in metrics.items():
                        row[name] = float(fn(model))
                table.append(row)
                if until is not None and until(row):
                    return table
    return table


def measure(
    model: nn.Module,
    data: Any,
    targets: Rows,
    references: Rows | None = None,
    *,
    output: _outputs.OutputFn | str = _outputs.margin,
    metrics: Mapping[str, Metric] | None = None,
    batch_size: int | None = None,
) -> dict[str, float]:
    """The columns of a :func:`sweep` row for a model as it is (no ablation).

    Use it on an edited copy (from :func:`apply`, or a loaded ``state_dict``) to check
    an edit without hooks.
    """
    device = model_device(model)
    every = ExampleSet(data, device, batch_size)
    t, r = _example_sets(targets, references, every.n_examples)
    output_fn = _outputs.resolve(output)
    with eval_mode(model, "measure", warn=False):
        with torch.inference_mode():
            values = every.outputs(model, output_fn).cpu()  # (E,)
        row = {
            "target_output": float(values[t].mean()),
            "reference_output": float(values[r].mean()),
            "target_acc": float((values[t] > 0).double().mean()),
            "reference_acc": float((values[r] > 0).double().mean()),
        }
        for name, fn in (metrics or {}).items():
            row[name] = float(fn(model))
    return row


# -- stop rules over a sweep table ------------------------------------------------------------


def _column(table: Sequence[Mapping[str, Any]], column: str) -> None:
    if not table:
        raise EditError("The sweep table is empty; run sweep with at least one k.")
    for row in table:
        if column not in row or "k" not in row:
            raise EditError(
                f"The sweep table has no column {column!r} (or no 'k'); it has "
                f"{list(table[0])}. Name one of those."
            )


def smallest_k(
    table: Sequence[Mapping[str, Any]],
    column: str,
    *,
    at_least: float | None = None,
    at_most: float | None = None,
) -> int | None:
    """The smallest ``k`` whose ``column`` is ``>= at_least`` (or ``<= at_most``); else None.

    E.g. ``smallest_k(table, "target_acc", at_least=1.0)``: the fewest components that
    fix every target.

    Examples
    --------
    >>> table = [{"k": 0, "fixed": 0.0}, {"k": 2, "fixed": 0.5}, {"k": 4, "fixed": 1.0}]
    >>> smallest_k(table, "fixed", at_least=0.5)
    2
    """
    if (at_least is None) == (at_most is None):
        raise EditError("Give exactly one of at_least= or at_most=.")
    _column(table, column)
    for row in sorted(table, key=lambda r: r["k"]):
        value = row[column]
        if (at_least is not None and value >= at_least) or (
            at_most is not None and value <= at_most
        ):
            return int(row["k"])
    return None


def largest_k_within(table: Sequence[Mapping[str, Any]], column: str, *, delta: float) -> int:
    """The largest ``k`` before ``column`` first falls more than ``delta`` below its k=0 value.

    A stop rule: walking up from ``k = 0``, stop at the last ``k`` whose ``column`` is at
    least ``value(k=0) - delta`` with every smaller ``k`` also within. E.g.
    ``largest_k_within(table, "reference_acc", delta=0.01)``.

    Examples
    --------
    >>> table = [{"k": 0, "ref": 0.90}, {"k": 1, "ref": 0.895}, {"k": 2, "ref": 0.85}]
    >>> largest_k_within(table, "ref", delta=0.01)
    1
    """
    _column(table, column)
    ordered = sorted(table, key=lambda r: r["k"])
    if ordered[0]["k"] != 0:
        raise EditError("The sweep table needs a row with k=0 (the unedited model) as baseline.")
    floor = ordered[0][column] - delta
    best = 0
    for row in ordered:
        if row[column] < floor:
            break
        best = int(row["k"])
    return best


def best_k(
    table: Sequence[Mapping[str, Any]],
    *,
    target: str,
    reference: str,
    delta: float,
    direction: str = "raise",
) -> int:
    """The ``k`` that moves ``target`` furthest while ``reference`` stays within ``delta``.

    Among the rows up to :func:`largest_k_within` ``(reference, delta)``, the one with the
    largest ``target`` (``direction="raise"``) or the smallest (``"lower"``); ties go to
    the smaller ``k``.
    """
    _check_direction(direction)
    _column(table, target)
    limit = largest_k_within(table, reference, delta=delta)
    rows = [r for r in sorted(table, key=lambda r: r["k"]) if r["k"] <= limit]
    sign = 1.0 if direction == "raise" else -1.0
    return int(max(rows, key=lambda r: (sign * r[target], -r["k"]))["k"])


# -- the edit as a record -------------------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    """Which components an edit ablates, why, and what it did.

    Parameters
    ----------
    names : the ablated components' names, strongest score first.
    indices : their flat indices in the Components (same order).
    scores : their Welch t scores.
    direction : ``"raise"`` or ``"lower"``.
    targets, references : the example indices the scores compared.
    before, after : measured metrics of the unedited and the edited model (columns
        of a :func:`sweep` row); empty if nothing was measured.
    curve : an optional :func:`sweep` table, one dict per ``k``.
    meta : the attributions' method, the unedited model's fingerprint, and so on.
    """

    names: tuple[str, ...]
    indices: tuple[int, ...]
    scores: tuple[float, ...]
    direction: str
    targets: tuple[int, ...]
    references: tuple[int, ...]
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    curve: tuple[dict[str, float], ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_direction(self.direction)
        for name in ("names", "indices", "scores", "targets", "references", "curve"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not len(self.names) == len(self.indices) == len(self.scores):
            raise EditError(
                f"An Edit needs one name, index and score per component, got {len(self.names)} "
                f"names, {len(self.indices)} indices and {len(self.scores)} scores."
            )

    @property
    def k(self) -> int:
        """The number of components ablated."""
        return len(self.indices)

    def summary(self, *, max_names: int = 10) -> str:
        """A few lines: what was ablated, for whom, and the metrics before and after."""
        method = self.meta.get("method") or "?"
        lines = [
            f"Edit: ablate {self.k} component(s) to {self.direction} the outputs of "
            f"{len(self.targets)} target(s) relative to {len(self.references)} reference(s) "
            f"(attributions: {method})"
        ]
        shown = [f"{n} (t={s:+.3g})" for n, s in zip(self.names, self.scores, strict=True)][
            :max_names
        ]
        if shown:
            more = f", ... ({self.k - len(shown)} more)" if self.k > len(shown) else ""
            lines.append("  components: " + ", ".join(shown) + more)
        for column, value in self.after.items():
            if column in self.before:
                lines.append(f"  {column:<24} {self.before[column]:9.4f} -> {value:9.4f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready record (what :meth:`save` writes, less the state_dict entry)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "k": self.k,
            "direction": self.direction,
            "names": list(self.names),
            "indices": [int(i) for i in self.indices],
            "scores": [_json_float(s) for s in self.scores],
            "targets": [int(i) for i in self.targets],
            "references": [int(i) for i in self.references],
            "before": dict(self.before),
            "after": dict(self.after),
            "curve": [dict(r) for r in self.curve],
            "meta": dict(self.meta),
        }

    def apply_to(self, model: nn.Module, components: Components) -> nn.Module:
        """The edited copy of ``model``: these components, found by name, zeroed.

        Raises
        ------
        EditError
            If ``model`` is not the model the edit was made for (its recorded
            fingerprint differs) or a component name is unknown.
        """
        recorded = self.meta.get("fingerprint")
        if recorded and recorded != model_fingerprint(model):
            raise EditError(
                "This edit was made for a model with other weights (fingerprint "
                f"{recorded}, this model's is {model_fingerprint(model)}). Apply it to the "
                "unedited model it was made for."
            )
        try:
            idx = [components.index(name) for name in self.names]
        except ComponentError as err:
            raise EditError(f"{err}. Apply the edit with the Components it was made with.") from err
        return apply(model, components, idx)

    def save(self, path: str | os.PathLike, *, model: nn.Module | None = None) -> Path:
        """Write the edit to ``path`` (JSON) and, if given, ``model``'s state_dict beside it.

        The state_dict goes to ``path`` with the suffix ``.pt`` (``torch.save`` of
        ``model.state_dict()``; load it with ``torch.load(..., weights_only=True)`` or
        :func:`load_state_dict`). Pass the edited model (from :func:`apply` or
        :meth:`apply_to`). Files are replaced atomically.

        Returns
        -------
        Path of the JSON file.
        """
        path = Path(path)
        if path.suffix != ".json":
            raise EditError(f"Save an edit to a .json path (e.g. RUN/edits/fix.json), got {path}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = self.to_dict()
        doc["state_dict"] = None
        if model is not None:
            fingerprint = model_fingerprint(model)
            if self.k and fingerprint == self.meta.get("fingerprint"):
                raise EditError(
                    "model is the unedited model (its fingerprint is the one the edit was made "
                    "for). Pass the edited copy: edit.apply_to(model, components)."
                )
            buf = io.BytesIO()
            torch.save(model.state_dict(), buf)
            data = buf.getvalue()
            weights = path.with_suffix(".pt")
            _fs.atomic_write(weights, data)
            doc["state_dict"] = {
                "file": weights.name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "fingerprint": fingerprint,
            }
        _fs.atomic_write(path, json.dumps(doc, indent=1, allow_nan=False).encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Edit:
        """Read an edit written by :meth:`save`.

        Raises
        ------
        EditError
            If the file is missing, not JSON, or not a coarpy edit.
        """
        doc = _read_doc(Path(path))
        return cls(
            names=doc["names"],
            indices=doc["indices"],
            scores=[_from_json_float(s) for s in doc["scores"]],
            direction=doc["direction"],
            targets=doc["targets"],
            references=doc["references"],
            before=doc.get("before") or {},
            after=doc.get("after") or {},
            curve=doc.get("curve") or (),
            meta=doc.get("meta") or {},
        )


def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The edited model's state_dict saved with the edit at ``path`` (the .json file).

    Loaded with ``weights_only=True`` and checked against the SHA-256 the edit records.

    Raises
    ------
    EditError
        If the edit was saved without a model, or the weights file is missing or altered.
    """
    path = Path(path)
    entry = _read_doc(path).get("state_dict")
    if not entry:
        raise EditError(
            f"{path} was saved without a model. Rebuild the edited model with "
            "Edit.load(path).apply_to(model, components)."
        )
    weights = path.with_name(entry["file"])
    if not weights.is_file():
        raise EditError(f"{weights}, the weights {path} names, does not exist; check the folder.")
    data = weights.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise EditError(
            f"{weights} does not match the checksum recorded in {path}; it was altered or "
            "belongs to another edit. Save the edit again."
        )
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _read_doc(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise EditError(f"{path} does not exist. Pass the .json file Edit.save wrote.")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EditError(f"{path} is not valid JSON ({err}); it is not a saved edit.") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise EditError(f"{path} is not a coarpy edit (expected format {FORMAT!r}).")
    if doc.get("version") != VERSION:
        raise EditError(
            f"{path} has edit format version {doc.get('version')!r}; this coarpy reads "
            f"version {VERSION}. Upgrade coarpy or make the edit again."
        )
    return doc


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _from_json_float(x: float | str) -> float:
    return float(x)


# -- one call ----------------------------------------------------------------------------------


def make(
    model: nn.Module,
    components: Components,
    attr: Attributions,
    targets: Rows,
    references: Rows | None = None,
    *,
    k: int,
    direction: str = "raise",
    data: Any = None,
    output: _outputs.OutputFn | str = _outputs.margin,
    metrics: Mapping[str, Metric] | None = None,
    ks: Iterable[int] | None = None,
    batch_size: int | None = None,
) -> Edit:
    """Score, select and (with ``data``) measure an edit of ``k`` components.

    Parameters
    ----------
    model, components, attr, targets, references, direction, output, metrics,
    batch_size : as for :func:`sweep`.
    k : the number of components to ablate.
    data : the attributions' examples. With it, ``before``/``after`` hold the measured
        metrics of the unedited and the edited model; without it they are empty.
    ks : with ``data``, also record a sweep over these sizes in ``curve`` (``k`` and 0
        are added).

    Returns
    -------
    Edit; the edited model is ``edit.apply_to(model, components)``.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(2, 2))
    >>> comps = Components.from_spec(net, {"0": "linear"})
    >>> w = torch.tensor([[-1.0, 1.0], [0.0, 1.0], [2.0, 1.0]])  # 3 examples x 2 components
    >>> attr = Attributions(weights=w, bias=torch.zeros(3), names=comps.names)
    >>> e = make(net, comps, attr, [0], [1, 2], k=1)
    >>> e.names, round(e.scores[0], 3)  # (-1 - 1) / sqrt(0 / 1 + 1 / 2)
    (('0:0',), -2.828)
    """
    _check_direction(direction)
    check_compatible(attr, model, components)
    _check_k(k, len(components))
    t, r = _example_sets(targets, references, attr.n_examples)
    s = scores(attr, t, r)
    chosen = select(s, k, direction=direction)
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    curve: list[dict[str, float]] = []
    if data is not None:
        sizes = {0, k, *(ks or ())}
        curve = sweep(
            model, components, attr, t, r, data=data, ks=sizes, direction=direction,
            output=output, metrics=metrics, batch_size=batch_size,
        )  # fmt: skip
        by_k = {row["k"]: row for row in curve}
        before = {c: v for c, v in by_k[0].items() if c != "k"}
        after = {c: v for c, v in by_k[k].items() if c != "k"}
        if ks is None:
            curve = []
    return Edit(
        names=[components.names[i] for i in chosen.tolist()],
        indices=chosen.tolist(),
        scores=s[chosen].tolist(),
        direction=direction,
        targets=t.tolist(),
        references=r.tolist(),
        before=before,
        after=after,
        curve=curve,
        meta={
            "method": attr.meta.get("method"),
            "output": _outputs.name_of(_outputs.resolve(output)),
            "fingerprint": model_fingerprint(model),
            "n_components": len(components),
        },
    )


def edit_run(
    run: str | os.PathLike,
    *,
    targets: Rows,
    references: Rows | None = None,
    k: int,
    direction: str = "raise",
    name: str | None = None,
    ks: Iterable[int] | None = None,
) -> Edit:
    """Edit a run's model with its fitted attributions; save ``RUN/edits/<name>.json``.

    Rebuilds the model, components and examples from ``RUN/config.toml``, loads
    ``RUN/attributions``, makes the edit (:func:`make`) over the run's examples and
    saves it with the edited model's state_dict (``RUN/edits/<name>.pt``). When the
    run's factory returns ``heldout`` data, its mean output and accuracy (share of
    positive outputs) before and after are recorded too, as ``heldout_output`` and
    ``heldout_acc``.

    Parameters
    ----------
    run : the run directory (``coar collect``'s path, after ``coar fit``).
    targets, references, k, direction : as for :func:`make`; indices into the run's
        examples; ``references=None`` takes every other example.
    name : file name of the edit (default ``"<direction>-k<k>"``).
    ks : sweep sizes for the edit curve (default: 0, powers of two up to ``k``, and
        ``k``); pass ``()`` for none.
    """
    from . import runs

    run = Path(run)
    if not (run / runs.ATTRIBUTIONS).is_dir():
        raise EditError(f"{run} has no fitted attributions yet. Run `coar fit {run}` first.")
    cfg = runs.load_config(run)
    setup = cfg.build()
    if cfg.device is not None:
        setup.model.to(cfg.device)
    attr = Attributions.load(run / runs.ATTRIBUTIONS)
    output_fn = _outputs.resolve(setup.output)
    metrics: dict[str, Metric] = {}
    heldout = setup.extra.get("heldout") if isinstance(setup.extra, Mapping) else None
    if heldout is not None:
        metrics["heldout_output"] = lambda m: _mean_output(m, heldout, output_fn, share=False)
        metrics["heldout_acc"] = lambda m: _mean_output(m, heldout, output_fn, share=True)
    if ks is None:
        ks = [0, *(2**i for i in range(max(int(k), 1).bit_length()) if 2**i < k), k]
    e = make(
        setup.model, setup.components, attr, targets, references, k=k, direction=direction,
        data=setup.data, output=output_fn, metrics=metrics, ks=ks or None,
        batch_size=cfg.batch_size,
    )  # fmt: skip
    edited = e.apply_to(setup.model, setup.components)
    path = run / EDITS / f"{name or f'{direction}-k{k}'}.json"
    e.save(path, model=edited)
    log.info("saved the edit to %s and the edited weights to %s", path, path.with_suffix(".pt"))
    return e


def _mean_output(model: nn.Module, data: Any, output_fn, *, share: bool) -> float:
    device = model_device(model)
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in B.batches_on(data, device):
            values = _outputs.check_values(output_fn(model, batch), B.batch_size(batch), output_fn)
            total += float((values > 0).double().sum() if share else values.double().sum())
            count += values.shape[0]
    if count == 0:
        raise EditError("The held-out data yielded no examples.")
    return total / count
