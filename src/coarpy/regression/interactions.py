"""Pairwise interactions over each example's top components: an optional second-order model.

At larger ablation fractions the linear model ``b + w . v`` loses correlation: ablating
two components together can cost more (or less) than the sum of ablating each.
:class:`PairwiseInteractions` adds, per example ``e``, the terms::

    sum_{i < j in top_k(e)} u_eij (a_i - abar_i) (a_j - abar_j)

over the ``top`` components with the largest ``|w_ei|`` of a fitted linear model,
``a = 1 - v`` the ablated indicator and ``abar`` its mean over the rows. For masks that
ablate components independently these centred products are orthogonal to the
intercept and to every linear term, so they are fitted to the linear model's residuals
on the same rows: one ridge per example over ``top * (top - 1) / 2`` features, its
penalty chosen by generalised cross-validation from a grid that includes 0 (least
squares) and "no pairs" (an infinite penalty), so the pairs are used only where GCV
says they predict. ``bench/interactions.py`` measures what it gains
(``bench/RESULTS_efficiency.md``, "Beyond linear").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..attributions import Attributions
from ..errors import FitError

L2_RELATIVE = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # x mean eigenvalue / n


def _arrays(source: Any) -> tuple[Tensor, Tensor]:
    """(masks (n, N) bool, outputs (n, E) float64) of a store or a (masks, outputs) tuple."""
    if isinstance(source, tuple) and len(source) == 2:
        V, Y = (torch.as_tensor(x) for x in source)
    elif hasattr(source, "masks") and hasattr(source, "outputs"):
        V, Y = source.masks(), source.outputs()
    else:
        raise FitError(
            "PairwiseInteractions.fit expects a ComponentDataset or a (masks, outputs) "
            f"tuple, got {type(source).__name__}."
        )
    if V.ndim != 2 or Y.ndim != 2 or V.shape[0] != Y.shape[0]:
        raise FitError(
            f"masks (n, N) and outputs (n, E) must share n, got {tuple(V.shape)} and "
            f"{tuple(Y.shape)}."
        )
    return V.bool(), Y.double()


class PairwiseInteractions:
    """Second-order terms over each example's ``top`` components, on a linear fit.

    Parameters
    ----------
    attributions : Attributions
        The linear model (``coarpy.fit`` on the same rows); its weights choose each
        example's top components and its predictions give the residuals.
    top : int
        Components per example whose pairs get a term (``top * (top - 1) / 2`` terms).

    Attributes
    ----------
    pairs_ : Tensor (n_examples, n_pairs, 2) int64, component indices ``i < j`` by rank
    weights_ : Tensor (n_examples, n_pairs) float64, ``u`` (zero where no pairs are used)
    bias_ : Tensor (n_examples,) float64, added to the linear model's bias
    centre_ : Tensor (n_components,) float64, ``abar``
    l2_ : Tensor (n_examples,) chosen penalty per row (``inf``: no pairs)

    Examples
    --------
    >>> import itertools
    >>> V = torch.tensor(list(itertools.product([0, 1], repeat=3)) * 4).bool()  # (32, 3)
    >>> a = 1.0 - V.double()
    >>> w = torch.tensor([3.0, -2.0, 0.5], dtype=torch.float64)
    >>> Y = (1.0 + V.double() @ w + 3.0 * a[:, 0] * a[:, 1])[:, None]  # one interaction
    >>> from coarpy.regression import fit
    >>> linear = fit((V, Y), method="ols", progress=False)
    >>> pw = PairwiseInteractions(linear, top=2).fit((V, Y))
    >>> pw.pairs_[0].tolist(), [round(u, 6) for u in pw.weights_[0].tolist()]
    ([[0, 1]], [3.0])
    >>> bool(torch.allclose(pw.predict(V), Y))
    True
    """

    def __init__(self, attributions: Attributions, *, top: int = 20):
        self.attributions = attributions
        self.top = top

    @torch.no_grad()
    def fit(self, source: Any) -> PairwiseInteractions:
        """Fit the pair terms on a ComponentDataset or ``(masks, outputs)``; returns self."""
        attr = self.attributions
        if not isinstance(attr, Attributions):
            raise FitError(f"attributions must be an Attributions, got {type(attr).__name__}.")
        V, Y = _arrays(source)
        n, N = V.shape
        E = Y.shape[1]
        if attr.weights.shape != (E, N):
            raise FitError(
                f"attributions have weights {tuple(attr.weights.shape)}, but the rows have "
                f"{E} examples and {N} components. Fit the linear model on the same rows."
            )
        if isinstance(self.top, bool) or not isinstance(self.top, int) or not 2 <= self.top <= N:
            raise FitError(f"top must be an int in [2, {N}], got {self.top!r}.")
        k = self.top
        top = attr.weights.abs().topk(k, dim=1).indices.sort(1).values  # (E, k)
        i, j = torch.triu_indices(k, k, offset=1)
        self.pairs_ = torch.stack([top[:, i], top[:, j]], 2)  # (E, P, 2)
        A = 1.0 - V.double()  # (n, N) ablated
        self.centre_ = A.mean(0)
        A -= self.centre_
        resid = Y - attr.predict(V).double()  # (n, E)
        P = self.pairs_.shape[1]
        self.weights_ = torch.zeros(E, P, dtype=torch.float64)
        self.bias_ = torch.zeros(E, dtype=torch.float64)
        self.l2_ = torch.full((E,), float("inf"), dtype=torch.float64)
        rel = torch.tensor(L2_RELATIVE, dtype=torch.float64)
        for e in range(E):
            Z = A[:, self.pairs_[e, :, 0]] * A[:, self.pairs_[e, :, 1]]  # (n, P)
            zm = Z.mean(0)
            Z -= zm
            r = resid[:, e]
            rm = r.mean()
            r = r - rm
            U, s, Vt = torch.linalg.svd(Z, full_matrices=False)
            d = s * s  # (m,)
            keep = d > float(d.max()) * max(n, P) * torch.finfo(d.dtype).eps if d.numel() else d > 0
            p = U.T @ r  # (m,)
            base = float(r @ r)
            best, pick = n * base / (n - 1.0) ** 2, None  # no pairs: df = 1 (the intercept)
            for lam in (rel * float(d.mean())).tolist():
                f = torch.where(keep, d / (d + lam).clamp_min(1e-300), 0.0)  # (m,)
                rss = max(base - float((f * (2 - f) * p * p).sum()), 0.0)
                df = 1.0 + float(f.sum())
                if n - df < 0.5:
                    continue
                g = n * rss / (n - df) ** 2
                if g < best:
                    best, pick = g, lam
            if pick is not None:
                filt = torch.where(keep, s / (d + pick).clamp_min(1e-300), 0.0)
                self.weights_[e] = Vt.T @ (filt * p)
                self.l2_[e] = pick / n
            self.bias_[e] = rm - zm @ self.weights_[e]
        return self

    def predict(self, masks: Tensor) -> Tensor:
        """Outputs (n, n_examples) float64 under keep-masks (n, n_components): the linear
        model's prediction plus the pair terms."""
        V = torch.as_tensor(masks)
        A = 1.0 - V.double()
        A -= self.centre_
        out = self.attributions.predict(V).double()  # (n, E)
        for e in range(out.shape[1]):
            Z = A[:, self.pairs_[e, :, 0]] * A[:, self.pairs_[e, :, 1]]
            out[:, e] += Z @ self.weights_[e] + self.bias_[e]
        return out
