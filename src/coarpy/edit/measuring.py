"""Coar-Edit measured: run the model under edits of growing size, and stop rules.

``sweep`` measures the effect of ablating the ``k`` best-scored components (or the
first ``k`` of any order), for several ``k``, by really running the model (with hooks that reproduce
:func:`coarpy.ablation.apply_ablation`'s weight zeroing exactly), never by the linear
prediction alone. ``measure`` gives the same columns for a model as it is (an edited
copy). The stop rules (``smallest_k``, ``largest_k_within``, ``best_k``) read a sweep
table and pick an edit size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import outputs as _outputs
from .._engine import ExampleSet, eval_mode, model_device, progress_bar, run_masks
from ..ablation import Ablator
from ..attributions import Attributions
from ..components import Components
from ..errors import EditError
from ._checks import (
    Rows,
    check_compatible,
    check_data,
    check_direction,
    check_ks,
    check_selected,
    check_statistic,
    example_sets,
)
from .scoring import scores, select

Metric = Callable[[nn.Module], float]  # fn(edited model) -> a number, e.g. held-out accuracy
BUILT_IN = ("k", "target_output", "reference_output", "target_acc", "reference_acc")


def _keep_rows(order: Tensor, ks: Sequence[int], n: int, device: torch.device) -> Tensor:
    """Nested keep-masks: row i ablates the first ``ks[i]`` components of ``order``."""
    keep = torch.ones(len(ks), n, dtype=torch.bool)  # (len(ks), N)
    for i, k in enumerate(ks):
        keep[i, order[:k]] = False
    return keep.to(device)


def _columns(vt: Tensor, vr: Tensor) -> dict[str, float]:
    """The built-in columns from the outputs of the targets and of the references."""
    return {
        "target_output": float(vt.mean()),
        "reference_output": float(vr.mean()),
        "target_acc": float((vt > 0).double().mean()),
        "reference_acc": float((vr > 0).double().mean()),
    }


def _check_metrics(metrics: Mapping[str, Metric] | None) -> dict[str, Metric]:
    metrics = dict(metrics or {})
    for name, fn in metrics.items():
        if name in BUILT_IN:
            raise EditError(f"The metric name {name!r} is a built-in column; rename the metric.")
        if not callable(fn):
            raise EditError(
                f"metrics[{name!r}] is a {type(fn).__name__}, not a function. Give "
                "fn(model) -> float, e.g. lambda m: accuracy(m, heldout)."
            )
    return metrics


def sweep(
    attributions: Attributions | None,
    model: nn.Module,
    components: Components,
    data: Any,
    *,
    targets: Rows,
    references: Rows | None = None,
    ks: Iterable[int] = (0, 1, 2, 4, 8, 16, 32),
    direction: str = "raise",
    statistic: str = "welch",
    order: Sequence[int] | Tensor | None = None,
    output: _outputs.OutputFn | str = _outputs.margin,
    metrics: Mapping[str, Metric] | None = None,
    until: Callable[[dict[str, float]], bool] | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    device_budget: int | None = None,
) -> list[dict[str, float]]:
    """Measure the edit of every size in ``ks`` by running the edited model.

    For each ``k`` the first ``k`` components of an order are ablated (the edits are
    nested: each extends the one before) and the model really runs, with hooks that
    reproduce :func:`~coarpy.edit.apply`'s weight zeroing exactly, on the target and
    reference examples of ``data``, and inside every metric function. The order is
    ``select(scores(attributions, targets, references, statistic=statistic))``, or
    the one given as ``order`` (from :func:`~coarpy.edit.select_predicted`, a
    :class:`~coarpy.edit.Search`, or a random permutation as a control).

    Parameters
    ----------
    attributions : attributions (COAR or a baseline) over the examples of ``data``;
        None only with ``order`` (then nothing is checked against attributions).
    model, components : the model the attributions were fitted on, and its components.
    data : the examples the attributions were fitted on, in the same order (as for
        ``collect``). Only the targets and references are run.
    targets, references : example indices (or bool masks) into ``data``;
        ``references=None`` takes every other example.
    ks : edit sizes; sorted, duplicates dropped; each in ``[0, n_components]``.
    direction : ``"raise"`` or ``"lower"`` (see :func:`~coarpy.edit.select`).
    statistic : ``"welch"`` or ``"paired"`` (see :func:`~coarpy.edit.scores`).
    order : component indices, in the order to ablate, at least ``max(ks)`` of them;
        replaces the scores' order (``direction`` and ``statistic`` are then unused).
    output : the output function (as for ``collect``; use the attributions' own).
    metrics : ``{column: fn}``; ``fn(model) -> float`` is called with the edited model
        (e.g. accuracy on held-out data) and its value goes in ``column``.
    until : stop after the first row for which ``until(row)`` is true (a stop rule such
        as "the target is fixed"), skipping larger ``k``.
    batch_size : examples per forward pass; a batch larger than the targets and
        references together runs several edits per pass.
    progress : show a progress bar (one step per ``k``); None shows it on a terminal.
    device_budget : bytes the examples may take on the device, as for
        ``coarpy.collect``; a larger ``data`` stays on the host.

    Returns
    -------
    list of dict, one per ``k`` (ascending), with columns ``k``, ``target_output`` and
    ``reference_output`` (mean output), ``target_acc`` and ``reference_acc`` (share of
    examples whose output is positive: for the margin, the share classified
    correctly), then one column per metric. ``report.plot_edit_curve`` draws it.

    Raises
    ------
    EditError
        Bad example sets, a bad ``k`` or order, data or attributions of another model.
    """
    attr = attributions
    check_direction(direction)
    check_statistic(statistic)
    if attr is None and order is None:
        raise EditError(
            "sweep needs attributions to score the components, or an order= to ablate "
            "them in (e.g. from edit.select_predicted or edit.oracle)."
        )
    if attr is not None:
        check_compatible(attr, model, components)
    n = len(components)
    ks = check_ks(ks, n)
    output_fn = _outputs.resolve(output)
    metrics = _check_metrics(metrics)
    device = model_device(model)
    every = ExampleSet(data, device, batch_size, device_budget=device_budget)
    if attr is not None:
        check_data(attr, every)
    t, r = example_sets(targets, references, every.n_examples)
    rows = torch.cat([t, r])  # run the targets and references only
    examples = every.subset(rows, batch_size)
    if order is None:
        order = select(scores(attr, t, r, statistic=statistic), max(ks), direction=direction)
    else:
        order = check_selected(order, n)
        if len(order) < max(ks):
            raise EditError(
                f"order lists {len(order)} components but ks goes up to {max(ks)}. Give an "
                "order at least as long as the largest k."
            )
    keep = _keep_rows(order, ks, n, device)  # (len(ks), N)
    table: list[dict[str, float]] = []
    ablator = Ablator(model, components)
    bar = progress_bar(len(ks), progress, desc="sweep", unit="edit")
    try:
        with eval_mode(model, "sweep", warn=False), ablator:
            step = examples.pack
            for start in range(0, len(ks), step):
                chunk = keep[start : start + step]  # (<= pack, N)
                with torch.inference_mode():
                    values = run_masks(model, ablator, examples, chunk, output_fn).cpu()
                # values: (chunk, |T| + |R|), targets first
                for i in range(values.shape[0]):
                    row = {"k": ks[start + i], **_columns(values[i, : len(t)], values[i, len(t) :])}
                    if metrics:
                        ablator.set(keep[start + i])
                        for name, fn in metrics.items():
                            row[name] = float(fn(model))
                    table.append(row)
                    bar.update(1)
                    if until is not None and until(row):
                        return table
    finally:
        bar.close()
    return table


def measure(
    model: nn.Module,
    data: Any,
    *,
    targets: Rows,
    references: Rows | None = None,
    output: _outputs.OutputFn | str = _outputs.margin,
    metrics: Mapping[str, Metric] | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    device_budget: int | None = None,
) -> dict[str, float]:
    """The columns of a :func:`sweep` row for a model as it is (no ablation, no ``k``).

    Use it on an edited copy (from :func:`~coarpy.edit.apply`, or a loaded
    ``state_dict``) to check an edit without hooks.

    Parameters
    ----------
    model : the model to run, e.g. an edited copy.
    data : the examples; ``targets`` and ``references`` index them.
    targets, references, output, metrics, batch_size, device_budget : as for :func:`sweep`.
    progress : show a progress bar (the outputs, then each metric); None shows it on a
        terminal.

    Raises
    ------
    EditError
        Bad example sets or metrics.
    """
    device = model_device(model)
    every = ExampleSet(data, device, batch_size, device_budget=device_budget)
    t, r = example_sets(targets, references, every.n_examples)
    output_fn = _outputs.resolve(output)
    metrics = _check_metrics(metrics)
    bar = progress_bar(1 + len(metrics), progress, desc="measure", unit="step")
    try:
        with eval_mode(model, "measure", warn=False):
            with torch.inference_mode():
                values = every.outputs(model, output_fn).cpu()  # (E,)
            bar.update(1)
            row = _columns(values[t], values[r])
            for name, fn in metrics.items():
                row[name] = float(fn(model))
                bar.update(1)
    finally:
        bar.close()
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
    check_direction(direction)
    _column(table, target)
    limit = largest_k_within(table, reference, delta=delta)
    rows = [r for r in sorted(table, key=lambda r: r["k"]) if r["k"] <= limit]
    sign = 1.0 if direction == "raise" else -1.0
    return int(max(rows, key=lambda r: (sign * r[target], -r["k"]))["k"])
