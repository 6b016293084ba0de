"""Tests of coarpy.regression (the ``fit`` dispatch, ridge/OLS and the lasso): recovery of
known truths, agreement with scikit-learn and numpy, streaming = in-memory, solver
agreement, and the errors. ``method="group"`` is tested in test_regression_group.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso, LinearRegression, Ridge

from coarpy.errors import FitError
from coarpy.regression import DEFAULT_L2_RELATIVE, LassoPath, LeastSquares, RidgePath, fit
from coarpy.regression._cg import column_bytes
from coarpy.regression._stats import BLOCK_BYTES, validation_rows


class FakeStore:
    """The ComponentDataset interface fit relies on, over in-memory arrays."""

    def __init__(self, V, Y, *, block=37, meta=None):
        self.V = torch.as_tensor(V).bool()
        self.Y = torch.as_tensor(Y).float()  # a store keeps outputs as float32
        self.block = block
        self.n_components = self.V.shape[1]
        self.n_examples = self.Y.shape[1]
        self.names = [f"layer:{i}" for i in range(self.n_components)]
        self.meta = meta if meta is not None else {"alpha": 0.2, "seed": 3}

    def __len__(self):
        return self.V.shape[0]

    def iter_blocks(self):
        for r0 in range(0, len(self), self.block):
            r1 = min(r0 + self.block, len(self))
            yield r0, self.V[r0:r1], self.Y[r0:r1]


def additive_data(n=400, N=12, E=3, *, keep=0.8, noise=0.0, seed=0, sparse=False):
    g = np.random.default_rng(seed)
    V = g.random((n, N)) < keep  # (n, N) True keeps
    W = g.normal(size=(E, N))
    if sparse:
        W = W * (g.random((E, N)) < 0.25)
    b = g.normal(size=E)
    Y = V @ W.T + b + noise * g.normal(size=(n, E))
    return V, Y, W, b


def split(n, seed=0, val_fraction=0.1):
    return validation_rows(torch.arange(n), seed=seed, val_fraction=val_fraction).numpy()


def np_ridge(V, Y, l2):
    """Ridge with intercept, penalty l2 per row (sklearn alpha = l2 * n), in numpy."""
    V = V.astype(np.float64)
    mv, my = V.mean(0), Y.mean(0)
    Vc, Yc = V - mv, Y - my
    W = np.linalg.solve(Vc.T @ Vc + len(V) * l2 * np.eye(V.shape[1]), Vc.T @ Yc)  # (N, E)
    return W.T, my - W.T @ mv


# ----------------------------------------------------------------- recovery of a truth


def test_ols_recovers_exactly_additive_outputs():
    V, Y, W, b = additive_data()
    attr = fit((V, Y), method="ols", progress=False)
    np.testing.assert_allclose(attr.weights.numpy(), W, atol=1e-6)
    np.testing.assert_allclose(attr.bias.numpy(), b, atol=1e-6)


def test_ridge_picks_a_tiny_l2_and_recovers_exactly_additive_outputs():
    V, Y, W, b = additive_data()
    attr = fit((V, Y), method="ridge", progress=False)
    var = attr.meta["l2_grid"][0] / DEFAULT_L2_RELATIVE[0]
    assert max(attr.meta["l2"]) <= 1e-7 * var
    np.testing.assert_allclose(attr.weights.numpy(), W, atol=1e-6)
    np.testing.assert_allclose(attr.bias.numpy(), b, atol=1e-6)


def test_lasso_recovers_a_sparse_truth_and_its_support():
    V, Y, W, b = additive_data(n=3000, N=30, E=4, noise=0.05, sparse=True, seed=1)
    attr = fit((V, Y), method="lasso", progress=False)
    w = attr.weights.numpy()
    np.testing.assert_allclose(w, W, atol=0.05)
    np.testing.assert_allclose(attr.bias.numpy(), b, atol=0.05)
    support = W != 0
    assert np.all(np.sign(w[support]) == np.sign(W[support]))
    assert np.abs(w[~support]).max() < 0.02
    assert (w[~support] == 0).mean() > 0.5  # most of the true zeros are exact zeros


def test_weights_are_on_the_raw_mask_scale_with_matching_bias():
    V, Y, _, _ = additive_data(noise=0.5, seed=2)
    attr = fit((V, Y), method="ridge", l2_grid=[0.01], progress=False)
    mean_v, mean_y = V.mean(0), Y.mean(0)
    np.testing.assert_allclose(
        attr.bias.numpy(), mean_y - attr.weights.numpy().astype(np.float64) @ mean_v, atol=1e-5
    )


def test_a_component_that_never_varies_gets_weight_zero_in_ols():
    V, Y, W, b = additive_data(seed=3)
    V[:, 5] = True  # never ablated: its effect is not identifiable
    Y = V @ W.T + b
    attr = fit((V, Y), method="ols", progress=False)
    assert abs(float(attr.weights[:, 5].abs().max())) < 1e-6
    others = np.delete(np.arange(12), 5)
    np.testing.assert_allclose(attr.weights.numpy()[:, others], W[:, others], atol=1e-6)


# ----------------------------------------------------------------- agreement with sklearn


def test_ols_matches_sklearn_linear_regression():
    V, Y, _, _ = additive_data(n=300, N=25, E=5, noise=1.0, seed=4)
    attr = fit((V, Y), method="ols", progress=False)
    ref = LinearRegression().fit(V.astype(np.float64), Y)
    np.testing.assert_allclose(attr.weights.numpy(), ref.coef_, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(attr.bias.numpy(), ref.intercept_, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("l2", [1e-3, 0.05, 2.0])
def test_ridge_with_one_l2_matches_sklearn_ridge_with_alpha_l2_times_n(l2):
    V, Y, _, _ = additive_data(n=300, N=25, E=5, noise=1.0, seed=5)
    attr = fit((V, Y), method="ridge", l2_grid=[l2], progress=False)
    ref = Ridge(alpha=l2 * len(V)).fit(V.astype(np.float64), Y)
    np.testing.assert_allclose(attr.weights.numpy(), ref.coef_, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(attr.bias.numpy(), ref.intercept_, rtol=1e-6, atol=1e-6)
    assert attr.meta["n_val"] == 0 and attr.meta["n_rows"] == 300  # one l2: all rows, no split


def test_lasso_with_one_l1_matches_sklearn_lasso_with_alpha_l1():
    V, Y, _, _ = additive_data(n=500, N=20, E=3, noise=0.5, seed=6, sparse=True)
    attr = fit((V, Y), method="lasso", l1_grid=[0.01], tol=1e-10, max_iter=50000, progress=False)
    ref = Lasso(alpha=0.01, tol=1e-12, max_iter=100000).fit(V.astype(np.float64), Y)
    np.testing.assert_allclose(attr.weights.numpy(), ref.coef_, atol=1e-5)
    np.testing.assert_allclose(attr.bias.numpy(), ref.intercept_, atol=1e-5)


# ----------------------------------------------------------------- choice of the penalty


def test_chosen_l2_and_refit_equal_a_brute_force_search():
    V, Y, _, _ = additive_data(n=500, N=30, E=6, noise=2.0, seed=7)
    grid = [1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]
    est = RidgePath(grid, val_fraction=0.25, seed=11, progress=False).fit((V, Y))
    is_val = split(len(V), seed=11, val_fraction=0.25)
    assert est.attributions_.meta["n_val"] == is_val.sum()
    assert est.attributions_.meta["n_train"] == (~is_val).sum()
    mse = []
    for l2 in grid:
        w, b = np_ridge(V[~is_val], Y[~is_val], l2)
        resid = Y[is_val] - V[is_val] @ w.T - b
        mse.append((resid**2).mean(0))
    mse = np.array(mse)  # (K, E)
    np.testing.assert_allclose(est.val_mse_.numpy(), mse, rtol=1e-8)
    best = np.array(grid)[mse.argmin(0)]
    assert len(set(best.tolist())) > 1  # the examples do not all pick the same l2
    np.testing.assert_array_equal(est.l2_.numpy(), best)
    for e, l2 in enumerate(best):
        w, b = np_ridge(V, Y[:, [e]], l2)
        np.testing.assert_allclose(est.weights_[e].numpy(), w[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(float(est.bias_[e]), b[0], rtol=1e-6, atol=1e-6)


def test_split_depends_only_on_seed_and_row_index():
    rows = torch.arange(1000)
    whole = validation_rows(rows, seed=4, val_fraction=0.1)
    pieces = torch.cat(
        [validation_rows(rows[a : a + 7], seed=4, val_fraction=0.1) for a in range(0, 1000, 7)]
    )
    assert torch.equal(whole, pieces)
    grown = validation_rows(torch.arange(5000), seed=4, val_fraction=0.1)
    assert torch.equal(grown[:1000], whole)
    assert 0.07 < float(whole.float().mean()) < 0.13
    assert not torch.equal(whole, validation_rows(rows, seed=5, val_fraction=0.1))


# ----------------------------------------------------------------- streaming, dtype, solvers


def test_streamed_store_equals_in_memory_tuple():
    V, Y, _, _ = additive_data(n=500, N=20, E=4, noise=1.0, seed=8)
    store = FakeStore(V, Y, block=37)
    streamed = fit(store, method="ridge", progress=False)
    in_memory = fit((V, store.Y), method="ridge", progress=False)
    assert streamed.meta["l2"] == in_memory.meta["l2"]
    torch.testing.assert_close(streamed.weights, in_memory.weights, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(streamed.bias, in_memory.bias, rtol=1e-6, atol=1e-6)
    assert streamed.names == store.names
    assert streamed.meta["source"] == store.meta


def test_float32_matches_float64_within_tolerance():
    V, Y, _, _ = additive_data(n=600, N=20, E=4, noise=0.5, seed=9)
    a64 = fit((V, Y), method="ridge", l2_grid=[0.01], progress=False)
    a32 = fit((V, Y), method="ridge", l2_grid=[0.01], dtype=torch.float32, progress=False)
    torch.testing.assert_close(a32.weights, a64.weights, rtol=1e-4, atol=1e-4)
    # The bias sums the weights' errors over all components: a looser bound.
    torch.testing.assert_close(a32.bias, a64.bias, rtol=1e-3, atol=1e-3)


def test_cg_solver_matches_eig_solver_over_the_whole_path():
    V, Y, _, _ = additive_data(n=500, N=25, E=5, noise=1.0, seed=10)
    store = FakeStore(V, Y, block=64)
    eig = RidgePath(solver="eig", progress=False).fit(store)
    cg = RidgePath(solver="cg", tol=1e-12, progress=False).fit(store)
    assert cg.solver_ == "cg" and eig.solver_ == "eig"
    torch.testing.assert_close(cg.val_mse_, eig.val_mse_, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(cg.l2_, eig.l2_)
    torch.testing.assert_close(cg.weights_, eig.weights_, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cg.bias_, eig.bias_, rtol=1e-6, atol=1e-6)


def test_cg_in_small_example_chunks_matches_eig():
    V, Y, _, _ = additive_data(n=300, N=10, E=7, noise=1.0, seed=12)
    eig = fit((V, Y), method="ridge", l2_grid=[0.02], solver="eig", progress=False)
    # A budget that holds two examples at a time (besides the kept rows) forces four chunks.
    kept = 300 * 2 + 300 * 7 * 8 + 4 * 7 * 10 + 16 * 7  # packed masks, outputs, the result
    budget = 2 * (BLOCK_BYTES + 2 * column_bytes(10, 1, 8, 300) + kept)
    cg = fit((V, Y), method="ridge", l2_grid=[0.02], solver="cg", max_memory=budget, progress=False)
    assert cg.meta["cg_example_chunk"] == 2
    torch.testing.assert_close(cg.weights, eig.weights, rtol=1e-6, atol=1e-6)


def test_auto_solver_picks_cg_when_eig_does_not_fit_the_budget():
    V, Y, _, _ = additive_data(n=200, N=10, E=2, noise=1.0, seed=13)
    attr = fit((V, Y), method="ridge", l2_grid=[0.1], max_memory=290 * 2**20, progress=False)
    assert attr.meta["solver"] == "cg"
    roomy = fit((V, Y), method="ridge", l2_grid=[0.1], max_memory=2**30, progress=False)
    assert roomy.meta["solver"] == "eig"


def test_float_01_masks_give_the_same_fit_as_bool_masks():
    V, Y, _, _ = additive_data(seed=14, noise=1.0)
    a = fit((V, Y), method="ridge", l2_grid=[0.01], progress=False)
    b = fit((V.astype(np.float32), Y), l2_grid=[0.01], progress=False)
    torch.testing.assert_close(a.weights, b.weights)


def test_lasso_chooses_the_l1_with_the_lowest_validation_error_and_refits_on_all_rows():
    V, Y, _, _ = additive_data(n=400, N=15, E=3, noise=0.5, seed=15, sparse=True)
    grid = [0.3, 0.1, 0.03, 0.01, 0.001]
    kw = dict(val_fraction=0.25, seed=2, tol=1e-10, max_iter=50000, progress=False)
    est = LassoPath(grid, **kw).fit((V, Y))
    is_val = split(len(V), seed=2, val_fraction=0.25)
    X = V.astype(np.float64)
    mse = []
    for l1 in grid:  # by hand: sklearn's Lasso on the training rows, scored on the others
        ref = Lasso(alpha=l1, tol=1e-12, max_iter=100000).fit(X[~is_val], Y[~is_val])
        mse.append(((Y[is_val] - ref.predict(X[is_val])) ** 2).mean(0))
    mse = np.array(mse)  # (K, E)
    np.testing.assert_allclose(est.val_mse_.numpy(), mse, rtol=1e-5)
    best = np.array(grid)[mse.argmin(0)]
    np.testing.assert_array_equal(est.l1_.numpy(), best)
    for e, l1 in enumerate(best):
        ref = Lasso(alpha=l1, tol=1e-12, max_iter=100000).fit(X, Y[:, e])
        np.testing.assert_allclose(est.weights_[e].numpy(), ref.coef_, atol=1e-5)


def test_least_squares_estimator_is_fit_method_ols():
    V, Y, _, _ = additive_data(n=200, noise=1.0, seed=19)
    est = LeastSquares(progress=False).fit((V, Y))
    attr = fit((V, Y), method="ols", progress=False)
    assert torch.equal(est.weights_, attr.weights) and torch.equal(est.bias_, attr.bias)
    assert est.attributions_.meta == attr.meta and est.solver_ == attr.meta["solver"]


@pytest.mark.parametrize("method", ["ridge", "ols", "lasso", "group"])
def test_progress_shows_a_bar_for_every_method_only_when_asked(method, capsys):
    V, Y, _, _ = additive_data(n=100, N=5, E=2, noise=1.0, seed=20)
    fit((V, Y), method=method, progress=True)
    assert "fit: statistics" in capsys.readouterr().err
    fit((V, Y), method=method, progress=False)
    assert "fit: statistics" not in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_gpu_equals_fit_on_cpu():
    V, Y, _, _ = additive_data(n=500, N=20, E=4, noise=1.0, seed=16)
    cpu = fit((V, Y), method="ridge", progress=False)
    gpu = fit((V, Y), method="ridge", device="cuda", progress=False)
    assert gpu.meta["l2"] == cpu.meta["l2"]
    torch.testing.assert_close(gpu.weights.cpu(), cpu.weights, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- errors


def test_no_finished_rows_is_an_error():
    V, Y, _, _ = additive_data()
    with pytest.raises(FitError, match="no finished rows"):
        fit(FakeStore(V[:0], Y[:0]), method="ridge", progress=False)


def test_ols_with_fewer_rows_than_components_says_how_many_are_needed():
    V, Y, _, _ = additive_data(n=10, N=12)
    with pytest.raises(
        FitError, match="needs at least 13 finished rows to determine every weight, got 10"
    ):
        fit((V, Y), method="ols", progress=False)


def test_ridge_path_without_validation_rows_says_what_is_needed():
    V, Y, _, _ = additive_data(n=4)
    with pytest.raises(FitError, match=r"needs at least 2 training rows and 1 validation row"):
        fit((V, Y), method="ridge", progress=False)


def test_nan_output_is_an_error_naming_row_and_example():
    V, Y, _, _ = additive_data(n=100)
    Y[57, 2] = np.nan
    with pytest.raises(FitError, match=r"outputs\[row 57, example 2\] is nan"):
        fit(FakeStore(V, Y, block=10), method="ridge", progress=False)


def test_mismatched_rows_are_an_error():
    V, Y, _, _ = additive_data(n=50)
    with pytest.raises(FitError, match="masks has 50 rows but outputs has 49"):
        fit((V, Y[:49]), method="ridge", progress=False)


def test_masks_that_are_not_01_are_an_error():
    V, Y, _, _ = additive_data(n=50)
    with pytest.raises(FitError, match="bool or 0/1"):
        fit((V * 0.5, Y), method="ridge", progress=False)


def test_a_store_block_of_the_wrong_width_is_an_error():
    V, Y, _, _ = additive_data(n=50)
    store = FakeStore(V, Y)
    store.n_components = 11
    store.names = store.names[:11]
    with pytest.raises(FitError, match=r"expected \(rows, 11\)"):
        fit(store, method="ridge", progress=False)


def test_eig_solver_that_does_not_fit_in_memory_says_the_bytes_and_the_fix():
    V, Y, _, _ = additive_data(n=50)
    with pytest.raises(FitError, match=r"needs about \d+ bytes .* solver='cg'"):
        fit((V, Y), method="ridge", solver="eig", max_memory=10**6, progress=False)


def test_a_penalty_grid_for_the_wrong_method_is_an_error():
    V, Y, _, _ = additive_data(n=50)
    with pytest.raises(FitError, match="takes l2_grid, not l1_grid"):
        fit((V, Y), method="ridge", l1_grid=[0.1], progress=False)
    with pytest.raises(FitError, match="method must be one of"):
        fit((V, Y), method="elastic", progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_memory": -5}, "max_memory must be a finite number of bytes > 0, got -5"),
        ({"max_memory": "8G"}, "max_memory must be a number of bytes, got '8G'"),
        ({"val_fraction": "0.1"}, r"val_fraction must be a number in \[0, 1\), got '0.1'"),
        ({"l2_grid": ["small"]}, "l2_grid must be a non-empty 1-D sequence of finite values"),
        ({"max_iter": 0, "solver": "cg"}, "max_iter must be an int >= 1, got 0"),
        ({"tol": -1.0}, "tol must be a number > 0, got -1.0"),
        ({"progress": "yes"}, "progress must be True, False or None"),
        ({"device": "gpu7"}, "device must be a torch.device or a name"),
        ({"method": "lasso", "l2_grid": [0.1]}, "method='lasso' takes no l2_grid; pass l1_grid"),
        ({"method": "group", "solver": "cg"}, "solver= is for 'ridge' and 'ols'"),
    ],
)
def test_a_bad_setting_is_a_fit_error_that_says_what_was_expected(kwargs, match):
    V, Y, _, _ = additive_data(n=50)
    with pytest.raises(FitError, match=match) as err:
        fit((V, Y), **{"method": "ridge", **kwargs})
    assert isinstance(err.value, ValueError)  # callers catching ValueError keep working


def test_a_path_is_refused_with_the_fix():
    with pytest.raises(FitError, match="ComponentDataset"):
        fit("runs/demo", method="ridge", progress=False)


def test_cg_handles_a_component_that_never_varies():
    V, Y, W, b = additive_data(n=300, N=10, E=3, noise=0.5, seed=17)
    V[:, 4] = True
    eig = fit((V, Y), method="ridge", l2_grid=[0.01], solver="eig", progress=False)
    cg = fit((V, Y), method="ridge", l2_grid=[0.01], solver="cg", progress=False)
    assert float(cg.weights[:, 4].abs().max()) < 1e-10
    torch.testing.assert_close(cg.weights, eig.weights, rtol=1e-6, atol=1e-6)


def test_a_fitted_result_saves_and_loads_with_its_meta(tmp_path):
    V, Y, _, _ = additive_data(n=300, noise=1.0, seed=18)
    attr = fit(FakeStore(V, Y), method="ridge", progress=False)
    back = type(attr).load(attr.save(tmp_path / "attr"))
    assert torch.equal(back.weights, attr.weights)
    assert back.meta == attr.meta
    assert back.meta["method"] == "ridge" and len(back.meta["l2"]) == 3
