"""Learning curves: held-out correlation of attributions against the number of masks.

For each size ``n``, attributions are fitted with :func:`coarpy.regression.fit` on the
first ``n`` rows of a component dataset and their predictions on held-out masks are
correlated, per example, with the true outputs. More masks should give a curve that
rises and flattens; where it is still rising, collecting more masks pays.

This module computes curves; :func:`coarpy.report.plot_learning_curve` draws one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .attributions import Attributions
from .errors import EvaluationError
from .evaluate import pearson, spearman
from .regression import fit
from .store import ComponentDataset

MIN_STORE_ROWS = 40  # store_learning_curve without heldout: 10 held out, 30 to fit on
_MIN_TRAIN_ROWS = 30


@dataclass(frozen=True)
class LearningCurve:
    """Held-out correlation of attributions fitted on the first ``n`` training rows.

    Attributes
    ----------
    sizes : the numbers of training rows, ascending.
    pearson : (n_sizes, n_examples) float64; NaN where undefined.
    spearman : same shape.
    n_heldout : the number of held-out masks the correlations are over.
    method : the regression method (``coarpy.regression.fit``'s ``method``).
    heldout : where the held-out masks come from, in words (for captions).
    final : the attributions fitted on ``sizes[-1]`` rows, so that their predictions
        on the held-out masks can be drawn without another fit.
    keep : (n_heldout, n_components) bool, the held-out masks.
    true : (n_heldout, n_examples), the model's outputs under them.
    """

    sizes: tuple[int, ...]
    pearson: Tensor
    spearman: Tensor
    n_heldout: int
    method: str
    heldout: str = "held-out masks"
    final: Attributions | None = field(default=None, repr=False, compare=False)
    keep: Tensor | None = field(default=None, repr=False, compare=False)
    true: Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def mean_pearson(self) -> Tensor:
        """Mean over examples of Pearson's r, per size: (n_sizes,) float64."""
        return torch.nanmean(self.pearson, dim=1)

    @property
    def pearson_se(self) -> Tensor:
        """Standard error over examples of the mean Pearson's r, per size: (n_sizes,)
        float64 (NaN with fewer than two defined examples)."""
        return standard_error(self.pearson)

    @property
    def mean_spearman(self) -> Tensor:
        """Mean over examples of Spearman's rho, per size: (n_sizes,) float64."""
        return torch.nanmean(self.spearman, dim=1)

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per size: ``n_masks``, ``pearson_mean``, ``spearman_mean``."""
        return [
            {"n_masks": n, "pearson_mean": float(p), "spearman_mean": float(s)}
            for n, p, s in zip(
                self.sizes, self.mean_pearson.tolist(), self.mean_spearman.tolist(), strict=True
            )
        ]


def learning_curve(
    train: ComponentDataset | tuple[Tensor, Tensor],
    keep: Tensor,
    true: Tensor,
    *,
    sizes: Sequence[int] | None = None,
    method: str = "ridge",
    seed: int = 0,
    groups: Sequence[Any] | None = None,
) -> LearningCurve:
    """Held-out correlation against the number of training masks.

    For each ``n`` in ``sizes``, attributions are fitted with
    :func:`coarpy.regression.fit` on the first ``n`` finished rows of ``train`` and
    correlated, per example, with the true outputs on the held-out masks.

    Parameters
    ----------
    train : the training store, or in-memory ``(masks (n, N), outputs (n, E))``.
    keep : Tensor, shape (n_heldout, N)
        Held-out masks (never among the training rows).
    true : Tensor, shape (n_heldout, E)
        The model's outputs under them.
    sizes : numbers of training rows; default six sizes spaced geometrically up to
        all rows.
    method, seed : passed to ``fit``.
    groups : ``method="group"`` only: the group of each component (passed to ``fit``).

    Returns
    -------
    LearningCurve

    Raises
    ------
    EvaluationError
        If the held-out masks do not match the training rows, or a size is below 2
        or above the rows available.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> V = torch.rand(300, 5, generator=g) > 0.2
    >>> Y = V.float() @ torch.tensor([[1.0], [-2.0], [0.5], [0.0], [3.0]]) + 1.0
    >>> curve = learning_curve((V[:250], Y[:250]), V[250:], Y[250:], sizes=(50, 250),
    ...                        method="ols")
    >>> curve.mean_pearson.round(decimals=6).tolist()
    [1.0, 1.0]
    """
    V, Y = _as_arrays(train, "train")  # (n, N) bool, (n, E) float32
    return _curve(V, Y, keep, true, sizes=sizes, method=method, seed=seed, groups=groups)


def store_learning_curve(
    store: ComponentDataset,
    *,
    heldout: ComponentDataset | tuple[Tensor, Tensor] | None = None,
    sizes: Sequence[int] | None = None,
    method: str = "ridge",
    seed: int = 0,
) -> LearningCurve:
    """The learning curve of a store, held out on ``heldout`` or on its own last rows.

    Without ``heldout``, the store's last ``min(max(n // 5, 10), 1000)`` rows are held
    out from every fit (its masks are drawn independently, so they are as fresh as
    a held-out store's) and the fits use the rows before them.

    Parameters
    ----------
    store : the training store.
    heldout : a held-out store or in-memory ``(masks, outputs)``; default the store's
        last rows.
    sizes, method, seed : as for :func:`learning_curve`.

    Returns
    -------
    LearningCurve
        Its ``heldout`` says which masks were held out.

    Raises
    ------
    EvaluationError
        If ``heldout`` is None and the store has fewer than ``MIN_STORE_ROWS``
        finished rows, or as :func:`learning_curve`.
    """
    if not isinstance(store, ComponentDataset):
        raise EvaluationError(
            f"store must be a ComponentDataset, got {type(store).__name__}. For in-memory "
            "(masks, outputs) use learning_curve(train, keep, true)."
        )
    V, Y = store.masks(), store.outputs()  # (n, N) bool, (n, E) float32
    if heldout is not None:
        keep, true = _as_arrays(heldout, "heldout")
        return _curve(V, Y, keep, true, sizes=sizes, method=method, seed=seed)
    n = V.shape[0]
    n_hold = min(max(n // 5, 10), 1000)
    if n - n_hold < _MIN_TRAIN_ROWS:
        raise EvaluationError(
            f"The store has {n} finished rows; at least {MIN_STORE_ROWS} are needed to fit "
            "on some and hold out the rest. Collect more masks, or pass heldout=."
        )
    label = f"the store's last {n_hold} rows, held out from every refit"
    train_V, train_Y = V[: n - n_hold], Y[: n - n_hold]  # (n - n_hold, N), (n - n_hold, E)
    keep, true = V[n - n_hold :], Y[n - n_hold :]  # (n_hold, N), (n_hold, E)
    return _curve(train_V, train_Y, keep, true, sizes=sizes, method=method, seed=seed, label=label)


def _curve(
    V: Tensor,
    Y: Tensor,
    keep: Tensor,
    true: Tensor,
    *,
    sizes: Sequence[int] | None,
    method: str,
    seed: int,
    label: str | None = None,
    groups: Sequence[Any] | None = None,
) -> LearningCurve:
    true = _check_heldout(keep, true, V.shape[1], Y.shape[1])
    sizes = _check_sizes(sizes, V.shape[0])
    pearsons, spearmans = [], []
    for n in sizes:
        extra = {} if groups is None else {"groups": groups}
        attr = fit((V[:n], Y[:n]), method=method, seed=seed, progress=False, **extra)
        pred = attr.predict(keep).double().cpu()  # (n_heldout, E)
        pearsons.append(pearson(pred, true))
        spearmans.append(spearman(pred, true))
    return LearningCurve(
        sizes=tuple(sizes),
        pearson=torch.stack(pearsons),
        spearman=torch.stack(spearmans),
        n_heldout=keep.shape[0],
        method=method,
        heldout=label or f"{keep.shape[0]} held-out masks",
        final=attr,  # the fit on the most rows (sizes is never empty)
        keep=keep,
        true=true,
    )


def standard_error(values: Tensor) -> Tensor:
    """SE over the last dimension of the mean of the finite entries: (n_sizes,) float64."""
    ok = torch.isfinite(values)
    count = ok.sum(dim=-1)  # (n_sizes,)
    mean = torch.nanmean(values, dim=-1, keepdim=True)
    sq = torch.where(ok, (values - mean) ** 2, torch.zeros_like(values)).sum(dim=-1)
    var = sq / (count - 1).clamp(min=1)
    se = (var / count.clamp(min=1)).sqrt()
    return torch.where(count >= 2, se, torch.full_like(se, float("nan")))


def _as_arrays(source: Any, what: str) -> tuple[Tensor, Tensor]:
    if isinstance(source, ComponentDataset):
        return source.masks(), source.outputs()
    if isinstance(source, tuple) and len(source) == 2:
        keep, out = source
        if isinstance(keep, Tensor) and isinstance(out, Tensor):
            return keep, out
    raise EvaluationError(
        f"{what} must be a ComponentDataset or a tuple (masks (n, N), outputs (n, E)) of "
        f"tensors, got {type(source).__name__}."
    )


def _check_heldout(keep: Tensor, true: Tensor, n_components: int, n_examples: int) -> Tensor:
    if not isinstance(keep, Tensor) or not isinstance(true, Tensor):
        raise EvaluationError(
            f"keep and true must be tensors, got {type(keep).__name__} and "
            f"{type(true).__name__}. Pass heldout_store.masks(), heldout_store.outputs()."
        )
    if keep.ndim != 2 or keep.shape[1] != n_components:
        raise EvaluationError(
            f"keep must have shape (n_masks, {n_components}), got {tuple(keep.shape)}. "
            "Pass masks over the components of the training rows."
        )
    if true.shape != (keep.shape[0], n_examples):
        raise EvaluationError(
            f"true must have shape ({keep.shape[0]}, {n_examples}) (one row per mask, one "
            f"column per example), got {tuple(true.shape)}."
        )
    if keep.shape[0] < 3:
        raise EvaluationError(
            f"A correlation over masks needs at least 3 masks, got {keep.shape[0]}. "
            "Collect more held-out masks."
        )
    return true.double().cpu()


def _default_sizes(n_rows: int) -> list[int]:
    smallest = min(n_rows, max(30, n_rows // 32))
    return sorted({int(round(v)) for v in np.geomspace(smallest, n_rows, 6)})


def _check_sizes(sizes: Sequence[int] | None, n_rows: int) -> list[int]:
    if sizes is None:
        return _default_sizes(n_rows)
    sizes = sorted({int(n) for n in sizes})
    if not sizes:
        raise EvaluationError(
            "sizes is empty; give the numbers of training rows, e.g. (100, 1000)."
        )
    if sizes[0] < 2 or sizes[-1] > n_rows:
        raise EvaluationError(
            f"sizes must lie between 2 and the {n_rows} training rows available, got "
            f"{sizes[0]} ... {sizes[-1]}. Drop the sizes above {n_rows} or collect more masks."
        )
    return sizes
