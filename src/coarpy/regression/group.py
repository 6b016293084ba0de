"""Group ridge, ``method="group"`` (:class:`PriorRidge`): per-group penalties and a prior mean.

Plain ridge shrinks every component's weight toward zero by the same amount. With few
masks that wastes information in two ways:

- **Components come in groups that differ in scale.** The heads of one layer, the
  neurons of another, the channels of a conv layer: a group of large effects and a
  group of tiny ones get the same penalty, so either the small ones are fitted to noise
  or the large ones are shrunk away. Here every group ``g`` gets its own penalty
  ``l2 * r_g``. The relative penalties ``r_g`` are estimated across examples (empirical
  Bayes): a pilot fit gives every example's weights, ``tau_g**2`` is the mean over
  examples of a group's mean squared weight relative to the example's, and
  ``r_g = 1 / tau_g**2``. The pilot is refitted with those penalties ``n_iter`` times;
  the pilots pool ``pilot_examples`` (256) evenly spaced examples, since they estimate
  one number per group.
  The ``r_g`` are normalised so that their geometric mean over components is 1: equal
  group penalties are plain ridge.
- **A cheap estimate is a better centre than zero.** The gradient (attribution
  patching) costs one backward pass per example and gives a rough estimate ``w0`` of
  every weight. Shrinking toward ``c * w0`` instead of zero keeps its information
  where the masks say little. ``c`` is chosen per example from ``prior_scales``
  (``0`` included, so the prior is ignored when it does not help).

Per example ``e``, with ``r_j`` the relative penalty of component ``j``'s group, the
weights minimise::

    (1/n) * sum_i (y_ie - b_e - w . v_i)**2 + l2_e * sum_j r_j (w_j - c_e w0_ej)**2

The penalty is per row as in :mod:`coarpy.regression.ridge` (scikit-learn's ``alpha`` is
``l2 * n``). Substituting ``u = (w - c w0) / s`` with ``s_j = r_j ** -0.5`` turns this
into plain ridge on the columns ``V * s`` and the outputs ``y - c V w0``, and all of it
follows from the same sufficient statistics (``V.T V``, ``V.T y``, the sums): the
shifted cross-products are ``V.T y - c V.T V w0``. One eigendecomposition of the scaled
centred Gram ``S Vc.T Vc S = Q diag(d) Q.T`` then gives every ``(c, l2)`` at once.

``l2`` and ``c`` are chosen per example by generalised cross-validation (GCV), which
approximates leave-one-out error from the eigendecomposition of all rows::

    GCV = n * RSS / (n - df)**2,   df = 1 + sum_i d_i / (d_i + n * l2)

so no rows are held out: with few masks, a 10% validation split is a handful of rows
and its choice of penalty is noisy, while GCV fits and selects on all of them.

Solvers, time and memory
------------------------
The fit reads the rows once (:mod:`._rows`) and then works from memory, in the primal
or the dual (:mod:`._gcv`), whichever the estimate of :mod:`._cost` says is faster
(``solver="auto"``; ``"eig"`` or ``"dual"`` to choose): ``n_iter + 1``
eigendecompositions of the ``N x N`` scaled Gram (about ``5 s N**2`` bytes for ``s``
bytes per number), or, with fewer masks than components, of the ``n x n`` scaled
kernel (about ``12 n**2`` bytes plus ``4 n**2`` per group when the group kernels are
kept); the dual pilots run in float32, the final fit in ``dtype``. Examples are
processed in chunks, so memory does not grow with ``E`` beyond the kept outputs and the
result. The choice, and why, is logged (INFO) and kept in the
meta (``solver``, ``solver_reason``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._engine import progress_bar
from ..attributions import Attributions
from ..errors import FitError
from . import _cost, _gcv, _rows, _stats

log = logging.getLogger(__name__)

DEFAULT_PRIOR_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
PILOT_EXAMPLES = 256  # examples the empirical-Bayes pilots pool over (bench/RESULTS_fit.md)
SOLVERS = ("auto", "eig", "dual")


# --------------------------------------------------------------------------- inputs


def _group_labels(src: _stats.Source, groups: Sequence[Any] | None) -> list[str]:
    """One label per component: given, else the store's modules, else a single group."""
    N = src.n_components
    if groups is None:
        spec = (src.meta or {}).get("components") if isinstance(src.meta, dict) else None
        if spec and sum(int(g[2]) for g in spec) == N:
            return [str(g[0]) for g in spec for _ in range(int(g[2]))]
        return ["all"] * N
    if isinstance(groups, (str, bytes)) or len(groups) != N:
        got = "a string" if isinstance(groups, (str, bytes)) else f"{len(groups)} labels"
        raise FitError(
            f"groups must give one label per component ({N}), got {got}. Pass e.g. "
            "[name.partition(':')[0] for name in ds.names] to group by module."
        )
    return [str(g) for g in groups]


def _prior_matrix(src: _stats.Source, prior: Any) -> Tensor:
    """The prior mean (E, N), checked against the source (converted a chunk at a time)."""
    N, E = src.n_components, src.n_examples
    if isinstance(prior, Attributions):
        if src.store is not None and list(prior.names) != list(src.names):
            raise FitError(
                "The prior's components differ from the store's (first names "
                f"{prior.names[:2]} vs {src.names[:2]}). Compute the prior (e.g. "
                "coarpy.baselines.gradient) with the Components the store was collected with."
            )
        prior = prior.weights
    if not isinstance(prior, Tensor):
        raise FitError(
            f"prior must be an Attributions or a tensor (n_examples, n_components), got "
            f"{type(prior).__name__}. Pass e.g. coarpy.baselines.gradient(model, comps, data)."
        )
    if tuple(prior.shape) != (E, N):
        raise FitError(
            f"prior must have shape (n_examples, n_components) = ({E}, {N}), got "
            f"{tuple(prior.shape)}. Compute it on the store's examples and components."
        )
    if not bool(torch.isfinite(prior).all()):
        raise FitError("prior has non-finite entries; the prior mean must be finite.")
    return prior.detach()


def _fixed_penalties(
    labels: list[str], penalties: Mapping[str, float], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Per-component relative penalties (N,) from a {group: penalty} mapping."""
    missing = sorted(set(labels) - set(penalties))
    if missing:
        raise FitError(
            f"group_penalties has no value for the groups {missing[:5]}; give one positive "
            "number per group, or None to estimate them."
        )
    r = torch.tensor([float(penalties[g]) for g in labels], dtype=dtype, device=device)
    if not bool(torch.isfinite(r).all()) or bool((r <= 0).any()):
        raise FitError(f"group_penalties must be finite and > 0, got {dict(penalties)}.")
    return r


def _normalised(r: Tensor) -> Tensor:
    """Relative penalties scaled to a geometric mean of 1 over components."""
    return r / r.log().mean().exp()


# --------------------------------------------------------------------------- GCV path


def _gcv_fit(
    spec: _gcv.Primal | _gcv.Dual,
    prior: Tensor | None,
    scales: Tensor,
    *,
    chunk: int,
    progress: bool | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Choose (c, l2) per example by GCV; returns (W (E, N) float32, bias (E,), c (E,),
    l2 (E,), gcv (E,)), a chunk of examples at a time."""
    E, N = spec.my.shape[0], spec.mv.shape[0]
    dtype, device = spec.mv.dtype, spec.mv.device
    weights = torch.empty(E, N, dtype=torch.float32, device=device)
    bias = torch.empty(E, dtype=dtype, device=device)
    c_all = torch.empty(E, dtype=dtype, device=device)
    k_all = torch.empty(E, dtype=torch.long, device=device)
    gcv = torch.empty(E, dtype=dtype, device=device)
    with progress_bar(E, progress, desc="fit: weights", unit="example") as bar:
        for e0 in range(0, E, chunk):
            sl = slice(e0, min(e0 + chunk, E))
            W0 = None if prior is None else prior[sl].T.to(device=device, dtype=dtype)
            W, c, k, g = spec.select(sl, W0, scales)  # (N, c) ...
            weights[sl] = W.T.to(torch.float32)
            bias[sl] = spec.my[sl] - W.T @ spec.mv
            c_all[sl], k_all[sl], gcv[sl] = c, k, g
            bar.update(sl.stop - sl.start)
    return weights, bias, c_all, spec.grid[k_all], gcv


def _pilot_examples(n_examples: int, most: int | None) -> Tensor | None:
    """The examples the pilots pool over: ``most`` evenly spaced ones, None for all."""
    if most is None or most >= n_examples:
        return None
    return torch.linspace(0, n_examples - 1, most, dtype=torch.float64).round().long().unique()


def _chunks(n_examples: int, chunk: int, pick: Tensor | None) -> list[slice | Tensor]:
    """Chunks of the examples ``pick`` (None: all), as slices or index tensors."""
    if pick is None:
        return [slice(e0, min(e0 + chunk, n_examples)) for e0 in range(0, n_examples, chunk)]
    return list(pick.split(chunk))


def _pilot_rel(
    spec: _gcv.Primal | _gcv.Dual, scales: Tensor, chunks: list[slice | Tensor], bar: Any
) -> Tensor | None:
    """(N,) mean over the examples of ``chunks`` of each weight squared relative to the
    example's mean squared weight, from a fit without prior; None if every weight is zero."""
    N = spec.mv.shape[0]
    total = torch.zeros(N, dtype=spec.mv.dtype, device=spec.mv.device)
    used_n = 0
    for sl in chunks:
        W = spec.select(sl, None, scales, pilot=True)[0].to(total.dtype)  # (N, c)
        bar.update(W.shape[1])
        W2 = W.mul_(W)  # squared weights
        q = W2.mean(0)  # (c,) mean squared weight per example
        used = q > 0
        total += W2 @ torch.where(used, 1.0 / q.where(used, torch.ones_like(q)), 0.0)
        used_n += int(used.sum())
    return total / used_n if used_n else None


def _group_scales(
    make: Any,
    labels: list[str],
    n_iter: int,
    scales: Tensor,
    chunks: list[slice | Tensor],
    n_pooled: int,
    progress: bool | None,
) -> tuple[Tensor, dict[str, float]]:
    """Column scales s (N,) and relative penalties per group, by empirical Bayes.

    ``make(s, pilot=True)`` builds a pilot's spectrum for column scales ``s`` (one
    eigendecomposition); the pilots pool ``n_pooled`` examples, given as ``chunks``.
    """
    names = list(dict.fromkeys(labels))
    index = {g: i for i, g in enumerate(names)}
    gid = torch.tensor([index[g] for g in labels], device=scales.device)
    counts = torch.bincount(gid, minlength=len(names)).to(scales.dtype)
    s = torch.ones(len(labels), dtype=scales.dtype, device=scales.device)
    r_group = torch.ones(len(names), dtype=scales.dtype, device=scales.device)
    iters = n_iter if len(names) > 1 else 0
    total = iters * n_pooled
    with progress_bar(total, progress, desc="fit: group penalties", unit="example") as bar:
        for _ in range(iters):
            rel = _pilot_rel(make(s, pilot=True), scales, chunks, bar)  # (N,) pooled
            if rel is None:
                break
            tau2 = torch.zeros_like(counts).index_add_(0, gid, rel) / counts  # (G,)
            tau2 = tau2.clamp_min(float(tau2.max()) * 1e-8)
            r_group = 1.0 / tau2
            r = _normalised(r_group[gid])
            r_group = r_group * (r[0] / r_group[gid[0]])
            s = r.rsqrt()
    return s, {g: float(r_group[i]) for i, g in enumerate(names)}


# --------------------------------------------------------------------------- estimator


class PriorRidge:
    """Ridge with per-group penalties and an optional prior mean; ``method="group"``.

    See the module docstring for the objective. Fitted from one streamed pass over the
    rows; the penalty ``l2`` and the prior's scale ``c`` are chosen per example by
    generalised cross-validation on all rows, the relative group penalties by empirical
    Bayes across examples.

    Parameters
    ----------
    prior : Attributions or Tensor (n_examples, n_components), optional
        Prior mean of the weights, e.g. ``coarpy.baselines.gradient(...)``. None
        shrinks toward zero.
    groups : sequence of labels (n_components,), optional
        Group of each component. Default: one group per module of the store
        (``"features.0"``, ``"encoder.layer.3.attention"``, ...); one group for a
        ``(masks, outputs)`` tuple.
    group_penalties : mapping {label: relative penalty}, optional
        Fix the relative penalties instead of estimating them (they are rescaled to a
        geometric mean of 1 over components).
    l2_grid : sequence of float, optional
        Penalties per row. Default: ``1e-8 .. 1e2`` times the mean variance of the
        scaled columns (21 values).
    prior_scales : sequence of float
        Candidate scales ``c`` of the prior (ignored without a prior).
    n_iter : int
        Empirical-Bayes refits of the group penalties (0: equal penalties).
    pilot_examples : int or None
        Examples the empirical-Bayes pilots pool over, evenly spaced (None: all). The
        pilots estimate one number per group, pooled over examples and components, so
        a few hundred examples pin them down; the final fit uses every example. With
        the dual solver the pilots also run in float32.
    solver : {"auto", "eig", "dual"}
        ``"eig"``: the ``N x N`` scaled Gram; ``"dual"``: the ``n x n`` scaled kernel
        (fewer masks than components); ``"auto"``: the faster by estimate that fits.
    device, dtype, max_memory, progress :
        As for :class:`coarpy.regression.RidgePath`.

    Attributes
    ----------
    weights_ : Tensor (n_examples, n_components) float32
    bias_ : Tensor (n_examples,) float32
    l2_ : Tensor (n_examples,) chosen penalty per example
    prior_scale_ : Tensor (n_examples,) chosen ``c`` (zeros without a prior)
    group_penalties_ : dict {label: relative penalty}
    gcv_ : Tensor (n_examples,) the chosen GCV value (an estimate of the mean squared
        prediction error on a new mask)
    attributions_ : Attributions

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> V = torch.rand(300, 6, generator=g) > 0.3
    >>> true = torch.tensor([[4.0, -4.0, 3.0, 0.1, -0.1, 0.05]])
    >>> Y = V.double() @ true.T.double() + 0.1 * torch.randn(300, 1, generator=g).double()
    >>> est = PriorRidge(groups=["big"] * 3 + ["small"] * 3, progress=False).fit((V, Y))
    >>> est.group_penalties_["small"] > 100 * est.group_penalties_["big"]
    True
    >>> torch.allclose(est.weights_[0, :3], true[0, :3], atol=0.05)
    True
    """

    def __init__(
        self,
        prior: Attributions | Tensor | None = None,
        *,
        groups: Sequence[Any] | None = None,
        group_penalties: Mapping[str, float] | None = None,
        l2_grid: Sequence[float] | None = None,
        prior_scales: Sequence[float] = DEFAULT_PRIOR_SCALES,
        n_iter: int = 2,
        pilot_examples: int | None = PILOT_EXAMPLES,
        solver: str = "auto",
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float64,
        max_memory: int | None = None,
        progress: bool | None = None,
    ):
        self.prior = prior
        self.groups = groups
        self.group_penalties = group_penalties
        self.l2_grid = l2_grid
        self.prior_scales = prior_scales
        self.n_iter = n_iter
        self.pilot_examples = pilot_examples
        self.solver = solver
        self.device = device
        self.dtype = dtype
        self.max_memory = max_memory
        self.progress = progress

    @torch.no_grad()
    def fit(self, source: Any) -> PriorRidge:
        """Fit on a ComponentDataset or a ``(masks, outputs)`` tuple; returns ``self``."""
        _stats.check_common(0.0, self.dtype, 0, self.progress)
        if isinstance(self.n_iter, bool) or not isinstance(self.n_iter, int) or self.n_iter < 0:
            raise FitError(f"n_iter must be an int >= 0, got {self.n_iter!r}.")
        most = self.pilot_examples
        if most is not None and (isinstance(most, bool) or not isinstance(most, int) or most < 1):
            raise FitError(
                f"pilot_examples must be an int >= 1 or None (all examples), got {most!r}."
            )
        if self.solver not in SOLVERS:
            raise FitError(
                f"solver must be one of {SOLVERS} for method='group', got {self.solver!r}. "
                "'auto' picks the primal ('eig') or the dual by estimated time and memory."
            )
        src = _stats.Source(source)
        dev = _stats.resolve_device(self.device, src)
        dtype = self.dtype
        N, E = src.n_components, src.n_examples
        labels = _group_labels(src, self.groups)
        prior = None if self.prior is None else _prior_matrix(src, self.prior)
        scales = _stats.as_grid(self.prior_scales, "prior_scales", dtype, dev)
        grid = None if self.l2_grid is None else _stats.as_grid(self.l2_grid, "l2_grid", dtype, dev)
        budget = _stats.budget(dev, self.max_memory)
        n_groups = len(set(labels))
        iters = 1 + (self.n_iter if self.group_penalties is None and n_groups > 1 else 0)
        rate = _cost.gemm_rate(dev, dtype)

        def plan(n: int) -> _cost.Plan:
            shape = _cost.Shape(
                n=n, n_val=0, N=N, E=E, K=1, s=torch.finfo(dtype).bits // 8,
                y_bytes=src.Y.element_size() if src.store is None else 4, l2_ratio=1.0,
                max_iter=1,
            )  # fmt: skip
            pooled = E if self.pilot_examples is None else min(E, self.pilot_examples)
            kw = dict(iters=iters, prior=prior is not None, pooled=pooled)
            estimators = {
                "eig": lambda sh, b: _cost.group_eig(sh, b, **kw),
                "dual": lambda sh, b: _cost.group_dual(sh, b, groups=n_groups, **kw),
            }
            p = _cost.choose(shape, budget, self.solver, rate, estimators)
            _stats.need_memory(
                p.estimate.bytes,
                budget,
                f"method='group' ({p.solver}) with {N} components, {n} rows and {E} examples",
                "Use dtype=torch.float32 (halves it), fewer components, or method='ridge' with "
                "solver='cg' (bounded memory).",
            )
            return p

        if src.n_rows:  # refuse up front, before the pass, when nothing fits
            plan(src.n_rows)
        rows = _rows.read(
            src,
            validate=False,
            seed=0,
            val_fraction=0.0,
            device=dev,
            dtype=dtype,
            progress=self.progress,
        )
        every = rows.parts[0]
        _stats.check_rows([every], validate=False, val_fraction=0.0, need=3)
        chosen = plan(rows.n)
        log.info("fit: solver=%s", chosen.log_line)
        chunk = chosen.estimate.chunk
        gram = kernels = cross = None
        if chosen.solver == "dual":
            index = {g: i for i, g in enumerate(dict.fromkeys(labels))}
            gid = torch.tensor([index[g] for g in labels])
            kernels = _gcv.GroupKernels(
                rows, gid, n_groups, chosen.estimate.keep, dtype, dev, self.progress
            )
        else:
            gram = rows.gram(0, rows.n, dtype, dev, self.progress)
            cross = _gcv.CrossCache(rows, chosen.estimate.keep, dtype, dev)

        def make(s: Tensor, pilot: bool = False) -> _gcv.Primal | _gcv.Dual:
            if chosen.solver == "dual":
                low = torch.float32 if pilot else None  # pilots: pooled squares only
                return _gcv.Dual(rows, kernels, s, grid, self.progress, low)
            return _gcv.Primal(rows, gram, s, grid, cross, self.progress)

        if self.group_penalties is not None:
            r = _normalised(_fixed_penalties(labels, self.group_penalties, dtype, dev))
            s = r.rsqrt()
            penalties = {g: float(r[labels.index(g)]) for g in dict.fromkeys(labels)}
        else:
            pick = _pilot_examples(E, self.pilot_examples)
            s, penalties = _group_scales(
                make, labels, self.n_iter, scales, _chunks(E, chunk, pick),
                E if pick is None else len(pick), self.progress,
            )  # fmt: skip
        spec = make(s)
        W, bias, c, l2, gcv = _gcv_fit(spec, prior, scales, chunk=chunk, progress=self.progress)
        used_grid = spec.grid
        del spec
        W0 = prior
        meta = {
            "method": "group",
            "selection": "gcv",
            "solver": chosen.solver,
            **chosen.meta(),
            "dtype": str(dtype).removeprefix("torch."),
            "n_rows": every.n,
            "l2_grid": used_grid.tolist(),
            "l2": l2.tolist(),
            "prior": "none" if W0 is None else "given",  # fit(prior="gradient") says "gradient"
            "prior_method": None if W0 is None else _prior_name(self.prior),
            "prior_scales": scales.tolist() if W0 is not None else None,
            "prior_scale": c.tolist() if W0 is not None else None,
            "group_penalties": penalties,
            "n_iter": self.n_iter,
            "pilot_examples": self.pilot_examples,
            "gcv": gcv.tolist(),
        }
        res = _stats.Result(W, bias, l2, None, used_grid, meta)
        self.attributions_ = _stats.finish(src, res)
        self.weights_ = self.attributions_.weights
        self.bias_ = self.attributions_.bias
        self.l2_ = l2
        self.prior_scale_ = c
        self.group_penalties_ = penalties
        self.gcv_ = gcv
        return self


def _prior_name(prior: Any) -> str:
    if isinstance(prior, Attributions):
        return str(prior.meta.get("method", "attributions"))
    return "tensor"
