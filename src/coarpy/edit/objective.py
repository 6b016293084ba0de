"""What an edit should achieve, and the edit that the attributions predict achieves it best.

An *objective* values candidate edits by the outputs they give: ``objective(outputs,
base)`` takes the outputs of the examples under ``n`` edits, ``(n, n_examples)``, and
those of the unedited model, ``(n_examples,)``, and returns ``(n,)`` or ``(n,
n_columns)`` float values, larger being better; later columns only break ties in
earlier ones. :class:`Objective` is the built-in one: raise (or lower) the targets
while the references keep their behaviour, counted in accuracy or in mean output, with
reference damage beyond a ``tolerance`` paid at a ``penalty``. Any callable with that
signature works too (e.g. worst-group accuracy).

``select_predicted`` trades target gain against reference damage as the attributions
themselves predict them: a linear attribution predicts every example's output under
any keep-mask (ablating a set S moves example z's output by ``-sum_{j in S} w[z, j]``),
so the value of every candidate edit follows without running the model, and k
components are chosen greedily, one at a time, each the best addition to those already
chosen. Unlike a top-k by score, the choice sees the references' accuracy (a component
that fixes the targets by breaking many references is passed over once the references
are at the edge) and the targets already fixed (no gain is counted twice).
:mod:`coarpy.edit.search` measures the same objective on the real model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..attributions import Attributions
from ..errors import EditError
from ._checks import Rows, check_direction, check_k, example_sets

QUANTITIES = ("accuracy", "output")

# fn(outputs (n, E), base (E,)) -> (n,) or (n, n_columns); larger is better
ObjectiveFn = Callable[[Tensor, Tensor], Tensor]

_CHUNK_ELEMENTS = 1 << 22  # predicted outputs held at once (candidates x examples), 32 MiB


@dataclass(frozen=True, eq=False)
class Objective:
    """Raise (or lower) the targets' outputs while the references keep theirs.

    Called as ``objective(outputs, base)`` with outputs ``(n, n_examples)`` of ``n``
    edits and the unedited model's ``base`` ``(n_examples,)``; returns ``(n, 2)``
    float64. With ``s = +1`` for ``"raise"`` and ``-1`` for ``"lower"``:

    ``quantity="accuracy"`` (the default; for the margin output, a positive output is
    a correct prediction):

    - column 0: ``mean_T [s y > 0] - penalty * max(0, drop - tolerance)``, where
      ``drop`` is how much the share of references with ``y > 0`` fell below its
      unedited value;
    - column 1 (ties): ``mean_T min(s y, 0) + mean_R min(y, 0)``, the shortfall of the
      targets and references still on the wrong side, so that among edits that fix
      as many targets, the one that brings the others closest wins.

    ``quantity="output"``:

    - column 0: ``s mean_T y - penalty * max(0, mean_R (base - y) - tolerance)``;
    - column 1 (ties): ``-mean_R |y - base|``.

    Parameters
    ----------
    targets, references : example indices or bool masks over the examples;
        ``references=None`` takes every example that is not a target.
    direction : ``"raise"`` or ``"lower"`` (see :func:`~coarpy.edit.select`).
    quantity : ``"accuracy"`` or ``"output"``.
    tolerance : reference damage allowed for free (a share of references for
        ``"accuracy"``, an output difference for ``"output"``), ``>= 0``.
    penalty : the price of each unit of damage beyond the tolerance, ``>= 0``;
        ``math.inf`` makes the tolerance a hard limit.

    Examples
    --------
    >>> obj = Objective([0], [1, 2])
    >>> base = torch.tensor([-1.0, 2.0, 3.0])
    >>> obj(torch.tensor([[1.0, 2.0, 3.0], [1.0, -1.0, 3.0]]), base)[:, 0].tolist()
    [1.0, 0.5]
    """

    targets: Rows
    references: Rows | None = None
    direction: str = "raise"
    quantity: str = "accuracy"
    tolerance: float = 0.0
    penalty: float = 1.0

    def __post_init__(self) -> None:
        check_direction(self.direction)
        if self.quantity not in QUANTITIES:
            raise EditError(
                f"quantity must be 'accuracy' (share of examples with a positive output) or "
                f"'output' (mean output), got {self.quantity!r}."
            )
        for name in ("tolerance", "penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise EditError(
                    f"{name} must be a number >= 0 (math.inf allowed for penalty), got {value!r}."
                )
        if math.isinf(self.tolerance):
            raise EditError("tolerance must be finite; to ignore the references use penalty=0.")

    def rows(self, n_examples: int) -> tuple[Tensor, Tensor]:
        """The checked ``(targets, references)`` as int64 indices into ``n_examples``."""
        return example_sets(self.targets, self.references, n_examples)

    def __call__(self, outputs: Tensor, base: Tensor) -> Tensor:
        t, r = self.rows(outputs.shape[1])
        y = outputs.double()  # (n, E)
        b = base.double().to(y.device)  # (E,)
        s = 1.0 if self.direction == "raise" else -1.0
        yt, yr, br = s * y[:, t], y[:, r], b[r]  # (n, |T|), (n, |R|), (|R|,)
        if self.quantity == "accuracy":
            gain = (yt > 0).double().mean(1)  # (n,)
            drop = (br > 0).double().mean() - (yr > 0).double().mean(1)  # (n,)
            ties = yt.clamp(max=0).mean(1) + yr.clamp(max=0).mean(1)
        else:
            gain = yt.mean(1)
            drop = (br - yr).mean(1)
            ties = -(yr - br).abs().mean(1)
        excess = (drop - self.tolerance).clamp(min=0)  # (n,)
        cost = torch.where(excess > 0, self.penalty * excess, torch.zeros_like(excess))
        return torch.stack([gain - cost, ties], dim=1)  # (n, 2)


def restrict(objective: Any, n_examples: int) -> tuple[Tensor, Any]:
    """``(rows, objective on those rows)``: the examples an objective reads.

    An :class:`Objective` reads its targets and references only, so only those need
    to run; it is rewritten for outputs holding those columns (targets first). Any
    other callable reads every example.
    """
    if isinstance(objective, Objective):
        t, r = objective.rows(n_examples)
        n_t = len(t)
        local = Objective(
            torch.arange(n_t), torch.arange(n_t, n_t + len(r)), direction=objective.direction,
            quantity=objective.quantity, tolerance=objective.tolerance,
            penalty=objective.penalty,
        )  # fmt: skip
        return torch.cat([t, r]), local
    if not callable(objective):
        raise EditError(
            f"objective must be a coarpy.edit.Objective or a function (outputs, base) -> "
            f"values, got {type(objective).__name__}."
        )
    return torch.arange(n_examples), objective


def values_of(objective: Any, outputs: Tensor, base: Tensor) -> Tensor:
    """The objective's values as ``(n, n_columns)`` float64 on the CPU; NaN becomes -inf."""
    values = torch.as_tensor(objective(outputs, base))
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or values.shape[0] != outputs.shape[0]:
        raise EditError(
            f"The objective returned shape {tuple(values.shape)} for {outputs.shape[0]} edits; "
            f"it must return ({outputs.shape[0]},) or ({outputs.shape[0]}, n_columns)."
        )
    values = values.detach().double().cpu()
    return values.nan_to_num(nan=-math.inf)


def rank(values: Tensor) -> Tensor:
    """Row indices, best first: by column 0, ties by column 1, ...; then by index."""
    order = torch.arange(values.shape[0])
    for c in reversed(range(values.shape[1])):
        # stable sorts from the last key to the first give the lexicographic order
        order = order[torch.sort(values[order, c], descending=True, stable=True).indices]
    return order


def predicted_values(
    objective: Any, current: Tensor, weights: Tensor, base: Tensor, candidates: Tensor
) -> Tensor:
    """Values of adding each candidate to an edit, as the linear attributions predict them.

    ``current`` (E,) are the outputs with the edit so far, ``weights`` (E, N) the
    attributions' weights on the same examples, ``base`` (E,) the unedited outputs.
    Ablating component j moves the outputs by ``-weights[:, j]``. Returns
    ``(len(candidates), n_columns)``, computed in chunks of candidates.
    """
    step = max(1, _CHUNK_ELEMENTS // max(1, current.shape[0]))
    parts = []
    for i in range(0, len(candidates), step):
        cols = candidates[i : i + step]
        predicted = current[None, :] - weights[:, cols].T  # (chunk, E): ablating j drops w[:, j]
        parts.append(values_of(objective, predicted, base))
    return torch.cat(parts)


def select_predicted(
    attributions: Attributions,
    objective: Objective | ObjectiveFn,
    k: int,
    *,
    outputs: Tensor | None = None,
) -> Tensor:
    """The ``k`` components to ablate, chosen greedily on the attributions' predictions.

    Step by step, every component not yet chosen is tried as the next one: the
    attributions predict each example's output with the chosen ones and it ablated
    (``outputs - sum of their weights``), the objective values that prediction, and
    the best is added (ties: the lower index). The model never runs.

    Parameters
    ----------
    attributions : any attributions (COAR's or a baseline's) over the examples the
        objective indexes.
    objective : an :class:`Objective` (e.g. ``Objective(targets, references,
        tolerance=0.02)``) or a function ``(outputs, base) -> values``.
    k : the number of components, ``0 <= k <= n_components``.
    outputs : the unedited model's measured outputs on the examples, shape
        ``(n_examples,)``; predictions start from them, and they are the objective's
        ``base``. Default: the attributions' own prediction with nothing ablated
        (``bias + weights.sum(1)``). Pass measured outputs when the attributions'
        bias is not exact there (COAR's is fitted at the training ablation fraction).

    Returns
    -------
    Tensor, shape (k,), int64: component indices in the order chosen; the first ``i``
    are the predicted best edit of size ``i`` built this way, so the order can be
    swept (``edit.sweep(..., order=...)``).

    Raises
    ------
    EditError
        A bad ``k``, bad example sets, or ``outputs`` of the wrong shape.

    Examples
    --------
    Ablating component a lifts the target by 3 and costs the reference 1, ablating b
    lifts the target by 2 and costs the reference 2, c changes nothing. At two units
    of target per unit of reference damage, a is worth it and b is not:

    >>> w = torch.tensor([[-3.0, -2.0, 0.0], [1.0, 2.0, 0.0]])  # (target, reference) x (a, b, c)
    >>> attr = Attributions(weights=w, bias=torch.zeros(2), names=["a", "b", "c"])
    >>> obj = Objective([0], [1], quantity="output", penalty=2.0)
    >>> select_predicted(attr, obj, 2).tolist()
    [0, 2]
    >>> from coarpy.edit import scores, select
    >>> select(scores(attr, [0], [1]), 2).tolist()  # the top 2 by Welch score take b
    [0, 1]
    """
    attr = attributions
    n_examples, n = attr.n_examples, attr.n_components
    check_k(k, n)
    weights = attr.weights.detach().cpu().double()  # (E, N)
    if outputs is None:
        base = attr.bias.detach().cpu().double() + weights.sum(1)  # (E,): nothing ablated
    else:
        base = torch.as_tensor(outputs).detach().cpu().double()
        if base.shape != (n_examples,):
            raise EditError(
                f"outputs must hold the unedited model's output for each of the "
                f"{n_examples} examples, shape ({n_examples},), got {tuple(base.shape)}."
            )
    rows, local = restrict(objective, n_examples)
    weights, base = weights[rows], base[rows]  # (|rows|, N), (|rows|,)
    current = base.clone()
    allowed = torch.ones(n, dtype=torch.bool)
    chosen: list[int] = []
    for _ in range(k):
        candidates = allowed.nonzero().flatten()
        values = predicted_values(local, current, weights, base, candidates)
        j = int(candidates[rank(values)[0]])
        chosen.append(j)
        allowed[j] = False
        current = current - weights[:, j]
    return torch.tensor(chosen, dtype=torch.long)
