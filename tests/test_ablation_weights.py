"""Ablator(edit_weights=True): shared masks written into the weights equal the hooks.

collect uses this path: a shared (N,) bool mask zeroes the ablated units' weight slices
in place (restored exactly afterwards) instead of masking activations in hooks, so the
forward pass runs hook-free. These tests pin that it gives the same numbers, bit for bit,
and leaves the model as it was.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import coarpy as coar
from coarpy.ablation import Ablator
from coarpy.masks import sample_masks


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.attn = _Attention(16, 4)
        self.mlp = _Mlp(16, 32)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


@pytest.fixture
def transformer() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(_Block(), _Block()).eval()


def _outputs(model, comps, keeps, x, *, edit_weights: bool) -> list[Tensor]:
    ablator = Ablator(model, comps, edit_weights=edit_weights)
    found = []
    with ablator, torch.inference_mode():
        for keep in keeps:
            ablator.set(keep)
            found.append(model(x).clone())
    return found


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_cnn_conv_and_linear_units_equal_the_hooks_bit_for_bit(cnn, digits_batch):
    comps = coar.Components.discover(cnn, kinds=("conv", "linear"))
    keeps = sample_masks(0, 8, len(comps), alpha=0.3, seed=1)
    x = digits_batch[0]
    hooks = _outputs(cnn, comps, keeps, x, edit_weights=False)
    weights = _outputs(cnn, comps, keeps, x, edit_weights=True)
    for a, b in zip(hooks, weights, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(hooks[0], hooks[1])  # the masks matter


def test_linear_inputs_equal_the_hooks_bit_for_bit(mlp):
    comps = coar.Components.from_spec(mlp, {"2.2": "inputs", "4": "inputs"})
    keeps = sample_masks(0, 8, len(comps), alpha=0.4, seed=2)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    hooks = _outputs(mlp, comps, keeps, x, edit_weights=False)
    weights = _outputs(mlp, comps, keeps, x, edit_weights=True)
    for a, b in zip(hooks, weights, strict=True):
        assert torch.equal(a, b)


def test_heads_and_neurons_equal_the_hooks_bit_for_bit(transformer):
    comps = coar.Components.discover(transformer, kinds=("heads", "neurons"))
    assert len(comps) == 2 * (4 + 32)
    keeps = sample_masks(0, 8, len(comps), alpha=0.3, seed=3)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    hooks = _outputs(transformer, comps, keeps, x, edit_weights=False)
    weights = _outputs(transformer, comps, keeps, x, edit_weights=True)
    for a, b in zip(hooks, weights, strict=True):
        assert torch.equal(a, b)


def test_shared_masks_run_without_hooks_and_per_row_masks_with_them(cnn, digits_batch):
    comps = coar.Components.discover(cnn, kinds=("conv",))
    ablator = Ablator(cnn, comps, edit_weights=True)
    x = digits_batch[0][:4]
    keep_rows = sample_masks(0, 4, len(comps), alpha=0.3, seed=4)
    with ablator, torch.inference_mode():
        ablator.set(keep_rows[0])
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in cnn.modules())
        ablator.set(keep_rows)  # one mask per example: hooks, weights back to the original
        per_row = cnn(x)
    for i in range(4):
        with coar.ablate(cnn, comps, keep_rows[i]), torch.inference_mode():
            alone = cnn(x[i : i + 1])[0]
        torch.testing.assert_close(per_row[i], alone)  # batch 4 vs 1: float tolerance


def test_weights_are_restored_bit_for_bit_after_masks_and_after_an_error(cnn, digits_batch):
    comps = coar.Components.discover(cnn, kinds=("conv", "linear"))
    before = _state(cnn)
    ablator = Ablator(cnn, comps, edit_weights=True)
    keeps = sample_masks(0, 3, len(comps), alpha=0.5, seed=5)
    with pytest.raises(RuntimeError, match="boom"), ablator, torch.inference_mode():
        for keep in keeps:
            ablator.set(keep)
            cnn(digits_batch[0])
        assert not torch.equal(cnn.features[0].weight, before["features.0.weight"])
        raise RuntimeError("boom")
    after = _state(cnn)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in cnn.modules())


def test_set_none_restores_the_weights_inside_the_context(cnn):
    comps = coar.Components.discover(cnn, kinds=("conv",))
    before = _state(cnn)
    ablator = Ablator(cnn, comps, edit_weights=True)
    with ablator:
        ablator.set(torch.zeros(len(comps), dtype=torch.bool))
        assert cnn.features[0].weight.abs().sum() == 0
        ablator.set(None)
        assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())


def test_a_tied_weight_is_masked_by_hooks_not_zeroed():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    net[2].weight = net[0].weight  # tied: zeroing it would also change layer 0
    comps = coar.Components.from_spec(net, {"2": "linear"})
    keep = torch.tensor([True, False, True, False])
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    hooks = _outputs(net, comps, [keep], x, edit_weights=False)[0]
    weights = _outputs(net, comps, [keep], x, edit_weights=True)[0]
    assert torch.equal(hooks, weights)
    assert Ablator(net, comps, edit_weights=True)._weighted == {}


def test_mean_mode_keeps_the_hooks(mlp):
    comps = coar.Components.from_spec(mlp, {"0": "linear"})
    means = {"0": torch.arange(16, dtype=torch.float32)}
    ablator = Ablator(mlp, comps, mode="mean", means=means, edit_weights=True)
    assert ablator._weighted == {}
