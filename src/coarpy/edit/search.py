"""Greedy edits measured on the real model: refinement of the attributions' choice, and the oracle.

Both build an edit one component at a time and value each candidate by *running* the
model with it ablated (hooks that reproduce weight zeroing exactly), under an
objective (:class:`~coarpy.edit.Objective` or any ``(outputs, base) -> values``):

- ``refine``: the attributions propose, the model decides. At each step the
  attributions' prediction is re-anchored at the measured outputs of the edit so far
  and ranks every remaining component; the best ``candidates`` are measured and the
  best measured is added. Cost: ``1 + k * candidates`` edits run.
- ``oracle``: no attributions. At each step every remaining component is measured
  and the best is added: the greedy best ``k``-component edit the model admits on
  these examples, to report how close an attribution-based edit comes. Cost: about
  ``k * n_components`` edits, or less within a ``budget`` (later steps measure only
  the candidates that the measured single-component effects, re-anchored at the
  edit so far, rank best).

"One edit run" is one pass over the examples the objective reads (several edits share
a forward pass when the examples fit a batch). Both return a :class:`Search` whose
``order`` can be swept like any other (``edit.sweep(..., order=search.order)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import outputs as _outputs
from .._engine import ExampleSet, eval_mode, model_device, progress_bar, run_masks
from ..ablation import Ablator
from ..attributions import Attributions
from ..components import Components
from ..errors import EditError
from ._checks import check_compatible, check_data, check_k, recorded
from .objective import Objective, ObjectiveFn, predicted_values, rank, restrict, values_of


@dataclass(frozen=True, eq=False)
class Search:
    """A greedy edit built by measuring the model.

    Attributes
    ----------
    order : Tensor (k,) int64, the components in the order added; ``order[:i]`` is the
        edit of size ``i``.
    values : Tensor (k + 1, n_columns) float64, the objective's measured values of the
        edits of size ``0 .. k`` on the examples searched.
    n_evaluations : edits run on the model (each a pass over the examples).
    method : ``"refine"`` or ``"oracle"``.
    """

    order: Tensor
    values: Tensor
    n_evaluations: int
    method: str

    @property
    def k(self) -> int:
        """The number of components chosen."""
        return int(self.order.numel())


@contextmanager
def _measuring(
    model: nn.Module,
    components: Components,
    examples: ExampleSet,
    output_fn: _outputs.OutputFn,
    caller: str,
) -> Iterator[Callable[[Tensor], Tensor]]:
    """A function keep (n, N) bool -> outputs (n, E) float64 on the CPU, model in eval mode."""
    ablator = Ablator(model, components)
    with eval_mode(model, caller, warn=False), ablator, torch.inference_mode():

        def measure(keep: Tensor) -> Tensor:
            return run_masks(model, ablator, examples, keep, output_fn).double().cpu()

        yield measure


def _rows_of(
    data: Any, model: nn.Module, objective: Any, batch_size: int | None
) -> tuple[ExampleSet, ExampleSet, Any]:
    """(every example, the examples the objective reads, the objective on those)."""
    device = model_device(model)
    every = ExampleSet(data, device, batch_size)  # batch_size: what a budget holds
    rows, local = restrict(objective, every.n_examples)
    return every, every.subset(rows, batch_size), (rows, local)


def _with_one_more(keep: Tensor, candidates: Tensor) -> Tensor:
    """Rows of ``keep`` (N,) with one candidate each ablated too: (len(candidates), N)."""
    rows = keep.repeat(len(candidates), 1)
    rows[torch.arange(len(candidates)), candidates] = False
    return rows


def _check_count(name: str, value: Any, at_least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < at_least:
        raise EditError(f"{name} must be an int >= {at_least}, got {value!r}.")
    return value


def refine(
    attributions: Attributions,
    model: nn.Module,
    components: Components,
    data: Any,
    *,
    objective: Objective | ObjectiveFn,
    k: int,
    candidates: int = 4,
    output: _outputs.OutputFn | str = _outputs.margin,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> Search:
    """Choose ``k`` components with the attributions' predictions, checked on the model.

    Step by step: run the model with the components chosen so far ablated (the first
    step runs the unedited model); predict from those measured outputs, with the
    attributions' weights, the value of adding each remaining component; measure the
    ``candidates`` best predicted; add the best measured. With ``candidates=1`` the
    attributions alone choose and the model only re-anchors their prediction; a
    larger value spends more runs to catch their mistakes.

    Parameters
    ----------
    attributions, model, components : as for :func:`~coarpy.edit.sweep`.
    data : the attributions' examples, in order; the objective indexes them.
    objective : what to maximise (:class:`~coarpy.edit.Objective` or a function).
    k : the edit size, ``0 <= k <= n_components``.
    candidates : components measured per step, ``>= 1``.
    output, batch_size, progress : as for :func:`~coarpy.edit.sweep`.

    Returns
    -------
    Search, with ``n_evaluations = 1 + k * candidates`` (fewer where fewer components
    remain).

    Raises
    ------
    EditError
        Bad sizes, data or attributions of another model.
    """
    attr = attributions
    check_compatible(attr, model, components)
    n = len(components)
    check_k(k, n)
    _check_count("candidates", candidates, 1)
    output_fn = _outputs.resolve(output)
    every, examples, (rows, local) = _rows_of(data, model, objective, batch_size)
    check_data(attr, every)
    weights = attr.weights.detach().cpu().double()[rows]  # (|rows|, N)
    keep = torch.ones(n, dtype=torch.bool)  # the edit so far
    chosen: list[int] = []
    bar = progress_bar(k + 1, progress, desc="refine", unit="step")
    try:
        with _measuring(model, components, examples, output_fn, "refine") as measure:
            base = measure(keep[None])[0]  # (|rows|,)
            current = base
            values = [values_of(local, current[None], base)[0]]
            runs = 1
            bar.update(1)
            for _ in range(k):
                remaining = keep.nonzero().flatten()
                predicted = predicted_values(local, current, weights, base, remaining)
                picked = remaining[rank(predicted)[:candidates]]
                measured = measure(_with_one_more(keep, picked))  # (len(picked), |rows|)
                runs += len(picked)
                measured_values = values_of(local, measured, base)
                best = int(rank(measured_values)[0])
                j = int(picked[best])
                chosen.append(j)
                keep[j] = False
                current = measured[best]
                values.append(measured_values[best])
                bar.update(1)
    finally:
        bar.close()
    return Search(torch.tensor(chosen, dtype=torch.long), torch.stack(values), runs, "refine")


def oracle(
    model: nn.Module,
    components: Components,
    data: Any,
    *,
    objective: Objective | ObjectiveFn,
    k: int,
    budget: int | None = None,
    leave_one_out: Attributions | None = None,
    output: _outputs.OutputFn | str = _outputs.margin,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> Search:
    """The greedy ``k``-component edit chosen by running the model: a yardstick for edits.

    At each step every component not yet chosen is ablated on top of the edit so far,
    the model runs, and the component whose ablation gives the best measured
    objective is added (ties: the lower index). No attribution is involved, so on the
    examples searched this is the best edit a one-at-a-time search can find; report
    attribution-based edits of the same size next to it.

    Parameters
    ----------
    model, components : the model and its components.
    data : the examples the objective indexes (use the same split as the edits it is
        compared with).
    objective : what to maximise (:class:`~coarpy.edit.Objective` or a function).
    k : the edit size, ``0 <= k <= n_components``.
    budget : the most edits to run (None: no limit, the exact greedy search). The
        first step measures every component alone; with a budget, each later step
        measures only ``(budget - 1 - first) // (k - 1)`` candidates (``first`` is
        ``n_components``, or 0 with ``leave_one_out``): those whose first-step effects,
        added to the measured outputs of the edit so far, predict the best values.
    leave_one_out : leave-one-out attributions (:func:`coarpy.baselines.leave_one_out`)
        of this model on these examples with the same output function. The first step
        is then read off them (the output without component j is ``f(full) - w_j``),
        so it runs no model: compute them once and share them with the comparison.
    output, batch_size, progress : as for :func:`~coarpy.edit.sweep`.

    Returns
    -------
    Search with the order, the measured values and the number of edits run.

    Raises
    ------
    EditError
        Bad sizes, a budget too small for ``k`` steps, or ``leave_one_out`` that is not
        leave-one-out attributions of this model on these examples.
    """
    n = len(components)
    check_k(k, n)
    output_fn = _outputs.resolve(output)
    every, examples, (rows, local) = _rows_of(data, model, objective, batch_size)
    singles = None
    if leave_one_out is not None:
        singles = _leave_one_out_weights(leave_one_out, model, components, every, output_fn)
        singles = singles[rows]  # (|rows|, N)
    first = 0 if singles is not None else n
    pool = None
    if budget is not None:
        _check_count("budget", budget, 1)
        need = 1 + first + max(k - 1, 0)
        if budget < need:
            raise EditError(
                f"budget={budget} edits cannot run a {k}-step search over {n} components: it "
                f"needs at least {need} (the unedited model, {first} for the first step, one "
                "per later step). Raise the budget, lower k, or pass leave_one_out= to read "
                "the first step off leave-one-out attributions."
            )
        if k > 1:
            pool = (budget - 1 - first) // (k - 1)
    keep = torch.ones(n, dtype=torch.bool)
    chosen: list[int] = []
    effects = None  # (|rows|, N): the measured change of each example when j alone is ablated
    bar = progress_bar(k + 1, progress, desc="oracle", unit="step")
    try:
        with _measuring(model, components, examples, output_fn, "oracle") as measure:
            base = measure(keep[None])[0]  # (|rows|,)
            current = base
            values = [values_of(local, base[None], base)[0]]
            runs = 1
            bar.update(1)
            for step in range(k):
                remaining = keep.nonzero().flatten()
                if step == 0 and singles is not None:
                    candidates = remaining
                    measured = base[None, :] - singles.T  # (N, |rows|): f without j
                elif step == 0 or pool is None or pool >= len(remaining):
                    candidates = remaining
                    measured = measure(_with_one_more(keep, candidates))
                    runs += len(candidates)
                else:  # screen: first-step effects added to the measured outputs so far
                    predicted = predicted_values(local, current, effects, base, remaining)
                    candidates = remaining[rank(predicted)[:pool]]
                    measured = measure(_with_one_more(keep, candidates))
                    runs += len(candidates)
                if step == 0:
                    effects = (base[None, :] - measured).T  # (|rows|, N)
                measured_values = values_of(local, measured, base)
                best = int(rank(measured_values)[0])
                j = int(candidates[best])
                chosen.append(j)
                keep[j] = False
                current = measured[best]
                values.append(measured_values[best])
                bar.update(1)
    finally:
        bar.close()
    return Search(torch.tensor(chosen, dtype=torch.long), torch.stack(values), runs, "oracle")


def _leave_one_out_weights(
    attr: Attributions,
    model: nn.Module,
    components: Components,
    every: ExampleSet,
    output_fn: _outputs.OutputFn,
) -> Tensor:
    """The weights (E, N) float64 of leave-one-out attributions checked against the setup."""
    if not isinstance(attr, Attributions) or recorded(attr, "method") != "leave_one_out":
        got = recorded(attr, "method") if isinstance(attr, Attributions) else type(attr).__name__
        raise EditError(
            f"leave_one_out must be attributions from coarpy.baselines.leave_one_out, got "
            f"{got!r}. Compute them with baselines.leave_one_out(model, components, data)."
        )
    check_compatible(attr, model, components)
    check_data(attr, every)
    made_with = recorded(attr, "output")
    if made_with is not None and made_with != _outputs.name_of(output_fn):
        raise EditError(
            f"leave_one_out was computed with output {made_with!r}, but the search uses "
            f"{_outputs.name_of(output_fn)!r}. Compute it with the same output function."
        )
    return attr.weights.detach().cpu().double()
