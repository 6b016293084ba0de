"""Correlation along the mask axis, per example: Pearson's r and Spearman's rho.

Inputs are (n_masks, n_examples): predicted and true outputs over the same masks.
A column where either input is constant or not finite has no correlation (NaN).
``coarpy.evaluate`` re-exports these functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import EvaluationError

__all__ = ["average_ranks", "pearson", "spearman", "undefined"]


def undefined(*tensors: Tensor) -> Tensor:
    """Columns where a correlation is undefined: constant or non-finite in any input."""
    bad = torch.zeros(tensors[0].shape[1:], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        bad |= (t.amax(0) == t.amin(0)) | ~torch.isfinite(t).all(0)
    return bad


def _pearson(x: Tensor, y: Tensor) -> Tensor:
    xc = x - x.mean(0)  # (n, E)
    yc = y - y.mean(0)
    r = (xc * yc).sum(0) / torch.sqrt((xc * xc).sum(0) * (yc * yc).sum(0))  # (E,)
    return r.clamp(-1.0, 1.0)


def _check_pair(pred: Tensor, true: Tensor) -> tuple[Tensor, Tensor]:
    if pred.shape != true.shape or pred.ndim < 1 or pred.shape[0] < 2:
        raise EvaluationError(
            f"pred and true must have the same shape (n_masks, ...) with n_masks >= 2, got "
            f"{tuple(pred.shape)} and {tuple(true.shape)}."
        )
    return pred.double(), true.double()


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..n along dim 0, ties given the average of their ranks (float64).

    Examples
    --------
    >>> average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist()
    [3.5, 1.0, 3.5, 2.0]
    """
    n = x.shape[0]
    values, order = torch.sort(x, dim=0, stable=True)  # (n, ...)
    pos = torch.arange(n, device=x.device).view(-1, *([1] * (x.ndim - 1))).expand(values.shape)
    differs = values[1:] != values[:-1]  # (n-1, ...): a new group of ties starts below
    edge = torch.ones_like(values[:1], dtype=torch.bool)
    starts = torch.cat([edge, differs])
    ends = torch.cat([differs, edge])
    first = torch.where(starts, pos, 0).cummax(0).values  # first position of each tie group
    last = torch.where(ends, pos, n - 1).flip(0).cummin(0).values.flip(0)
    mean_rank = (first + last).double() / 2 + 1
    return torch.empty_like(mean_rank).scatter_(0, order, mean_rank)


def pearson(pred: Tensor, true: Tensor) -> Tensor:
    """Pearson's r along dim 0, per column: (n, E), (n, E) -> (E,) float64.

    Columns where either input is constant or not finite have no correlation: NaN.

    Examples
    --------
    >>> pearson(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[2.0], [4.0], [7.0]]))
    tensor([0.9934], dtype=torch.float64)
    """
    x, y = _check_pair(pred, true)
    return torch.where(undefined(x, y), torch.nan, _pearson(x, y))


def spearman(pred: Tensor, true: Tensor) -> Tensor:
    """Spearman's rho along dim 0 (Pearson's r of average ranks): (n, E) -> (E,) float64.

    Examples
    --------
    >>> spearman(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[2.0], [4.0], [7.0]]))
    tensor([1.], dtype=torch.float64)
    """
    x, y = _check_pair(pred, true)
    rho = _pearson(average_ranks(x), average_ranks(y))
    return torch.where(undefined(x, y), torch.nan, rho)
