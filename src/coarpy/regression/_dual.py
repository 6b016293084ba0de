"""Ridge in the dual, ``solver="dual"`` of :mod:`.ridge`: for fewer rows than components.

With ``n`` masks over ``N > n`` components the ridge solution lives in the span of the
masks: ``w = Vc.T (Vc Vc.T + n * l2 * I)^-1 yc`` (``Vc``, ``yc`` centred), so
everything runs on the ``n x n`` kernel ``Vc Vc.T`` instead of the ``N x N`` Gram
(the paper's ViT-B/16 run: 5,000 masks over 82,944 components).

1. **Kernel.** ``V V.T`` counts the components two masks both keep: computed exactly in
   float32 from the kept rows (:meth:`._rows.Rows.kernel`), then centred at the
   training rows' mean mask in ``dtype``; its row sums centre it again later.
2. **Validation.** One eigendecomposition of the training block ``Ktt = U diag(d) U.T``
   gives every ``l2`` of the grid: the training-row fit predicts the validation rows as
   ``Kvt U diag(1 / (d + n_t l2)) U.T yt``, so with ``A = Kvt U`` formed once, each
   chunk of examples costs one rotation ``U.T yt`` and one product with ``A`` per
   ``l2``. The validation rows, the centring at the training means and the rule (lowest
   validation mean squared error, per example) are those of the primal solver, so both
   choose the same ``l2`` and agree to rounding.
3. **Refit.** The kernel is re-centred at the mean of all rows (a rank-two update from
   its row sums) and each distinct chosen ``l2`` is solved by one Cholesky
   factorisation (:mod:`._refit`); the weights ``Vc.T alpha`` come from the kept masks,
   a slice of rows at a time.

Memory and time are in :mod:`._cost`. A helper module of :mod:`coarpy.regression.ridge`;
no promise outside the package.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._engine import progress_bar
from . import _refit, _rows, _stats


def centre(
    K: Tensor, a: Tensor, mm: float, dtype: torch.dtype, *, inplace_ok: bool = True
) -> Tensor:
    """``K - a 1.T - 1 a.T + mm`` in ``dtype``, formed in float64 a slice of rows at a time.

    Reuses ``K``'s storage when it already has ``dtype`` (``K`` is then consumed).
    """
    n = K.shape[0]
    out = K if (K.dtype == dtype and inplace_ok) else torch.empty_like(K, dtype=dtype)
    a = a.to(device=K.device, dtype=torch.float64)
    step = max(1, _stats.WORK_BYTES // max(1, 8 * n))
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        tile = K[r0:r1].to(torch.float64)
        tile -= a[r0:r1, None]
        tile -= a[None, :]
        tile += mm
        out[r0:r1] = tile.to(dtype)
    return out


def centred_kernel(
    rows: _rows.Rows, n_mean: int, dtype: torch.dtype, device: torch.device, progress: bool | None
) -> tuple[Tensor, Tensor, float]:
    """The kernel of the kept rows centred at the mean mask of rows ``0:n_mean``.

    Returns ``(Kc (n, n) in dtype, row_sums (n,) float64 of the raw kernel, m.m)`` where
    ``m`` is that mean; row sums of the first ``n_mean`` columns give ``v_i . m``.
    """
    K, rs_all = rows.kernel(dtype, device, progress)
    rs = K[:, :n_mean].sum(1, dtype=torch.float64) if n_mean < rows.n else rs_all
    a = rs / n_mean  # (n,) v_i . m
    mm = float(a[:n_mean].sum()) / n_mean  # m . m
    Kc = centre(K, a, mm, dtype)
    del K
    return Kc, torch.stack([rs, rs_all]), mm


def _recentre_(Kc: Tensor, sums: Tensor, n_t: int, mm_t: float) -> None:
    """Move ``Kc`` from the training mean ``m`` to the mean of all rows ``mu``, in place.

    ``(v_i - mu).(v_j - mu) = x_i.x_j + b_i + b_j + |m - mu|**2`` with ``x = v - m``
    and ``b_i = x_i.(m - mu)``; all of it from the raw kernel's row sums.
    """
    n = Kc.shape[0]
    rs_t, rs_all = sums[0], sums[1]
    vm = rs_t / n_t  # v_i . m
    vmu = rs_all / n  # v_i . mu
    m_mu = float(rs_all[:n_t].sum()) / (n_t * n)
    mu_mu = float(rs_all.sum()) / (n * n)
    b = (vm - vmu - mm_t + m_mu).to(Kc.dtype)  # (n,)
    dd = mm_t - 2.0 * m_mu + mu_mu
    step = max(1, _stats.WORK_BYTES // max(1, Kc.element_size() * n))
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        Kc[r0:r1] += b[r0:r1, None]
        Kc[r0:r1] += b[None, :]
        Kc[r0:r1] += dd


def _validate(
    rows: _rows.Rows,
    Kc: Tensor,
    grid: Tensor,
    *,
    chunk: int,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool | None,
) -> tuple[Tensor, float]:
    """(K, E) validation mean squared error of the training-row fit for every l2, and the
    smallest eigenvalue that matters for the refit (see :mod:`._refit`)."""
    nt, n, E, N = rows.n_train, rows.n, rows.n_examples, rows.n_components
    train = rows.parts[0]
    my = train.sy / train.n  # (E,) training means of the outputs
    with progress_bar(1, progress, desc=f"fit: eigendecomposition {nt}x{nt}", unit="") as bar:
        d, U = torch.linalg.eigh(Kc[:nt, :nt])  # (nt,), (nt, nt)
        bar.update(1)
    F = _stats.ridge_filter(d, nt, grid)  # (K, nt)
    # The centred kernel's one exact null direction (the constant) never reaches the
    # weights (Vc.T 1 = 0); with more rows than components there are others.
    min_eig = _refit.smallest_relevant(d, nt, exact_nulls=1) if n <= N else 0.0
    del d
    A = Kc[nt:, :nt] @ U  # (nv, nt): validation rows in the eigenbasis of the training kernel
    K = grid.shape[0]
    out = torch.empty(K, E, dtype=dtype, device=device)
    with progress_bar(E, progress, desc="fit: validation", unit="example") as bar:
        for e0 in range(0, E, chunk):
            sl = slice(e0, min(e0 + chunk, E))
            P = U.T @ (rows.y(0, nt, sl, dtype, device) - my[sl])  # (nt, c)
            Z = rows.y(nt, n, sl, dtype, device) - my[sl]  # (nv, c) centred at training means
            for k in range(K):
                R = Z - A @ (F[k][:, None] * P)  # (nv, c) validation residuals
                out[k, sl] = (R * R).sum(0) / (n - nt)
            bar.update(sl.stop - sl.start)
    return out, min_eig


def weights_from_dual(
    rows: _rows.Rows, alpha: Tensor, mv: Tensor, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``Vc.T @ alpha`` over all kept rows: (N, c) in ``dtype``, ``Vc`` the masks centred
    at ``mv``.

    In float32 the product runs on the ablated indicator ``1 - v`` instead
    (``Vc = -(A - mean A)``): most entries of a keep-mask are 1, and summing them would
    cancel to a small number with float32's rounding of the large partial sums.
    """
    n, N = rows.n, rows.n_components
    alpha = alpha.to(dtype)
    W = torch.zeros(N, alpha.shape[1], dtype=dtype, device=device)
    ablated = dtype == torch.float32
    for a, b in rows.row_chunks(0, n, N, torch.finfo(dtype).bits // 8):
        X = rows.masks(a, b, dtype, device)  # (b, N) 0/1
        if ablated:
            X = X.neg_().add_(1.0)  # 1 - v
        W.addmm_(X.T, alpha[a:b])
    mean = (1.0 - mv if ablated else mv).to(dtype)
    W.addr_(mean, alpha.sum(0), alpha=-1.0)
    return W.neg_() if ablated else W


def solve(
    rows: _rows.Rows,
    grid: Tensor,
    *,
    validate: bool,
    dtype: torch.dtype,
    device: torch.device,
    chunk: int,
    progress: bool | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, dict]:
    """Ridge in the dual. Returns (weights (E, N) float32, bias (E,), choice (E,),
    val_mse (K, E) or None, info)."""
    n, nt, N, E = rows.n, rows.n_train, rows.n_components, rows.n_examples
    n_mean = nt if validate else n
    Kc, sums, mm = centred_kernel(rows, n_mean, dtype, device, progress)
    min_eig = 0.0
    if validate:
        val_mse, min_eig = _validate(
            rows, Kc, grid, chunk=chunk, dtype=dtype, device=device, progress=progress
        )
        choice = val_mse.argmin(0)
        _recentre_(Kc, sums, nt, mm)
    else:
        val_mse = None
        choice = torch.zeros(E, dtype=torch.long, device=device)
    every = rows.parts[0] if not validate else _stats.Moments(
        n, rows.parts[0].sv + rows.parts[1].sv, rows.parts[0].sy + rows.parts[1].sy,
        rows.parts[0].syy + rows.parts[1].syy, None, None,
    )  # fmt: skip
    mv, my = every.means()
    weights = torch.empty(E, N, dtype=torch.float32, device=device)
    bias = torch.empty(E, dtype=dtype, device=device)

    def rhs(idx: Tensor) -> Tensor:
        return rows.y(0, n, idx, dtype, device) - my[idx]  # (n, c) centred outputs

    def done(idx: Tensor, alpha: Tensor) -> None:
        W = weights_from_dual(rows, alpha, mv, dtype, device)  # (N, c)
        weights[idx] = W.T.to(torch.float32)
        bias[idx] = my[idx] - W.T @ mv

    info = _refit.refit(
        Kc, n, grid, choice, rhs, done, chunk=chunk, progress=progress, min_eig=min_eig
    )
    return weights, bias, choice, val_mse, info
