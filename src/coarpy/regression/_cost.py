"""What a ridge fit will cost, before it runs: time and memory of each solver, and the choice.

With ``n`` rows (``n_t`` training, ``n_v`` validation), ``N`` components, ``E`` examples,
``K`` penalties and ``s`` bytes per number, the three solvers of
:mod:`coarpy.regression.ridge` cost (flops; a float32 product of 0/1 masks counts half):

========= ============================================== ===============================
solver    fixed work                                     per example
========= ============================================== ===============================
``eig``   Gram ``n N**2``, one eigendecomposition        ``2 n N`` (``V.T y``, twice when
          ``12 N**3``, validation ``4 N**3``, refit        not cached), ``(4 + 2 r) N**2``
          Choleskys ``D N**3 / 3``                       validation, ``2 N**2`` refit
``dual``  kernel ``n**2 N``, one eigendecomposition      ``2 n_t**2 + 2 K n_v n_t``
          ``12 n_t**3``, validation ``2 n_v n_t**2``,    validation, ``2 n**2`` refit,
          refit Choleskys ``D n**3 / 3``                 ``2 n N`` weights
``cg``    none                                           ``4 n N (K + 1)`` per iteration
========= ============================================== ===============================

``r`` (about 10) is the numerical rank of the ridge filters over the grid, ``D`` the
number of distinct penalties chosen (assumed 4). The Gram and the kernel are products
of 0/1 masks in float32 (half the cost of float64; the kernel, formed on the lower
triangle of row blocks, costs less still, which the estimate leaves as a margin). An
eigendecomposition costs about 12 GEMM-flops per ``m**3`` (measured: LAPACK ``syevd``
on CPU, 40-150x a Cholesky factorisation of the same size); conjugate gradients need
about ``sqrt(condition number)`` iterations, estimated from the mask variance and the
smallest penalty (Marchenko-Pastur bounds of the Gram's spectrum). Seconds are these
flops over the rate of a float64 matrix product measured on the device (a few ms).

Memory (bytes, on the device; the kept rows ``n ceil(N/8) + n E 4`` and the result
``4 E N`` come on top): ``eig`` ``6 s N**2`` (``4 s N**2`` with one penalty) plus
``8 s N`` per example of a chunk; ``dual`` the largest of ``(4 + s) n**2`` (the exact
float32 kernel and its centred copy), ``s (n**2 + 3 n_t**2 + n_v n_t)`` (the
eigendecomposition) and ``(s + 8) n**2`` (the refit's float64 Cholesky factor; ``24
n**2`` in float32, which factors a float64 copy), plus ``s (6 n + 2 N)`` per example;
``cg`` ``2 (128 MiB + c s ((6 K + 3) N + 2 K b))`` for chunks of ``c`` examples and
blocks of ``b`` rows. Chunks of examples are sized to the budget and to ~1 GiB, so many
examples (ImageNet: 50,000) never need the full ``N x E`` products at once.

``auto`` takes the solver with the fewest flops that fits the budget; one that does
not fit when asked for by name, or ``auto`` when none does, raises
:class:`~coarpy.errors.FitError` with the bytes each needs, before the store is read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import FitError
from . import _stats

EIG_FLOPS = 12.0  # GEMM-flops per m**3 of a symmetric eigendecomposition (syevd, measured)
CHOL_FLOPS = 1.0 / 3.0  # per m**3 of a Cholesky factorisation
FILTER_RANK = 10  # numerical rank of the (K, m) ridge filters over a 21-value grid
CHOSEN_PENALTIES = 4  # distinct penalties assumed chosen across examples (refit Choleskys)
CHUNK_CAP_BYTES = 2**30  # working memory of one chunk of examples, at most
OVERHEAD_BYTES = _stats.WORK_BYTES + _stats.BLOCK_BYTES  # unpacked masks + one block


@dataclass(frozen=True)
class Shape:
    """The sizes a cost depends on."""

    n: int  # rows
    n_val: int  # validation rows (0 without validation)
    N: int  # components
    E: int  # examples
    K: int  # penalties tried (1 without validation)
    s: int  # bytes per number of the solve
    y_bytes: int  # bytes per kept output
    l2_ratio: float  # smallest penalty over the mask variance (for CG's iterations)
    max_iter: int

    @property
    def n_train(self) -> int:
        return self.n - self.n_val

    @property
    def validate(self) -> bool:
        return self.n_val > 0


@dataclass(frozen=True)
class Estimate:
    """One solver's cost: flops (float64-GEMM equivalents), peak bytes, examples per chunk."""

    solver: str
    flops: float
    bytes: int
    chunk: int
    keep: bool = False  # eig: keep V.T @ Y between passes; group dual: per-group kernels
    iterations: int = 0  # cg: the iterations assumed

    def seconds(self, rate: float) -> float:
        return self.flops / rate


def kept_bytes(shape: Shape) -> int:
    """The rows kept in memory (packed masks, outputs) and the result (float32 weights)."""
    n, N, E = shape.n, shape.N, shape.E
    return n * ((N + 7) // 8) + n * E * shape.y_bytes + 4 * E * N + 16 * E


def _chunk(room: int | None, per_col: int, E: int) -> int:
    cap = max(1, CHUNK_CAP_BYTES // max(1, per_col))
    fit = cap if room is None else max(0, room // max(1, per_col))
    return max(0, min(E, cap, fit))


def eig(shape: Shape, budget: int | None) -> Estimate:
    """The primal eigendecomposition of the N x N Gram (see the module docstring)."""
    n, N, E, s = shape.n, shape.N, shape.E, shape.s
    fixed = s * (6 if shape.validate else 4) * N * N + OVERHEAD_BYTES + kept_bytes(shape)
    per_col = 8 * s * N
    room = None if budget is None else budget - fixed
    c = _chunk(room, per_col, E)
    cache = shape.validate and (room is None or room - c * per_col >= s * N * E)
    need = fixed + max(c, 1) * per_col + (s * N * E if cache else 0)
    r = min(FILTER_RANK, shape.K)
    fixed_flops = n * N * N + CHOL_FLOPS * min(CHOSEN_PENALTIES, shape.K) * N**3
    per_ex = 2 * n * N + 2 * N * N
    if shape.validate:
        fixed_flops += (EIG_FLOPS + 4) * N**3
        per_ex += (4 + 2 * r) * N * N + (0 if cache else 2 * n * N)
    return Estimate("eig", fixed_flops + per_ex * E, need, max(c, 1), keep=cache)


def dual(shape: Shape, budget: int | None) -> Estimate:
    """The dual: the n x n kernel of the masks (see the module docstring)."""
    n, nv, nt, N, E, s = shape.n, shape.n_val, shape.n_train, shape.N, shape.E, shape.s
    # The float32 kernel and its centred copy; the refit (the kernel and a float64
    # Cholesky factor, plus a float64 copy to factor when the fit runs in float32); the
    # eigendecomposition of the training block and the validation rows in its basis.
    stages = [(4 + s) * n * n, s * n * n + (8 if s == 8 else 16) * n * n]
    if shape.validate:
        stages.append(s * (n * n + 3 * nt * nt + nv * nt))
    fixed = max(stages) + OVERHEAD_BYTES + kept_bytes(shape)
    per_col = s * (6 * n + 2 * N)
    room = None if budget is None else budget - fixed
    c = _chunk(room, per_col, E)
    need = fixed + max(c, 1) * per_col
    fixed_flops = n * n * N + CHOL_FLOPS * min(CHOSEN_PENALTIES, shape.K) * n**3
    per_ex = 2 * n * n + 2 * n * N
    if shape.validate:
        fixed_flops += EIG_FLOPS * nt**3 + 2 * nv * nt * nt
        per_ex += 2 * nt * nt + 2 * shape.K * nv * nt
    return Estimate("dual", fixed_flops + per_ex * E, need, max(c, 1))


def cg_column_bytes(N: int, K: int, s: int, block_rows: int) -> int:
    """Bytes per example column of a CG chunk: 6 vectors per grid value, 3 right-hand sides,
    and the per-row products of one block."""
    return s * ((6 * K + 3) * N + 2 * K * block_rows)


def cg_iterations(shape: Shape) -> int:
    """About sqrt(condition number) of the training Gram plus the smallest penalty.

    The centred Gram of n Bernoulli masks over N components has its nonzero eigenvalues
    within var * (sqrt(n) -+ sqrt(N))**2 (Marchenko-Pastur), var the mask variance.
    """
    n, N = shape.n_train, shape.N
    lo = (math.sqrt(n) - math.sqrt(N)) ** 2 + n * shape.l2_ratio
    hi = (math.sqrt(n) + math.sqrt(N)) ** 2 + n * shape.l2_ratio
    kappa = hi / max(lo, 1e-300)
    return int(min(shape.max_iter, max(10, math.ceil(math.sqrt(kappa)))))


def cg(shape: Shape, budget: int | None) -> Estimate:
    """Conjugate gradients over the kept rows (see :mod:`._cg`)."""
    n, N, E, s, K = shape.n, shape.N, shape.E, shape.s, shape.K
    rows = max(1, min(_stats.block_rows(N, E, s), n))
    per_col = cg_column_bytes(N, K, s, rows)
    room = None if budget is None else budget // 2 - _stats.BLOCK_BYTES - kept_bytes(shape)
    c = E if room is None else max(0, min(E, room // per_col))
    need = 2 * (_stats.BLOCK_BYTES + max(c, 1) * per_col) + kept_bytes(shape)
    its = cg_iterations(shape)
    flops = 2 * n * N * E + its * 4 * n * N * E * (K + (1 if shape.validate else 0))
    return Estimate("cg", float(flops), need, max(c, 1), iterations=its)


ESTIMATORS = {"eig": eig, "dual": dual, "cg": cg}


def group_eig(
    shape: Shape, budget: int | None, *, iters: int, prior: bool, pooled: int | None = None
) -> Estimate:
    """``method="group"`` through the N x N Gram: ``iters`` eigendecompositions, the
    ``iters - 1`` pilots over ``pooled`` examples (default: all)."""
    n, N, E, s = shape.n, shape.N, shape.E, shape.s
    fixed = s * 5 * N * N + OVERHEAD_BYTES + kept_bytes(shape)
    per_col = 8 * s * N
    room = None if budget is None else budget - fixed
    c = _chunk(room, per_col, E)
    cache = iters > 1 and (room is None or room - c * per_col >= s * N * E)
    need = fixed + max(c, 1) * per_col + (s * N * E if cache else 0)
    P = E if pooled is None else min(pooled, E)
    per_ex = 2 * n * N + 4 * N * N + (2 * N * N if prior else 0)
    per_pilot = (0 if cache else 2 * n * N) + 4 * N * N
    flops = n * N * N + iters * EIG_FLOPS * N**3 + per_ex * E + (iters - 1) * per_pilot * P
    return Estimate("eig", float(flops), need, max(c, 1), keep=cache)


def group_dual(
    shape: Shape,
    budget: int | None,
    *,
    iters: int,
    prior: bool,
    groups: int,
    pooled: int | None = None,
) -> Estimate:
    """``method="group"`` through the n x n kernel: ``iters`` eigendecompositions, the
    kernel of each group counted once (kept when it fits) and weighted per iteration;
    the ``iters - 1`` pilots run in float32 (half the flops) over ``pooled`` examples."""
    n, N, E, s = shape.n, shape.N, shape.E, shape.s
    base = OVERHEAD_BYTES + kept_bytes(shape)
    stages = s * n * n + 3 * s * n * n + 8 * n * n  # weighted sum, eigh, float64 combination
    per_col = s * (6 * n + 4 * N)
    many = iters > 1 and groups > 1
    keep = many and (budget is None or base + stages + 4 * groups * n * n + per_col <= budget)
    fixed = base + stages + (4 * groups * n * n if keep else 0)
    room = None if budget is None else budget - fixed
    c = _chunk(room, per_col, E)
    need = fixed + max(c, 1) * per_col
    kernel = n * n * N + iters * groups * n * n if keep else iters * 2 * n * n * N
    P = E if pooled is None else min(pooled, E)
    per_ex = 4 * n * n + 2 * n * N + (2 * n * N + 2 * n * n if prior else 0)
    pilots = (iters - 1) * (EIG_FLOPS * n**3 + (4 * n * n + 2 * n * N) * P) / 2
    flops = kernel + EIG_FLOPS * n**3 + per_ex * E + pilots
    return Estimate("dual", float(flops), need, max(c, 1), keep=keep)


def gemm_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Flops per second of a float64 matrix product on ``device`` (best of 3, 384**3)."""
    m = 384
    a = torch.rand(m, m, dtype=torch.float64, device=device)
    best = math.inf
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        (a @ a).sum().item()
        best = min(best, time.perf_counter() - t0)
    rate = 2 * m**3 / max(best, 1e-9)
    return rate * (2.0 if dtype == torch.float32 else 1.0)


@dataclass(frozen=True)
class Plan:
    """The solver chosen, its estimate, every solver's estimate, and why.

    ``reason`` (kept in the meta) gives flops and bytes, which depend only on the shape;
    ``log_line`` adds the seconds at the measured rate of this machine and the budget.
    """

    solver: str
    estimate: Estimate
    estimates: dict[str, Estimate]
    rate: float
    reason: str
    log_line: str

    def meta(self) -> dict:
        e = self.estimate
        return {
            "solver_reason": self.reason,
            "solver_estimate": {"flops": float(e.flops), "bytes": int(e.bytes)},
            "example_chunk": int(e.chunk),
        }


def _fmt_s(sec: float) -> str:
    if sec < 120:
        return f"{sec:.2g} s"
    if sec < 7200:
        return f"{sec / 60:.1f} min"
    return f"{sec / 3600:.1f} h"


def choose(
    shape: Shape,
    budget: int | None,
    solver: str,
    rate: float,
    estimators: dict[str, Callable[[Shape, int | None], Estimate]],
) -> Plan:
    """Estimate with every one of ``estimators`` and pick ``solver`` (or, for ``"auto"``,
    the one with the fewest flops among those that fit the budget; FitError when none
    does)."""
    est = {name: f(shape, budget) for name, f in estimators.items()}

    def fits(e: Estimate) -> bool:
        return budget is None or e.bytes <= budget

    shape_txt = f"n={shape.n} rows, N={shape.N} components, E={shape.E} examples"
    if solver == "auto":
        ok = [e for e in est.values() if fits(e)]
        if not ok:
            raise FitError(
                f"No solver fits the memory budget of {budget} bytes ({_stats.gib(budget)}) "
                f"for {shape_txt}: "
                + "; ".join(f"{e.solver} needs {e.bytes} bytes" for e in est.values())
                + ". Pass dtype=torch.float32 (halves the solve), fit fewer examples or "
                "components at a time, or give a larger max_memory."
            )
        pick = min(ok, key=lambda e: e.flops)
        why = "the fewest flops of the solvers that fit"
    else:
        pick = est[solver]
        why = "requested"

    def line(e: Estimate, seconds: bool) -> str:
        t = f"~{_fmt_s(e.seconds(rate))}, " if seconds else ""
        ok = "" if fits(e) else " (does not fit)"
        return f"{e.solver} {t}{e.flops:.2g} flop, {_stats.gib(e.bytes)}{ok}"

    def text(seconds: bool) -> str:
        others = "; ".join(line(e, seconds) for e in est.values() if e is not pick)
        chunk = f", {pick.chunk} examples per chunk" if pick.chunk < shape.E else ""
        # The budget (free memory) changes from call to call: only the log line shows it.
        room = "unknown" if budget is None else _stats.gib(budget)
        room = f" of a budget of {room}" if seconds else ""
        return f"{pick.solver}, {why} ({shape_txt}): {line(pick, seconds)}{room}{chunk}" + (
            f"; vs {others}" if others else ""
        )

    return Plan(pick.solver, pick, est, rate, text(False), text(True))
