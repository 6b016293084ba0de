"""Regression: fitting component attributions from a component dataset.

For every example ``e`` the attribution is the linear model
``y[:, e] ~ bias[e] + V @ weights[e]`` over the keep-masks ``V`` (n_rows, n_components),
fitted by least squares with an intercept. All examples share the design matrix, so
everything is computed from *sufficient statistics* gathered in one streamed pass over
the store: the row count, ``sum v``, ``sum y``, ``sum y**2``, ``V.T @ V`` and
``V.T @ Y``. Weights come back on the raw mask scale with the matching bias
(``bias = mean_y - weights @ mean_v``); nothing is standardised.

Methods
-------
``"ols"``
    Least squares with intercept: ``w = pinv(Vc.T Vc) Vc.T yc`` on centred data, the
    pseudo-inverse taken through an eigendecomposition whose eigenvalues below
    ``max_eig * N * eps`` count as zero (a component that never varies gets weight 0).
``"ridge"`` (default)
    Minimises, per example, ``(1/n) * sum_i (y_i - b - w.v_i)**2 + l2 * ||w||**2``, i.e.
    ``w = (Vc.T Vc + n * l2 * I)^-1 Vc.T yc``. The penalty is *per row*, so the same
    ``l2`` means the same amount of shrinkage whatever the number of rows, and the
    ``l2`` chosen on the training rows carries over to the refit on all rows.
    scikit-learn's ``Ridge(alpha=a)`` penalises the *unscaled* sum of squares, so it
    equals ``l2 = a / n_rows`` here (``alpha = l2 * n_rows``).
    The rows are split into training and validation rows: row ``i`` is a validation
    row iff a hash of ``(seed, i)`` falls below ``val_fraction``, so the split does not
    depend on block sizes, on the order blocks were written, or on how far a store has
    grown. One eigendecomposition of the training Gram gives the solution for every
    ``l2`` of the grid; the validation mean squared error of every ``l2`` for every
    example follows from the validation rows' sufficient statistics (no second pass).
    The ``l2`` with the lowest validation error is chosen per example and the model is
    refitted on all rows with it. With a one-value grid there is no validation: the
    fit uses all rows.
    The default grid is ``s * 10**[-8, -7.5, ..., 2]`` (21 values) where
    ``s = trace(Vc.T Vc / n) / N`` is the mean variance of a mask entry
    (``alpha * (1 - alpha)`` for Bernoulli masks).
``"group"``
    Ridge with one penalty per group of components (per module by default, relative
    strengths estimated across examples), optionally centred on a prior estimate such
    as the gradient baseline, with the penalty chosen per example by generalised
    cross-validation on all rows. Fewer masks for the same held-out correlation when
    masks are few (bench/RESULTS_efficiency.md); see :mod:`coarpy.priors`.
``"lasso"``
    Minimises ``(1/(2n)) * sum_i (y_i - b - w.v_i)**2 + l1 * ||w||_1`` (scikit-learn's
    ``Lasso(alpha=l1)`` exactly), by FISTA on the Gram matrix, batched over examples,
    along a decreasing path of ``l1`` with warm starts. The default grid is per example,
    ``l1_max[e] * 10**linspace(0, -4, 13)``, where ``l1_max[e]`` is the smallest ``l1``
    giving all-zero weights. ``l1`` is chosen per example on the validation rows and the
    model refitted on all rows, as for ridge.

Solvers and memory
------------------
With ``N`` components, ``E`` examples and ``s`` bytes per number (8 for float64, 4 for
float32), the peak memory of each solver is about:

- ``solver="eig"`` (ridge with validation):
  ``s * (6 N**2 + 6 N E)`` bytes: two Grams (training and validation rows), a centred
  copy, its eigenvectors and the LAPACK workspace (2 N**2); two ``V.T @ Y`` and their
  rotations into the eigenbasis. The per-``l2`` validation work is blocked over
  examples, so it adds at most ~256 MiB. With one ``l2`` (and for ``"ols"``):
  ``s * (4 N**2 + 3 N E)``.
- ``method="lasso"``: ``s * (5 N**2 + 9 N E)``.
- ``solver="cg"`` (ridge only): never forms an ``N x N`` matrix. The examples are
  processed in chunks of ``c`` columns; each chunk runs preconditioned conjugate
  gradients for every ``l2`` of the grid at once, every iteration being one streamed
  pass over the store (``V.T @ (V @ X)`` block by block). Memory is
  ``s * (6 K + 3) * N * c`` plus one block of rows, with ``K`` grid values and ``c``
  chosen to fit the budget; time is ``(2 + 2 * iterations)`` passes per chunk.

Large ``N`` (ViT-B/16: 82,944 components) makes the eigendecomposition infeasible
(``6 * 8 * 82944**2`` bytes = 330 GB), and ``solver="auto"`` then picks ``"cg"``: it picks
``"eig"`` whenever the formula above fits in the memory budget (``max_memory``, or the
free memory: ``MemAvailable`` from ``/proc/meminfo`` on CPU, ``torch.cuda.mem_get_info``
on GPU), else ``"cg"``. An explicit ``solver="eig"`` (and ``"ols"``/``"lasso"``) that
does not fit raises :class:`FitError` with the bytes needed before allocating anything.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .attributions import Attributions
from .errors import FitError

log = logging.getLogger(__name__)

METHODS = ("ridge", "ols", "lasso", "group")
SOLVERS = ("auto", "eig", "cg")
DEFAULT_L2_RELATIVE = tuple(10.0 ** np.arange(-8.0, 2.01, 0.5))  # times the mask variance
DEFAULT_L1_RELATIVE = tuple(10.0 ** np.linspace(0.0, -4.0, 13))  # times l1_max per example

_BLOCK_BYTES = 128 * 2**20  # rows are gathered into blocks of about this size
_WORK_BYTES = 256 * 2**20  # per-chunk working memory of the blocked steps
_F32_EXACT_ROWS = 2**24  # float32 holds every integer up to 2**24 exactly
_SPLIT_KEY = 0x5EED_C0A2_5917_0001  # salt: keeps the split independent of mask streams


# --------------------------------------------------------------------------- sources


class _Source:
    """A ComponentDataset or an in-memory ``(V, Y)`` pair, read as blocks of rows."""

    def __init__(self, source: Any):
        self.store = None
        if isinstance(source, (str, os.PathLike)):
            raise FitError(
                f"fit expects an open store or a (masks, outputs) tuple, got the path "
                f"{os.fspath(source)!r}. Open it with coarpy.store.ComponentDataset(path)."
            )
        if isinstance(source, tuple):
            self._init_arrays(source)
        elif hasattr(source, "iter_blocks"):
            self.store = source
            self.n_components = int(source.n_components)
            self.n_examples = int(source.n_examples)
            self.names = [str(n) for n in source.names]
            self.meta = _jsonable(getattr(source, "meta", None))
            self.n_rows = len(source) if hasattr(source, "__len__") else None
            self.device = torch.device("cpu")
            if len(self.names) != self.n_components:
                raise FitError(
                    f"The store lists {len(self.names)} component names but n_components is "
                    f"{self.n_components}. The store's meta.json is inconsistent; rebuild it."
                )
        else:
            raise FitError(
                "fit expects a ComponentDataset (anything with iter_blocks()) or a tuple "
                f"(masks [n, N], outputs [n, E]), got {type(source).__name__}."
            )

    def _init_arrays(self, source: tuple) -> None:
        if len(source) != 2:
            raise FitError(
                f"A tuple source must be (masks, outputs), got a tuple of {len(source)} items."
            )
        V, Y = (torch.as_tensor(x) for x in source)
        if V.ndim != 2:
            raise FitError(
                f"masks must have shape (n_rows, n_components), got {tuple(V.shape)}. "
                "Use masks[None] for a single row."
            )
        if Y.ndim != 2:
            raise FitError(
                f"outputs must have shape (n_rows, n_examples), got {tuple(Y.shape)}. "
                "Use outputs[:, None] for a single example."
            )
        if V.shape[0] != Y.shape[0]:
            raise FitError(
                f"masks has {V.shape[0]} rows but outputs has {Y.shape[0]}; row i of both "
                "must come from the same mask. Pass matching arrays."
            )
        if V.dtype != torch.bool and not bool(((V == 0) | (V == 1)).all()):
            raise FitError(
                f"masks must be bool or 0/1 (1 keeps a component), got dtype {V.dtype} with "
                "other values. Pass the keep-masks themselves, e.g. masks.bool()."
            )
        if not Y.is_floating_point():
            Y = Y.double()
        self.V, self.Y = V, Y
        self.n_components, self.n_examples = V.shape[1], Y.shape[1]
        self.names = [str(i) for i in range(self.n_components)]
        self.meta = None
        self.n_rows = V.shape[0]
        self.device = V.device

    def blocks(self, device: torch.device, target_rows: int) -> Iterator[tuple]:
        """``(rows int64 [b], masks [b, N] bool, outputs [b, E])``, the tensors on ``device``."""
        if self.store is None:
            for r0 in range(0, self.n_rows, target_rows):
                r1 = min(r0 + target_rows, self.n_rows)
                rows = torch.arange(r0, r1, dtype=torch.int64)
                yield rows, self.V[r0:r1].to(device), self.Y[r0:r1].to(device)
            return
        buf: list[tuple[Tensor, Tensor, Tensor]] = []
        count = 0
        for first, masks, outputs in self.store.iter_blocks():
            b = masks.shape[0]
            if masks.ndim != 2 or masks.shape[1] != self.n_components:
                raise FitError(
                    f"The store's block at row {first} has masks of shape {tuple(masks.shape)}, "
                    f"expected (rows, {self.n_components}). The store is inconsistent."
                )
            if outputs.shape != (b, self.n_examples):
                raise FitError(
                    f"The store's block at row {first} has outputs of shape "
                    f"{tuple(outputs.shape)}, expected ({b}, {self.n_examples})."
                )
            buf.append((torch.arange(first, first + b, dtype=torch.int64), masks, outputs))
            count += b
            if count >= target_rows:
                yield _concat(buf, device)
                buf, count = [], 0
        if buf:
            yield _concat(buf, device)


def _concat(buf: list[tuple[Tensor, Tensor, Tensor]], device: torch.device) -> tuple:
    if len(buf) == 1:
        rows, m, y = buf[0]
        return rows, m.to(device), y.to(device)
    return (
        torch.cat([b[0] for b in buf]),
        torch.cat([b[1] for b in buf]).to(device),
        torch.cat([b[2] for b in buf]).to(device),
    )


def _jsonable(meta: Any) -> Any:
    if meta is None:
        return None
    return json.loads(json.dumps(meta, default=str))


def _block_rows(n_components: int, n_examples: int, s: int) -> int:
    per_row = n_components * (1 + 4 + 2 * s) + n_examples * (4 + s)
    return max(1, _BLOCK_BYTES // per_row)


# --------------------------------------------------------------------------- split


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scrambles every bit."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _validation_rows(rows: Tensor, *, seed: int, val_fraction: float) -> Tensor:
    """Bool [b]: whether each row index is a validation row; a pure function of (seed, row)."""
    if val_fraction <= 0:
        return torch.zeros(rows.shape[0], dtype=torch.bool)
    key = _mix64(np.array([(seed ^ _SPLIT_KEY) % 2**64], dtype=np.uint64))
    u = _mix64(rows.cpu().numpy().astype(np.uint64) ^ key)
    uniform = (u >> np.uint64(11)).astype(np.float64) * 2.0**-53  # in [0, 1)
    return torch.from_numpy(uniform < val_fraction)


# --------------------------------------------------------------------------- statistics


@dataclass
class _Moments:
    """Sufficient statistics of one set of rows (training, validation or all)."""

    n: int
    sv: Tensor  # (N,) sum of v
    sy: Tensor  # (E,) sum of y
    syy: Tensor  # (E,) sum of y**2
    gram: Tensor | None  # (N, N) V.T @ V
    vty: Tensor | None  # (N, E) V.T @ Y

    def means(self) -> tuple[Tensor, Tensor]:
        return self.sv / self.n, self.sy / self.n

    def merge_(self, other: _Moments) -> _Moments:
        """Add ``other`` into ``self`` in place (its big tensors are consumed)."""
        self.n += other.n
        self.sv += other.sv
        self.sy += other.sy
        self.syy += other.syy
        if self.gram is not None and other.gram is not None:
            self.gram += other.gram
            other.gram = None
        if self.vty is not None and other.vty is not None:
            self.vty += other.vty
            other.vty = None
        return self


class _GramSum:
    """V.T @ V accumulated exactly.

    The products of 0/1 masks are integer counts; float32 represents every integer up to
    2**24 exactly, so partial sums are formed with the (about 2x faster) float32 matmul
    and flushed into the ``dtype`` total before they could exceed 2**24.
    """

    def __init__(self, n: int, device: torch.device, dtype: torch.dtype):
        self.total = torch.zeros(n, n, device=device, dtype=dtype)
        exact32 = dtype == torch.float32
        self.part = self.total if exact32 else torch.zeros_like(self.total, dtype=torch.float32)
        self.pending = 0

    def add(self, v32: Tensor) -> None:
        if self.part is not self.total and self.pending + v32.shape[0] > _F32_EXACT_ROWS:
            self.flush()
        self.part.addmm_(v32.T, v32)
        self.pending += v32.shape[0]

    def flush(self) -> Tensor:
        if self.part is not self.total:
            self.total += self.part
            self.part.zero_()
        self.pending = 0
        return self.total


def _check_finite(rows: Tensor, Y: Tensor) -> None:
    bad = ~torch.isfinite(Y)
    if bool(bad.any()):
        i, e = (int(x) for x in bad.nonzero()[0])
        raise FitError(
            f"outputs[row {int(rows[i])}, example {e}] is {float(Y[i, e])}; regression needs "
            "finite outputs. Fix the output function (e.g. a log of 0) or re-collect that "
            "block, or drop the example."
        )


def _accumulate(
    src: _Source,
    *,
    validate: bool,
    seed: int,
    val_fraction: float,
    with_gram: bool,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
) -> list[_Moments]:
    """One pass over the rows: [training, validation] moments, or [all] without validation."""
    N, E = src.n_components, src.n_examples
    n_parts = 2 if validate else 1

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(*shape, device=device, dtype=dtype)

    parts = [
        _Moments(0, zeros(N), zeros(E), zeros(E), None, zeros(N, E) if with_gram else None)
        for _ in range(n_parts)
    ]
    grams = [_GramSum(N, device, dtype) if with_gram else None for _ in range(n_parts)]
    s = torch.finfo(dtype).bits // 8
    bar = tqdm(total=src.n_rows, unit="row", desc="fit: statistics", disable=_no_bar(progress))
    with bar:
        for rows, V, Y in src.blocks(device, _block_rows(N, E, s)):
            _check_finite(rows, Y)
            if validate:
                is_val = _validation_rows(rows, seed=seed, val_fraction=val_fraction).to(device)
                selections: list[Tensor | None] = [~is_val, is_val]
            else:
                selections = [None]
            for m, g, sel in zip(parts, grams, selections, strict=True):
                Vs, Ys = (V, Y) if sel is None else (V[sel], Y[sel])
                if Vs.shape[0] == 0:
                    continue
                v32 = Vs.to(torch.float32)
                vd = v32 if dtype == torch.float32 else Vs.to(dtype)  # (b, N) 0/1
                yd = Ys.to(dtype)  # (b, E)
                m.n += Vs.shape[0]
                m.sv += vd.sum(0)
                m.sy += yd.sum(0)
                m.syy += (yd * yd).sum(0)
                if g is not None:
                    g.add(v32)
                    m.vty.addmm_(vd.T, yd)
            bar.update(V.shape[0])
    for m, g in zip(parts, grams, strict=True):
        if g is not None:
            m.gram = g.flush()
    return parts


def _no_bar(progress: bool) -> bool | None:
    # tqdm's disable=None hides the bar by itself when stderr is not a terminal.
    return None if progress else True


def _centered_gram_(m: _Moments, mv: Tensor, *, inplace: bool = False) -> Tensor:
    """sum over m's rows of (v - mv)(v - mv).T, shape (N, N)."""
    G = m.gram if inplace else m.gram.clone()
    G.addr_(mv, m.sv, alpha=-1.0)
    G.addr_(m.sv, mv, alpha=-1.0)
    G.addr_(mv, mv, alpha=float(m.n))
    return G


def _centered_cross_(m: _Moments, mv: Tensor, my: Tensor, *, inplace: bool = False) -> Tensor:
    """sum over m's rows of (v - mv)(y - my).T, shape (N, E)."""
    C = m.vty if inplace else m.vty.clone()
    C.addr_(mv, m.sy, alpha=-1.0)
    C.addr_(m.sv, my, alpha=-1.0)
    C.addr_(mv, my, alpha=float(m.n))
    return C


def _centered_yy(m: _Moments, my: Tensor) -> Tensor:
    """sum over m's rows of (y - my)**2, shape (E,)."""
    return m.syy - 2.0 * my * m.sy + m.n * my * my


def _mask_variance(m: _Moments) -> float:
    mv = m.sv / m.n
    return float((mv * (1.0 - mv)).mean())  # trace(Vc.T Vc / n) / N for 0/1 masks


# --------------------------------------------------------------------------- memory


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _eig_bytes(N: int, E: int, s: int, *, validate: bool) -> int:
    """Peak bytes of the eigendecomposition ridge solver (see the module docstring)."""
    block = _BLOCK_BYTES
    if validate:
        return s * (6 * N * N + 6 * N * E) + _WORK_BYTES + block
    return s * (4 * N * N + 3 * N * E) + _WORK_BYTES + block


def _lasso_bytes(N: int, E: int, s: int) -> int:
    return s * (5 * N * N + 9 * N * E) + _BLOCK_BYTES


def _cg_column_bytes(N: int, K: int, s: int, block_rows: int) -> int:
    """Bytes per example column of a CG chunk: 6 vectors per grid value, 3 right-hand sides,
    and the per-row products of one block."""
    return s * ((6 * K + 3) * N + 2 * K * block_rows)


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


# --------------------------------------------------------------------------- ridge (eig)


def _eig_filter(d: Tensor, n: int, l2: Tensor) -> Tensor:
    """(K, N) spectral filters 1 / (d + n * l2); eigenvalues below the rank cutoff give 0."""
    tol = float(d.abs().max()) * d.shape[0] * torch.finfo(d.dtype).eps
    keep = d > tol
    inv = 1.0 / (d.clamp_min(tol)[None, :] + n * l2[:, None])
    return torch.where(keep[None, :], inv, torch.zeros_like(inv))


def _chunk(n_cols_per_item: int, s: int, total: int) -> int:
    return max(1, min(total, _WORK_BYTES // max(1, n_cols_per_item * s)))


def _validation_errors_eig(train: _Moments, val: _Moments, grid: Tensor) -> Tensor:
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
    Gc = _centered_gram_(train, mv)  # (N, N)
    d, Q = torch.linalg.eigh(Gc)  # (N,), (N, N)
    del Gc
    Suu = _centered_gram_(val, mv)  # (N, N) validation rows, centred at the training means
    H = Q.T @ Suu
    del Suu
    H = H @ Q  # (N, N)
    P = Q.T @ _centered_cross_(train, mv, my)  # (N, E)
    R = Q.T @ _centered_cross_(val, mv, my)  # (N, E)
    del Q
    Szz = _centered_yy(val, my)  # (E,)
    F = _eig_filter(d, train.n, grid)  # (K, N)
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


def _solve_eig(m: _Moments, l2: Tensor, choice: Tensor) -> tuple[Tensor, Tensor]:
    """Ridge on all of m's rows with penalty l2[choice[e]] for example e.

    Returns (weights (N, E), bias (E,)). Consumes m.gram and m.vty.
    """
    mv, my = m.means()
    N, E = m.vty.shape
    s = m.sv.element_size()
    Gc = _centered_gram_(m, mv, inplace=True)
    m.gram = None
    d, Q = torch.linalg.eigh(Gc)
    del Gc
    P = Q.T @ _centered_cross_(m, mv, my, inplace=True)  # (N, E)
    m.vty = None
    F = _eig_filter(d, m.n, l2)  # (K, N)
    W = torch.empty_like(P)
    step = _chunk(2 * N, s, E)
    for k in torch.unique(choice).tolist():
        cols = (choice == k).nonzero().squeeze(1)
        for c0 in range(0, cols.numel(), step):
            idx = cols[c0 : c0 + step]
            W[:, idx] = Q @ (F[k][:, None] * P[:, idx])
    bias = my - W.T @ mv
    return W, bias


# --------------------------------------------------------------------------- ridge (cg)


def _gram_apply(
    src: _Source,
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


def _select(rows, V, *, part, seed, val_fraction, device) -> Tensor | None:
    if part == "all":
        return V
    is_val = _validation_rows(rows, seed=seed, val_fraction=val_fraction).to(device)
    sel = is_val if part == "val" else ~is_val
    return V[sel] if bool(sel.any()) else None


def _pcg(apply_A, B: Tensor, diag: Tensor, X0: Tensor, *, max_iter: int, tol: float, bar):
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


def _ridge_cg(
    src: _Source,
    parts: list[_Moments],
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
    progress: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, dict]:
    """Ridge by conjugate gradients over streamed passes; never forms an N x N matrix.

    Returns (weights (N, E), bias (E,), choice (E,), val_mse (K, E) or None, info).
    """
    N, E = src.n_components, src.n_examples
    s = torch.finfo(dtype).bits // 8
    K = grid.shape[0] if validate else 1
    block_rows = _block_rows(N, E, s)
    per_col = _cg_column_bytes(N, K, s, min(block_rows, src.n_rows or block_rows))
    room = (budget // 2 if budget is not None else 4 * _WORK_BYTES) - _BLOCK_BYTES
    if room < per_col:
        raise FitError(
            f"The CG solver needs at least {per_col + _BLOCK_BYTES} bytes "
            f"({_gib(per_col + _BLOCK_BYTES)}) for one example at a time with {N} components "
            f"and {K} l2 values, but the budget is {budget} bytes. Use fewer l2 values, "
            "dtype=torch.float32, or a machine with more memory."
        )
    step = max(1, min(E, room // per_col))
    train = parts[0]
    every = (
        parts[0]
        if not validate
        else _Moments(
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
    bar = tqdm(desc="fit: cg passes", unit="pass", disable=_no_bar(progress))
    with bar:
        for e0 in range(0, E, step):
            sl = slice(e0, min(e0 + step, E))
            c = sl.stop - sl.start
            # Right-hand sides: raw V.T @ Y per split for this chunk of examples (one pass).
            raw = [torch.zeros(N, c, dtype=dtype, device=device) for _ in parts]
            for rows, V, Y in src.blocks(device, block_rows):
                _check_finite(rows, Y[:, sl])
                if validate:
                    is_val = _validation_rows(rows, seed=seed, val_fraction=val_fraction)
                    sels = [~is_val.to(device), is_val.to(device)]
                else:
                    sels = [None]
                for acc, sel in zip(raw, sels, strict=True):
                    Vs, Ys = (V, Y[:, sl]) if sel is None else (V[sel], Y[sel][:, sl])
                    if Vs.shape[0]:
                        acc.addmm_(Vs.to(dtype).T, Ys.to(dtype))
            bar.update(1)
            part_m = [
                _Moments(m.n, m.sv, m.sy[sl], m.syy[sl], None, r)
                for m, r in zip(parts, raw, strict=True)
            ]
            X0 = torch.zeros(N, c, dtype=dtype, device=device)
            if validate:
                tr, va = part_m
                Ct = _centered_cross_(tr, mv_t, my_t[sl])  # (N, c)
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
                    is_val = _validation_rows(rows, seed=seed, val_fraction=val_fraction)
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
            every_c = _Moments(
                every.n, every.sv, every.sy[sl], every.syy[sl], None, sum(raw[1:], raw[0])
            )
            Ca = _centered_cross_(every_c, mv_a, my_a[sl], inplace=True)
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


# --------------------------------------------------------------------------- lasso


def _fista(G: Tensor, C: Tensor, n: int, l1: Tensor, W0: Tensor, L: float, *, max_iter, tol):
    """Accelerated proximal gradient for min (1/2n) w.G w - (1/n) w.C + l1 |w|_1, per column.

    G (N, N) centred Gram, C (N, E) centred cross-products, l1 (E,), W0 (N, E) warm start,
    L the largest eigenvalue of G / n. Uses adaptive restart (momentum reset whenever it
    points uphill) and stops a column when its largest update is below tol * max|w|.
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
    parts: list[_Moments],
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
    Gc = _centered_gram_(train, mv)
    Cc = _centered_cross_(train, mv, my)
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
        Suu = _centered_gram_(val, mv)
        Suz = _centered_cross_(val, mv, my)
        Szz = _centered_yy(val, my)
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
        Gc = _centered_gram_(every, mv, inplace=True)
        Cc = _centered_cross_(every, mv, my, inplace=True)
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


# --------------------------------------------------------------------------- front door


def _as_grid(grid: Any, name: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    g = torch.as_tensor(np.atleast_1d(np.asarray(grid, dtype=np.float64)))
    if g.ndim != 1 or g.numel() == 0 or not bool(torch.isfinite(g).all()) or bool((g < 0).any()):
        raise FitError(
            f"{name} must be a non-empty 1-D sequence of finite values >= 0, got {grid!r}."
        )
    return g.to(device=device, dtype=dtype)


def _check_common(val_fraction: float, dtype: torch.dtype, seed: int) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise FitError(f"dtype must be torch.float32 or torch.float64, got {dtype}.")
    if not 0.0 <= val_fraction < 1.0:
        raise FitError(
            f"val_fraction must be in [0, 1), got {val_fraction}. The default 0.1 holds out "
            "one row in ten to choose the penalty."
        )
    if not isinstance(seed, (int, np.integer)):
        raise FitError(f"seed must be an int, got {type(seed).__name__}.")


def _check_rows(parts: list[_Moments], *, validate: bool, val_fraction: float, need: int) -> None:
    n = sum(m.n for m in parts)
    if n == 0:
        raise FitError(
            "The source has no finished rows, so there is nothing to fit. Run collect (or "
            "let it finish at least one block) first."
        )
    if validate:
        n_t, n_v = parts[0].n, parts[1].n
        if n_t < need or n_v < 1:
            want = max(need + 1, math.ceil(3.0 / val_fraction))
            raise FitError(
                f"Choosing the penalty needs at least {need} training rows and 1 validation "
                f"row; got {n} rows ({n_t} training, {n_v} validation with val_fraction="
                f"{val_fraction}). Collect more masks (about {want} or more), or pass a single "
                "penalty value to fit on all rows without validation."
            )
    elif n < need:
        raise FitError(
            f"This fit needs at least {need} finished rows, got {n}. Collect more masks."
        )


def _default_tol(tol: float | None, dtype: torch.dtype, *, float64: float, float32: float):
    if tol is None:
        return float64 if dtype == torch.float64 else float32
    if not tol > 0:
        raise FitError(f"tol must be > 0, got {tol}.")
    return float(tol)


def _resolve_device(device: Any, src: _Source) -> torch.device:
    return src.device if device is None else torch.device(device)


def _budget(device: torch.device, max_memory: int | None) -> int | None:
    return int(max_memory) if max_memory is not None else _available_bytes(device)


def _need_memory(need: int, budget: int | None, what: str, fix: str) -> None:
    if budget is not None and need > budget:
        raise FitError(
            f"{what} needs about {need} bytes ({_gib(need)}) but only {budget} bytes "
            f"({_gib(budget)}) are available. {fix}"
        )


@dataclass(frozen=True)
class _Result:
    weights: Tensor  # (N, E)
    bias: Tensor  # (E,)
    penalty: Tensor  # (E,) chosen l2 or l1
    val_mse: Tensor | None  # (K, E)
    grid: Tensor  # (K,) or (K, E)
    meta: dict


def _finish(src: _Source, res: _Result) -> Attributions:
    W = res.weights.T  # (E, N)
    bad = ~torch.isfinite(W)
    if bool(bad.any()):
        e, j = (int(x) for x in bad.nonzero()[0])
        raise FitError(
            f"The fitted weight of example {e}, component {j} is not finite. The problem is "
            "too ill-conditioned for this dtype: use dtype=torch.float64 or a larger penalty."
        )
    meta = dict(res.meta)
    meta["source"] = src.meta
    return Attributions(weights=W, bias=res.bias, names=src.names, meta=meta)


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
    progress: bool,
) -> tuple[_Source, _Result]:
    _check_common(val_fraction, dtype, seed)
    tol = _default_tol(tol, dtype, float64=1e-10, float32=1e-5)
    if solver not in SOLVERS:
        raise FitError(f"solver must be one of {SOLVERS}, got {solver!r}.")
    src = _Source(source)
    dev = _resolve_device(device, src)
    N, E = src.n_components, src.n_examples
    s = torch.finfo(dtype).bits // 8
    grid_given = None if l2_grid is None else _as_grid(l2_grid, "l2_grid", dtype, dev)
    validate = grid_given is None or grid_given.numel() > 1
    if validate and val_fraction <= 0:
        raise FitError(
            "Choosing l2 from a grid needs validation rows, but val_fraction=0. Pass "
            "val_fraction > 0 (e.g. 0.1) or a single l2 value."
        )
    budget = _budget(dev, max_memory)
    need = _eig_bytes(N, E, s, validate=validate)
    if solver == "auto":
        solver = "eig" if budget is None or need <= budget else "cg"
        log.info("fit: solver=%s (eig needs %s, budget %s)", solver, _gib(need), budget)
    if solver == "eig":
        _need_memory(
            need,
            budget,
            f"The eigendecomposition solver with {N} components and {E} examples",
            "Use solver='cg' (streams the store, bounded memory), dtype=torch.float32 "
            "(halves it), or fewer components.",
        )
    parts = _accumulate(
        src,
        validate=validate,
        seed=seed,
        val_fraction=val_fraction,
        with_gram=solver == "eig",
        device=dev,
        dtype=dtype,
        progress=progress,
    )
    _check_rows(parts, validate=validate, val_fraction=val_fraction, need=2)
    n_all = sum(m.n for m in parts)
    n_val = parts[1].n if validate else 0
    if method == "ols" and n_all < N + 1:
        raise FitError(
            f"OLS with {N} components and an intercept needs at least {N + 1} finished rows to "
            f"determine every weight, got {n_all}. Collect more masks or use method='ridge'."
        )
    var = _mask_variance(parts[0])
    if var == 0.0:
        raise FitError(
            "Every mask of the training rows is identical, so no component's effect can be "
            "estimated. Collect masks with alpha > 0."
        )
    grid = grid_given
    if grid is None:
        grid = var * torch.tensor(DEFAULT_L2_RELATIVE, dtype=dtype, device=dev)
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
        W, bias, choice, val_mse, info = _ridge_cg(
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
    return src, _Result(W, bias, l2, val_mse, grid, meta)


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
    progress: bool,
) -> tuple[_Source, _Result]:
    _check_common(val_fraction, dtype, seed)
    tol = _default_tol(tol, dtype, float64=1e-7, float32=1e-5)
    src = _Source(source)
    dev = _resolve_device(device, src)
    N, E = src.n_components, src.n_examples
    grid = None if l1_grid is None else _as_grid(l1_grid, "l1_grid", dtype, dev)
    validate = grid is None or grid.numel() > 1
    if validate and val_fraction <= 0:
        raise FitError(
            "Choosing l1 from a grid needs validation rows, but val_fraction=0. Pass "
            "val_fraction > 0 (e.g. 0.1) or a single l1 value."
        )
    s = torch.finfo(dtype).bits // 8
    _need_memory(
        _lasso_bytes(N, E, s),
        _budget(dev, max_memory),
        f"The lasso with {N} components and {E} examples",
        "Fit fewer components or examples at a time, use dtype=torch.float32, or use "
        "method='ridge' with solver='cg'.",
    )
    parts = _accumulate(
        src,
        validate=validate,
        seed=seed,
        val_fraction=val_fraction,
        with_gram=True,
        device=dev,
        dtype=dtype,
        progress=progress,
    )
    _check_rows(parts, validate=validate, val_fraction=val_fraction, need=2)
    n_all, n_t = sum(m.n for m in parts), parts[0].n
    n_v = parts[1].n if validate else 0
    if _mask_variance(parts[0]) == 0.0:
        raise FitError(
            "Every mask of the training rows is identical, so no component's effect can be "
            "estimated. Collect masks with alpha > 0."
        )
    W, bias, l1, val_mse, lam, info = _lasso(
        parts, grid, validate=validate, max_iter=max_iter, tol=tol
    )
    if val_mse is not None:
        best = val_mse.min(0).values.tolist()
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
        "val_mse": best if val_mse is not None else None,
        **info,
    }
    return src, _Result(W, bias, l1, val_mse, lam, meta)


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
    progress : bool
        Show progress bars (only on a terminal).

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
    >>> est = RidgePath(progress=False).fit((V, Y))
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
        progress: bool = True,
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
        self._set(src, res)
        return self

    def _set(self, src: _Source, res: _Result) -> None:
        self.attributions_ = _finish(src, res)
        self.weights_ = self.attributions_.weights
        self.bias_ = self.attributions_.bias
        self.l2_ = res.penalty
        self.l2_grid_ = res.grid
        self.val_mse_ = res.val_mse
        self.solver_ = res.meta["solver"]


class LassoPath:
    """Lasso over a grid of ``l1`` penalties, ``l1`` chosen per example on held-out rows.

    Minimises ``(1/(2n)) ||y - b - V w||**2 + l1 ||w||_1`` (scikit-learn's ``Lasso(alpha=l1)``).
    Parameters as :class:`RidgePath`, with ``l1_grid`` (default: per example,
    ``l1_max * 10**linspace(0, -4, 13)``) and FISTA limits ``max_iter``/``tol`` (stop an
    example when its largest update is below ``tol * max|w|``; default tol: 1e-7 in
    float64, 1e-5 in float32).

    Attributes
    ----------
    weights_, bias_, attributions_ : as RidgePath
    l1_ : Tensor (n_examples,) the chosen penalty per example
    val_mse_ : Tensor (K, n_examples) or None
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
        progress: bool = True,
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
        self.attributions_ = _finish(src, res)
        self.weights_ = self.attributions_.weights
        self.bias_ = self.attributions_.bias
        self.l1_ = res.penalty
        self.val_mse_ = res.val_mse
        return self


def fit(
    source: Any,
    *,
    method: str = "ridge",
    l2_grid: Sequence[float] | None = None,
    l1_grid: Sequence[float] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    solver: str = "auto",
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float64,
    max_memory: int | None = None,
    max_iter: int | None = None,
    tol: float | None = None,
    progress: bool = True,
    prior: Any = None,
    groups: Sequence[Any] | None = None,
) -> Attributions:
    """Fit one linear model per example over the components: the COAR attributions.

    Parameters
    ----------
    source : ComponentDataset or tuple (masks, outputs)
        A store (read with one streamed pass over its finished blocks), or in-memory
        masks ``(n_rows, n_components)`` (bool or 0/1) and outputs ``(n_rows, n_examples)``.
    method : {"ridge", "ols", "lasso", "group"}
        See the module docstring. ``"ridge"`` chooses ``l2`` per example on held-out rows;
        ``"group"`` (:class:`coarpy.priors.PriorRidge`) penalises each group of
        components on its own scale, shrinks toward ``prior`` and chooses by GCV.
    l2_grid : sequence of float, optional
        Ridge penalties per row (``sklearn alpha = l2 * n_rows``); ``"ridge"`` and
        ``"group"``.
    l1_grid : sequence of float, optional
        Lasso penalties (``sklearn Lasso alpha = l1``); ``"lasso"`` only.
    val_fraction, seed :
        The held-out share of rows and the seed of the split (a pure function of
        ``(seed, row index)``); not used by ``"group"``.
    solver : {"auto", "eig", "cg"}
        Ridge/OLS solver; see :class:`RidgePath`.
    device, dtype :
        Where and in what precision to compute (default: the source's device, float64).
    max_memory : int, optional
        Memory budget in bytes (default: free memory on ``device``).
    max_iter, tol : optional
        Iterative solver limits (CG: 1000 and 1e-10, lasso: 5000 and 1e-7; both tol 1e-5
        in float32).
    progress : bool
        Progress bars over blocks (shown only on a terminal).
    prior : Attributions or Tensor (n_examples, n_components), optional
        ``"group"`` only: the prior mean, e.g. ``coarpy.baselines.gradient(...)``.
    groups : sequence of labels (n_components,), optional
        ``"group"`` only: the group of each component (default: the store's modules).

    Returns
    -------
    Attributions
        ``weights`` (n_examples, n_components) on the raw mask scale, ``bias``, component
        ``names`` (``str(i)`` for a tuple), and ``meta`` with the settings, the chosen
        penalty per example and the split sizes.

    Raises
    ------
    FitError
        No finished rows, too few rows, non-finite outputs (naming the row and example),
        mismatched shapes, or not enough memory (naming the bytes needed).

    Examples
    --------
    >>> import torch
    >>> V = torch.tensor([[1, 1], [0, 1], [1, 0], [0, 0], [1, 1]], dtype=torch.bool)
    >>> Y = torch.tensor([[5.0], [3.0], [4.0], [2.0], [5.0]])   # 2 + 2*v0 + 1*v1
    >>> attr = fit((V, Y), method="ols", progress=False)
    >>> attr.weights, attr.bias
    (tensor([[2., 1.]]), tensor([2.]))
    """
    if method not in METHODS:
        raise FitError(f"method must be one of {METHODS}, got {method!r}.")
    if method == "group":
        from .priors import PriorRidge  # built on this module's sufficient statistics

        if l1_grid is not None or solver not in ("auto", "eig"):
            raise FitError(
                "method='group' takes l2_grid and uses one eigendecomposition; got "
                f"l1_grid={l1_grid!r}, solver={solver!r}."
            )
        est = PriorRidge(
            prior, groups=groups, l2_grid=l2_grid, device=device, dtype=dtype,
            max_memory=max_memory, progress=progress,
        )  # fmt: skip
        return est.fit(source).attributions_
    if prior is not None or groups is not None:
        raise FitError(f"prior= and groups= are for method='group', got method={method!r}.")
    if method == "lasso":
        if l2_grid is not None:
            raise FitError("method='lasso' takes l1_grid, not l2_grid.")
        if solver not in ("auto", "eig"):
            raise FitError(f"method='lasso' uses its own solver (FISTA); got solver={solver!r}.")
        est = LassoPath(
            l1_grid,
            val_fraction=val_fraction,
            seed=seed,
            device=device,
            dtype=dtype,
            max_memory=max_memory,
            max_iter=5000 if max_iter is None else max_iter,
            tol=tol,
            progress=progress,
        )
        return est.fit(source).attributions_
    if l1_grid is not None:
        raise FitError(f"method={method!r} takes l2_grid, not l1_grid (that is for 'lasso').")
    if method == "ols" and l2_grid is not None:
        raise FitError("method='ols' has no penalty; use method='ridge' to pass l2_grid.")
    src, res = _fit_ridge(
        source,
        method=method,
        l2_grid=(0.0,) if method == "ols" else l2_grid,
        val_fraction=val_fraction,
        seed=seed,
        solver=solver,
        device=device,
        dtype=dtype,
        max_memory=max_memory,
        max_iter=1000 if max_iter is None else max_iter,
        tol=tol,
        progress=progress,
    )
    return _finish(src, res)
