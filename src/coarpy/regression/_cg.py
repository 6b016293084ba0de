"""Ridge by conjugate gradients: ``solver="cg"`` of :mod:`.ridge`.

Never forms an ``N x N`` or ``n x n`` matrix, so it serves where neither the primal
eigendecomposition nor the dual kernel fits (both large: say 100,000 masks over 82,944
components). The examples are processed in chunks of ``c`` columns; each chunk runs
Jacobi-preconditioned conjugate gradients for every ``l2`` of the grid at once, every
iteration being one product ``Vc.T @ (Vc @ X)`` over the rows kept in memory by the one
pass (:mod:`._rows`: bit-packed masks, unpacked a slice of rows at a time, centred on
the fly); the store is never read again. The validation error of every ``l2`` takes one
more product; the chosen ``l2`` is then refitted on all rows, warm-started from the
training-row solution.

Memory is ``s * (6 K + 3) * N * c`` bytes plus one slice of rows, with ``K`` grid
values, ``s`` bytes per number and ``c`` chosen to fit the budget (:mod:`._cost`);
time is ``2 + 2 * iterations`` products over the rows per chunk.

A helper module of :mod:`coarpy.regression.ridge`; its names carry no promise outside
the package.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._engine import progress_bar
from . import _rows, _stats
from ._cost import cg_column_bytes as column_bytes

__all__ = ["column_bytes", "solve"]


def _gram_apply(rows: _rows.Rows, X: Tensor, mean: Tensor, r0: int, r1: int) -> Tensor:
    """sum over kept rows r0:r1 of (v - mean)(v - mean).T @ X."""
    out = torch.zeros_like(X)
    s = X.element_size()
    for a, b in rows.row_chunks(r0, r1, rows.n_components, s):
        U = rows.masks(a, b, X.dtype, X.device) - mean  # (b, N)
        out.addmm_(U.T, U @ X)
    return out


def _pcg(
    apply_A: Callable[[Tensor], Tensor],
    B: Tensor,
    diag: Tensor,
    X0: Tensor,
    *,
    max_iter: int,
    tol: float,
    bar: Any,
) -> tuple[Tensor, int, float]:
    """Jacobi-preconditioned conjugate gradients for A X = B, one system per column.

    Returns (X, iterations, worst relative residual). Converged columns stop moving.
    """
    X = X0.clone()
    R = B - apply_A(X) if bool(X0.any()) else B.clone()
    bnorm = B.norm(dim=0)
    del B
    done = R.norm(dim=0) <= tol * bnorm
    # A component that never varies has a zero diagonal (and a zero row): leave it unscaled.
    inv_diag = torch.where(diag > 0, 1.0 / diag, torch.ones_like(diag))
    Z = R * inv_diag
    P = Z.clone()
    rz = (R * Z).sum(0)
    it = 0
    while it < max_iter and not bool(done.all()):
        it += 1
        AP = apply_A(P)
        bar.update(1)
        pAp = (P * AP).sum(0)
        a = torch.where(done | (pAp <= 0), torch.zeros_like(pAp), rz / pAp)
        X.add_(a * P)
        R.sub_(a * AP)
        del AP
        done = done | (R.norm(dim=0) <= tol * bnorm)
        Z = R * inv_diag
        rz_new = (R * Z).sum(0)
        beta = torch.where(done | (rz <= 0), torch.zeros_like(rz), rz_new / rz)
        P = Z + beta * P
        rz = rz_new
    rel = R.norm(dim=0) / bnorm.clamp_min(torch.finfo(bnorm.dtype).tiny)
    return X, it, float(rel.max()) if rel.numel() else 0.0


def solve(
    rows: _rows.Rows,
    grid: Tensor,
    *,
    validate: bool,
    device: torch.device,
    dtype: torch.dtype,
    chunk: int,
    max_iter: int,
    tol: float,
    progress: bool | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, dict]:
    """Ridge by conjugate gradients over the kept rows; never forms an N x N matrix.

    Returns (weights (E, N) float32, bias (E,), choice (E,), val_mse (K, E) or None, info).
    """
    N, E, n, nt = rows.n_components, rows.n_examples, rows.n, rows.n_train
    K = grid.shape[0] if validate else 1
    step = max(1, min(E, chunk))
    parts = rows.parts
    train = parts[0]
    every = (
        parts[0]
        if not validate
        else _stats.Moments(
            parts[0].n + parts[1].n,
            parts[0].sv + parts[1].sv,
            parts[0].sy + parts[1].sy,
            parts[0].syy + parts[1].syy,
            None,
            None,
        )
    )
    mv_t, my_t = train.means()
    mv_a, my_a = every.means()
    diag_t = train.sv - train.n * mv_t * mv_t  # diagonal of the centred Gram (0/1 masks)
    diag_a = every.sv - every.n * mv_a * mv_a
    weights = torch.empty(E, N, dtype=torch.float32, device=device)
    bias = torch.empty(E, dtype=dtype, device=device)
    choice = torch.zeros(E, dtype=torch.long, device=device)
    val_mse = torch.empty(K, E, dtype=dtype, device=device) if validate else None
    info = {"cg_iterations": 0, "cg_max_residual": 0.0, "cg_example_chunk": step}
    with progress_bar(None, progress, desc="fit: cg passes", unit="pass") as bar:
        for e0 in range(0, E, step):
            sl = slice(e0, min(e0 + step, E))
            c = sl.stop - sl.start
            # Right-hand sides: raw V.T @ Y per side of the split for this chunk.
            spans = [(0, nt), (nt, n)] if validate else [(0, n)]
            raw = [rows.cross(a, b, sl, dtype, device) for a, b in spans]
            bar.update(1)
            X0 = torch.zeros(N, c, dtype=dtype, device=device)
            if validate:
                tr = _stats.Moments(train.n, train.sv, train.sy[sl], train.syy[sl], None, raw[0])
                Ct = _stats.centered_cross_(tr, mv_t, my_t[sl])  # (N, c)
                shift = (train.n * grid)[:, None].expand(K, c).reshape(1, K * c)  # n * l2

                def apply_t(X, shift=shift):
                    return _gram_apply(rows, X, mv_t, 0, nt) + shift * X

                B = Ct[:, None, :].expand(N, K, c).reshape(N, K * c)
                Xk, its, res = _pcg(
                    apply_t,
                    B,
                    diag_t[:, None] + shift,
                    torch.zeros_like(B),
                    max_iter=max_iter,
                    tol=tol,
                    bar=bar,
                )
                info["cg_iterations"] = max(info["cg_iterations"], its)
                info["cg_max_residual"] = max(info["cg_max_residual"], res)
                sse = torch.zeros(K * c, dtype=dtype, device=device)
                for a, b in rows.row_chunks(nt, n, N, X0.element_size()):
                    U = rows.masks(a, b, dtype, device) - mv_t  # (b, N)
                    z = rows.y(a, b, sl, dtype, device) - my_t[sl]  # (b, c)
                    resid = z.repeat(1, K) - U @ Xk  # (b, K * c), column k * c + j
                    sse += (resid * resid).sum(0)
                bar.update(1)
                mse = (sse / (n - nt)).reshape(K, c)
                val_mse[:, sl] = mse
                ch = mse.argmin(0)
                choice[sl] = ch
                X0 = Xk.reshape(N, K, c)[:, ch, torch.arange(c, device=device)]
                del Xk
            every_c = _stats.Moments(
                every.n, every.sv, every.sy[sl], every.syy[sl], None, sum(raw[1:], raw[0])
            )
            Ca = _stats.centered_cross_(every_c, mv_a, my_a[sl], inplace=True)
            shift_a = (every.n * grid[choice[sl]])[None, :]  # (1, c)

            def apply_a(X, shift=shift_a):
                return _gram_apply(rows, X, mv_a, 0, n) + shift * X

            X, its, res = _pcg(
                apply_a, Ca, diag_a[:, None] + shift_a, X0, max_iter=max_iter, tol=tol, bar=bar
            )
            info["cg_iterations"] = max(info["cg_iterations"], its)
            info["cg_max_residual"] = max(info["cg_max_residual"], res)
            weights[sl] = X.T.to(torch.float32)
            bias[sl] = my_a[sl] - X.T @ mv_a
    if info["cg_max_residual"] > tol:
        warnings.warn(
            f"Conjugate gradients stopped after max_iter={max_iter} iterations with a relative "
            f"residual of {info['cg_max_residual']:.2e} (> tol={tol:g}). Raise max_iter, or "
            "use larger l2 values (better conditioned).",
            stacklevel=3,
        )
    return weights, bias, choice, val_mse, info
