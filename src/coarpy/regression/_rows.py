"""The rows of a fit, read once and kept: bit-packed masks and the outputs, in memory.

The ridge solvers (primal eigendecomposition, dual, conjugate gradients) and the group
fit all start from one streamed pass over the source (:func:`read`): every block is read
once (a store verifies each block's checksum as it reads it), its outputs checked for
non-finite values, its rows sent to the training or validation side of the split, and
kept:

- the masks bit-packed, ``(n, ceil(N / 8))`` uint8: 8 masks of 64,512 components in
  64 KB, so a 20,000-mask GPT-2 store takes 161 MB (a float copy would take 5 GB);
- the outputs as the source gives them, ``(n, E)`` (float32 from a store);
- per side, the sufficient sums (``sum v``, ``sum y``, ``sum y**2``) as
  :class:`~coarpy.regression._stats.Moments`.

Training rows come first, then validation rows, each side in row order, so every
product a solver needs over one side is a contiguous slice. Everything after the pass
(Gram, kernel, ``V.T @ Y`` for a chunk of examples, the products of conjugate gradients)
is computed from these rows, unpacking a bounded slice of masks at a time; nothing
re-reads the source.

A helper module made for sharing inside :mod:`coarpy.regression`; no promise outside.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .._engine import progress_bar
from ..errors import FitError
from . import _stats

CHUNK_BYTES = _stats.WORK_BYTES  # unpacked masks per product step
Cols = slice | Tensor  # examples: a slice, or an int64 index tensor


@dataclass
class Rows:
    """The rows of one fit, kept in host memory; training rows first.

    ``packed`` (n, ceil(N/8)) uint8 masks (little bit order), ``outputs`` (n, E) in the
    source's float dtype, ``index`` (n,) the source row of each kept row, ``n_train``
    the number of training rows, ``parts`` the sums of [training, validation] rows (or
    [all rows] without validation).
    """

    packed: np.ndarray
    outputs: Tensor
    index: np.ndarray
    n_train: int
    n_components: int
    parts: list[_stats.Moments]

    @property
    def n(self) -> int:
        return self.packed.shape[0]

    @property
    def n_examples(self) -> int:
        return self.outputs.shape[1]

    def nbytes(self) -> int:
        return self.packed.nbytes + self.outputs.element_size() * self.outputs.numel()

    # ----------------------------------------------------------------- masks

    def masks(self, r0: int, r1: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Masks of kept rows ``r0:r1`` as 0/1 in ``dtype`` on ``device``: (r1 - r0, N)."""
        bits = np.unpackbits(self.packed[r0:r1], axis=1, count=self.n_components, bitorder="little")
        return torch.from_numpy(bits).to(device=device, dtype=dtype)

    def columns(self, j0: int, j1: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Components ``j0:j1`` (``j0`` a multiple of 8) of every kept row: (n, j1 - j0)."""
        bits = np.unpackbits(
            self.packed[:, j0 // 8 : (j1 + 7) // 8], axis=1, count=j1 - j0, bitorder="little"
        )
        return torch.from_numpy(bits).to(device=device, dtype=dtype)

    def row_chunks(self, r0: int, r1: int, width: int, s: int) -> Iterator[tuple[int, int]]:
        """``(a, b)`` slices of rows ``r0:r1``; ``width`` unpacked columns take ~CHUNK_BYTES."""
        step = max(1, CHUNK_BYTES // max(1, width * s))
        for a in range(r0, r1, step):
            yield a, min(a + step, r1)

    # ----------------------------------------------------------------- products

    def gram(
        self,
        r0: int,
        r1: int,
        dtype: torch.dtype,
        device: torch.device,
        progress: bool | None = False,
    ) -> Tensor:
        """``V.T @ V`` over kept rows ``r0:r1``, (N, N) in ``dtype``, exact.

        Mask products are counts: float32 holds every integer below 2**24 exactly, so
        partial sums use the (about 2x faster) float32 product and are flushed into the
        ``dtype`` total before they could reach 2**24.
        """
        g = _stats.GramSum(self.n_components, device, dtype)
        with progress_bar(r1 - r0, progress, desc="fit: gram", unit="row") as bar:
            for a, b in self.row_chunks(r0, r1, self.n_components, 4):
                g.add(self.masks(a, b, torch.float32, device))
                bar.update(b - a)
        return g.flush()

    def kernel(
        self, dtype: torch.dtype, device: torch.device, progress: bool | None
    ) -> tuple[Tensor, Tensor]:
        """The raw kernel ``V @ V.T`` over all kept rows, exact, and its row sums.

        Returns ``(K (n, n) float32, row_sums (n,) float64)``. Entries count the
        components two masks both keep, integers up to N, exact in float32 for any
        N < 2**24; the product runs over slices of components, each unpacked once.
        """
        n, N = self.n, self.n_components
        if N >= _stats.F32_EXACT_ROWS:
            raise FitError(  # pragma: no cover - 16.7 million components
                f"The dual solver counts shared components in float32, exact below 2**24 "
                f"components; got {N}. Use solver='cg'."
            )
        K = torch.zeros(n, n, dtype=torch.float32, device=device)
        with progress_bar(N, progress, desc="fit: kernel", unit="comp") as bar:
            for j0, j1 in self.column_chunks():
                X = self.columns(j0, j1, torch.float32, device)  # (n, j1 - j0) 0/1
                add_outer_lower_(K, X)
                bar.update(j1 - j0)
        mirror_lower_(K)
        return K, K.sum(1, dtype=torch.float64)

    def column_chunks(self) -> Iterator[tuple[int, int]]:
        """``(j0, j1)`` slices of components (``j0`` a multiple of 8) whose unpacked float32
        columns over all kept rows take about CHUNK_BYTES."""
        step = max(8, (CHUNK_BYTES // max(1, 4 * self.n)) // 8 * 8)
        for j0 in range(0, self.n_components, step):
            yield j0, min(j0 + step, self.n_components)

    def cross(
        self,
        r0: int,
        r1: int,
        cols: Cols,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Tensor:
        """``V.T @ Y[:, cols]`` over kept rows ``r0:r1``: (N, c) in ``dtype``."""
        c = cols.numel() if isinstance(cols, Tensor) else len(range(*cols.indices(self.n_examples)))
        out = torch.zeros(self.n_components, c, dtype=dtype, device=device)
        for a, b in self.row_chunks(r0, r1, self.n_components, torch.finfo(dtype).bits // 8):
            out.addmm_(self.masks(a, b, dtype, device).T, self.y(a, b, cols, dtype, device))
        return out

    def y(self, r0: int, r1: int, cols: Cols, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Outputs of kept rows ``r0:r1`` for examples ``cols`` (a slice or an index
        tensor), in ``dtype`` on ``device``: (r1 - r0, c)."""
        if isinstance(cols, Tensor):
            return self.outputs[r0:r1].index_select(1, cols.cpu()).to(device=device, dtype=dtype)
        return self.outputs[r0:r1, cols].to(device=device, dtype=dtype)


def _row_blocks(n: int) -> list[tuple[int, int]]:
    """Blocks of rows for the symmetric products: up to 8, of at least 256 rows."""
    b = max(1, min(8, n // 256))
    edges = [round(i * n / b) for i in range(b + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def add_outer_lower_(K: Tensor, X: Tensor, weight: float = 1.0) -> None:
    """``K += weight * X @ X.T`` on the lower triangle of row blocks only (about half the
    flops of the full product); :func:`mirror_lower_` completes ``K`` once at the end."""
    same = K.dtype == X.dtype and weight == 1.0
    blocks = _row_blocks(X.shape[0])
    for i, (a0, a1) in enumerate(blocks):
        for b0, b1 in blocks[: i + 1]:
            if same:
                K[a0:a1, b0:b1].addmm_(X[a0:a1], X[b0:b1].T)
            else:
                K[a0:a1, b0:b1].add_(X[a0:a1] @ X[b0:b1].T, alpha=weight)


def mirror_lower_(K: Tensor) -> None:
    """Copy the lower triangle of row blocks (see :func:`add_outer_lower_`) onto the upper."""
    blocks = _row_blocks(K.shape[0])
    for i, (a0, a1) in enumerate(blocks):
        for b0, b1 in blocks[:i]:
            K[b0:b1, a0:a1] = K[a0:a1, b0:b1].T


def read(
    src: _stats.Source,
    *,
    validate: bool,
    seed: int,
    val_fraction: float,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool | None,
) -> Rows:
    """One streamed pass over the source: the kept rows and the sums of each side.

    Raises FitError (via the checks of :mod:`._stats`) on a non-finite output; the sums
    are formed exactly as :func:`._stats.accumulate` forms them, block by block.
    """
    N, E = src.n_components, src.n_examples
    s = torch.finfo(dtype).bits // 8
    width = (N + 7) // 8
    parts = [
        _stats.Moments(
            0,
            torch.zeros(N, dtype=dtype),
            torch.zeros(E, dtype=dtype),
            torch.zeros(E, dtype=dtype),
            None,
            None,
        )
        for _ in range(2 if validate else 1)
    ]
    known = src.n_rows
    ydtype = src.Y.dtype if src.store is None else torch.float32
    # With the row count known, fill one array: training rows from the front, validation
    # rows from the back (reversed at the end); else gather blocks and join them.
    packed = np.empty((known, width), np.uint8) if known is not None else None
    outputs = torch.empty(known, E, dtype=ydtype) if known is not None else None
    index = np.empty(known, np.int64) if known is not None else None
    pieces: list[list[tuple[np.ndarray, Tensor, np.ndarray]]] = [[], []]
    front, back = 0, known
    cpu = torch.device("cpu")
    with progress_bar(src.n_rows, progress, desc="fit: statistics", unit="row") as bar:
        for rows, V, Y in src.blocks(cpu, _stats.block_rows(N, E, s)):
            _stats.check_finite(rows, Y)
            if validate:
                is_val = _stats.validation_rows(rows, seed=seed, val_fraction=val_fraction)
                sides = [~is_val, is_val]
            else:
                sides = [torch.ones(rows.shape[0], dtype=torch.bool)]
            for side, (m, sel) in enumerate(zip(parts, sides, strict=True)):
                b = int(sel.sum())
                if b == 0:
                    continue
                Vs, Ys = (V, Y) if b == rows.shape[0] else (V[sel], Y[sel])
                vd = Vs.to(dtype)
                yd = Ys.to(dtype)
                m.n += b
                m.sv += vd.sum(0)
                m.sy += yd.sum(0)
                m.syy += (yd * yd).sum(0)
                bits = np.packbits(Vs.numpy().astype(bool, copy=False), axis=1, bitorder="little")
                idx = rows[sel].numpy()
                if packed is None:
                    pieces[side].append((bits, Ys.to(ydtype), idx))
                elif side == 0:
                    packed[front : front + b], outputs[front : front + b] = bits, Ys
                    index[front : front + b] = idx
                    front += b
                else:
                    packed[back - b : back] = bits[::-1]
                    outputs[back - b : back] = Ys.flip(0)
                    index[back - b : back] = idx[::-1]
                    back -= b
            bar.update(rows.shape[0])
    n_train = parts[0].n
    if packed is None:
        flat = pieces[0] + pieces[1]
        if flat:
            packed = np.concatenate([p[0] for p in flat])
            outputs = torch.cat([p[1] for p in flat])
            index = np.concatenate([p[2] for p in flat])
        else:
            packed = np.empty((0, width), np.uint8)
            outputs = torch.empty(0, E, dtype=ydtype)
            index = np.empty(0, np.int64)
    else:
        n = sum(m.n for m in parts)
        if back != front:  # fewer rows than announced: close the gap
            packed[front:n] = packed[back:known]
            outputs[front:n] = outputs[back:known].clone()
            index[front:n] = index[back:known]
        packed, outputs, index = packed[:n], outputs[:n], index[:n]
        packed[n_train:] = packed[n_train:][::-1].copy()
        outputs[n_train:] = outputs[n_train:].flip(0)
        index[n_train:] = index[n_train:][::-1].copy()
    for m in parts:
        m.sv, m.sy, m.syy = m.sv.to(device), m.sy.to(device), m.syy.to(device)
    return Rows(packed, outputs, index, n_train, N, parts)
