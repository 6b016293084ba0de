"""Tests for coarpy.baselines: leave-one-out and gradient (attribution patching)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from coarpy.ablation import ablate
from coarpy.attributions import Attributions
from coarpy.baselines import expected_gradient, gradient, leave_one_out
from coarpy.components import Components
from coarpy.errors import ComponentError, EvaluationError
from coarpy.evaluate import evaluate

# Integer weights and inputs: every output below is an exact float32 integer.
W1 = [[1, 0, 2], [-1, 3, 0], [2, 2, -1], [0, -2, 1], [3, -1, 0], [1, 1, 1]]
B1 = [1, -2, 0, 3, -1, 2]
R = [2, -1, 1, 3, -2, 1]
C = 4
X = torch.tensor([[1, 2, 0], [0, -1, 3], [2, 2, 2], [-1, 0, 1], [3, 1, -2]], dtype=torch.float32)


def additive_net() -> nn.Sequential:
    """x -> Linear(3, 6) -> Linear(6, 1). The 6 hidden units are the components.

    Ablating unit j replaces it by its bias, so the output is exactly additive in the
    keep-mask v: f(v) = C + sum_j R_j (B1_j + v_j W1_j . x).
    """
    net = nn.Sequential(nn.Linear(3, 6), nn.Linear(6, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(W1, dtype=torch.float32))
        net[0].bias.copy_(torch.tensor(B1, dtype=torch.float32))
        net[1].weight.copy_(torch.tensor([R], dtype=torch.float32))
        net[1].bias.fill_(C)
    return net.eval()


def true_weights() -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (E, 6), bias (E,)) of the additive model, computed by hand."""
    w1, r = torch.tensor(W1, dtype=torch.float32), torch.tensor(R, dtype=torch.float32)
    weights = (X @ w1.T) * r  # (E, 6): R_j * (W1_j . x)
    bias = torch.full((len(X),), float(C + sum(b * c for b, c in zip(B1, R, strict=True))))
    return weights, bias


def readout(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The model's single output unit, one number per example."""
    return model(batch)[:, 0]


@pytest.fixture
def additive():
    net = additive_net()
    return net, Components.from_spec(net, {"0": "linear"})


def test_leave_one_out_recovers_the_weights_of_an_additive_model_exactly(additive):
    net, comps = additive
    loo = leave_one_out(net, comps, X, output=readout, progress=False)
    weights, bias = true_weights()
    assert torch.equal(loo.weights, weights)
    assert torch.equal(loo.bias, bias)


def test_gradient_recovers_the_weights_of_an_additive_model_exactly(additive):
    net, comps = additive
    grad = gradient(net, comps, X, output=readout, batch_size=2)
    weights, bias = true_weights()
    assert torch.equal(grad.weights, weights)
    assert torch.equal(grad.bias, bias)


def test_baselines_of_an_additive_model_predict_held_out_ablations_perfectly(additive):
    net, comps = additive
    named = {
        "loo": leave_one_out(net, comps, X, output=readout, progress=False),
        "grad": gradient(net, comps, X, output=readout),
    }
    res = evaluate(named, net, comps, X, output=readout, alphas=(0.3,), n_masks=30)
    torch.testing.assert_close(res.pearson, torch.ones_like(res.pearson), rtol=0, atol=1e-6)
    torch.testing.assert_close(res.spearman, torch.ones_like(res.spearman), rtol=0, atol=1e-6)


def test_leave_one_out_is_the_output_lost_by_each_single_ablation(mlp):
    comps = Components.discover(mlp, kinds=("linear", "neurons"), exclude=["2.2", "4"])
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(1))
    out = readout
    loo = leave_one_out(mlp, comps, x, output=out, progress=False)
    with torch.no_grad():
        full = out(mlp, x)
        for j in range(len(comps)):
            keep = torch.ones(len(comps), dtype=torch.bool)
            keep[j] = False
            with ablate(mlp, comps, keep):
                torch.testing.assert_close(loo.weights[:, j], full - out(mlp, x))
    torch.testing.assert_close(loo.bias, full - loo.weights.sum(1))


def test_leave_one_out_with_several_masks_per_pass_equals_one_mask_per_pass(mlp):
    comps = Components.discover(mlp, kinds=("linear",), exclude="4")
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    one = leave_one_out(mlp, comps, x, output=readout, progress=False)
    packed = leave_one_out(mlp, comps, x, output=readout, batch_size=40, progress=False)
    torch.testing.assert_close(packed.weights, one.weights, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed.bias, one.bias, rtol=0, atol=1e-5)


def test_leave_one_out_ablates_multihead_attention_heads(attention_net):
    comps = Components.from_spec(attention_net, {"attn": "heads"})
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(3))
    loo = leave_one_out(attention_net, comps, x, output=readout, progress=False)
    with torch.no_grad():
        full = readout(attention_net, x)
        for j in range(len(comps)):
            keep = torch.ones(len(comps), dtype=torch.bool)
            keep[j] = False
            with ablate(attention_net, comps, keep):
                torch.testing.assert_close(loo.weights[:, j], full - readout(attention_net, x))


def test_gradient_per_example_in_one_batch_equals_one_example_at_a_time(cnn, digits_batch):
    x, y = digits_batch
    data = (x[:12], y[:12])
    comps = Components.discover(cnn, kinds=("conv", "linear"), exclude="classifier.3")
    batched = gradient(cnn, comps, data)
    single = gradient(cnn, comps, data, batch_size=1)
    torch.testing.assert_close(batched.weights, single.weights, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched.bias, single.bias, rtol=1e-4, atol=1e-4)


def test_gradient_matches_a_finite_difference_of_the_soft_mask(mlp):
    mlp = mlp.double()
    comps = Components.discover(mlp, kinds=("linear",), exclude="4")
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def out64(model, batch):  # float64 throughout; check_values casts to float32 at the end
        return model(batch)[:, 0]

    grad = gradient(mlp, comps, x, output=out64)
    eps = 1e-3
    for j in (0, 5, 20):
        keep = torch.ones(len(comps), dtype=torch.float64)
        keep[j] -= eps
        with torch.no_grad(), ablate(mlp, comps, keep):
            lower = out64(mlp, x)
        with torch.no_grad():
            full = out64(mlp, x)
        torch.testing.assert_close(
            grad.weights[:, j], ((full - lower) / eps).float(), rtol=1e-3, atol=1e-3
        )


def test_gradient_leaves_parameter_gradients_and_the_model_untouched(
    mlp, snapshot, assert_unchanged
):
    comps = Components.discover(mlp, kinds=("linear",), exclude="4")
    saved = snapshot(mlp)
    gradient(mlp, comps, torch.randn(3, 6), output=readout)
    assert all(p.grad is None for p in mlp.parameters())
    assert_unchanged(mlp, saved)


def test_baselines_restore_training_mode_and_warn(mlp):
    comps = Components.discover(mlp, kinds=("linear",), exclude="4")
    mlp.train()
    with pytest.warns(UserWarning, match="training mode"):
        leave_one_out(mlp, comps, torch.randn(3, 6), output=readout, progress=False)
    with pytest.warns(UserWarning, match="training mode"):
        gradient(mlp, comps, torch.randn(3, 6), output=readout)
    assert mlp.training


def test_gradient_refuses_multihead_attention_heads(attention_net):
    comps = Components.from_spec(attention_net, {"attn": "heads"})
    with pytest.raises(ComponentError, match="'attn'.*Use leave_one_out"):
        gradient(attention_net, comps, torch.randn(2, 5, 16), output=readout)


def test_baselines_return_attributions_named_for_their_method(additive):
    net, comps = additive
    loo = leave_one_out(net, comps, X, output=readout, progress=False)
    grad = gradient(net, comps, X, output=readout)
    for attr, method in ((loo, "leave_one_out"), (grad, "gradient")):
        assert isinstance(attr, Attributions)
        assert attr.meta["method"] == method
        assert attr.names == comps.names
        assert attr.meta["output"].endswith("readout")


def test_baselines_record_what_their_weights_depend_on(additive):
    net, comps = additive
    loo = leave_one_out(net, comps, X, output=readout, progress=False)
    for key in ("fingerprint", "structure", "output", "output_code", "mode", "autocast"):
        assert key in loo.meta, key
    assert loo.meta["output"].endswith("readout") and loo.meta["output_code"]
    with pytest.raises(EvaluationError, match=r"fitted on a model with other weights"):
        evaluate(loo, additive_net().train(False).requires_grad_(False).apply(_bump), comps, X,
                 output=readout, n_masks=5)  # fmt: skip


def _bump(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        with torch.no_grad():
            module.bias.add_(1.0)


# -- a bi-encoder: modules see 2n sequences for n examples (issue #16) ---------------------


class PairScorer(nn.Module):
    """Scores a pair of 4-d "sentences" per example with one shared encoder.

    Each example is (2, 4): both halves go through ``encoder`` as 2n rows of one batch,
    and the logits are (-s, s) for the similarity s of the two encodings, so the
    encoder's modules see twice as many rows as there are examples.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        n = pairs.shape[0]
        z = self.encoder(pairs.reshape(2 * n, 4)).view(n, 2, 5)  # (2n, 5) -> (n, 2, 5)
        s = (z[:, 0] * z[:, 1]).sum(-1)  # (n,)
        return torch.stack([-s, s], 1)


@pytest.fixture
def pairs():
    net = PairScorer().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, 4, generator=gen)
    y = torch.randint(0, 2, (6,), generator=gen)
    return net, Components.from_spec(net, {"encoder.0": "linear"}), (x, y)


def _one_at_a_time(net, comps, data, keep):
    """(n_masks, E) margins under each mask, one shared mask per plain forward pass."""
    x, y = data
    rows = []
    with torch.no_grad():
        for k in keep:
            with ablate(net, comps, k):
                logits = net(x)
            rows.append(logits.gather(1, y[:, None])[:, 0] - logits.gather(1, 1 - y[:, None])[:, 0])
    return torch.stack(rows)


def test_a_bi_encoder_collects_and_evaluates_with_packed_masks(pairs, tmp_path, caplog):
    from coarpy.collect import collect
    from coarpy.masks import sample_masks

    net, comps, data = pairs
    with caplog.at_level("INFO", logger="coarpy._engine"):
        ds = collect(net, comps, data, path=tmp_path / "run", n_masks=8, alpha=0.3,
                     batch_size=64, block_size=4, progress=False)  # fmt: skip
    # detected once (in the first block), said once; later blocks go straight to shared masks
    assert sum("per-row masks do not apply" in r.getMessage() for r in caplog.records) == 1
    keep = sample_masks(0, 8, len(comps), alpha=0.3, seed=0)
    torch.testing.assert_close(ds.outputs(), _one_at_a_time(net, comps, data, keep))
    attr = Attributions(weights=torch.zeros(6, 6), bias=torch.zeros(6), names=comps.names)
    res = evaluate(attr, net, comps, data, n_masks=5, batch_size=64, check=False)
    assert res.n_masks == 5


def test_a_bi_encoder_gets_the_same_baselines_as_one_example_at_a_time(pairs, caplog):
    net, comps, data = pairs
    x, y = data
    with caplog.at_level("INFO", logger="coarpy.baselines"):
        grad = gradient(net, comps, data, progress=False)
    assert any("gradient runs one example at a time" in r.getMessage() for r in caplog.records)
    for i in range(len(x)):
        alone = gradient(net, comps, (x[i : i + 1], y[i : i + 1]), progress=False)
        torch.testing.assert_close(grad.weights[i], alone.weights[0])
        torch.testing.assert_close(grad.bias[i], alone.bias[0])
    loo = leave_one_out(net, comps, data, batch_size=64, progress=False)
    keep = torch.ones(len(comps) + 1, len(comps), dtype=torch.bool)
    keep[1:].fill_diagonal_(False)
    values = _one_at_a_time(net, comps, data, keep)
    torch.testing.assert_close(loo.weights, (values[0] - values[1:]).T)


# -- the expected gradient: the gradient averaged over ablation states ---------------------


def test_expected_gradient_recovers_the_weights_of_an_additive_model_exactly(additive):
    net, comps = additive
    eg = expected_gradient(net, comps, X, output=readout, n_states=8, alpha=0.3, seed=2)
    weights, bias = true_weights()
    assert torch.equal(eg.weights, weights)  # the same gradient at every state
    assert torch.equal(eg.bias, bias)


def test_expected_gradient_at_alpha_zero_is_the_gradient(mlp):
    comps = Components.discover(mlp, kinds=("linear",), exclude="4")
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    first = lambda model, batch: model(batch)[:, 0]  # noqa: E731
    eg = expected_gradient(mlp, comps, x, output=first, n_states=3, alpha=0.0)
    grad = gradient(mlp, comps, x, output=first)
    torch.testing.assert_close(eg.weights, grad.weights, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eg.bias, grad.bias, rtol=1e-6, atol=1e-5)


class Product(nn.Module):
    """f = h0 * h1 of two hidden units h = (2x, 3x): one pure pairwise interaction."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.tensor([[2.0], [3.0]]))

    def forward(self, x):
        h = self.hidden(x)
        return h[:, :1] * h[:, 1:]


def test_expected_gradient_averages_the_gradient_over_the_states_drawn_like_masks():
    from coarpy.baselines import _STATES_STREAM
    from coarpy.masks import sample_masks

    net = Product().eval()
    comps = Components.from_spec(net, {"hidden": "linear"})
    x = torch.tensor([[1.0], [2.0]])  # h0 h1 = 6 x**2: 6 and 24
    eg = expected_gradient(net, comps, x, output=readout, n_states=40, alpha=0.5, seed=5)
    states = sample_masks(0, 40, 2, alpha=0.5, seed=5, stream=_STATES_STREAM).double()
    hh = torch.tensor([6.0, 24.0], dtype=torch.float64)
    # f(v) = v0 v1 h0 h1, so df/dv0 = v1 h0 h1 and df/dv1 = v0 h0 h1 at every state
    mean = states.mean(0)
    want = hh[:, None] * mean.flip(0)[None, :]  # (E, 2)
    torch.testing.assert_close(eg.weights.double(), want, rtol=1e-6, atol=1e-6)
    mean_f = hh * (states[:, 0] * states[:, 1]).mean()
    torch.testing.assert_close(eg.bias.double(), mean_f - want @ mean, rtol=1e-6, atol=1e-5)
    assert 0 < mean[0] < 1 and 0 < mean[1] < 1  # the states are not all full or all ablated
    assert eg.meta["method"] == "expected_gradient"
    assert eg.meta["states"] == {"n_states": 40, "alpha": 0.5, "sampler": "bernoulli", "seed": 5}


def test_a_bi_encoder_gets_the_same_expected_gradient_as_one_example_at_a_time(pairs):
    net, comps, (x, y) = pairs
    eg = expected_gradient(net, comps, (x, y), n_states=3, alpha=0.2, progress=False)
    for i in (0, 5):
        alone = expected_gradient(net, comps, (x[i : i + 1], y[i : i + 1]), n_states=3, alpha=0.2)
        torch.testing.assert_close(eg.weights[i], alone.weights[0])
        torch.testing.assert_close(eg.bias[i], alone.bias[0])
