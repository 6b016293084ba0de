"""Tests of a fit whose cost follows the work: the dual solver (coarpy.regression._dual)
against the primal and a numpy closed form, the solver choice by estimate
(coarpy.regression._cost), chunks of examples, and one read of the store (_rows)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from coarpy.errors import FitError
from coarpy.regression import RidgePath, _cost, fit
from coarpy.regression._stats import validation_rows


class CountingStore:
    """The ComponentDataset interface fit relies on; counts the blocks it hands out."""

    def __init__(self, V, Y, *, block=16):
        self.V = torch.as_tensor(V).bool()
        self.Y = torch.as_tensor(Y).float()
        self.block = block
        self.n_components = self.V.shape[1]
        self.n_examples = self.Y.shape[1]
        self.names = [f"m{i % 3}:{i}" for i in range(self.n_components)]
        self.meta = {"alpha": 0.1}
        self.passes = 0
        self.block_reads = 0

    def __len__(self):
        return self.V.shape[0]

    def iter_blocks(self):
        self.passes += 1
        for r0 in range(0, len(self), self.block):
            self.block_reads += 1
            yield r0, self.V[r0 : r0 + self.block], self.Y[r0 : r0 + self.block]

    @property
    def n_blocks(self):
        return -(-len(self) // self.block)


def data(n, N, E, *, keep=0.9, noise=1.0, seed=0):
    g = np.random.default_rng(seed)
    V = g.random((n, N)) < keep
    W = g.normal(size=(E, N)) * (g.random((E, N)) < 0.2)
    Y = V @ W.T + g.normal(size=E) + noise * g.normal(size=(n, E))
    return V, Y


def close(a, b, tol=1e-6):
    torch.testing.assert_close(a.weights, b.weights, rtol=tol, atol=tol)
    torch.testing.assert_close(a.bias, b.bias, rtol=tol, atol=tol)


# ----------------------------------------------------------------- dual == primal


@pytest.mark.parametrize(("n", "N"), [(80, 150), (300, 40)])
def test_dual_equals_primal_over_the_whole_path(n, N):
    V, Y = data(n, N, 5, seed=1)
    eig = RidgePath(solver="eig", progress=False).fit((V, Y))
    dual = RidgePath(solver="dual", progress=False).fit((V, Y))
    assert (eig.solver_, dual.solver_) == ("eig", "dual")
    torch.testing.assert_close(dual.val_mse_, eig.val_mse_, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(dual.l2_, eig.l2_)
    close(dual.attributions_, eig.attributions_)


def test_dual_equals_primal_for_one_l2_on_a_store():
    V, Y = data(90, 120, 3, seed=2)
    store = CountingStore(V, Y)
    eig = fit(store, method="ridge", l2_grid=[0.05], solver="eig", progress=False)
    dual = fit(store, method="ridge", l2_grid=[0.05], solver="dual", progress=False)
    close(dual, eig)
    assert dual.meta["n_val"] == 0 and dual.names == store.names


def test_dual_matches_the_numpy_closed_form():
    V, Y = data(60, 200, 4, seed=3)
    n, l2 = len(V), 0.02
    attr = fit((V, Y), method="ridge", l2_grid=[l2], solver="dual", progress=False)
    Vc, Yc = V - V.mean(0), Y - Y.mean(0)
    W = Vc.T @ np.linalg.solve(Vc @ Vc.T + n * l2 * np.eye(n), Yc)  # (N, E)
    np.testing.assert_allclose(attr.weights.numpy(), W.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(attr.bias.numpy(), Y.mean(0) - W.T @ V.mean(0), atol=1e-5)


def test_dual_chooses_l2_on_the_same_validation_rows_as_a_brute_force_search():
    V, Y = data(100, 160, 4, seed=4)
    grid = [1e-3, 1e-2, 0.1, 1.0]
    est = RidgePath(grid, val_fraction=0.2, seed=5, solver="dual", progress=False).fit((V, Y))
    is_val = validation_rows(torch.arange(len(V)), seed=5, val_fraction=0.2).numpy()
    Vt, Yt, Vv, Yv = V[~is_val], Y[~is_val], V[is_val], Y[is_val]
    mv, my = Vt.mean(0), Yt.mean(0)
    mse = []
    for l2 in grid:
        Vc = Vt - mv
        W = Vc.T @ np.linalg.solve(Vc @ Vc.T + len(Vt) * l2 * np.eye(len(Vt)), Yt - my)
        mse.append((((Yv - my) - (Vv - mv) @ W) ** 2).mean(0))
    np.testing.assert_allclose(est.val_mse_.numpy(), np.array(mse), rtol=1e-8)
    np.testing.assert_array_equal(est.l2_.numpy(), np.array(grid)[np.argmin(mse, 0)])


def test_dual_with_l2_zero_is_the_minimum_norm_interpolation():
    V, Y = data(40, 100, 2, seed=6)
    attr = fit((V, Y), method="ridge", l2_grid=[0.0], solver="dual", progress=False)
    Vc, Yc = V - V.mean(0), Y - Y.mean(0)
    np.testing.assert_allclose(attr.weights.numpy(), (np.linalg.pinv(Vc) @ Yc).T, atol=1e-5)
    assert attr.meta["refit_eig_fallbacks"] == 1


def test_dual_in_float32_matches_float64():
    V, Y = data(80, 150, 3, seed=7, noise=0.5)
    a64 = fit((V, Y), method="ridge", l2_grid=[0.05], solver="dual", progress=False)
    a32 = fit(
        (V, Y), method="ridge", l2_grid=[0.05], solver="dual", dtype=torch.float32, progress=False
    )
    torch.testing.assert_close(a32.weights, a64.weights, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------- the choice


def test_auto_picks_the_dual_when_masks_are_far_fewer_than_components(caplog):
    V, Y = data(60, 3000, 2, seed=8)
    with caplog.at_level(logging.INFO, logger="coarpy.regression.ridge"):
        attr = fit((V, Y), method="ridge", progress=False)
    assert attr.meta["solver"] == "dual"
    assert attr.meta["solver_reason"].startswith("dual, the fewest flops")
    lines = [r.getMessage() for r in caplog.records if "solver=" in r.getMessage()]
    assert len(lines) == 1 and "solver=dual" in lines[0] and "eig ~" in lines[0]


def test_auto_picks_the_primal_when_masks_far_outnumber_components():
    V, Y = data(3000, 20, 2, seed=9)
    attr = fit((V, Y), method="ridge", progress=False)
    assert attr.meta["solver"] == "eig"
    est = attr.meta["solver_estimate"]
    assert est["flops"] > 0 and est["bytes"] > 0


def test_group_picks_the_dual_when_masks_are_far_fewer_than_components():
    V, Y = data(50, 2000, 2, seed=10)
    few = fit((V, Y), method="group", progress=False)
    many = fit(data(2000, 20, 2, seed=10), method="group", progress=False)
    assert (few.meta["solver"], many.meta["solver"]) == ("dual", "eig")


def test_the_estimate_of_each_solver_follows_its_formula():
    shape = _cost.Shape(n=5000, n_val=500, N=82944, E=100, K=21, s=8, y_bytes=4,
                        l2_ratio=1e-8, max_iter=1000)  # fmt: skip
    dual, eig = _cost.dual(shape, None), _cost.eig(shape, None)
    assert dual.flops < eig.flops / 100  # the paper's ViT shape: the dual, by far
    assert eig.bytes > 6 * 8 * 82944**2  # six N x N float64 matrices: 330 GB
    assert dual.bytes < 2 * 2**30


def test_nothing_fits_is_refused_before_the_store_is_read():
    V, Y = data(100, 50, 2, seed=11)
    store = CountingStore(V, Y)
    with pytest.raises(FitError, match=r"No solver fits the memory budget.*eig needs \d+ bytes"):
        fit(store, method="ridge", max_memory=10**5, progress=False)
    with pytest.raises(FitError, match=r"The dual solver .* needs about \d+ bytes"):
        fit(store, method="ridge", solver="dual", max_memory=10**5, progress=False)
    assert store.passes == 0


# ----------------------------------------------------------------- chunks, one read


@pytest.mark.parametrize("solver", ["eig", "dual", "cg"])
def test_examples_in_chunks_give_the_same_weights_as_all_at_once(solver, monkeypatch):
    V, Y = data(120, 90, 7, seed=12)
    kw = dict(solver=solver, tol=1e-12, progress=False)
    whole = fit((V, Y), method="ridge", **kw)
    monkeypatch.setattr(_cost, "CHUNK_CAP_BYTES", 1)  # one example per chunk
    if solver == "cg":
        per_col = _cost.cg_column_bytes(90, 21, 8, 120)
        kept = _cost.kept_bytes(_cost.Shape(120, 12, 90, 7, 21, 8, 8, 1e-8, 1000))
        kw["max_memory"] = 2 * (2**27 + 2 * per_col + kept)  # room for two examples
    chunked = fit((V, Y), method="ridge", **kw)
    assert chunked.meta["example_chunk" if solver != "cg" else "cg_example_chunk"] < 7
    assert chunked.meta["l2"] == whole.meta["l2"]
    close(chunked, whole, 1e-6)


def test_group_in_chunks_gives_the_same_weights_as_all_at_once(monkeypatch):
    V, Y = data(60, 120, 5, seed=13)
    prior = torch.tensor(np.random.default_rng(0).normal(size=(5, 120)))
    groups = ["a"] * 40 + ["b"] * 80
    kw = dict(method="group", prior=prior, groups=groups, progress=False)
    whole = {s: fit((V, Y), solver=s, **kw) for s in ("eig", "dual")}
    monkeypatch.setattr(_cost, "CHUNK_CAP_BYTES", 1)
    for s in ("eig", "dual"):
        chunked = fit((V, Y), solver=s, **kw)
        assert chunked.meta["example_chunk"] == 1
        close(chunked, whole[s])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"solver": "eig"},
        {"solver": "dual"},
        {"solver": "cg"},
        {"l2_grid": [0.1], "solver": "dual"},
        {"method": "group", "solver": "eig"},
        {"method": "group", "solver": "dual"},
        {"method": "lasso"},
    ],
)
def test_the_store_is_read_once(kwargs):
    V, Y = data(150, 60, 3, seed=14)
    store = CountingStore(V, Y, block=16)
    fit(store, progress=False, **{"method": "ridge", **kwargs})
    assert store.passes == 1
    assert store.block_reads == store.n_blocks


@pytest.mark.parametrize(
    ("kwargs", "phases"),
    [
        (
            {"solver": "dual"},
            ["statistics", "kernel", "eigendecomposition", "validation", "weights"],
        ),
        ({"solver": "eig"}, ["statistics", "gram", "eigendecomposition", "validation", "weights"]),
        ({"method": "group", "solver": "dual"}, ["statistics", "kernel", "group penalties"]),
    ],
)
def test_progress_shows_every_phase_that_can_take_minutes(kwargs, phases, capsys):
    V, Y = data(60, 80, 2, seed=15)
    groups = {"groups": ["a"] * 40 + ["b"] * 40} if kwargs.get("method") == "group" else {}
    fit((V, Y), progress=True, **{"method": "ridge", **kwargs}, **groups)
    err = capsys.readouterr().err
    for phase in phases:
        assert f"fit: {phase}" in err


def test_a_store_without_a_length_gives_the_same_fit():
    V, Y = data(130, 70, 3, seed=16)
    store = CountingStore(V, Y, block=16)
    unsized = type("Unsized", (), {})()
    for name in ("n_components", "n_examples", "names", "meta", "iter_blocks"):
        setattr(unsized, name, getattr(store, name))
    for solver in ("eig", "dual"):
        close(
            fit(unsized, method="ridge", solver=solver, progress=False),
            fit(store, method="ridge", solver=solver, progress=False),
        )
