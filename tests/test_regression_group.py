"""Tests of coarpy.regression.group (``fit(method="group")``): exact limits of the prior-centred
ridge, agreement with a numpy closed form and a brute-force GCV, per-group penalties,
and the gain in masks on a real digits CNN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coarpy import outputs
from coarpy._engine import ExampleSet, run_masks
from coarpy.ablation import Ablator
from coarpy.attributions import Attributions
from coarpy.baselines import gradient
from coarpy.components import Components
from coarpy.errors import FitError
from coarpy.evaluate import pearson
from coarpy.masks import sample_masks
from coarpy.regression import DEFAULT_L2_RELATIVE, DEFAULT_PRIOR_SCALES, PriorRidge, fit


class FakeStore:
    """The ComponentDataset interface fit relies on, with module groups in its meta."""

    def __init__(self, V, Y, groups, *, block=23):
        self.V = torch.as_tensor(V).bool()
        self.Y = torch.as_tensor(Y).float()
        self.block = block
        self.n_components = self.V.shape[1]
        self.n_examples = self.Y.shape[1]
        self.meta = {"components": [list(g) for g in groups], "alpha": 0.2}
        self.names = [f"{m}:{u}" for m, _, n in groups for u in range(n)]

    def __len__(self):
        return self.V.shape[0]

    def iter_blocks(self):
        for r0 in range(0, len(self), self.block):
            yield r0, self.V[r0 : r0 + self.block], self.Y[r0 : r0 + self.block]


def additive_data(n=300, N=10, E=3, *, keep=0.8, noise=0.3, seed=0):
    g = np.random.default_rng(seed)
    V = g.random((n, N)) < keep  # (n, N) True keeps
    W = g.normal(size=(E, N))
    b = g.normal(size=E)
    Y = V @ W.T + b + noise * g.normal(size=(n, E))
    return V, Y, W, b


def np_prior_ridge(V, Y, W0, *, l2, c, r):
    """min (1/n)|y - b - Vw|^2 + l2 sum_j r_j (w_j - c_e w0_j)^2 per example, in numpy."""
    n = V.shape[0]
    Vc = V - V.mean(0)
    Yc = Y - Y.mean(0)
    A = Vc.T @ Vc + n * l2 * np.diag(r)
    W = np.empty((Y.shape[1], V.shape[1]))
    for e in range(Y.shape[1]):
        w0 = c[e] * W0[e]
        W[e] = w0 + np.linalg.solve(A, Vc.T @ (Yc[:, e] - Vc @ w0))
    b = Y.mean(0) - W @ V.mean(0)
    return W, b


def np_gcv(V, y, w0, *, l2, c):
    """GCV of the ridge of y - c V w0 on V (with intercept), and its weights."""
    n, N = V.shape
    Vc = V - V.mean(0)
    z = (y - c * V @ w0) - (y - c * V @ w0).mean()
    A = Vc.T @ Vc + n * l2 * np.eye(N)
    u = np.linalg.solve(A, Vc.T @ z)
    hat_trace = np.trace(np.linalg.solve(A, Vc.T @ Vc)) + 1.0
    rss = np.sum((z - Vc @ u) ** 2)
    return n * rss / (n - hat_trace) ** 2, c * w0 + u


def test_huge_penalty_returns_the_prior():
    V, Y, W, _ = additive_data()
    W0 = torch.tensor(np.random.default_rng(1).normal(size=W.shape))
    est = PriorRidge(W0, l2_grid=[1e12], prior_scales=[1.0], progress=False).fit((V, Y))
    assert torch.allclose(est.weights_.double(), W0, atol=1e-6)
    expected_bias = Y.mean(0) - W0.numpy() @ V.mean(0)
    np.testing.assert_allclose(est.bias_.numpy(), expected_bias, rtol=1e-5, atol=1e-5)


def test_vanishing_penalty_equals_least_squares_whatever_the_prior():
    V, Y, W, _ = additive_data()
    W0 = torch.tensor(np.random.default_rng(1).normal(size=W.shape) * 5)
    est = PriorRidge(W0, l2_grid=[1e-14], prior_scales=[1.0], progress=False).fit((V, Y))
    ols = fit((V, Y), method="ols", progress=False)
    assert torch.allclose(est.weights_, ols.weights, atol=1e-5)
    assert torch.allclose(est.bias_, ols.bias, atol=1e-5)


def test_matches_numpy_closed_form_with_group_penalties_and_scaled_prior():
    V, Y, W, _ = additive_data(n=80, N=12, E=4)
    W0 = np.random.default_rng(2).normal(size=W.shape)
    groups = ["a"] * 5 + ["b"] * 7
    est = PriorRidge(
        torch.tensor(W0), groups=groups, group_penalties={"a": 1.0, "b": 20.0},
        l2_grid=[0.03], prior_scales=[0.5], progress=False,
    ).fit((V, Y))  # fmt: skip
    raw = np.array([1.0] * 5 + [20.0] * 7)
    r = raw / np.exp(np.log(raw).mean())  # geometric mean 1 over components
    W_np, b_np = np_prior_ridge(V.astype(float), Y, W0, l2=0.03, c=np.full(4, 0.5), r=r)
    np.testing.assert_allclose(est.weights_.numpy(), W_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(est.bias_.numpy(), b_np, rtol=1e-5, atol=1e-5)
    assert est.group_penalties_ == pytest.approx({"a": r[0], "b": r[-1]})


def test_equal_group_penalties_equal_plain_ridge():
    V, Y, _, _ = additive_data(n=120, N=9)
    groups = ["x", "y", "z"] * 3
    est = PriorRidge(
        groups=groups, group_penalties={"x": 3.0, "y": 3.0, "z": 3.0}, l2_grid=[0.02],
        progress=False,
    ).fit((V, Y))  # fmt: skip
    ridge = fit((V, Y), method="ridge", l2_grid=[0.02], progress=False)
    assert torch.allclose(est.weights_, ridge.weights, atol=1e-6)
    assert torch.allclose(est.bias_, ridge.bias, atol=1e-6)


def test_gcv_picks_the_penalty_and_prior_scale_a_brute_force_search_picks():
    V, Y, W, _ = additive_data(n=60, N=15, E=3, noise=1.0, seed=4)
    W0 = W + np.random.default_rng(5).normal(size=W.shape)  # a noisy but useful prior
    grid = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    scales = [0.0, 0.5, 1.0]
    est = PriorRidge(torch.tensor(W0), l2_grid=grid, prior_scales=scales, progress=False)
    est.fit((V, Y))
    Vf = V.astype(float)
    for e in range(3):
        scores = {(l2, c): np_gcv(Vf, Y[:, e], W0[e], l2=l2, c=c) for l2 in grid for c in scales}
        (l2, c), (value, w) = min(scores.items(), key=lambda kv: kv[1][0])
        assert float(est.l2_[e]) == pytest.approx(l2)
        assert float(est.prior_scale_[e]) == c
        assert float(est.gcv_[e]) == pytest.approx(value, rel=1e-8)
        np.testing.assert_allclose(est.weights_[e].numpy(), w, rtol=1e-5, atol=1e-5)


def test_group_penalties_are_estimated_per_module_of_a_store():
    g = np.random.default_rng(0)
    n, sizes = 400, (6, 8)
    V = g.random((n, sum(sizes))) < 0.7
    W = np.concatenate([g.normal(0, 3.0, (5, 6)), g.normal(0, 0.05, (5, 8))], axis=1)
    Y = V @ W.T + 0.5 * g.normal(size=(n, 5))
    store = FakeStore(V, Y, [("conv", "conv", 6), ("fc", "neurons", 8)])
    attr = fit(store, method="group", progress=False)
    pen = attr.meta["group_penalties"]
    assert set(pen) == {"conv", "fc"}
    assert pen["fc"] > 100 * pen["conv"]  # small effects get the larger penalty
    assert attr.names[0] == "conv:0" and attr.meta["method"] == "group"
    # streamed from the store = in memory with the same groups
    labels = ["conv"] * 6 + ["fc"] * 8
    in_memory = fit((V, store.Y), method="group", groups=labels, progress=False)
    assert torch.allclose(attr.weights, in_memory.weights, atol=1e-5)


def test_fit_group_is_prior_ridge_and_records_its_choices():
    V, Y, W, _ = additive_data()
    prior = Attributions(torch.tensor(W), torch.zeros(3), [str(i) for i in range(10)])
    attr = fit((V, Y), method="group", prior=prior, progress=False)
    est = PriorRidge(prior, progress=False).fit((V, Y))
    assert torch.equal(attr.weights, est.weights_)
    assert attr.meta["prior_scales"] == list(DEFAULT_PRIOR_SCALES)
    assert len(attr.meta["l2_grid"]) == len(DEFAULT_L2_RELATIVE)
    assert set(attr.meta["prior_scale"]) <= set(DEFAULT_PRIOR_SCALES)


def test_components_never_ablated_fall_back_to_the_prior():
    V, Y, W, _ = additive_data(n=100, N=8)
    V[:, 3] = True  # component 3 never varies: the masks say nothing about it
    W0 = torch.tensor(W)
    est = PriorRidge(W0, prior_scales=[1.0], progress=False).fit((V, Y))
    assert torch.allclose(est.weights_[:, 3].double(), W0[:, 3], atol=1e-6)
    plain = PriorRidge(progress=False).fit((V, Y))
    assert float(plain.weights_[:, 3].abs().max()) < 1e-9


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prior": torch.zeros(2, 10)}, r"prior must have shape .* \(3, 10\), got \(2, 10\)"),
        ({"prior": np.zeros((3, 10))}, "prior must be an Attributions or a tensor"),
        ({"groups": ["a"] * 9}, r"one label per component \(10\), got 9 labels"),
    ],
)
def test_bad_inputs_raise_with_the_fix(kwargs, match):
    V, Y, _, _ = additive_data()
    with pytest.raises(FitError, match=match):
        fit((V, Y), method="group", progress=False, **kwargs)


def test_prior_and_groups_belong_to_method_group():
    V, Y, W, _ = additive_data()
    with pytest.raises(FitError, match="prior= and groups= are for method='group'"):
        fit((V, Y), method="ridge", prior=torch.tensor(W), progress=False)
    with pytest.raises(FitError, match="group_penalties has no value for the groups"):
        PriorRidge(groups=["a", "b"] * 5, group_penalties={"a": 1.0}).fit((V, Y))


def test_prior_from_other_components_is_refused():
    V, Y, W, _ = additive_data()
    store = FakeStore(V, Y, [("fc", "neurons", 10)])
    other = Attributions(torch.tensor(W), torch.zeros(3), [f"conv:{i}" for i in range(10)])
    with pytest.raises(FitError, match="The prior's components differ from the store's"):
        fit(store, method="group", prior=other, progress=False)


@pytest.fixture(scope="module")
def digits_masks(trained_cnn, digits):
    """The digits CNN (56 components) on 64 test digits: 80 training masks, 300 held-out."""
    _, _, x, y = digits
    data = (x[:64], y[:64])
    comps = Components.discover(trained_cnn, kinds=("conv", "neurons"))
    examples = ExampleSet(data, torch.device("cpu"), 4096)
    V = sample_masks(0, 80, len(comps), alpha=0.1, seed=0)
    V_held = sample_masks(0, 300, len(comps), alpha=0.1, seed=0, stream=1)
    with Ablator(trained_cnn, comps) as ablator, torch.inference_mode():
        Y = run_masks(trained_cnn, ablator, examples, V, outputs.margin)
        Y_held = run_masks(trained_cnn, ablator, examples, V_held, outputs.margin)
    grad = gradient(trained_cnn, comps, data)
    labels = [g.module for g in comps.groups for _ in range(g.n_units)]
    return V, Y, V_held, Y_held, grad, labels


def test_group_ridge_beats_least_squares_with_few_masks_on_a_digits_cnn(digits_masks):
    # 80 masks for 56 components: just enough for least squares to be defined. Measured
    # over 10 disjoint draws of 80 masks: group - ols = +0.018 .. +0.053 mean Pearson,
    # group with the gradient prior - ols = +0.035 .. +0.083.
    V, Y, V_held, Y_held, grad, labels = digits_masks

    def score(attr):
        return float(pearson(attr.predict(V_held).double(), Y_held.double()).nanmean())

    ols = score(fit((V, Y), method="ols", progress=False))
    group = score(fit((V, Y), method="group", groups=labels, progress=False))
    with_prior = score(fit((V, Y), method="group", groups=labels, prior=grad, progress=False))
    assert group > ols + 0.01
    assert with_prior > ols + 0.02


@pytest.mark.parametrize(("n", "N"), [(50, 90), (200, 30)])
def test_dual_equals_primal_with_a_prior_and_estimated_group_penalties(n, N):
    V, Y, W, _ = additive_data(n=n, N=N, E=4, noise=0.5, seed=6)
    W0 = torch.tensor(W + np.random.default_rng(7).normal(size=W.shape))
    groups = ["a"] * (N // 3) + ["b"] * (N - N // 3)
    kw = dict(groups=groups, progress=False)
    eig = PriorRidge(W0, solver="eig", **kw).fit((V, Y))
    dual = PriorRidge(W0, solver="dual", **kw).fit((V, Y))
    assert (eig.attributions_.meta["solver"], dual.attributions_.meta["solver"]) == ("eig", "dual")
    # The dual's pilots run in float32 (their weights are only pooled into penalties), so
    # the penalties, and everything downstream of them, agree to float32's rounding.
    assert dual.group_penalties_ == pytest.approx(eig.group_penalties_, rel=1e-5)
    torch.testing.assert_close(dual.l2_, eig.l2_)
    torch.testing.assert_close(dual.prior_scale_, eig.prior_scale_)
    torch.testing.assert_close(dual.gcv_, eig.gcv_, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(dual.weights_, eig.weights_, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dual.bias_, eig.bias_, rtol=1e-6, atol=1e-6)


def test_dual_group_matches_the_numpy_closed_form():
    V, Y, W, _ = additive_data(n=40, N=70, E=3)
    W0 = np.random.default_rng(2).normal(size=W.shape)
    groups = ["a"] * 30 + ["b"] * 40
    est = PriorRidge(
        torch.tensor(W0), groups=groups, group_penalties={"a": 1.0, "b": 5.0},
        l2_grid=[0.03], prior_scales=[0.5], solver="dual", progress=False,
    ).fit((V, Y))  # fmt: skip
    raw = np.array([1.0] * 30 + [5.0] * 40)
    r = raw / np.exp(np.log(raw).mean())
    W_np, b_np = np_prior_ridge(V.astype(float), Y, W0, l2=0.03, c=np.full(3, 0.5), r=r)
    np.testing.assert_allclose(est.weights_.numpy(), W_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(est.bias_.numpy(), b_np, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------- the default, and prior="gradient"


def test_the_default_method_is_group_without_a_prior():
    V, Y, _, _ = additive_data(n=120, N=10, E=3, seed=21)
    default = fit((V, Y), progress=False)
    group = fit((V, Y), method="group", progress=False)
    assert default.meta["method"] == "group" and default.meta["prior"] == "none"
    assert torch.equal(default.weights, group.weights) and torch.equal(default.bias, group.bias)


@pytest.fixture(scope="module")
def digits_store(trained_cnn, digits, tmp_path_factory):
    """A store of 60 masks of the digits CNN (56 components) on 32 test digits."""
    from coarpy.collect import collect

    _, _, x, y = digits
    data = (x[:32], y[:32])
    comps = Components.discover(trained_cnn, kinds=("conv", "neurons"))
    path = tmp_path_factory.mktemp("grad") / "store"
    ds = collect(trained_cnn, comps, data, path=path, n_masks=60, alpha=0.1, progress=False)
    return ds, comps, data


def test_prior_gradient_is_exactly_the_gradient_passed_by_hand(trained_cnn, digits_store):
    ds, comps, data = digits_store
    by_name = fit(ds, prior="gradient", model=trained_cnn, components=comps, data=data,
                  progress=False)  # fmt: skip
    by_hand = fit(ds, prior=gradient(trained_cnn, comps, data), progress=False)
    assert torch.equal(by_name.weights, by_hand.weights)
    assert torch.equal(by_name.bias, by_hand.bias)
    assert by_name.meta["prior"] == "gradient" and by_hand.meta["prior"] == "given"
    assert by_hand.meta["prior_method"] == "gradient"


def test_prior_gradient_needs_the_model_components_and_data(digits_store):
    ds, comps, _ = digits_store
    with pytest.raises(FitError, match="needs model=, components= and data=.*missing model, data"):
        fit(ds, prior="gradient", components=comps, progress=False)
    with pytest.raises(FitError, match="are for prior='gradient'"):
        fit(ds, components=comps, progress=False)
    with pytest.raises(FitError, match="prior must be 'gradient'"):
        fit(ds, prior="gradients", progress=False)


def test_prior_gradient_on_other_components_examples_or_weights_is_refused(
    trained_cnn, digits_store
):
    import copy

    ds, comps, (x, y) = digits_store
    kw = dict(prior="gradient", progress=False)
    fewer = Components.discover(trained_cnn, kinds=("conv",))
    with pytest.raises(FitError, match=r"components given \(24\) are not the store's \(56"):
        fit(ds, model=trained_cnn, components=fewer, data=(x, y), **kw)
    with pytest.raises(FitError, match="data has 31 examples but the store 32"):
        fit(ds, model=trained_cnn, components=comps, data=(x[1:], y[1:]), **kw)
    with pytest.raises(FitError, match="the examples differ"):
        fit(ds, model=trained_cnn, components=comps, data=(x.flip(0), y.flip(0)), **kw)
    other = copy.deepcopy(trained_cnn)
    with torch.no_grad():
        other.classifier[3].bias.add_(1.0)
    with pytest.raises(FitError, match="the model's weights differ.*Pass the model, data"):
        fit(ds, model=other, components=Components.discover(other, kinds=("conv", "neurons")),
            data=(x, y), **kw)  # fmt: skip


def test_pilots_pool_the_evenly_spaced_examples_they_are_given():
    V, Y, _, _ = additive_data(n=60, N=40, E=9, noise=0.5, seed=3)
    groups = ["a"] * 15 + ["b"] * 25
    sub = PriorRidge(groups=groups, pilot_examples=3, progress=False).fit((V, Y))
    # 3 evenly spaced of 9 examples: 0, 4 and 8; the penalties are those of their pilots.
    alone = PriorRidge(groups=groups, pilot_examples=None, progress=False).fit((V, Y[:, [0, 4, 8]]))
    assert sub.group_penalties_ == pytest.approx(alone.group_penalties_, rel=1e-9)
    assert sub.weights_.shape == (9, 40)  # the final fit uses every example


def test_pilot_examples_must_be_a_positive_int_or_none():
    V, Y, _, _ = additive_data(n=30, N=10, E=2)
    with pytest.raises(FitError, match="pilot_examples must be an int >= 1 or None"):
        PriorRidge(pilot_examples=0, progress=False).fit((V, Y))


def test_prior_expected_gradient_is_the_expected_gradient_at_the_stores_alpha(
    trained_cnn, digits_store
):
    from coarpy.baselines import expected_gradient

    ds, comps, data = digits_store
    by_name = fit(ds, prior="expected_gradient", model=trained_cnn, components=comps,
                  data=data, progress=False)  # fmt: skip
    eg = expected_gradient(trained_cnn, comps, data, n_states=16, alpha=0.1, seed=0)
    by_hand = fit(ds, prior=eg, progress=False)
    assert torch.equal(by_name.weights, by_hand.weights)
    assert by_name.meta["prior"] == "expected_gradient"
    assert by_hand.meta["prior_method"] == "expected_gradient"


def test_prior_expected_gradient_on_in_memory_masks_centres_on_the_true_weights():
    net = torch.nn.Sequential(torch.nn.Linear(3, 5, bias=False), torch.nn.Linear(5, 1)).eval()
    comps = Components.from_spec(net, {"0": "linear"})
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        true = (net[0](x) * net[1].weight).double()  # (E, 5): additive in the hidden units
    V = torch.from_numpy(np.random.default_rng(1).random((12, 5)) > 0.2)  # (n, N)
    Y = V.double() @ true.T + float(net[1].bias.detach())  # (n, E) exact outputs
    attr = fit((V, Y), prior="expected_gradient", model=net, components=comps, data=x,
               output=lambda m, b: m(b)[:, 0], progress=False)  # fmt: skip
    assert attr.meta["prior"] == "expected_gradient"
    torch.testing.assert_close(attr.weights.double(), true, rtol=1e-4, atol=1e-4)
