"""The lasso, ``method="lasso"`` (:class:`LassoPath`): sparse attributions by FISTA.

Minimises, per example, ``(1/(2n)) * sum_i (y_i - b - w.v_i)**2 + l1 * ||w||_1``
(scikit-learn's ``Lasso(alpha=l1)`` exactly), by FISTA on the centred Gram matrix,
batched over examples, along a decreasing path of ``l1`` with warm starts. The default
grid is per example, ``l1_max[e] * 10**linspace(0, -4, 13)``, where ``l1_max[e]`` is
the smallest ``l1`` giving all-zero weights. ``l1`` is chosen per example on the
validation rows (the same split as ridge: a hash of ``(seed, row)``) and the model
refitted on all rows with it.

Memory is about ``s * (5 N**2 + 9 N E)`` bytes for ``N`` components, ``E`` examples
and ``s`` bytes per number; a fit that does not fit the budget is refused before
anything is allocated.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import FitError
from . import _stats

DEFAULT_L1_RELATIVE = tuple(10.0 ** np.linspace(0.0, -4.0, 13))  # times l1_max per example


def _lasso_bytes(N: int, E: int, s: int) -> int:
    return s * (5 * N * N + 9 * N * E) + _stats.BLOCK_BYTES


def _fista(
    G: Tensor, C: Tensor, n: int, l1: Tensor, W0: Tensor, L: float, *, max_iter: int, tol: float
) -> tuple[Tensor, int, int]:
    """Accelerated proximal gradient for min (1/2n) w.G w - (1/n) w.C + l1 |w|_1, per column.

    G (N, N) centred Gram, C (N, E) centred cross-products, l1 (E,), W0 (N, E) warm start,
    L the largest eigenvalue of G / n. Uses adaptive restart (momentum reset whenever it
    points uphill) and stops a column when its largest update is below tol * max|w|.
    Returns (W, iterations, columns not converged).
    """
    step = 1.0 / L
    thr = (l1 * step)[None, :]
    W = W0.clone()
    Z = W.clone()
    t = torch.ones(W.shape[1], dtype=W.dtype, device=W.device)
    active = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - reported below
        grad = (G @ Z - C) / n
        Wn = Z - step * grad
        Wn = torch.sign(Wn) * (Wn.abs() - thr).clamp_min(0.0)
        Wn = torch.where(active[None, :], Wn, W)
        diff = Wn - W
        t_new = (1.0 + torch.sqrt(1.0 + 4.0 * t * t)) / 2.0
        mom = (t - 1.0) / t_new
        uphill = ((Z - Wn) * diff).sum(0) > 0
        mom = torch.where(uphill, torch.zeros_like(mom), mom)
        t = torch.where(uphill, torch.ones_like(t), t_new)
        Z = Wn + mom[None, :] * diff
        scale = Wn.abs().amax(0).clamp_min(torch.finfo(W.dtype).tiny)
        active = active & (diff.abs().amax(0) > tol * scale)
        W = Wn
        if not bool(active.any()):
            break
    return W, it, int(active.sum())


def _lasso(
    parts: list[_stats.Moments],
    grid: Tensor | None,
    *,
    validate: bool,
    max_iter: int,
    tol: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor, dict]:
    """Returns (weights (N, E), bias (E,), l1 per example (E,), val_mse (K, E) or None,
    the (K, E) grid used, info)."""
    train = parts[0]
    mv, my = train.means()
    Gc = _stats.centered_gram_(train, mv)
    Cc = _stats.centered_cross_(train, mv, my)
    N, E = Cc.shape
    if grid is None:
        l1_max = Cc.abs().amax(0) / train.n  # (E,) smallest l1 with all-zero weights
        lam = torch.tensor(DEFAULT_L1_RELATIVE, dtype=Cc.dtype, device=Cc.device)
        lam = lam[:, None] * l1_max[None, :]  # (K, E)
    else:
        lam = grid[:, None].expand(grid.shape[0], E)
    info = {"lasso_iterations": 0, "lasso_unconverged": 0}

    def note(its: int, left: int) -> None:
        info["lasso_iterations"] = max(info["lasso_iterations"], its)
        info["lasso_unconverged"] = max(info["lasso_unconverged"], left)

    val_mse = None
    if validate:
        val = parts[1]
        L = float(torch.linalg.eigvalsh(Gc).max()) / train.n
        Suu = _stats.centered_gram_(val, mv)
        Suz = _stats.centered_cross_(val, mv, my)
        Szz = _stats.centered_yy(val, my)
        K = lam.shape[0]
        val_mse = torch.empty(K, E, dtype=Cc.dtype, device=Cc.device)
        W = torch.zeros_like(Cc)
        best = torch.zeros_like(Cc)
        best_mse = torch.full((E,), math.inf, dtype=Cc.dtype, device=Cc.device)
        choice = torch.zeros(E, dtype=torch.long, device=Cc.device)
        # Largest l1 first: warm starts then move from the sparse end of the path.
        for k in sorted(range(K), key=lambda k: -float(lam[k].max())):
            W, its, left = _fista(Gc, Cc, train.n, lam[k], W, L, max_iter=max_iter, tol=tol)
            note(its, left)
            sse = Szz - 2.0 * (W * Suz).sum(0) + (W * (Suu @ W)).sum(0)
            val_mse[k] = sse / val.n
            better = val_mse[k] < best_mse
            best_mse = torch.where(better, val_mse[k], best_mse)
            choice = torch.where(better, torch.full_like(choice, k), choice)
            best[:, better] = W[:, better]
        del Suu, Suz, Gc, Cc
        every = train.merge_(val)
        mv, my = every.means()
        Gc = _stats.centered_gram_(every, mv, inplace=True)
        Cc = _stats.centered_cross_(every, mv, my, inplace=True)
        chosen = lam.gather(0, choice[None, :])[0]
        W0 = best
    else:
        every = train
        chosen = lam[0]
        choice = torch.zeros(E, dtype=torch.long, device=Cc.device)
        W0 = torch.zeros_like(Cc)
    L = float(torch.linalg.eigvalsh(Gc).max()) / every.n
    W, its, left = _fista(Gc, Cc, every.n, chosen, W0, L, max_iter=max_iter, tol=tol)
    note(its, left)
    if info["lasso_unconverged"]:
        warnings.warn(
            f"FISTA reached max_iter={max_iter} with {info['lasso_unconverged']} examples not "
            f"converged to tol={tol:g}. Raise max_iter.",
            stacklevel=3,
        )
    bias = my - W.T @ mv
    return W, bias, chosen, val_mse, lam, info


@torch.no_grad()
def _fit_lasso(
    source: Any,
    *,
    l1_grid: Any,
    val_fraction: float,
    seed: int,
    device: Any,
    dtype: torch.dtype,
    max_memory: int | None,
    max_iter: int,
    tol: float | None,
    progress: bool | None,
) -> tuple[_stats.Source, _stats.Result]:
    _stats.check_common(val_fraction, dtype, seed, progress)
    max_iter = _stats.check_max_iter(max_iter)
    tol = _stats.default_tol(tol, dtype, float64=1e-7, float32=1e-5)
    src = _stats.Source(source)
    dev = _stats.resolve_device(device, src)
    N, E = src.n_components, src.n_examples
    grid = None if l1_grid is None else _stats.as_grid(l1_grid, "l1_grid", dtype, dev)
    validate = grid is None or grid.numel() > 1
    if validate and val_fraction <= 0:
        raise FitError(
            "Choosing l1 from a grid needs validation rows, but val_fraction=0. Pass "
            "val_fraction > 0 (e.g. 0.1) or a single l1 value."
        )
    s = torch.finfo(dtype).bits // 8
    _stats.need_memory(
        _lasso_bytes(N, E, s),
        _stats.budget(dev, max_memory),
        f"The lasso with {N} components and {E} examples",
        "Fit fewer components or examples at a time, use dtype=torch.float32, or use "
        "method='ridge' with solver='cg'.",
    )
    parts = _stats.accumulate(
        src,
        validate=validate,
        seed=seed,
        val_fraction=val_fraction,
        with_gram=True,
        device=dev,
        dtype=dtype,
        progress=progress,
    )
    _stats.check_rows(parts, validate=validate, val_fraction=val_fraction, need=2)
    n_all, n_t = sum(m.n for m in parts), parts[0].n
    n_v = parts[1].n if validate else 0
    _stats.mask_variance(parts[0])  # raises when every training mask is the same
    W, bias, l1, val_mse, lam, info = _lasso(
        parts, grid, validate=validate, max_iter=max_iter, tol=tol
    )
    meta = {
        "method": "lasso",
        "solver": "fista",
        "dtype": str(dtype).removeprefix("torch."),
        "seed": int(seed),
        "val_fraction": float(val_fraction) if validate else 0.0,
        "n_rows": n_all,
        "n_train": n_t if validate else n_all,
        "n_val": n_v,
        "l1_grid": None if grid is None else grid.tolist(),
        "l1_grid_relative": list(DEFAULT_L1_RELATIVE) if grid is None else None,
        "l1": l1.tolist(),
        "val_mse": val_mse.min(0).values.tolist() if val_mse is not None else None,
        **info,
    }
    return src, _stats.Result(W.T, bias, l1, val_mse, lam, meta)


class LassoPath:
    """Lasso over a grid of ``l1`` penalties, ``l1`` chosen per example on held-out rows.

    Minimises ``(1/(2n)) ||y - b - V w||**2 + l1 ||w||_1`` (scikit-learn's
    ``Lasso(alpha=l1)``).

    Parameters
    ----------
    l1_grid : sequence of float, optional
        Penalties. Default: per example, ``l1_max * 10**linspace(0, -4, 13)``, where
        ``l1_max`` is the smallest penalty giving all-zero weights. One value fits all
        rows with it, without validation.
    val_fraction, seed, device, dtype, max_memory, progress :
        As for :class:`~coarpy.regression.RidgePath`.
    max_iter, tol :
        FISTA limits: stop an example when its largest update is below ``tol * max|w|``
        (default tol: 1e-7 in float64, 1e-5 in float32).

    Attributes
    ----------
    weights_, bias_, attributions_ : as :class:`~coarpy.regression.RidgePath`
    l1_ : Tensor (n_examples,) the chosen penalty per example
    l1_grid_ : Tensor (K, n_examples) the penalties tried for each example
    val_mse_ : Tensor (K, n_examples) or None, validation mean squared error per ``l1``

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> V = torch.rand(400, 6, generator=g) > 0.3
    >>> Y = V.double() @ torch.tensor([[2.0, 0, 0, -2, 0, 0]]).T.double()
    >>> est = LassoPath([0.01], max_memory=2**30, progress=False).fit((V, Y))
    >>> (est.weights_[0, [1, 2, 4, 5]] == 0).all().item()
    True
    """

    def __init__(
        self,
        l1_grid: Sequence[float] | None = None,
        *,
        val_fraction: float = 0.1,
        seed: int = 0,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float64,
        max_memory: int | None = None,
        max_iter: int = 5000,
        tol: float | None = None,
        progress: bool | None = None,
    ):
        self.l1_grid = l1_grid
        self.val_fraction = val_fraction
        self.seed = seed
        self.device = device
        self.dtype = dtype
        self.max_memory = max_memory
        self.max_iter = max_iter
        self.tol = tol
        self.progress = progress

    def fit(self, source: Any) -> LassoPath:
        """Fit on a ComponentDataset or a ``(masks, outputs)`` tuple; returns ``self``."""
        src, res = _fit_lasso(
            source,
            l1_grid=self.l1_grid,
            val_fraction=self.val_fraction,
            seed=self.seed,
            device=self.device,
            dtype=self.dtype,
            max_memory=self.max_memory,
            max_iter=self.max_iter,
            tol=self.tol,
            progress=self.progress,
        )
        self.attributions_ = _stats.finish(src, res)
        self.weights_ = self.attributions_.weights
        self.bias_ = self.attributions_.bias
        self.l1_ = res.penalty
        self.l1_grid_ = res.grid
        self.val_mse_ = res.val_mse
        return self
