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

Solvers
-------
Everything starts from one streamed pass over the source (:mod:`._rows`): the masks are
kept bit-packed and the outputs as stored, training rows first; no solver reads the
source again. Then, with ``n`` rows, ``N`` components and ``E`` examples:

- ``solver="eig"`` (primal): the ``N x N`` Gram of the training rows, one
  eigendecomposition for the whole grid and the validation errors, then the refit on
  all rows by one Cholesky factorisation per distinct chosen ``l2`` (:mod:`._refit`).
  Cheapest when ``N`` is small.
- ``solver="dual"`` (:mod:`._dual`): the same fit through the ``n x n`` kernel of the
  masks, ``w = Vc.T (Vc Vc.T + n * l2 * I)^-1 yc``; the same split and the same rule,
  so it agrees with ``"eig"`` to rounding. Cheapest when masks are fewer than
  components (the paper's ViT-B/16: 5,000 masks, 82,944 components).
- ``solver="cg"`` (:mod:`._cg`): conjugate gradients over the kept rows; never forms
  an ``N x N`` or ``n x n`` matrix. For when both are too large for memory.
- ``solver="auto"`` estimates the time and memory of each (:mod:`._cost`, which states
  the formulas), takes the fastest that fits the memory budget, and logs one line
  (``logging``, INFO, logger ``coarpy.regression.ridge``) saying which and why; the
  reason is kept in the attributions' meta (``solver``, ``solver_reason``). An explicit
  solver that does not fit, or ``"auto"`` when none does, raises
  :class:`~coarpy.errors.FitError` with the bytes needed, before the pass.

Examples are processed in chunks sized to the budget (``example_chunk`` in the meta), so
``V.T @ Y`` and the weights of many examples (ImageNet: 50,000) are never all held in
working memory at once; the result itself is written once, as float32.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._engine import progress_bar
from ..errors import FitError
from . import _cg, _cost, _dual, _refit, _rows, _stats

log = logging.getLogger(__name__)

SOLVERS = ("auto", "eig", "dual", "cg")


# --------------------------------------------------------------------------- primal


def _low_rank(F: Tensor) -> tuple[Tensor, Tensor]:
    """F (K, m) = C @ B with C (K, r), B (r, m): a truncated SVD, exact to K * eps."""
    U, sig, B = torch.linalg.svd(F, full_matrices=False)
    r = max(1, int((sig > sig[0] * F.shape[0] * torch.finfo(F.dtype).eps).sum()))
    return U[:, :r] * sig[:r], B[:r]


def _errors_chunk(
    P: Tensor, R: Tensor, Szz: Tensor, F: Tensor, C: Tensor, B: Tensor, H: Tensor, n_val: int
) -> Tensor:
    """(K, c) validation mean squared error for one chunk of examples (see below)."""
    N, c = P.shape
    r = B.shape[0]
    linear = F @ (P * R)  # (K, c): a.R for every l2
    BP = (B.T[:, :, None] * P[:, None, :]).reshape(N, r * c)  # (N, r*c): B[q] * P
    HBP = (H @ BP).reshape(N, r, c)  # (N, r, c)
    del BP
    M = (B @ (HBP * P[:, None, :]).reshape(N, r * c)).reshape(r, r, c)  # (B[p]*P).H(B[q]*P)
    quad = torch.einsum("kp,kq,pqc->kc", C, C, M)  # (K, c): a.H a for every l2
    return (Szz[None] - 2.0 * linear + quad) / n_val


def _primal_validation(
    rows: _rows.Rows,
    grid: Tensor,
    *,
    chunk: int,
    cache: Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool | None,
) -> tuple[Tensor, float]:
    """(K, E) validation mean squared error of the training-row ridge fit for every l2,
    and the smallest eigenvalue that matters for the refit (see :mod:`._refit`).

    With w = Q a (Q: eigenvectors of the training Gram, a = F[k] * P the filtered
    projections), the validation error of w is Szz - 2 a.R + a.H a, where R = Q.T Suz and
    H = Q.T Suu Q are the validation cross-products centred at the training means, rotated
    into the eigenbasis.

    The quadratic term is the costly one (an N x N product per l2). The filters
    F[k, i] = 1 / (d_i + n l2_k) are smooth in l2, so the (K, N) matrix F has numerical
    rank r of about 10 whatever K is: with F = C @ B (a truncated SVD, exact to K * eps)
    a.H a = sum_{p,q} C[k,p] C[k,q] (B[p] * P).H (B[q] * P) needs r products with H, not K.

    ``V.T @ Y`` is formed a chunk of examples at a time; with ``cache`` given (N, E), the
    all-rows products are kept there for the refit.
    """
    train, val = rows.parts
    nt, n, N, E = rows.n_train, rows.n, rows.n_components, rows.n_examples
    s = torch.finfo(dtype).bits // 8
    train.gram = rows.gram(0, nt, dtype, device, progress)
    val.gram = rows.gram(nt, n, dtype, device, progress)
    mv, my = train.means()
    Gc = _stats.centered_gram_(train, mv)  # (N, N)
    with progress_bar(1, progress, desc=f"fit: eigendecomposition {N}x{N}", unit="") as bar:
        d, Q = torch.linalg.eigh(Gc)  # (N,), (N, N)
        bar.update(1)
    del Gc
    Suu = _stats.centered_gram_(val, mv)  # (N, N) validation rows, centred at the training means
    H = Q.T @ Suu
    del Suu
    H = H @ Q  # (N, N)
    Szz = _stats.centered_yy(val, my)  # (E,)
    F = _stats.ridge_filter(d, train.n, grid)  # (K, N)
    # A component that never varies has an exact zero row in the Gram: a harmless null.
    constant = int((train.sv - train.n * mv * mv == 0).sum())
    min_eig = _refit.smallest_relevant(d, N, exact_nulls=constant)
    C, B = _low_rank(F)
    K = F.shape[0]
    out = torch.empty(K, E, dtype=dtype, device=device)
    inner = max(1, min(chunk, _stats.WORK_BYTES // max(1, 3 * B.shape[0] * N * s)))
    with progress_bar(E, progress, desc="fit: validation", unit="example") as bar:
        for e0 in range(0, E, chunk):
            sl = slice(e0, min(e0 + chunk, E))
            raw_t = rows.cross(0, nt, sl, dtype, device)  # (N, c)
            raw_v = rows.cross(nt, n, sl, dtype, device)
            if cache is not None:
                torch.add(raw_t, raw_v, out=cache[:, sl])
            tr = _stats.Moments(train.n, train.sv, train.sy[sl], train.syy[sl], None, raw_t)
            va = _stats.Moments(val.n, val.sv, val.sy[sl], val.syy[sl], None, raw_v)
            P = Q.T @ _stats.centered_cross_(tr, mv, my[sl], inplace=True)  # (N, c)
            R = Q.T @ _stats.centered_cross_(va, mv, my[sl], inplace=True)
            del raw_t, raw_v
            for i0 in range(0, P.shape[1], inner):
                j = slice(i0, i0 + inner)
                out[:, e0 + i0 : e0 + min(i0 + inner, P.shape[1])] = _errors_chunk(
                    P[:, j], R[:, j], Szz[sl][j], F, C, B, H, val.n
                )
            bar.update(sl.stop - sl.start)
    return out, min_eig


def _primal(
    rows: _rows.Rows,
    grid: Tensor,
    *,
    validate: bool,
    dtype: torch.dtype,
    device: torch.device,
    plan: _cost.Estimate,
    progress: bool | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, dict]:
    """Ridge through the N x N Gram. Returns (weights (E, N) float32, bias (E,),
    choice (E,), val_mse (K, E) or None, info)."""
    n, N, E = rows.n, rows.n_components, rows.n_examples
    cache = None
    min_eig = 0.0
    if validate:
        if plan.keep:
            cache = torch.empty(N, E, dtype=dtype, device=device)
        val_mse, min_eig = _primal_validation(
            rows, grid, chunk=plan.chunk, cache=cache, dtype=dtype, device=device,
            progress=progress,
        )  # fmt: skip
        choice = val_mse.argmin(0)
        every = rows.parts[0].merge_(rows.parts[1])
    else:
        val_mse = None
        choice = torch.zeros(E, dtype=torch.long, device=device)
        every = rows.parts[0]
        every.gram = rows.gram(0, n, dtype, device, progress)
    mv, my = every.means()
    Gc = _stats.centered_gram_(every, mv, inplace=True)
    every.gram = None
    weights = torch.empty(E, N, dtype=torch.float32, device=device)
    bias = torch.empty(E, dtype=dtype, device=device)

    def rhs(idx: Tensor) -> Tensor:
        raw = cache[:, idx] if cache is not None else rows.cross(0, n, idx, dtype, device)
        m = _stats.Moments(every.n, every.sv, every.sy[idx], every.syy[idx], None, raw)
        return _stats.centered_cross_(m, mv, my[idx], inplace=True)  # (N, c)

    def done(idx: Tensor, W: Tensor) -> None:
        weights[idx] = W.T.to(torch.float32)
        bias[idx] = my[idx] - W.T @ mv

    info = _refit.refit(
        Gc, n, grid, choice, rhs, done, chunk=plan.chunk, progress=progress, min_eig=min_eig
    )
    return weights, bias, choice, val_mse, info


# --------------------------------------------------------------------------- the fit


def _plan(
    src: _stats.Source,
    *,
    n: int,
    n_val: int,
    K: int,
    dtype: torch.dtype,
    budget: int | None,
    solver: str,
    l2_ratio: float,
    max_iter: int,
    rate: float,
) -> _cost.Plan:
    """Estimate every solver for this shape; the chosen one, or FitError if it does not fit."""
    s = torch.finfo(dtype).bits // 8
    y_bytes = src.Y.element_size() if src.store is None else 4
    shape = _cost.Shape(
        n=n, n_val=n_val, N=src.n_components, E=src.n_examples, K=K, s=s, y_bytes=y_bytes,
        l2_ratio=l2_ratio, max_iter=max_iter,
    )  # fmt: skip
    plan = _cost.choose(shape, budget, solver, rate, _cost.ESTIMATORS)
    if solver != "auto":
        fixes = {
            "eig": "Use solver='dual' (fewer masks than components) or solver='cg' "
            "(bounded memory), dtype=torch.float32 (halves it), or fewer components.",
            "dual": "Use solver='eig' (fewer components than masks) or solver='cg' "
            "(bounded memory), dtype=torch.float32 (halves it), or fewer masks.",
            "cg": "Use fewer l2 values, dtype=torch.float32, or a machine with more memory.",
        }
        names = {"eig": "eigendecomposition", "dual": "dual", "cg": "CG"}
        _stats.need_memory(
            plan.estimate.bytes,
            budget,
            f"The {names[solver]} solver with {src.n_components} components, {n} rows and "
            f"{src.n_examples} examples",
            fixes[solver],
        )
    return plan


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
        raise FitError(
            f"solver must be one of {SOLVERS}, got {solver!r}. 'auto' picks by estimated "
            "time and memory."
        )
    src = _stats.Source(source)
    dev = _stats.resolve_device(device, src)
    N = src.n_components
    grid_given = None if l2_grid is None else _stats.as_grid(l2_grid, "l2_grid", dtype, dev)
    validate = grid_given is None or grid_given.numel() > 1
    if validate and val_fraction <= 0:
        raise FitError(
            "Choosing l2 from a grid needs validation rows, but val_fraction=0. Pass "
            "val_fraction > 0 (e.g. 0.1) or a single l2 value."
        )
    budget = _stats.budget(dev, max_memory)
    K = 1 if not validate else (grid_given.numel() if grid_given is not None else 21)
    rate = _cost.gemm_rate(dev, dtype)

    def ratio(var: float) -> float:  # the smallest penalty over the mask variance
        if grid_given is None:
            return float(_stats.DEFAULT_L2_RELATIVE[0])
        return float(grid_given.min()) / var

    plan_kw = dict(K=K, dtype=dtype, budget=budget, solver=solver, max_iter=max_iter, rate=rate)
    if src.n_rows:  # refuse up front, before the pass, when nothing fits
        n_guess = src.n_rows
        v_guess = max(1, round(val_fraction * n_guess)) if validate else 0
        _plan(src, n=n_guess, n_val=v_guess, l2_ratio=ratio(0.25), **plan_kw)
    rows = _rows.read(
        src,
        validate=validate,
        seed=seed,
        val_fraction=val_fraction,
        device=dev,
        dtype=dtype,
        progress=progress,
    )
    parts = rows.parts
    _stats.check_rows(parts, validate=validate, val_fraction=val_fraction, need=2)
    n_all = rows.n
    n_val = n_all - rows.n_train if validate else 0
    if method == "ols" and n_all < N + 1:
        raise FitError(
            f"OLS with {N} components and an intercept needs at least {N + 1} finished rows to "
            f"determine every weight, got {n_all}. Collect more masks or use method='ridge'."
        )
    var = _stats.mask_variance(parts[0])
    grid = grid_given
    if grid is None:
        grid = var * torch.tensor(_stats.DEFAULT_L2_RELATIVE, dtype=dtype, device=dev)
    plan = _plan(src, n=n_all, n_val=n_val, l2_ratio=ratio(var), **plan_kw)
    log.info("fit: solver=%s", plan.log_line)
    solver = plan.solver
    kw = dict(validate=validate, dtype=dtype, device=dev, progress=progress)
    if solver == "eig":
        W, bias, choice, val_mse, info = _primal(rows, grid, plan=plan.estimate, **kw)
    elif solver == "dual":
        W, bias, choice, val_mse, info = _dual.solve(rows, grid, chunk=plan.estimate.chunk, **kw)
    else:
        W, bias, choice, val_mse, info = _cg.solve(
            rows, grid, chunk=plan.estimate.chunk, max_iter=max_iter, tol=tol, **kw
        )
    l2 = grid[choice]
    meta = {
        "method": method,
        "solver": solver,
        **plan.meta(),
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
    solver : {"auto", "eig", "dual", "cg"}
        ``"eig"``: the primal, one eigendecomposition of the ``N x N`` Gram.
        ``"dual"``: the same through the ``n x n`` kernel of the masks (fewer masks than
        components). ``"cg"``: conjugate gradients over the kept rows (no ``N x N`` or
        ``n x n`` matrix). ``"auto"``: the fastest by estimate that fits the memory
        budget (see the module docstring).
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
