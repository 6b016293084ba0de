"""Coar-Edit's scores and selection: which components to ablate, and the edited copy.

Given attributions over a set of examples, *targets* T (the behaviour to change) and
*references* R (the behaviour to keep), every component gets Welch's t statistic
between its attribution weights on T and on R::

    score_j = (mean_T w_j - mean_R w_j) / sqrt(var_T w_j / |T| + var_R w_j / |R|)

with population variances, as in the paper. A weight is the output gained by keeping
a component, so a very negative score marks a component that holds the targets down
relative to the references: ablating the ``k`` most negative ones raises the target
outputs relative to the references (``direction="raise"``), ablating the ``k`` most
positive lowers them (``"lower"``). ``apply`` zeroes the selected components' weights
in a copy of the model, with :func:`coarpy.ablation.apply_ablation`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..ablation import apply_ablation
from ..attributions import Attributions
from ..components import Components
from ..errors import EditError
from ._checks import Rows, check_direction, check_k, check_selected, example_sets


def scores(attributions: Attributions, targets: Rows, references: Rows | None = None) -> Tensor:
    """Welch's t statistic of every component between target and reference weights.

    ``(mean_T w - mean_R w) / sqrt(var_T / |T| + var_R / |R|)`` with population
    variances (divided by the group size, as in the paper). Where both variances are
    zero the statistic is the limit: ``+inf`` or ``-inf`` by the sign of the mean
    difference, and 0 when the means are equal too.

    Parameters
    ----------
    attributions : any attributions (COAR's or a baseline's).
    targets, references : example indices (rows of ``attributions.weights``) or bool masks over
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
    t, r = example_sets(targets, references, attributions.n_examples)
    w = attributions.weights.detach().cpu().double()  # (E, N)
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
    check_direction(direction)
    if not isinstance(scores, Tensor) or scores.ndim != 1:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise EditError(
            f"scores must be a 1-D tensor (one score per component), got {got}. Compute them "
            "with coarpy.edit.scores(attr, targets, references)."
        )
    n = scores.shape[0]
    check_k(k, n)
    if bool(torch.isnan(scores).any()):
        raise EditError(
            f"scores holds NaN at component {int(torch.isnan(scores).nonzero()[0])}; a score "
            "must be a number to rank components. Check the attributions for NaN weights."
        )
    order = torch.sort(scores.cpu(), descending=direction == "lower", stable=True).indices
    return order[:k].clone()


def apply(model: nn.Module, components: Components, selected: Sequence[int] | Tensor) -> nn.Module:
    """A copy of ``model`` with the ``selected`` components' weights zeroed.

    The copy is a plain module (no hooks), so it runs, saves and loads without coarpy;
    the original is untouched. This is the paper's ablation, the one ``ablate`` and
    ``collect`` reproduce with hooks (a conv channel followed by BatchNorm becomes a
    constant channel).

    Parameters
    ----------
    model, components : the model and its components.
    selected : flat component indices, e.g. from :func:`select`.

    Raises
    ------
    EditError
        ``selected`` is not a list of distinct component indices in range.
    """
    idx = check_selected(selected, len(components))
    keep = torch.ones(len(components), dtype=torch.bool)  # (N,)
    keep[idx] = False
    return apply_ablation(model, components, keep)
