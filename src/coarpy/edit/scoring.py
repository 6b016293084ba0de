"""Coar-Edit's scores and selection: which components to ablate, and the edited copy.

Given attributions over a set of examples, *targets* T (the behaviour to change) and
*references* R (the behaviour to keep), every component gets a t statistic of its
attribution weights on T against R. Two statistics, one keyword (``statistic=``):

- ``"welch"`` (the paper's, the default): Welch's t between the two groups, for
  unpaired sets (a class against the rest, one error against the correct examples)::

      score_j = (mean_T w_j - mean_R w_j) / sqrt(var_T w_j / |T| + var_R w_j / |R|)

  with population variances, as in the paper.
- ``"paired"``: a paired t of the per-pair differences ``d_ij = w[T_i, j] - w[R_i, j]``,
  for sets that pair up one to one (the same input with and without a trigger, a
  patch or an inserted word): ``score_j = mean_i d_ij / (sd_i d_ij / sqrt(n))``, with
  the sample standard deviation. Each target is compared with its own reference, so
  what the inputs share cancels and only the difference (the trigger) is scored.

A weight is the output gained by keeping a component, so a very negative score marks
a component that holds the targets down relative to the references: ablating the
``k`` most negative ones raises the target outputs relative to the references
(``direction="raise"``), ablating the ``k`` most positive lowers them (``"lower"``).
``apply`` zeroes the selected components' weights in a copy of the model, with
:func:`coarpy.ablation.apply_ablation`.
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
from ._checks import (
    Rows,
    check_direction,
    check_k,
    check_selected,
    check_statistic,
    example_pairs,
    example_sets,
)


def scores(
    attributions: Attributions,
    targets: Rows,
    references: Rows | None = None,
    *,
    statistic: str = "welch",
) -> Tensor:
    """A t statistic of every component between its target and reference weights.

    ``statistic="welch"`` (default): Welch's t, ``(mean_T w - mean_R w) /
    sqrt(var_T / |T| + var_R / |R|)`` with population variances (divided by the group
    size, as in the paper). Use it when targets and references are different inputs.

    ``statistic="paired"``: the paired t of the differences ``d_i = w[targets[i]] -
    w[references[i]]``, ``mean(d) / (sd(d) / sqrt(n))`` with the sample standard
    deviation (divided by ``n - 1``). Use it when ``targets[i]`` and ``references[i]``
    are the same input with and without the feature to edit (a trigger, a patch, an
    inserted word): what the two share cancels pair by pair, so a component that
    reads only the feature scores far from zero even when its weight varies a lot from
    one input to the next. Needs two or more pairs, given in matching order (bool
    masks pair in ascending index order).

    Where the variance term is zero the statistic is its limit: ``+inf`` or ``-inf``
    by the sign of the mean difference, and 0 when the mean difference is 0 too.

    Parameters
    ----------
    attributions : any attributions (COAR's or a baseline's).
    targets, references : example indices (rows of ``attributions.weights``) or bool masks over
        them; ``references=None`` takes every example that is not a target (Welch only).
    statistic : ``"welch"`` or ``"paired"``.

    Returns
    -------
    Tensor, shape (n_components,), float64 on the CPU.

    Raises
    ------
    EditError
        If a set is empty, holds a bad index, or the sets overlap; for ``"paired"``, if
        the sets differ in size, hold fewer than two pairs, or references is None.

    Examples
    --------
    >>> import torch
    >>> attr = Attributions(
    ...     weights=torch.tensor([[-2.0, 1.0], [-4.0, 1.0], [1.0, 1.0], [3.0, 1.0]]),
    ...     bias=torch.zeros(4), names=["fc:0", "fc:1"])
    >>> scores(attr, [0, 1], [2, 3]).tolist()
    [-5.0, 0.0]
    >>> scores(attr, [0, 1], [2, 3], statistic="paired").tolist()  # d_0 = (-3, -7)
    [-2.5, 0.0]
    """
    check_statistic(statistic)
    w = attributions.weights.detach().cpu().double()  # (E, N)
    if statistic == "paired":
        t, r = example_pairs(targets, references, attributions.n_examples)
        d = w[t] - w[r]  # (n_pairs, N): one difference per pair
        diff = d.mean(0)  # (N,)
        var = d.var(0, correction=1) / len(t)  # (N,): squared standard error of the mean
    else:
        t, r = example_sets(targets, references, attributions.n_examples)
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
