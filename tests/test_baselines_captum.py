"""Tests for coarpy.baselines_captum: neuron conductance and internal influence via captum."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from coarpy import Components, outputs
from coarpy.errors import ArgumentError, ComponentError, DataError, MissingExtraError
from coarpy.evaluate import evaluate

captum_attr = pytest.importorskip("captum.attr")

from coarpy.baselines import gradient, leave_one_out  # noqa: E402
from coarpy.baselines_captum import conductance, internal_influence  # noqa: E402

# The additive net of test_baselines: x -> Linear(3, 6) -> Linear(6, 1), integer weights.
W1 = [[1, 0, 2], [-1, 3, 0], [2, 2, -1], [0, -2, 1], [3, -1, 0], [1, 1, 1]]
B1 = [1, -2, 0, 3, -1, 2]
R = [2, -1, 1, 3, -2, 1]
C = 4
X = torch.tensor([[1, 2, 0], [0, -1, 3], [2, 2, 2], [-1, 0, 1], [3, 1, -2]], dtype=torch.float32)


def readout(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch)[:, 0]


@pytest.fixture
def additive():
    net = nn.Sequential(nn.Linear(3, 6), nn.Linear(6, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(W1, dtype=torch.float32))
        net[0].bias.copy_(torch.tensor(B1, dtype=torch.float32))
        net[1].weight.copy_(torch.tensor([R], dtype=torch.float32))
        net[1].bias.fill_(C)
    return net.eval(), Components.from_spec(net, {"0": "linear"})


def test_conductance_of_a_linear_layer_is_its_units_share_of_the_change(additive):
    # Unit j's conductance from the zero input is R_j * (W1_j . x): exactly what
    # ablating it (leaving its bias) removes, so it recovers the additive model's weights
    # (up to captum's quadrature: its Gauss-Legendre path misses the ends by ~0.1%).
    net, comps = additive
    found = conductance(net, comps, X, output=readout, progress=False)
    w1, r = torch.tensor(W1, dtype=torch.float32), torch.tensor(R, dtype=torch.float32)
    torch.testing.assert_close(found.weights, (X @ w1.T) * r, rtol=3e-3, atol=1e-3)
    bias = float(C + sum(b * c for b, c in zip(B1, R, strict=True)))
    torch.testing.assert_close(found.bias, torch.full((len(X),), bias), rtol=3e-3, atol=0.05)
    assert found.names == comps.names and found.meta["method"] == "conductance"


def test_internal_influence_of_a_linear_layer_is_the_readout_weight(additive):
    net, comps = additive
    found = internal_influence(net, comps, X, output=readout, progress=False)
    expected = torch.tensor(R, dtype=torch.float32).expand(len(X), -1)
    torch.testing.assert_close(found.weights, expected, rtol=1e-5, atol=1e-5)
    assert found.meta["method"] == "internal_influence"


class _SmallCnn(nn.Module):
    """Conv (8 channels) + BN + ReLU, an MLP block (neurons) and a readout."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.mlp = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * 6 * 6, 12), nn.ReLU(), nn.Linear(12, 4)
        )

    def forward(self, x):
        return self.mlp(self.features(x))


@pytest.fixture
def small_cnn():
    torch.manual_seed(0)
    net = _SmallCnn().eval()
    with torch.no_grad():
        net.features[1].running_mean.normal_()
        net.features[1].bias.normal_()
    comps = Components.from_spec(net, {"features.0": "conv", "mlp": "neurons"})
    gen = torch.Generator().manual_seed(1)
    data = (torch.randn(5, 1, 8, 8, generator=gen), torch.tensor([0, 1, 2, 3, 1]))
    return net, comps, data


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(conductance, "LayerConductance"), (internal_influence, "InternalInfluence")],
    ids=["conductance", "internal_influence"],
)
def test_each_group_equals_captums_own_result_summed_per_unit(small_cnn, ours, theirs):
    net, comps, (x, y) = small_cnn
    found = ours(net, comps, (x, y), output=outputs.margin, n_steps=20, progress=False)
    assert found.weights.shape == (5, 8 + 12)

    def forward(inputs, labels):
        return outputs.margin(net, (inputs, labels))

    method = getattr(captum_attr, theirs)
    conv = method(forward, net.features[0]).attribute(
        x, additional_forward_args=(y,), n_steps=20
    )  # (5, 8, 6, 6): one value per activation
    torch.testing.assert_close(found.weights[:, :8], conv.sum((2, 3)), rtol=1e-4, atol=1e-5)
    neurons = method(forward, net.mlp[3]).attribute(
        x, additional_forward_args=(y,), n_steps=20, attribute_to_layer_input=True
    )  # (5, 12): the down projection's input
    torch.testing.assert_close(found.weights[:, 8:], neurons, rtol=1e-4, atol=1e-5)


def test_batches_give_the_same_weights_as_one_pass(small_cnn):
    net, comps, data = small_cnn
    whole = conductance(net, comps, data, n_steps=10, progress=False)
    batched = conductance(net, comps, data, n_steps=10, batch_size=2, progress=False)
    torch.testing.assert_close(batched.weights, whole.weights, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched.bias, whole.bias, rtol=1e-4, atol=1e-5)


def test_uint8_pixels_are_interpolated_as_floats(small_cnn):
    net, comps, (x, y) = small_cnn
    pixels = (x.clamp(-2, 2) * 60 + 128).to(torch.uint8)
    seen = []

    def margin_of_pixels(model, batch):
        seen.append(batch[0].dtype)
        return outputs.margin(model, (batch[0].float() / 255, batch[1]))

    found = internal_influence(net, comps, (pixels, y), output=margin_of_pixels, progress=False)
    assert torch.isfinite(found.weights).all() and torch.float32 in seen


def test_heads_sum_their_head_dimension():
    class Attention(nn.Module):  # a head count and an output projection: "heads"
        def __init__(self):
            super().__init__()
            self.num_heads = 2
            self.qkv, self.proj = nn.Linear(4, 12), nn.Linear(4, 4)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, -1)
            return self.proj(torch.softmax(q @ k.transpose(1, 2), -1) @ v)

    torch.manual_seed(0)
    net = nn.Sequential(Attention(), nn.Flatten(), nn.Linear(12, 3)).eval()
    comps = Components.from_spec(net, {"0": "heads"})
    x, y = torch.randn(2, 3, 4), torch.tensor([0, 2])
    found = conductance(net, comps, (x, y), n_steps=10, progress=False)

    def forward(inputs, labels):
        return outputs.margin(net, (inputs, labels))

    per_feature = captum_attr.LayerConductance(forward, net[0].proj).attribute(
        x, additional_forward_args=(y,), n_steps=10, attribute_to_layer_input=True
    )  # (2, 3, 4): head 0 is features 0-1, head 1 features 2-3
    expected = per_feature.sum(1).view(2, 2, 2).sum(-1)
    torch.testing.assert_close(found.weights, expected, rtol=1e-4, atol=1e-5)


def test_the_five_columns_of_figure_1_evaluate_together(small_cnn, tmp_path):
    net, comps, data = small_cnn
    from coarpy.collect import collect
    from coarpy.regression import fit

    ds = collect(net, comps, data, path=tmp_path, n_masks=60, alpha=0.1, seed=0, progress=False)
    methods = {
        "coar": fit(ds, progress=False),
        "leave_one_out": leave_one_out(net, comps, data, progress=False),
        "gradient": gradient(net, comps, data, progress=False),
        "conductance": conductance(net, comps, data, n_steps=10, progress=False),
        "internal_influence": internal_influence(net, comps, data, n_steps=10, progress=False),
    }
    result = evaluate(methods, net, comps, data, alphas=(0.1,), n_masks=20, progress=False)
    assert set(methods) <= set(result.summary().split())  # every method has a row


# -- refusals --------------------------------------------------------------------------------


def test_multihead_attention_units_are_refused_with_the_way_out(attention_net):
    comps = Components.discover(attention_net, kinds="heads")
    x = torch.randn(2, 3, 16)
    with pytest.raises(ComponentError, match=r"'attn' are weight slices.*leave_one_out"):
        conductance(attention_net, comps, (x, torch.tensor([0, 1])), progress=False)


def test_token_batches_are_refused(additive):
    net, comps = additive
    with pytest.raises(DataError, match="dicts of input_ids"):
        conductance(net, comps, [{"input_ids": torch.ones(2, 3)}], output=readout, progress=False)
    with pytest.raises(DataError, match="token ids cannot be interpolated"):
        conductance(net, comps, torch.ones(2, 3, dtype=torch.long), output=readout, progress=False)


def test_bad_settings_are_refused(additive):
    net, comps = additive
    with pytest.raises(ArgumentError, match="n_steps must be an int >= 2"):
        conductance(net, comps, X, output=readout, n_steps=1)
    with pytest.raises(ArgumentError, match="baseline must be a number"):
        internal_influence(net, comps, X, output=readout, baseline=torch.zeros(3))


def test_without_captum_the_extra_is_named(additive, monkeypatch):
    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    net, comps = additive
    with pytest.raises(MissingExtraError, match=r"pip install 'coarpy\[captum\]'"):
        conductance(net, comps, X, output=readout)
