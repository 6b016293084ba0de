"""Regression: fitting component attributions from a component dataset.

For every example ``e`` the attribution is the linear model
``y[:, e] ~ bias[e] + V @ weights[e]`` over the keep-masks ``V`` (n_rows, n_components),
fitted with an intercept. All examples share the design matrix, so everything is
computed from *sufficient statistics* gathered in one streamed pass over the store: the
row count, ``sum v``, ``sum y``, ``sum y**2``, ``V.T @ V`` and ``V.T @ Y``. Weights come
back on the raw mask scale with the matching bias (``bias = mean_y - weights @ mean_v``);
nothing is standardised.

:func:`fit` is the front door; ``method`` names the estimator, each one a
scikit-learn-style class in its own module:

========== ====================================== ==========================================
method     estimator                              what it does
========== ====================================== ==========================================
``ridge``  :class:`RidgePath` (:mod:`.ridge`)     ridge; ``l2`` chosen per example on
                                                  held-out rows; primal or dual
                                                  eigendecomposition, or conjugate
                                                  gradients, by estimated cost
``ols``    :class:`LeastSquares` (:mod:`.ridge`)  least squares (pseudo-inverse)
``lasso``  :class:`LassoPath` (:mod:`.lasso`)     the lasso by FISTA; ``l1`` chosen per
                                                  example on held-out rows
``group``  :class:`PriorRidge` (:mod:`.group`)    one penalty per group of components,
                                                  optionally centred on a prior, chosen by
                                                  generalised cross-validation
========== ====================================== ==========================================

:class:`PairwiseInteractions` (:mod:`.interactions`) optionally adds pairwise terms over
each example's top components to a fitted linear model (a second-order model, for larger
``alpha``).

The held-out rows are a pure function of ``(seed, row index)``, so the split does not
depend on block sizes or on how far a store has grown. The statistics, the split and the
memory budget shared by the estimators live in :mod:`coarpy.regression._stats`. Ridge
and group read the source once into memory (:mod:`._rows`: bit-packed masks and the
outputs) and never again; :mod:`._cost` estimates the time and memory of each solver
and states its formulas, and a fit that does not fit the budget (``max_memory``, else
the device's free memory) is refused before the pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..attributions import Attributions
from ..errors import FitError
from . import _prior, _stats
from ._stats import DEFAULT_L2_RELATIVE
from .group import DEFAULT_PRIOR_SCALES, PriorRidge
from .interactions import PairwiseInteractions
from .lasso import DEFAULT_L1_RELATIVE, LassoPath
from .ridge import SOLVERS, LeastSquares, RidgePath

METHODS = ("ridge", "ols", "lasso", "group")

__all__ = [
    "DEFAULT_L1_RELATIVE",
    "DEFAULT_L2_RELATIVE",
    "DEFAULT_PRIOR_SCALES",
    "METHODS",
    "SOLVERS",
    "LassoPath",
    "LeastSquares",
    "PairwiseInteractions",
    "PriorRidge",
    "RidgePath",
    "fit",
]


def fit(
    source: Any,
    *,
    method: str = "group",
    l2_grid: Sequence[float] | None = None,
    l1_grid: Sequence[float] | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    solver: str = "auto",
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float64,
    max_memory: int | None = None,
    max_iter: int | None = None,
    tol: float | None = None,
    progress: bool | None = None,
    prior: Any = None,
    groups: Sequence[Any] | None = None,
    model: Any = None,
    components: Any = None,
    data: Any = None,
    output: Any = None,
) -> Attributions:
    """Fit one linear model per example over the components: the COAR attributions.

    Parameters
    ----------
    source : ComponentDataset or tuple (masks, outputs)
        A store (read with one streamed pass over its finished blocks), or in-memory
        masks ``(n_rows, n_components)`` (bool or 0/1) and outputs ``(n_rows, n_examples)``.
    method : {"group", "ridge", "ols", "lasso"}
        The estimator (see the module docstring). ``"group"`` (default) penalises each
        group of components on its own scale, shrinks toward ``prior`` and chooses by
        GCV: ``bench/RESULTS_efficiency.md`` measured it never worse than ``"ridge"``
        and much better with few masks, most of all centred on the gradient.
        ``"ridge"`` chooses one ``l2`` per example on held-out rows.
    l2_grid : sequence of float, optional
        Ridge penalties per row (``sklearn alpha = l2 * n_rows``); ``"ridge"`` and
        ``"group"``.
    l1_grid : sequence of float, optional
        Lasso penalties (``sklearn Lasso alpha = l1``); ``"lasso"`` only.
    val_fraction, seed :
        The held-out share of rows (default 0.1) and the seed of the split (a pure
        function of ``(seed, row index)``); ``"ridge"`` and ``"lasso"`` only (``"group"``
        holds out nothing: it chooses by GCV).
    solver : {"auto", "eig", "dual", "cg"}
        ``"auto"`` (default) picks by estimated time and memory and logs why (INFO):
        ``"eig"`` (primal, ``N x N``) when components are few, ``"dual"`` (``n x n``) when
        masks are fewer than components, ``"cg"`` when neither fits. See
        :class:`RidgePath`; ``"group"`` takes ``"eig"`` or ``"dual"``.
    device, dtype :
        Where and in what precision to compute (default: the source's device, float64).
    max_memory : int, optional
        Memory budget in bytes (default: free memory on ``device``).
    max_iter, tol : optional
        Iterative solver limits (CG: 1000 and 1e-10, lasso: 5000 and 1e-7; both tol 1e-5
        in float32).
    progress : bool, optional
        Progress bars over the passes: None (default) only when stderr is a terminal,
        True always, False never.
    prior : "gradient", "expected_gradient", Attributions or Tensor, optional
        ``"group"`` only: the prior mean, (n_examples, n_components) when given as
        attributions or a tensor. ``"gradient"`` computes
        ``coarpy.baselines.gradient`` from ``model``, ``components``, ``data`` and
        ``output`` (with the store's ablation mode) and refuses it unless they are the
        ones the store was collected with; ``"expected_gradient"`` likewise computes
        ``coarpy.baselines.expected_gradient`` (16 ablation states drawn at the store's
        ``alpha``: 16 backward passes, a better prior where the model is not linear
        around the full model); or pass a precomputed prior. The meta records which:
        ``meta["prior"]`` is ``"gradient"``, ``"expected_gradient"``, ``"given"`` or
        ``"none"``.
    groups : sequence of labels (n_components,), optional
        ``"group"`` only: the group of each component (default: the store's modules).
    model, components, data, output :
        ``prior="gradient"`` or ``"expected_gradient"`` only: as given to ``collect``
        (``output`` default: the margin).

    Returns
    -------
    Attributions
        ``weights`` (n_examples, n_components) on the raw mask scale, ``bias``, component
        ``names`` (``str(i)`` for a tuple), and ``meta`` with the settings, the chosen
        penalty per example and the split sizes.

    Raises
    ------
    FitError
        An unknown method or a setting that belongs to another method, a
        ``prior="gradient"`` whose model, components or examples are not the store's,
        no finished rows,
        too few rows, non-finite outputs (naming the row and example), mismatched
        shapes, or not enough memory (naming the bytes needed).

    Examples
    --------
    >>> import torch
    >>> V = torch.tensor([[1, 1], [0, 1], [1, 0], [0, 0], [1, 1]], dtype=torch.bool)
    >>> Y = torch.tensor([[5.0], [3.0], [4.0], [2.0], [5.0]])   # 2 + 2*v0 + 1*v1
    >>> attr = fit((V, Y), method="ols", progress=False)
    >>> attr.weights, attr.bias
    (tensor([[2., 1.]]), tensor([2.]))
    >>> default = fit((V, Y), progress=False)
    >>> default.meta["method"], default.meta["prior"]
    ('group', 'none')
    """
    if method not in METHODS:
        raise FitError(
            f"method must be one of {METHODS}, got {method!r}. 'group' is the default; "
            "'ridge' for one penalty per example, 'lasso' for sparse attributions."
        )
    if method != "group" and (prior is not None or groups is not None):
        raise FitError(
            f"prior= and groups= are for method='group', got method={method!r}. Pass "
            "method='group', or drop them."
        )
    if method in ("group", "ols") and val_fraction is not None:
        raise FitError(
            f"method={method!r} holds out no rows, so val_fraction= does not apply (it is for "
            "'ridge' and 'lasso'). Drop it, or pass method='ridge'."
        )
    if isinstance(prior, str) and prior not in _prior.PRIORS:
        raise FitError(
            f"prior must be {' or '.join(map(repr, _prior.PRIORS))}, an Attributions or a "
            f"tensor (n_examples, n_components), got {prior!r}."
        )
    given = {"model": model, "components": components, "data": data, "output": output}
    if not isinstance(prior, str) and any(v is not None for v in given.values()):
        named = ", ".join(k for k, v in given.items() if v is not None)
        raise FitError(
            f"{named} are for prior='gradient' or 'expected_gradient' (fit computes the "
            f"prior from them), got "
            f"prior={prior!r}. Pass prior='gradient', or drop them."
        )
    val_fraction = 0.1 if val_fraction is None else val_fraction
    if method in ("ridge", "ols", "group") and l1_grid is not None:
        raise FitError(
            f"method={method!r} takes l2_grid, not l1_grid (that is for 'lasso'). Rename the "
            "argument, or pass method='lasso'."
        )
    if method in ("lasso", "ols") and l2_grid is not None:
        fix = "pass l1_grid" if method == "lasso" else "use method='ridge' to pass l2_grid"
        raise FitError(f"method={method!r} takes no l2_grid; {fix}.")
    if (method == "lasso" and solver not in ("auto", "eig")) or (
        method == "group" and solver not in ("auto", "eig", "dual")
    ):
        raise FitError(
            f"method={method!r} has its own solver (lasso: FISTA; group: one "
            "eigendecomposition per step, primal 'eig' or 'dual'); solver= is for 'ridge' and "
            f"'ols', got solver={solver!r}."
        )
    est: RidgePath | LeastSquares | LassoPath | PriorRidge
    used = "none" if prior is None else "given"
    if isinstance(prior, str):  # computed here from the model, checked against the store
        src = _stats.Source(source)
        share = None if src.store is not None else float(1.0 - src.V.float().mean())
        name, prior = prior, _prior.gradient_prior(
            src.meta if src.store is not None else None, src.names, src.n_examples,
            progress=progress, method=prior, alpha=share, **given,
        )  # fmt: skip
        used = name
    if method == "group":
        est = PriorRidge(
            prior, groups=groups, l2_grid=l2_grid, solver=solver, device=device, dtype=dtype,
            max_memory=max_memory, progress=progress,
        )  # fmt: skip
    elif method == "lasso":
        est = LassoPath(
            l1_grid, val_fraction=val_fraction, seed=seed, device=device, dtype=dtype,
            max_memory=max_memory, max_iter=5000 if max_iter is None else max_iter, tol=tol,
            progress=progress,
        )  # fmt: skip
    elif method == "ols":
        est = LeastSquares(
            solver=solver, device=device, dtype=dtype, max_memory=max_memory,
            max_iter=1000 if max_iter is None else max_iter, tol=tol, progress=progress,
        )  # fmt: skip
    else:
        est = RidgePath(
            l2_grid, val_fraction=val_fraction, seed=seed, solver=solver, device=device,
            dtype=dtype, max_memory=max_memory, max_iter=1000 if max_iter is None else max_iter,
            tol=tol, progress=progress,
        )  # fmt: skip
    attr = est.fit(source).attributions_
    if method == "group":  # PriorRidge records "none" or "given"; fit knows it computed it
        attr.meta["prior"] = used
    return attr
