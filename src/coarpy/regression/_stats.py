"""What every estimator of :mod:`coarpy.regression` shares: rows in, Attributions out.

- **The source.** A ComponentDataset (read block by block, never as a whole) or an
  in-memory ``(masks, outputs)`` pair, both read as blocks of rows by :class:`Source`.
- **The validation split.** Row ``i`` is a validation row iff a hash of ``(seed, i)``
  falls below ``val_fraction`` (:func:`validation_rows`), so the split does not depend on
  block sizes, on the order blocks were written, or on how far a store has grown.
- **Sufficient statistics.** Per side of the split, the row count, ``sum v``, ``sum y``,
  ``sum y**2``, ``V.T @ V`` and ``V.T @ Y`` (:class:`Moments`); the centring helpers turn
  them into the centred Gram and cross-products the solvers work with. The lasso gathers
  them all in one streamed pass (:func:`accumulate`); ridge and group read the rows once
  into memory instead (:mod:`._rows`) and form the products they need from there, a
  chunk of examples at a time.
- **The memory budget.** ``max_memory``, else the free memory of the device
  (``MemAvailable`` from ``/proc/meminfo`` on CPU, ``torch.cuda.mem_get_info`` on GPU);
  each estimator states its own formula and refuses, before allocating, a fit that
  does not fit.
- **Checks and the finish.** The argument checks common to every estimator, and
  :func:`finish`, which turns solved weights into :class:`~coarpy.attributions.Attributions`.

Why these statistics are ours, not scikit-learn's ``RidgeCV``/``LassoCV``: those take the
whole design and targets as arrays in memory (the paper's ViT run: 5,000 masks x 82,944
components is 1.7 GB in float32, 3.3 GB in float64, for the design alone), fit on the
CPU, and cannot read a store block by block. Here the rows stream from the store, the
products run on the device asked for (a GPU included), every example gets its own
penalty from a validation split that stays fixed as the store grows, and the memory a
fit needs is stated and checked before it is allocated.

This is a helper module made for sharing inside the package: its names carry no
underscore, and no promise outside :mod:`coarpy.regression`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._engine import progress_bar
from ..attributions import Attributions
from ..errors import FitError

BLOCK_BYTES = 128 * 2**20  # rows are gathered into blocks of about this size
WORK_BYTES = 256 * 2**20  # per-chunk working memory of the blocked steps
F32_EXACT_ROWS = 2**24  # float32 holds every integer up to 2**24 exactly
DEFAULT_L2_RELATIVE = tuple(10.0 ** np.arange(-8.0, 2.01, 0.5))  # times the mask variance
_SPLIT_KEY = 0x5EED_C0A2_5917_0001  # salt: keeps the split independent of mask streams


# --------------------------------------------------------------------------- the source


class Source:
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
            self.example_ids = getattr(source, "example_ids", None)
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
        try:
            V, Y = (torch.as_tensor(x) for x in source)
        except (TypeError, ValueError, RuntimeError) as err:
            raise FitError(
                "A tuple source must hold two arrays, (masks [n, N], outputs [n, E]), that "
                f"torch.as_tensor accepts; it failed with: {err}. Pass tensors or numpy arrays."
            ) from err
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
        self.example_ids = None
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


def block_rows(n_components: int, n_examples: int, s: int) -> int:
    """Rows per block so that one block and its float copies take about BLOCK_BYTES."""
    per_row = n_components * (1 + 4 + 2 * s) + n_examples * (4 + s)
    return max(1, BLOCK_BYTES // per_row)


# --------------------------------------------------------------------------- the split


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scrambles every bit."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def validation_rows(rows: Tensor, *, seed: int, val_fraction: float) -> Tensor:
    """Bool [b]: whether each row index is a validation row; a pure function of (seed, row).

    Examples
    --------
    >>> rows = torch.arange(10)
    >>> torch.equal(validation_rows(rows, seed=0, val_fraction=0.5)[3:5],
    ...             validation_rows(rows[3:5], seed=0, val_fraction=0.5))
    True
    """
    if val_fraction <= 0:
        return torch.zeros(rows.shape[0], dtype=torch.bool)
    key = _mix64(np.array([(seed ^ _SPLIT_KEY) % 2**64], dtype=np.uint64))
    u = _mix64(rows.cpu().numpy().astype(np.uint64) ^ key)
    uniform = (u >> np.uint64(11)).astype(np.float64) * 2.0**-53  # in [0, 1)
    return torch.from_numpy(uniform < val_fraction)


# --------------------------------------------------------------------------- statistics


@dataclass
class Moments:
    """Sufficient statistics of one set of rows (training, validation or all)."""

    n: int
    sv: Tensor  # (N,) sum of v
    sy: Tensor  # (E,) sum of y
    syy: Tensor  # (E,) sum of y**2
    gram: Tensor | None  # (N, N) V.T @ V
    vty: Tensor | None  # (N, E) V.T @ Y

    def means(self) -> tuple[Tensor, Tensor]:
        return self.sv / self.n, self.sy / self.n

    def merge_(self, other: Moments) -> Moments:
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


class GramSum:
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
        if self.part is not self.total and self.pending + v32.shape[0] > F32_EXACT_ROWS:
            self.flush()
        self.part.addmm_(v32.T, v32)
        self.pending += v32.shape[0]

    def flush(self) -> Tensor:
        if self.part is not self.total:
            self.total += self.part
            self.part.zero_()
        self.pending = 0
        return self.total


def check_finite(rows: Tensor, Y: Tensor) -> None:
    """Raise FitError naming the first non-finite output of a block."""
    bad = ~torch.isfinite(Y)
    if bool(bad.any()):
        i, e = (int(x) for x in bad.nonzero()[0])
        raise FitError(
            f"outputs[row {int(rows[i])}, example {e}] is {float(Y[i, e])}; regression needs "
            "finite outputs. Fix the output function (e.g. a log of 0) or re-collect that "
            "block, or drop the example."
        )


def accumulate(
    src: Source,
    *,
    validate: bool,
    seed: int,
    val_fraction: float,
    with_gram: bool,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool | None,
) -> list[Moments]:
    """One pass over the rows: [training, validation] moments, or [all] without validation."""
    N, E = src.n_components, src.n_examples
    n_parts = 2 if validate else 1

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(*shape, device=device, dtype=dtype)

    parts = [
        Moments(0, zeros(N), zeros(E), zeros(E), None, zeros(N, E) if with_gram else None)
        for _ in range(n_parts)
    ]
    grams = [GramSum(N, device, dtype) if with_gram else None for _ in range(n_parts)]
    s = torch.finfo(dtype).bits // 8
    with progress_bar(src.n_rows, progress, desc="fit: statistics", unit="row") as bar:
        for rows, V, Y in src.blocks(device, block_rows(N, E, s)):
            check_finite(rows, Y)
            if validate:
                is_val = validation_rows(rows, seed=seed, val_fraction=val_fraction).to(device)
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


# --------------------------------------------------------------------------- centring


def centered_gram_(m: Moments, mv: Tensor, *, inplace: bool = False) -> Tensor:
    """sum over m's rows of (v - mv)(v - mv).T, shape (N, N)."""
    G = m.gram if inplace else m.gram.clone()
    G.addr_(mv, m.sv, alpha=-1.0)
    G.addr_(m.sv, mv, alpha=-1.0)
    G.addr_(mv, mv, alpha=float(m.n))
    return G


def centered_cross_(m: Moments, mv: Tensor, my: Tensor, *, inplace: bool = False) -> Tensor:
    """sum over m's rows of (v - mv)(y - my).T, shape (N, E)."""
    C = m.vty if inplace else m.vty.clone()
    C.addr_(mv, m.sy, alpha=-1.0)
    C.addr_(m.sv, my, alpha=-1.0)
    C.addr_(mv, my, alpha=float(m.n))
    return C


def centered_yy(m: Moments, my: Tensor) -> Tensor:
    """sum over m's rows of (y - my)**2, shape (E,)."""
    return m.syy - 2.0 * my * m.sy + m.n * my * my


def mask_variance(m: Moments) -> float:
    """The mean variance of a mask entry, trace(Vc.T Vc / n) / N for 0/1 masks.

    Raises FitError when it is zero: identical masks say nothing about any component.
    """
    mv = m.sv / m.n
    var = float((mv * (1.0 - mv)).mean())
    if var == 0.0:
        raise FitError(
            "Every mask of the training rows is identical, so no component's effect can be "
            "estimated. Collect masks with alpha > 0."
        )
    return var


def ridge_filter(d: Tensor, n: int, l2: Tensor) -> Tensor:
    """(K, N) spectral filters 1 / (d + n * l2); eigenvalues below the rank cutoff give 0.

    ``d`` are the eigenvalues of a centred Gram of ``n`` rows: the ridge solution for
    penalty ``l2[k]`` is ``Q diag(filter[k]) Q.T`` applied to the cross-products.
    """
    tol = float(d.abs().max()) * d.shape[0] * torch.finfo(d.dtype).eps
    keep = d > tol
    inv = 1.0 / (d.clamp_min(tol)[None, :] + n * l2[:, None])
    return torch.where(keep[None, :], inv, torch.zeros_like(inv))


# --------------------------------------------------------------------------- memory


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes, or None where it cannot be read."""
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


def budget(device: torch.device, max_memory: int | None) -> int | None:
    """The memory budget: ``max_memory`` if given, else the free memory of ``device``."""
    if max_memory is None:
        return available_bytes(device)
    if isinstance(max_memory, bool) or not isinstance(max_memory, (int, float, np.number)):
        raise FitError(
            f"max_memory must be a number of bytes, got {max_memory!r}. "
            "Pass e.g. max_memory=8 * 2**30 for 8 GiB, or None for the free memory."
        )
    if not (max_memory > 0 and math.isfinite(max_memory)):
        raise FitError(f"max_memory must be a finite number of bytes > 0, got {max_memory}.")
    return int(max_memory)


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def need_memory(need: int, budget: int | None, what: str, fix: str) -> None:
    """Raise FitError (with the bytes and ``fix``) if ``need`` exceeds the budget."""
    if budget is not None and need > budget:
        raise FitError(
            f"{what} needs about {need} bytes ({gib(need)}) but only {budget} bytes "
            f"({gib(budget)}) are available. {fix}"
        )


# --------------------------------------------------------------------------- checks


def as_grid(grid: Any, name: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A penalty grid as a 1-D tensor of finite values >= 0."""
    bad = FitError(f"{name} must be a non-empty 1-D sequence of finite values >= 0, got {grid!r}.")
    try:
        g = torch.as_tensor(np.atleast_1d(np.asarray(grid, dtype=np.float64)))
    except (TypeError, ValueError) as err:
        raise bad from err
    if g.ndim != 1 or g.numel() == 0 or not bool(torch.isfinite(g).all()) or bool((g < 0).any()):
        raise bad
    return g.to(device=device, dtype=dtype)


def check_common(val_fraction: float, dtype: torch.dtype, seed: int, progress: bool | None) -> None:
    """The settings every estimator takes: dtype, the split's share and seed, progress."""
    if dtype not in (torch.float32, torch.float64):
        raise FitError(f"dtype must be torch.float32 or torch.float64, got {dtype}.")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float, np.number)):
        raise FitError(
            f"val_fraction must be a number in [0, 1), got {val_fraction!r}. The default 0.1 "
            "holds out one row in ten to choose the penalty."
        )
    if not 0.0 <= val_fraction < 1.0:
        raise FitError(
            f"val_fraction must be in [0, 1), got {val_fraction}. The default 0.1 holds out "
            "one row in ten to choose the penalty."
        )
    if not isinstance(seed, (int, np.integer)):
        raise FitError(f"seed must be an int, got {type(seed).__name__}.")
    if progress is not None and not isinstance(progress, bool):
        raise FitError(
            f"progress must be True, False or None (a bar only on a terminal), got {progress!r}."
        )


def check_max_iter(max_iter: Any) -> int:
    """An iteration limit: an int >= 1."""
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise FitError(f"max_iter must be an int >= 1, got {max_iter!r}.")
    return int(max_iter)


def check_rows(parts: list[Moments], *, validate: bool, val_fraction: float, need: int) -> None:
    """Raise FitError when there are too few rows (or validation rows) to fit."""
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


def default_tol(tol: float | None, dtype: torch.dtype, *, float64: float, float32: float) -> float:
    """``tol``, or the default for ``dtype``."""
    if tol is None:
        return float64 if dtype == torch.float64 else float32
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.number)) or not tol > 0:
        raise FitError(f"tol must be a number > 0, got {tol!r}.")
    return float(tol)


def resolve_device(device: Any, src: Source) -> torch.device:
    """``device``, else the source's device."""
    if device is None:
        return src.device
    try:
        return torch.device(device)
    except (TypeError, RuntimeError) as err:
        raise FitError(
            f"device must be a torch.device or a name such as 'cpu' or 'cuda:0', got {device!r}."
        ) from err


# --------------------------------------------------------------------------- the finish


@dataclass(frozen=True)
class Result:
    """What a solver returns, before it becomes Attributions."""

    weights: Tensor  # (E, N), examples as rows (float32 from the ridge solvers)
    bias: Tensor  # (E,)
    penalty: Tensor  # (E,) chosen l2 or l1
    val_mse: Tensor | None  # (K, E)
    grid: Tensor  # (K,) or (K, E)
    meta: dict


def check_weights(W: Tensor, examples: Tensor | int = 0) -> None:
    """Raise FitError naming the first non-finite weight of ``W`` (rows are examples:
    ``examples[i]``, or ``examples + i`` for an int)."""
    bad = ~torch.isfinite(W)
    if bool(bad.any()):
        i, j = (int(x) for x in bad.nonzero()[0])
        e = int(examples[i]) if isinstance(examples, Tensor) else examples + i
        raise FitError(
            f"The fitted weight of example {e}, component {j} is not finite. The "
            "problem is too ill-conditioned for this dtype: use dtype=torch.float64 or a "
            "larger penalty."
        )


def finish(src: Source, res: Result) -> Attributions:
    """Attributions from a solver's result, refusing non-finite weights.

    The weights are checked a slice of examples at a time and handed over as they are
    (float32, contiguous, examples as rows: no copy), so a 50,000 x 22,720 result is
    never held twice.
    """
    W = res.weights
    step = max(1, WORK_BYTES // max(1, W.shape[1]))
    for e0 in range(0, W.shape[0], step):
        check_weights(W[e0 : e0 + step], e0)
    meta = dict(res.meta)
    meta["source"] = src.meta
    return Attributions(
        weights=W, bias=res.bias, names=src.names, meta=meta, example_ids=src.example_ids
    )
