"""Ridge and least squares: ``method="ridge"`` (:class:`RidgePath`) and ``"ols"``.

Ridge minimises, per example, ``(1/n) * sum_i (y_i - b - w.v_i)**2 + l2 * ||w||**2``,
i.e. ``w = (Vc.T Vc + n * l2 * I)^-1 Vc.T yc`` on centred data. The penalty is *per
row*, so the same ``l2`` means the same amount of shrinkage whatever the number of rows,
and the ``l2`` chosen on the training rows carries over to the refit on all rows.
scikit-learn's ``Ridge(alpha=a)`` penalises the *unscaled* sum of squares, so it equals
``l2 = a / n_rows`` here (``alpha = l2 * n_rows``).

The rows are split into training and validation rows by a hash of ``(seed, row)``.
One eigendecomposition of the training Gram gives the solution for every ``l2`` of the
grid; the validation mean squared error of every ``l2`` for every example follows from
the validation rows' sufficient statistics (no second pass). The ``l2`` with the lowest
validation error is chosen per example and the model is refitted on all rows with it.
With a one-value grid there is no validation: the fit uses all rows. The default grid
is ``s * 10**[-8, -7.5, ..., 2]`` (21 values) where ``s = trace(Vc.T Vc / n) / N`` is
the mean variance of a mask entry (``alpha * (1 - alpha)`` for Bernoulli masks).

Least squares (:class:`LeastSquares`, ``method="ols"``) is ``w = pinv(Vc.T Vc) Vc.T yc``,
the pseudo-inverse taken through the same eigendecomposition, whose eigenvalues below
``max_eig * N * eps`` count as zero (a component that never varies gets weight 0).

Solvers and memory
------------------
With ``N`` components, ``E`` examples and ``s`` bytes per number (8 for float64, 4 for
float32), the peak memory is about:

- ``solver="eig"`` with validation: ``s * (6 N**2 + 6 N E)`` bytes: two Grams (training
  and validation rows), a centred copy, its eigenvectors and the LAPACK workspace
  (2 N**2); two ``V.T @ Y`` and their rotations into the eigenbasis. The per-``l2``
  validation work is blocked over examples, so it adds at most ~256 MiB. With one
  ``l2`` (and for ``"ols"``): ``s * (4 N**2 + 3 N E)``.
- ``solver="cg"`` (:mod:`coarpy.regression._cg`): never forms an ``N x N`` matrix;
  ``s * (6 K + 3) * N * c`` bytes plus one block of rows, for ``K`` grid values and
  chunks of ``c`` examples chosen to fit the budget; ``(2 + 2 * iterations)`` streamed
  passes per chunk.

Large ``N`` (ViT-B/16: 82,944 components) makes the eigendecomposition infeasible
(``6 * 8 * 82944**2`` bytes = 330 GB), and ``solver="auto"`` then picks ``"cg"``: it
picks ``"eig"`` whenever the formula above fits in the memory budget, else ``"cg"``. An
explicit ``solver="eig"`` that does not fit raises :class:`~coarpy.errors.FitError`
with the bytes needed before allocating anything.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import FitError
from . import _cg, _stats

log = logging.getLogger(__name__)

SOLVERS = ("auto", "eig", "cg")


# --------------------------------------------------------------------------- memory


def _eig_bytes(N: int, E: int, s: int, *, validate: bool) -> int:
    """Peak bytes of the eigendecomposition solver (see the module docstring)."""
    block = _stats.BLOCK_BYTES
    if validate:
        return s * (6 * N * N + 6 * N * E) + _stats.WORK_BYTES + block
    return s * (4 * N * N + 3 * N * E) + _stats.WORK_BYTES + block


def _chunk(n_cols_per_item: int, s: int, total: int) -> int:
    return max(1, min(total, _stats.WORK_BYTES // max(1, n_cols_per_item * s)))


# --------------------------------------------------------------------------- eig


def _validation_errors_eig(train: _stats.Moments, val: _stats.Moments, grid: Tensor) -> Tensor:
    """(K, E) validation mean squared error of the training-row ridge fit for every l2.

    With w = Q a (Q: eigenvectors of the training Gram, a = F[k] * P the filtered
    projections), the validation error of w is Szz - 2 a.R + a.H a, where R = Q.T Suz and
    H = Q.T Suu Q are the validation cross-products centred at the training means, rotated
    into the eigenbasis.

    The quadratic term is the costly one (an N x N product per l2). The filters
    F[k, i] = 1 / (d_i + n l2_k) are smooth in l2, so the (K, N) matrix F has numerical
    rank r of about 10 whatever K is: with F = C @ B (a truncated SVD, exact to K * eps)
    a.H a = sum_{p,q} C[k,p] C[k,q] (B[p] * P).H (B[q] * P) needs r products with H, not K.
    """
    N = train.sv.shape[0]
    s = train.sv.element_size()
    mv, my = train.means()
    Gc = _stats.centered_gram_(train, mv)  # (N, N)
    d, Q = torch.linalg.eigh(Gc)  # (N,), (N, N)
    del Gc
    Suu = _stats.centered_gram_(val, mv)  # (N, N) validation rows, centred at the training means
    H = Q.T @ Suu
    del Suu
    H = H @ Q  # (N, N)
    P = Q.T @ _stats.centered_cross_(train, mv, my)  # (N, E)
    R = Q.T @ _stats.centered_cross_(val, mv, my)  # (N, E)
    del Q
    Szz = _stats.centered_yy(val, my)  # (E,)
    F = _stats.ridge_filter(d, train.n, grid)  # (K, N)
    U, sig, B = torch.linalg.svd(F, full_matrices=False)  # F = U diag(sig) B
    r = max(1, int((sig > sig[0] * F.shape[0] * torch.finfo(F.dtype).eps).sum()))
    C, B = U[:, :r] * sig[:r], B[:r]  # (K, r), (r, N)
    K, E = F.shape[0], P.shape[1]
    out = torch.empty(K, E, dtype=P.dtype, device=P.device)
    Bt = B.T.contiguous()  # (N, r)
    step = _chunk(3 * r * N, s, E)  # B * P, H @ (B * P), P * H @ (B * P)
    for e0 in range(0, E, step):
        sl = slice(e0, min(e0 + step, E))
        Pc, Rc = P[:, sl], R[:, sl]  # (N, c)
        c = Pc.shape[1]
        linear = F @ (Pc * Rc)  # (K, c): a.R for every l2
        BP = (Bt[:, :, None] * Pc[:, None, :]).reshape(N, r * c)  # (N, r*c): B[q] * P
        HBP = (H @ BP).reshape(N, r, c)  # (N, r, c)
        del BP
        M = (B @ (HBP * Pc[:, None, :]).reshape(N, r * c)).reshape(r, r, c)  # (B[p]*P).H(B[q]*P)
        quad = torch.einsum("kp,kq,pqc->kc", C, C, M)  # (K, c): a.H a for every l2
        out[:, sl] = (Szz[sl][None] - 2.0 * linear + quad) / val.n
    return out


def _solve_eig(m: _stats.Moments, l2: Tensor, choice: Tensor) -> tuple[Tensor, Tensor]:
    """Ridge on all of m's rows with penalty l2[choice[e]] for example e.

    Returns (weights (N, E), bias (E,)). Consumes m.gram and m.vty.
    """
    mv, my = m.means()
    N, E = m.vty.shape
    s = m.sv.element_size()
    Gc = _stats.centered_gram_(m, mv, inplace=True)
    m.gram = None
    d, Q = torch.linalg.eigh(Gc)
    del Gc
    P = Q.T @ _stats.centered_cross_(m, mv, my, inplace=True)  # (N, E)
    m.vty = None
    F = _stats.ridge_filter(d, m.n, l2)  # (K, N)
    W = torch.empty_like(P)
    step = _chunk(2 * N, s, E)
    for k in torch.unique(choice).tolist():
        cols = (choice == k).nonzero().squeeze(1)
        for c0 in range(0, cols.numel(), step):
            idx = cols[c0 : c0 + step]
            W[:, idx] = Q @ (F[k][:, None] * P[:, idx])
    bias = my - W.T @ mv
    return W, bias


# --------------------------------------------------------------------------- the fit


@torch.no_grad()
def _fit_ridge(
    source: Any,
    *,
    method: str,
    l2_grid: Any,
    val_fraction: float,
    seed: int,
    solver: str,
    device: Any,
    dtype: torch.dtype,
    max_memory: int | None,
    max_iter: int,
    tol: float | None,
    progress: bool | None,
) -> tuple[_stats.Source, _stats.Result]:
    """Ridge (``method="ridge"``) or least squares (``"ols"``, ``l2_grid=(0.0,)``)."""
    _stats.check_common(val_fraction, dtype, seed, progress)
    max_iter = _stats.check_max_iter(max_iter)
    tol = _stats.default_tol(tol, dtype, float64=1e-10, float32=1e-5)
    if solver not in SOLVERS:
        raise FitError(f"solver must be one of {SOLVERS}, got {solver!r}.")
    src = _stats.Source(source)
    dev = _stats.resolve_device(device, src)
    N, E = src.n_components, src.n_examples
    s = torch.finfo(dtype).bits // 8
    grid_given = None if l2_grid is None else _stats.as_grid(l2_grid, "l2_grid", dtype, dev)
    validate = grid_given is None or grid_given.numel() > 1
    if validate and val_fraction <= 0:
        raise FitError(
            "Choosing l2 from a grid needs validation rows, but val_fraction=0. Pass "
            "val_fraction > 0 (e.g. 0.1) or a single l2 value."
        )
    budget = _stats.budget(dev, max_memory)
    need = _eig_bytes(N, E, s, validate=validate)
    if solver == "auto":
        solver = "eig" if budget is None or need <= budget else "cg"
        log.info("fit: solver=%s (eig needs %s, budget %s)", solver, _stats.gib(need), budget)
    if solver == "eig":
        _stats.need_memory(
            need,
            budget,
            f"The eigendecomposition solver with {N} components and {E} examples",
            "Use solver='cg' (streams the store, bounded memory), dtype=torch.float32 "
            "(halves it), or fewer components.",
        )
    parts = _stats.accumulate(
        src,
        validate=validate,
        seed=seed,
        val_fraction=val_fraction,
        with_gram=solver == "eig",
        device=dev,
        dtype=dtype,
        progress=progress,
    )
    _stats.check_rows(parts, validate=validate, val_fraction=val_fraction, need=2)
    n_all = sum(m.n for m in parts)
    n_val = parts[1].n if validate else 0
    if method == "ols" and n_all < N + 1:
        raise FitError(
            f"OLS with {N} components and an intercept needs at least {N + 1} finished rows to "
            f"determine every weight, got {n_all}. Collect more masks or use method='ridge'."
        )
    var = _stats.mask_variance(parts[0])
    grid = grid_given
    if grid is None:
        grid = var * torch.tensor(_stats.DEFAULT_L2_RELATIVE, dtype=dtype, device=dev)
    info: dict[str, Any] = {}
    if solver == "eig":
        if validate:
            val_mse = _validation_errors_eig(parts[0], parts[1], grid)
            choice = val_mse.argmin(0)
            every = parts[0].merge_(parts[1])
        else:
            val_mse, every = None, parts[0]
            choice = torch.zeros(E, dtype=torch.long, device=dev)
        W, bias = _solve_eig(every, grid, choice)
    else:
        W, bias, choice, val_mse, info = _cg.solve(
            src,
            parts,
            grid,
            validate=validate,
            seed=seed,
            val_fraction=val_fraction,
            device=dev,
            dtype=dtype,
            budget=budget,
            max_iter=max_iter,
            tol=tol,
            progress=progress,
        )
    l2 = grid[choice]
    meta = {
        "method": method,
        "solver": solver,
        "dtype": str(dtype).removeprefix("torch."),
        "seed": int(seed),
        "val_fraction": float(val_fraction) if validate else 0.0,
        "n_rows": n_all,
        "n_train": n_all - n_val,
        "n_val": n_val,
        "l2_grid": grid.tolist(),
        "l2": l2.tolist(),
        "val_mse": None if val_mse is None else val_mse.gather(0, choice[None])[0].tolist(),
        **info,
    }
    return src, _stats.Result(W, bias, l2, val_mse, grid, meta)


class RidgePath:
    """Ridge regression over a grid of ``l2`` penalties, ``l2`` chosen per example.

    Parameters
    ----------
    l2_grid : sequence of float, optional
        Penalties per row (see the module docstring; scikit-learn's ``alpha`` is
        ``l2 * n_rows``). Default: 21 values, ``1e-8`` to ``1e2`` times the mask variance.
        One value fits all rows with it, without validation.
    val_fraction : float
        Share of rows held out to choose ``l2``; row ``i``'s side depends only on
        ``(seed, i)``.
    seed : int
        Seed of the training/validation split.
    solver : {"auto", "eig", "cg"}
        ``"eig"``: one eigendecomposition of the Gram (memory ``~ 6 N**2`` numbers).
        ``"cg"``: conjugate gradients over streamed passes (no ``N x N`` matrix).
        ``"auto"``: ``"eig"`` if it fits the memory budget, else ``"cg"``.
    device, dtype :
        Where and in what precision to accumulate and solve (default: the source's device,
        float64).
    max_memory : int, optional
        Memory budget in bytes (default: the free memory of ``device``).
    max_iter, tol :
        Conjugate-gradient limits: stop a system when ``|r| <= tol * |b|`` (default tol:
        1e-10 in float64, 1e-5 in float32).
    progress : bool, optional
        Show progress bars: None (default) only when stderr is a terminal, True always,
        False never.

    Attributes
    ----------
    weights_ : Tensor (n_examples, n_components) float32
    bias_ : Tensor (n_examples,) float32
    l2_ : Tensor (n_examples,) the chosen penalty per example
    l2_grid_ : Tensor (K,) the grid used (absolute values)
    val_mse_ : Tensor (K, n_examples) or None, validation mean squared error per ``l2``
    solver_ : str, the solver used
    attributions_ : Attributions

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> V = torch.rand(400, 6, generator=g) > 0.3
    >>> Y = V.double() @ torch.tensor([[1.0, 0, 0, -2, 0, 0.5]]).T.double() + 3.0
    >>> est = RidgePath(max_memory=2**30, progress=False).fit((V, Y))
    >>> torch.allclose(est.weights_, torch.tensor([[1.0, 0, 0, -2, 0, 0.5]]), atol=1e-6)
    True
    >>> est.solver_, est.l2_grid_.shape, est.val_mse_.shape
    ('eig', torch.Size([21]), torch.Size([21, 1]))
    """

    def __init__(
        self,
        l2_grid: Sequence[float] | None = None,
        *,
        val_fraction: float = 0.1,
        seed: int = 0,
        solver: str = "auto",
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float64,
        max_memory: int | None = None,
        max_iter: int = 1000,
        tol: float | None = None,
        progress: bool | None = None,
    ):
        self.l2_grid = l2_grid
        self.val_fraction = val_fraction
        self.seed = seed
        self.solver = solver
        self.device = device
        self.dtype = dtype
        self.max_memory = max_memory
        self.max_iter = max_iter
        self.tol = tol
        self.progress = progress

    def fit(self, source: Any) -> RidgePath:
        """Fit on a ComponentDataset or a ``(masks, outputs)`` tuple; returns ``self``."""
        src, res = _fit_ridge(
            source,
            method="ridge",
            l2_grid=self.l2_grid,
            val_fraction=self.val_fraction,
            seed=self.seed,
            solver=self.solver,
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
        self.l2_ = res.penalty
        self.l2_grid_ = res.grid
        self.val_mse_ = res.val_mse
        self.solver_ = res.meta["solver"]
        return self


class LeastSquares:
    """Least squares with an intercept, ``method="ols"``: ridge with ``l2 = 0``.

    The pseudo-inverse is taken through the eigendecomposition of the centred Gram; a
    component that never varies gets weight 0. All rows are used (nothing to choose).
    Parameters as :class:`RidgePath` without the grid and the split.

    Attributes
    ----------
    weights_, bias_, solver_, attributions_ : as :class:`RidgePath`

    Examples
    --------
    >>> import torch
    >>> V = torch.tensor([[1, 1], [0, 1], [1, 0], [0, 0], [1, 1]], dtype=torch.bool)
    >>> Y = torch.tensor([[5.0], [3.0], [4.0], [2.0], [5.0]])   # 2 + 2*v0 + 1*v1
    >>> est = LeastSquares(progress=False).fit((V, Y))
    >>> est.weights_, est.bias_
    (tensor([[2., 1.]]), tensor([2.]))
    """

    def __init__(
        self,
        *,
        solver: str = "auto",
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float64,
        max_memory: int | None = None,
        max_iter: int = 1000,
        tol: float | None = None,
        progress: bool | None = None,
    ):
        self.solver = solver
        self.device = device
        self.dtype = dtype
        self.max_memory = max_memory
        self.max_iter = max_iter
        self.tol = tol
        self.progress = progress

    def fit(self, source: Any) -> LeastSquares:
        """Fit on a ComponentDataset or a ``(masks, outputs)`` tuple; returns ``self``."""
        src, res = _fit_ridge(
            source,
            method="ols",
            l2_grid=(0.0,),
            val_fraction=0.1,  # unused: one penalty value means no split
            seed=0,
            solver=self.solver,
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
        self.solver_ = res.meta["solver"]
        return self
