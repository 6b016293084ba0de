"""Ridge on scaled columns with a prior, chosen by GCV: the engine of ``method="group"``.

:mod:`.group` reduces its objective to plain ridge on the columns ``X = Vc S`` (``S``
the diagonal of column scales) with outputs ``z = yc - c Vc w0`` and penalty ``l2`` per
row. One eigendecomposition then gives, for every example, every ``l2`` of the grid
and every prior scale ``c``: the residual sum of squares, the degrees of freedom
``df = 1 + sum_i d_i / (d_i + n l2)`` and ``GCV = n RSS / (n - df)**2``; the pair with
the lowest GCV is kept and the weights formed. Two forms, the same numbers:

- :class:`Primal`: the ``N x N`` scaled Gram ``S Vc.T Vc S = Q diag(d) Q.T``.
- :class:`Dual`: the ``n x n`` scaled kernel ``Vc S**2 Vc.T = U diag(d) U.T`` (fewer
  masks than components). The hat matrix lives in mask space: the residual of ``z`` is
  ``sum_i (1 - d_i f_i)**2 (U.T z)_i**2`` with ``f_i = 1 / (d_i + n l2)``, and the
  weights are ``c w0 + S**2 Vc.T U (f * U.T z)``.

The scales ``s`` are constant within a group, so the dual kernel for any ``s`` is
``sum_g s_g**2 K_g`` of per-group kernels ``K_g`` counted once (exact in float32) when
they fit in memory; otherwise it is formed again from the kept masks.

Both work a chunk of examples at a time from the rows kept by the one pass
(:mod:`._rows`). A helper module of :mod:`coarpy.regression.group`; no promise outside.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._engine import progress_bar
from . import _dual, _rows, _stats


class _Base:
    """What both forms share: the filters over the grid and the GCV choice per chunk."""

    n: int
    d: Tensor  # (m,) eigenvalues (zero below the rank cutoff)
    grid: Tensor  # (K,)
    F: Tensor  # (K, m) filters 1 / (d + n l2)

    def _filters(self, d: Tensor, grid: Tensor | None, trace: float, N: int) -> None:
        if grid is None:
            var = trace / (self.n * N)
            grid = var * torch.tensor(_stats.DEFAULT_L2_RELATIVE, dtype=d.dtype, device=d.device)
        self.grid = grid = grid.to(d.dtype)
        self.F = _stats.ridge_filter(d, self.n, grid)  # (K, m)
        self.d = d.clamp_min(0.0) * (self.F[0] != 0)  # null directions carry nothing
        self.df = 1.0 + (self.F * self.d).sum(1)  # (K,) with the intercept
        self.room = self.n - self.df

    def _gcv(self, rss: Tensor) -> Tensor:
        gcv = self.n * rss / self.room.clamp_min(1e-12)[:, None] ** 2
        return torch.where(self.room[:, None] > 0.5, gcv, torch.full_like(gcv, float("inf")))


class Primal(_Base):
    """GCV ridge through the ``N x N`` scaled Gram of all rows (the raw Gram is reused)."""

    def __init__(
        self,
        rows: _rows.Rows,
        gram: Tensor,
        s: Tensor,
        grid: Tensor | None,
        cross: CrossCache,
        progress: bool | None,
    ):
        m = rows.parts[0]
        self.n, self.s, self.cross = m.n, s, cross
        self.mv, self.my = m.means()
        m.gram = gram
        Gc = _stats.centered_gram_(m, self.mv)  # (N, N)
        m.gram = None
        Gc.mul_(s[:, None]).mul_(s[None, :])  # S Gc S: ridge on the columns v * s
        trace = float(torch.diagonal(Gc).sum())
        N = Gc.shape[0]
        with progress_bar(1, progress, desc=f"fit: eigendecomposition {N}x{N}", unit="") as bar:
            d, self.Q = torch.linalg.eigh(Gc)  # (N,), (N, N)
            bar.update(1)
        del Gc
        self._filters(d, grid, trace, N)
        self.Fd, self.F2d = self.F * self.d, self.F * self.F * self.d  # (K, N)

    def select(
        self, sl: slice, W0: Tensor | None, scales: Tensor, *, pilot: bool = False
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For examples ``sl``: (weights (N, c), chosen c (c,), chosen k (c,), GCV (c,)).

        ``pilot`` is accepted for the dual's sake; the primal's weights cost ``N**2`` per
        example either way."""
        m, s, Q, d, F = self.cross.moments, self.s, self.Q, self.d, self.F
        P0 = Q.T @ (self.cross.centred(sl) * s[:, None])  # (N, c)
        Szz = _stats.centered_yy(_stats.Moments(m.n, m.sv, m.sy[sl], m.syy[sl], None, None),
                                 self.my[sl])  # fmt: skip
        c_ = P0.shape[1]
        if W0 is None:
            B, scales = None, scales[:1] * 0.0
        else:
            B = Q.T @ (W0 / s[:, None])  # (N, c): the prior in the rotated, scaled coordinates
            BP, BdB = (B * P0).sum(0), (B * B * d[:, None]).sum(0)  # (c,)
        best = torch.full((c_,), float("inf"), dtype=P0.dtype, device=P0.device)
        best_c = torch.zeros(c_, dtype=torch.long, device=P0.device)
        best_k = torch.zeros(c_, dtype=torch.long, device=P0.device)
        for ci, c in enumerate(scales.tolist()):
            if B is None:
                Pc, Szc = P0, Szz
            else:
                Pc = P0 - c * d[:, None] * B  # rotated cross-products of y - c V w0
                Szc = Szz - 2.0 * c * BP + c * c * BdB
            P2 = Pc * Pc
            rss = (Szc[None] - 2.0 * (F @ P2) + self.F2d @ P2).clamp_min(0.0)  # (K, c)
            value, k = self._gcv(rss).min(0)
            better = value < best
            best = torch.where(better, value, best)
            best_c = torch.where(better, torch.full_like(best_c, ci), best_c)
            best_k = torch.where(better, k, best_k)
        c = scales[best_c]  # (c,)
        Pc = P0 if B is None else P0 - d[:, None] * B * c[None, :]
        U = Q @ (F[best_k].T * Pc)  # (N, c) scaled deviations from the prior
        if W0 is not None:
            U = U + (W0 / s[:, None]) * c[None, :]
        return U * s[:, None], c, best_k, best


class Dual(_Base):
    """GCV ridge through the ``n x n`` scaled kernel of all rows.

    ``dtype`` (default: the kernels') is the precision of the eigendecomposition and the
    products per example; the empirical-Bayes pilots of :mod:`.group` run in float32
    (their weights are only pooled into a few group penalties), the final fit in the
    fit's dtype.
    """

    def __init__(
        self,
        rows: _rows.Rows,
        kernels: GroupKernels,
        s: Tensor,
        grid: Tensor | None,
        progress: bool | None,
        dtype: torch.dtype | None = None,
    ):
        m = rows.parts[0]
        self.rows, self.n, self.s = rows, m.n, s
        self.mv, my = m.means()
        Kc = kernels.centred(s, dtype)  # (n, n) Vc S^2 Vc.T
        self.my = my.to(Kc.dtype)
        trace = float(torch.diagonal(Kc).sum())
        n = Kc.shape[0]
        with progress_bar(1, progress, desc=f"fit: eigendecomposition {n}x{n}", unit="") as bar:
            d, self.U = torch.linalg.eigh(Kc)  # (n,), (n, n)
            bar.update(1)
        del Kc
        self._filters(d, grid, trace, rows.n_components)
        self.G = (1.0 - self.F * self.d) ** 2  # (K, n): residual filter of each l2

    def select(
        self, sl: slice, W0: Tensor | None, scales: Tensor, *, pilot: bool = False
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For examples ``sl``: (weights (N, c), chosen c (c,), chosen k (c,), GCV (c,)).

        A ``pilot`` (weights only pooled into the group penalties) forms the weights in
        float32: about 3x faster on CPU, and pooled squares over examples and components
        do not need more.
        """
        rows, U, F = self.rows, self.U, self.F
        dtype, device = U.dtype, U.device
        p0 = U.T @ (rows.y(0, rows.n, sl, dtype, device) - self.my[sl])  # (n, c)
        c_ = p0.shape[1]
        if W0 is None:
            b, scales = None, scales[:1] * 0.0
        else:
            b = U.T @ _masks_times(rows, W0, self.mv)  # (n, c): U.T Vc w0
        best = torch.full((c_,), float("inf"), dtype=dtype, device=device)
        best_c = torch.zeros(c_, dtype=torch.long, device=device)
        best_k = torch.zeros(c_, dtype=torch.long, device=device)
        for ci, c in enumerate(scales.tolist()):
            pc = p0 if b is None else p0 - c * b  # U.T (yc - c Vc w0)
            value, k = self._gcv(self.G @ (pc * pc)).min(0)
            better = value < best
            best = torch.where(better, value, best)
            best_c = torch.where(better, torch.full_like(best_c, ci), best_c)
            best_k = torch.where(better, k, best_k)
        c = scales[best_c]  # (c,)
        pc = p0 if b is None else p0 - b * c[None, :]
        alpha = U @ (F[best_k].T * pc)  # (n, c)
        wdtype = torch.float32 if pilot else dtype
        W = _dual.weights_from_dual(rows, alpha, self.mv, wdtype, device)  # (N, c) Vc.T alpha
        W = W.to(dtype) * (self.s * self.s)[:, None]
        if W0 is not None:
            W += W0 * c[None, :]
        return W, c, best_k, best


def _masks_times(rows: _rows.Rows, X: Tensor, mv: Tensor) -> Tensor:
    """``Vc @ X`` over all kept rows: (n, c), ``Vc`` the masks centred at ``mv``."""
    out = torch.empty(rows.n, X.shape[1], dtype=X.dtype, device=X.device)
    for a, b in rows.row_chunks(0, rows.n, rows.n_components, X.element_size()):
        out[a:b] = rows.masks(a, b, X.dtype, X.device) @ X
    out -= (mv @ X)[None, :]
    return out


class CrossCache:
    """Centred ``V.T @ Y`` of all rows for a chunk of examples; kept whole when it fits."""

    def __init__(self, rows: _rows.Rows, keep: bool, dtype: torch.dtype, device: torch.device):
        self.rows, self.dtype, self.device = rows, dtype, device
        self.moments = rows.parts[0]
        self.mv, self.my = self.moments.means()
        self.full = self._centred(slice(None)) if keep else None

    def _centred(self, sl: slice) -> Tensor:
        m = self.moments
        raw = self.rows.cross(0, self.rows.n, sl, self.dtype, self.device)
        part = _stats.Moments(m.n, m.sv, m.sy[sl], m.syy[sl], None, raw)
        return _stats.centered_cross_(part, self.mv, self.my[sl], inplace=True)

    def centred(self, sl: slice) -> Tensor:
        return self.full[:, sl] if self.full is not None else self._centred(sl)


class GroupKernels:
    """The scaled kernels ``V S**2 V.T`` from per-group kernels counted exactly in float32.

    With ``keep`` the kernel of each group is kept (``4 n**2`` bytes per group) and every
    scaled kernel is a weighted sum of them; otherwise each scaled kernel is counted
    again from the kept masks, group by group.
    """

    def __init__(
        self,
        rows: _rows.Rows,
        gid: Tensor,
        n_groups: int,
        keep: bool,
        dtype: torch.dtype,
        device: torch.device,
        progress: bool | None,
    ):
        self.rows, self.gid, self.dtype, self.device = rows, gid.cpu(), dtype, device
        self.n_groups, self.progress = n_groups, progress
        self.kernels: list[Tensor] | None = None
        if keep:
            n = rows.n
            self.kernels = [torch.zeros(n, n, device=device) for _ in range(n_groups)]
            # One full product per group: a group is a few columns wide, and one large
            # GEMM beats the lower triangle's many small ones (49 ResNet-50 modules, 2,000
            # rows: 4.1 s against 7.8 s on 2 cores) despite twice the flops.
            self._count(lambda g, X: self.kernels[g].addmm_(X, X.T))

    def _count(self, add: Any) -> None:
        """Call ``add(group, X)`` for the float32 columns X (n, w) of each group, by slices."""
        with progress_bar(self.rows.n_components, self.progress, desc="fit: kernel",
                          unit="comp") as bar:  # fmt: skip
            for j0, j1 in self.rows.column_chunks():
                X = self.rows.columns(j0, j1, torch.float32, self.device)  # (n, w) 0/1
                g = self.gid[j0:j1]
                for k in torch.unique(g).tolist():
                    add(k, X[:, (g == k).to(self.device)])
                bar.update(j1 - j0)

    def centred(self, s: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """``Vc S**2 Vc.T`` (n, n) in ``dtype`` (default: the kernels' dtype), centred at
        the mean of all rows."""
        n = self.rows.n
        scale = torch.zeros(self.n_groups, dtype=torch.float64)
        scale[self.gid] = (s * s).to(torch.float64).cpu()  # s is constant within a group
        K = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        if self.kernels is not None:
            for g, Kg in enumerate(self.kernels):
                K.add_(Kg, alpha=float(scale[g]))
        else:
            self._count(lambda g, X: _rows.add_outer_lower_(K, X, float(scale[g])))
            _rows.mirror_lower_(K)
        rs = K.sum(1)
        a = rs / n
        mm = float(a.sum()) / n
        return _dual.centre(K, a, mm, self.dtype if dtype is None else dtype)
