"""Ridge by conjugate gradients over streamed passes: ``solver="cg"`` of :mod:`.ridge`.

Never forms an ``N x N`` matrix, so it serves where the eigendecomposition does not fit
(ViT-B/16: 82,944 components). The examples are processed in chunks of ``c`` columns;
each chunk runs Jacobi-preconditioned conjugate gradients for every ``l2`` of the grid
at once, every iteration being one streamed pass over the store (``V.T @ (V @ X)`` block
by block, centred on the fly). The validation error of every ``l2`` takes one more pass;
the chosen ``l2`` is then refitted on all rows, warm-started from the training-row
solution.

Memory is ``s * (6 K + 3) * N * c`` bytes plus one block of rows, with ``K`` grid
values, ``s`` bytes per number and ``c`` chosen to fit the budget; time is
``(2 + 2 * iterations)`` passes per chunk.

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
from ..errors import FitError
from . import _stats


def column_bytes(N: int, K: int, s: int, block_rows: int) -> int:
    """Bytes per example column of a CG chunk: 6 vectors per grid value, 3 right-hand sides,
    and the per-row products of one block."""
    return s * ((6 * K + 3) * N + 2 * K * block_rows)


def _select(
    rows: Tensor, V: Tensor, *, part: str, seed: int, val_fraction: float, device: torch.device
) -> Tensor | None:
    """The rows of V on one side of the split ("train", "val") or all of them."""
    if part == "all":
        return V
    is_val = _stats.validation_rows(rows, seed=seed, val_fraction=val_fraction).to(device)
    sel = is_val if part == "val" else ~is_val
    return V[sel] if bool(sel.any()) else None


def _gram_apply(
    src: _stats.Source,
    X: Tensor,
    mean: Tensor,
    *,
    part: str,
    seed: int,
    val_fraction: float,
    device: torch.device,
    block_rows: int,
) -> Tensor:
    """sum over the chosen rows of (v - mean)(v - mean).T @ X, streaming the store."""
    out = torch.zeros_like(X)
    for rows, V, _ in src.blocks(device, block_rows):
        U = _select(rows, V, part=part, seed=seed, val_fraction=val_fraction, device=device)
        if U is None:
            continue
        U = U.to(X.dtype) - mean  # (b, N)
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
    src: _stats.Source,
    parts: list[_stats.Moments],
    grid: Tensor,
    *,
    validate: bool,
    seed: int,
    val_fraction: float,
    device: torch.device,
    dtype: torch.dtype,
    budget: int | None,
    max_iter: int,
    tol: float,
    progress: bool | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, dict]:
    """Ridge by conjugate gradients over streamed passes; never forms an N x N matrix.

    Returns (weights (N, E), bias (E,), choice (E,), val_mse (K, E) or None, info).
    """
    N, E = src.n_components, src.n_examples
    s = torch.finfo(dtype).bits // 8
    K = grid.shape[0] if validate else 1
    block_rows = _stats.block_rows(N, E, s)
    per_col = column_bytes(N, K, s, min(block_rows, src.n_rows or block_rows))
    room = (budget // 2 if budget is not None else 4 * _stats.WORK_BYTES) - _stats.BLOCK_BYTES
    if room < per_col:
        raise FitError(
            f"The CG solver needs at least {per_col + _stats.BLOCK_BYTES} bytes "
            f"({_stats.gib(per_col + _stats.BLOCK_BYTES)}) for one example at a time with {N} "
            f"components and {K} l2 values, but the budget is {budget} bytes. Use fewer l2 "
            "values, dtype=torch.float32, or a machine with more memory."
        )
    step = max(1, min(E, room // per_col))
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
    W = torch.empty(N, E, dtype=dtype, device=device)
    choice = torch.zeros(E, dtype=torch.long, device=device)
    val_mse = torch.empty(K, E, dtype=dtype, device=device) if validate else None
    info = {"cg_iterations": 0, "cg_max_residual": 0.0, "cg_example_chunk": step}
    kw = dict(seed=seed, val_fraction=val_fraction, device=device, block_rows=block_rows)
    with progress_bar(None, progress, desc="fit: cg passes", unit="pass") as bar:
        for e0 in range(0, E, step):
            sl = slice(e0, min(e0 + step, E))
            c = sl.stop - sl.start
            # Right-hand sides: raw V.T @ Y per split for this chunk of examples (one pass).
            raw = [torch.zeros(N, c, dtype=dtype, device=device) for _ in parts]
            for rows, V, Y in src.blocks(device, block_rows):
                _stats.check_finite(rows, Y[:, sl])
                if validate:
                    is_val = _stats.validation_rows(rows, seed=seed, val_fraction=val_fraction)
                    sels = [~is_val.to(device), is_val.to(device)]
                else:
                    sels = [None]
                for acc, sel in zip(raw, sels, strict=True):
                    Vs, Ys = (V, Y[:, sl]) if sel is None else (V[sel], Y[sel][:, sl])
                    if Vs.shape[0]:
                        acc.addmm_(Vs.to(dtype).T, Ys.to(dtype))
            bar.update(1)
            part_m = [
                _stats.Moments(m.n, m.sv, m.sy[sl], m.syy[sl], None, r)
                for m, r in zip(parts, raw, strict=True)
            ]
            X0 = torch.zeros(N, c, dtype=dtype, device=device)
            if validate:
                tr, va = part_m
                Ct = _stats.centered_cross_(tr, mv_t, my_t[sl])  # (N, c)
                shift = (train.n * grid)[:, None].expand(K, c).reshape(1, K * c)  # n * l2

                def apply_t(X, shift=shift):
                    return _gram_apply(src, X, mv_t, part="train", **kw) + shift * X

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
                for rows, V, Y in src.blocks(device, block_rows):
                    is_val = _stats.validation_rows(rows, seed=seed, val_fraction=val_fraction)
                    is_val = is_val.to(device)
                    if not bool(is_val.any()):
                        continue
                    U = V[is_val].to(dtype) - mv_t  # (b, N)
                    z = Y[is_val][:, sl].to(dtype) - my_t[sl]  # (b, c)
                    resid = z.repeat(1, K) - U @ Xk  # (b, K * c), column k * c + j
                    sse += (resid * resid).sum(0)
                bar.update(1)
                mse = (sse / va.n).reshape(K, c)
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
                return _gram_apply(src, X, mv_a, part="all", **kw) + shift * X

            X, its, res = _pcg(
                apply_a, Ca, diag_a[:, None] + shift_a, X0, max_iter=max_iter, tol=tol, bar=bar
            )
            info["cg_iterations"] = max(info["cg_iterations"], its)
            info["cg_max_residual"] = max(info["cg_max_residual"], res)
            W[:, sl] = X
    if info["cg_max_residual"] > tol:
        warnings.warn(
            f"Conjugate gradients stopped after max_iter={max_iter} iterations with a relative "
            f"residual of {info['cg_max_residual']:.2e} (> tol={tol:g}). Raise max_iter, or "
            "use larger l2 values (better conditioned).",
            stacklevel=3,
        )
    bias = my_a - W.T @ mv_a
    return W, bias, choice, val_mse, info
