"""Hook ablation reproduces weight zeroing exactly, leaves the model as it was, and
rejects bad masks with a message that says how to fix them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from coarpy.ablation import Ablator, ablate, apply_ablation, mean_values
from coarpy.components import Components
from coarpy.errors import ComponentError, MaskError


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    """Relative 1e-5 of the tensor's scale (elementwise rtol, atol scaled by max |want|)."""
    scale = max(want.abs().max().item(), 1e-12)
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale)


def random_keep(n: int, alpha: float, seed: int, rows: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (n,) if rows is None else (rows, n)
    return torch.rand(shape, generator=gen) >= alpha


def conv_comps(model: nn.Module) -> Components:
    return Components.discover(model, kinds=("conv",))


# -- hooks equal weight zeroing ---------------------------------------------------


def zero_cnn_channels_by_hand(model: nn.Module, keep: torch.Tensor) -> nn.Module:
    """Independent of coarpy: channels 0-7 are conv 1's filters, 8-23 conv 2's."""
    edited = copy.deepcopy(model)
    convs = (edited.features[0], edited.features[4])
    ablated = (~keep).nonzero().flatten().tolist()
    with torch.no_grad():
        for i in ablated:
            conv, channel = (convs[0], i) if i < 8 else (convs[1], i - 8)
            conv.weight[channel] = 0  # the filter; its bias stays
    return edited


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cnn_hook_ablation_equals_zeroed_filters(cnn, digits_batch, seed):
    x, _ = digits_batch
    comps = conv_comps(cnn)
    keep = random_keep(len(comps), 0.3, seed)
    assert (~keep).any()
    with torch.no_grad():
        by_hand = zero_cnn_channels_by_hand(cnn, keep)(x)
        by_coarpy = apply_ablation(cnn, comps, keep)(x)
        with ablate(cnn, comps, keep):
            hooked = cnn(x)
        plain = cnn(x)
    assert_close(hooked, by_hand)
    assert_close(by_coarpy, by_hand)
    assert not torch.allclose(hooked, plain, atol=1e-3)  # the masks matter


def test_an_ablated_conv_channel_before_batchnorm_becomes_bn_of_the_bias(cnn, digits_batch):
    x, _ = digits_batch
    comps = conv_comps(cnn)
    keep = torch.ones(len(comps), dtype=torch.bool)
    keep[[2, 5]] = False
    seen = {}
    handle = cnn.features[1].register_forward_hook(lambda m, a, out: seen.update(bn=out.clone()))
    try:
        with torch.no_grad(), ablate(cnn, comps, keep):
            cnn(x)
    finally:
        handle.remove()
    conv, bn = cnn.features[0], cnn.features[1]
    for c in (2, 5):
        constant = (conv.bias[c] - bn.running_mean[c]) / torch.sqrt(
            bn.running_var[c] + bn.eps
        ) * bn.weight[c] + bn.bias[c]
        assert torch.allclose(seen["bn"][:, c], constant.expand_as(seen["bn"][:, c]), atol=1e-6)
        assert constant.abs() > 1e-3  # not zero: the paper's semantics
    assert seen["bn"][:, 3].std() > 1e-2  # kept channels still vary


@pytest.mark.parametrize("seed", [0, 1])
def test_mlp_linear_neurons_inputs_equal_zeroed_weights(mlp, seed):
    comps = Components.from_spec(mlp, {"0": "linear", "2": "neurons", "4": "inputs"})
    assert len(comps) == 16 + 32 + 16
    keep = random_keep(len(comps), 0.3, seed)
    edited = copy.deepcopy(mlp)
    with torch.no_grad():
        edited[0].weight[~keep[:16]] = 0  # rows: output units, bias kept
        edited[2][2].weight[:, ~keep[16:48]] = 0  # columns: hidden neurons
        edited[4].weight[:, ~keep[48:]] = 0  # columns: input features
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = edited(x)
        with ablate(mlp, comps, keep):
            hooked = mlp(x)
        copied = apply_ablation(mlp, comps, keep)(x)
    assert_close(hooked, want)
    assert_close(copied, want)
    assert not torch.allclose(hooked, mlp(x).detach(), atol=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multihead_attention_heads_equal_zeroed_out_proj_columns(
    attention_net, snapshot, assert_unchanged, seed
):
    comps = Components.discover(attention_net, kinds=("heads",))
    keep = torch.ones(4, dtype=torch.bool)
    keep[torch.randperm(4, generator=torch.Generator().manual_seed(seed))[: seed + 1]] = False
    edited = copy.deepcopy(attention_net)
    with torch.no_grad():
        for h in (~keep).nonzero().flatten().tolist():
            edited.attn.out_proj.weight[:, 4 * h : 4 * h + 4] = 0
    x = torch.randn(5, 7, 16, generator=torch.Generator().manual_seed(seed))
    saved = snapshot(attention_net)
    with torch.no_grad():
        want = edited(x)
        with ablate(attention_net, comps, keep):
            hooked = attention_net(x)
        copied = apply_ablation(attention_net, comps, keep)(x)
    assert_close(hooked, want)
    assert_close(copied, want)
    assert_unchanged(attention_net, saved)


def zero_minilm_by_hand(model: nn.Module, keep: torch.Tensor) -> nn.Module:
    """Per layer: 12 heads (columns of attention.output.dense, 32 each), then 1536
    neurons (columns of output.dense). Written without coarpy's index arithmetic."""
    edited = copy.deepcopy(model)
    per_layer = 12 + 1536
    with torch.no_grad():
        for layer_index, layer in enumerate(edited.encoder.layer):
            k = keep[layer_index * per_layer : (layer_index + 1) * per_layer]
            for h in (~k[:12]).nonzero().flatten().tolist():
                layer.attention.output.dense.weight[:, 32 * h : 32 * h + 32] = 0
            layer.output.dense.weight[:, ~k[12:]] = 0
    return edited


@pytest.fixture(scope="module")
def minilm_comps(minilm):
    return Components.discover(minilm, kinds=("heads", "neurons"))


def test_minilm_heads_and_neurons_equal_zeroed_weights(minilm, minilm_batch, minilm_comps):
    keep = random_keep(len(minilm_comps), 0.2, seed=0)
    with torch.no_grad():
        want = zero_minilm_by_hand(minilm, keep)(**minilm_batch).last_hidden_state
        with ablate(minilm, minilm_comps, keep):
            hooked = minilm(**minilm_batch).last_hidden_state
        plain = minilm(**minilm_batch).last_hidden_state
    real = minilm_batch["attention_mask"].bool()
    assert_close(hooked[real], want[real])
    assert (hooked[real] - plain[real]).abs().max() > 0.1


def test_minilm_apply_ablation_matches_hand_zeroing(minilm, minilm_batch, minilm_comps):
    keep = random_keep(len(minilm_comps), 0.1, seed=3)
    copied = apply_ablation(minilm, minilm_comps, keep)
    by_hand = zero_minilm_by_hand(minilm, keep)
    for (name, a), (_, b) in zip(
        copied.state_dict().items(), by_hand.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


# -- per-row masks ----------------------------------------------------------------


def test_cnn_per_row_masks_equal_each_row_alone(cnn, digits_batch):
    x, _ = digits_batch
    x = x[:16]
    comps = Components.discover(cnn, kinds=("conv", "linear"))
    keep = random_keep(len(comps), 0.2, seed=5, rows=len(x))
    with torch.no_grad():
        with ablate(cnn, comps, keep):
            together = cnn(x)
        alone = []
        for i in range(len(x)):
            with ablate(cnn, comps, keep[i]):
                alone.append(cnn(x[i : i + 1]))
    assert_close(together, torch.cat(alone))


def test_minilm_per_row_masks_equal_each_row_alone(minilm, minilm_batch, minilm_comps):
    n = minilm_batch["input_ids"].shape[0]
    keep = random_keep(len(minilm_comps), 0.2, seed=7, rows=n)
    with torch.no_grad():
        with ablate(minilm, minilm_comps, keep):
            together = minilm(**minilm_batch).last_hidden_state
        for i in range(n):
            row = {k: v[i : i + 1] for k, v in minilm_batch.items()}
            with ablate(minilm, minilm_comps, keep[i]):
                alone = minilm(**row).last_hidden_state[0]
            real = row["attention_mask"][0].bool()
            assert_close(together[i][real], alone[real])


def test_per_row_masks_on_multihead_attention_are_refused(
    attention_net, snapshot, assert_unchanged
):
    comps = Components.discover(attention_net, kinds=("heads",))
    saved = snapshot(attention_net)
    keep = torch.ones(5, 4, dtype=torch.bool)
    with (
        pytest.raises(MaskError, match=r"MultiheadAttention.*shape \(4,\), not \(5, 4\)"),
        ablate(attention_net, comps, keep),
    ):
        attention_net(torch.randn(5, 3, 16))
    with (
        pytest.raises(MaskError, match=r"MultiheadAttention.*torch.float32"),
        ablate(attention_net, comps, torch.ones(4)),
    ):
        pass
    assert_unchanged(attention_net, saved)


# -- the model is left as it was --------------------------------------------------


def test_cnn_unchanged_after_the_context(cnn, digits_batch, snapshot, assert_unchanged):
    x, _ = digits_batch
    comps = Components.discover(cnn, kinds=("conv", "linear"))
    saved = snapshot(cnn)
    with torch.no_grad():
        before = cnn(x)
        with ablate(cnn, comps, random_keep(len(comps), 0.5, seed=0)):
            cnn(x)
        with ablate(cnn, comps, random_keep(len(comps), 0.5, seed=0, rows=len(x))):
            cnn(x)
    assert_unchanged(cnn, saved)
    assert torch.equal(cnn(x), before)


def test_model_unchanged_after_an_exception_inside_the_context(
    cnn, attention_net, snapshot, assert_unchanged
):
    for model, kinds in ((cnn, ("conv", "linear")), (attention_net, ("heads", "linear"))):
        comps = Components.discover(model, kinds=kinds)
        saved = snapshot(model)
        keep = torch.zeros(len(comps), dtype=torch.bool)
        with pytest.raises(KeyboardInterrupt), ablate(model, comps, keep):
            raise KeyboardInterrupt
        assert_unchanged(model, saved)


def test_multihead_attention_weights_restored_exactly(attention_net, snapshot, assert_unchanged):
    comps = Components.discover(attention_net, kinds=("heads",))
    saved = snapshot(attention_net)
    x = torch.randn(2, 3, 16)
    with torch.no_grad(), Ablator(attention_net, comps) as ablator:
        for seed in range(4):
            ablator.set(random_keep(4, 0.5, seed))
            attention_net(x)
            assert not torch.equal(
                attention_net.attn.out_proj.weight, saved["attn.out_proj.weight"]
            )
        ablator.set(None)
        assert torch.equal(attention_net.attn.out_proj.weight, saved["attn.out_proj.weight"])
        ablator.set(torch.zeros(4, dtype=torch.bool))
    assert_unchanged(attention_net, saved)


def test_minilm_unchanged_after_the_context(minilm, minilm_batch, minilm_comps, snapshot):
    saved = snapshot(minilm)
    keep = random_keep(len(minilm_comps), 0.5, seed=1)
    with torch.no_grad(), ablate(minilm, minilm_comps, keep):
        minilm(**minilm_batch)
    for name, t in minilm.state_dict().items():
        assert torch.equal(t, saved[name]), name
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in minilm.modules())


def test_ablator_set_none_runs_the_plain_model(cnn, digits_batch):
    x, _ = digits_batch
    comps = conv_comps(cnn)
    with torch.no_grad():
        plain = cnn(x)
        with Ablator(cnn, comps) as ablator:
            ablator.set(torch.zeros(len(comps), dtype=torch.bool))
            ablated = cnn(x)
            ablator.set(None)
            again = cnn(x)
    assert torch.equal(again, plain)
    assert not torch.allclose(ablated, plain)


def test_apply_ablation_leaves_the_original_alone(cnn, snapshot, assert_unchanged):
    comps = conv_comps(cnn)
    saved = snapshot(cnn)
    edited = apply_ablation(cnn, comps, [comps.names[i] for i in (0, 9, 23)])
    assert_unchanged(cnn, saved)
    assert edited.features[0].weight[0].abs().sum() == 0
    assert edited.features[4].weight[1].abs().sum() == 0
    assert edited.features[4].weight[15].abs().sum() == 0
    assert torch.equal(edited.features[4].weight[2], cnn.features[4].weight[2])


# -- bad masks --------------------------------------------------------------------


def test_wrong_mask_length_is_refused(cnn):
    comps = conv_comps(cnn)
    with (
        pytest.raises(MaskError, match=r"shape \(24,\) or \(batch, 24\).*got \(23,\)"),
        ablate(cnn, comps, torch.ones(23, dtype=torch.bool)),
    ):
        pass
    with (
        pytest.raises(MaskError, match=r"got \(2, 3, 24\)"),
        ablate(cnn, comps, torch.ones(2, 3, 24, dtype=torch.bool)),
    ):
        pass


def test_integer_mask_is_refused_with_the_conversion(cnn):
    comps = conv_comps(cnn)
    with (
        pytest.raises(MaskError, match=r"bool tensor.*torch.int64.*keep.bool\(\)"),
        ablate(cnn, comps, torch.ones(24, dtype=torch.long)),
    ):
        pass


def test_mask_on_another_device_is_refused(cnn):
    comps = conv_comps(cnn)
    keep = torch.ones(24, dtype=torch.bool, device="meta")
    with (
        pytest.raises(MaskError, match=r"keep is on meta but the model is on cpu.*keep.to"),
        ablate(cnn, comps, keep),
    ):
        pass


def test_a_list_is_not_a_mask(cnn):
    with (
        pytest.raises(MaskError, match=r"torch.Tensor.*got list"),
        ablate(cnn, conv_comps(cnn), [True] * 24),
    ):
        pass


def test_per_row_mask_with_the_wrong_batch_size_is_refused(cnn, digits_batch):
    x, _ = digits_batch
    comps = conv_comps(cnn)
    keep = torch.ones(3, 24, dtype=torch.bool)
    with (
        pytest.raises(MaskError, match=r"keep has 3 rows but 'features.0' got a batch of 5"),
        torch.no_grad(),
        ablate(cnn, comps, keep),
    ):
        cnn(x[:5])
    assert not any(m._forward_hooks for m in cnn.modules())


def test_apply_ablation_with_a_bool_mask_zeroes_exactly_the_false_components(
    cnn, digits_batch, snapshot, assert_unchanged
):
    # Regression: apply_ablation took indices, so a keep-mask [True, False, ...] was read
    # as the indices 1 and 0 and silently ablated components 0 and 1.
    x, _ = digits_batch
    comps = conv_comps(cnn)  # 8 filters of features.0, then 16 of features.4
    keep = torch.ones(24, dtype=torch.bool)
    keep[[3, 10, 17]] = False
    saved = snapshot(cnn)
    edited = apply_ablation(cnn, comps, keep)
    assert_unchanged(cnn, saved)
    first, second = edited.features[0].weight, edited.features[4].weight
    zeroed = [i for i in range(8) if not first[i].any()] + [
        8 + i for i in range(16) if not second[i].any()
    ]
    assert zeroed == [3, 10, 17]
    for name, value in edited.state_dict().items():  # biases and every other filter kept
        if name not in ("features.0.weight", "features.4.weight"):
            assert torch.equal(value, saved[name]), name
    with torch.no_grad(), ablate(cnn, comps, keep):
        hooked = cnn(x)
    with torch.no_grad():
        assert torch.equal(edited(x), hooked)  # the same as ablate, bit for bit


def test_apply_ablation_names_equal_the_mask_that_ablates_them(mlp):
    comps = Components.discover(mlp, kinds=("linear",))
    keep = random_keep(len(comps), 0.3, seed=4)
    names = [comps.names[i] for i in (~keep).nonzero().flatten().tolist()]
    by_mask, by_name = apply_ablation(mlp, comps, keep), apply_ablation(mlp, comps, names)
    for (name, a), (_, b) in zip(
        by_mask.state_dict().items(), by_name.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert apply_ablation(mlp, comps, []).state_dict().keys() == mlp.state_dict().keys()


def test_apply_ablation_refuses_indices_and_other_masks(cnn, snapshot, assert_unchanged):
    comps = conv_comps(cnn)
    saved = snapshot(cnn)
    with pytest.raises(MaskError, match=r"torch.int64 tensor.*keep\[indices\] = False"):
        apply_ablation(cnn, comps, torch.tensor([0, 1]))
    with pytest.raises(MaskError, match=r"torch.float32 tensor.*soft"):
        apply_ablation(cnn, comps, torch.ones(24))
    with pytest.raises(MaskError, match=r"shape \(24,\).*got \(23,\)"):
        apply_ablation(cnn, comps, torch.ones(23, dtype=torch.bool))
    with pytest.raises(MaskError, match=r"not one per batch row"):
        apply_ablation(cnn, comps, torch.ones(2, 24, dtype=torch.bool))
    with pytest.raises(MaskError, match=r"got a list of int.*names of the components"):
        apply_ablation(cnn, comps, [0, 9])
    with pytest.raises(MaskError, match=r"got str.*e.g. \['features.0:0'\]"):
        apply_ablation(cnn, comps, "features.0:0")
    with pytest.raises(ComponentError, match=r"No component named 'features.0:99'"):
        apply_ablation(cnn, comps, ["features.0:99"])
    with pytest.raises(ComponentError, match=r"'features.0:1' more than once"):
        apply_ablation(cnn, comps, ["features.0:1", "features.0:1"])
    assert_unchanged(cnn, saved)


def test_unknown_mode_and_missing_means_are_refused(cnn):
    comps = conv_comps(cnn)
    keep = torch.ones(24, dtype=torch.bool)
    with (
        pytest.raises(ComponentError, match=r"mode must be one of \('zero', 'mean'\)"),
        ablate(cnn, comps, keep, mode="resample"),
    ):
        pass
    with (
        pytest.raises(ComponentError, match=r"needs means=.*mean_values"),
        ablate(cnn, comps, keep, mode="mean"),
    ):
        pass


# -- soft masks and mean ablation -------------------------------------------------


def test_soft_keep_gradient_equals_finite_differences(cnn, digits_batch):
    x, y = digits_batch
    model = cnn.double()
    x = x[:16].double()
    y = y[:16]
    comps = conv_comps(model)
    keep0 = 0.2 + 0.6 * torch.rand(
        24, generator=torch.Generator().manual_seed(0), dtype=torch.double
    )

    def objective(keep: torch.Tensor) -> torch.Tensor:
        with ablate(model, comps, keep):
            logits = model(x)
        return logits.gather(1, y[:, None]).sum() - logits.logsumexp(1).sum()

    keep = keep0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(keep), keep)
    eps = 1e-6
    with torch.no_grad():
        fd = torch.stack(
            [
                (objective(keep0 + eps * e) - objective(keep0 - eps * e)) / (2 * eps)
                for e in torch.eye(24, dtype=torch.double)
            ]
        )
    assert_close(grad, fd, rtol=1e-6)
    assert (grad.abs() > 1e-3).sum() >= 20  # nearly every channel matters to the loss


def test_soft_keep_of_zeros_and_ones_equals_the_bool_mask(cnn, digits_batch):
    x, _ = digits_batch
    comps = conv_comps(cnn)
    keep = random_keep(24, 0.4, seed=4)
    with torch.no_grad():
        with ablate(cnn, comps, keep):
            hard = cnn(x)
        with ablate(cnn, comps, keep.float()):
            soft = cnn(x)
        with ablate(cnn, comps, keep.float().expand(len(x), 24)):
            soft_rows = cnn(x)
    assert_close(soft, hard)
    assert_close(soft_rows, hard)


def test_mean_mode_replaces_a_linear_unit_by_its_mean():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    data = torch.randn(50, 4)
    comps = Components.from_spec(net, {"0": "linear"})
    means = mean_values(net, comps, data)
    w, b = net[0].weight.double(), net[0].bias.double()
    hidden = data.double() @ w.T + b  # (50, 3)
    torch.testing.assert_close(means["0"], hidden.mean(0).float(), rtol=1e-6, atol=1e-6)

    x = torch.randn(7, 4)
    keep = torch.tensor([True, False, True])
    with torch.no_grad(), ablate(net, comps, keep, mode="mean", means=means):
        got = net(x)
    h = x @ net[0].weight.T + net[0].bias
    h[:, 1] = means["0"][1]
    want = net[2](torch.relu(h)).detach()
    assert_close(got, want)


def test_mean_values_of_a_conv_average_over_batch_and_space(cnn, digits_batch):
    x, _ = digits_batch
    comps = conv_comps(cnn)
    means = mean_values(cnn, comps, (x,))
    with torch.no_grad():
        first = cnn.features[0](x)
        second = cnn.features[4](cnn.features[:4](x))
    assert_close(means["features.0"], first.mean((0, 2, 3)))
    assert_close(means["features.4"], second.mean((0, 2, 3)))


def test_mean_values_run_in_eval_mode_and_restore_the_mode(cnn, digits_batch, snapshot):
    x, _ = digits_batch
    comps = conv_comps(cnn)
    in_eval = mean_values(cnn, comps, (x,))
    cnn.train()
    saved = snapshot(cnn)
    in_train = mean_values(cnn, comps, (x,))
    assert cnn.training and cnn.features[1].training
    for name, t in cnn.state_dict().items():  # BatchNorm running statistics untouched
        assert torch.equal(t, saved[name]), name
    for name, value in in_eval.items():
        assert torch.equal(in_train[name], value)


def test_mean_mode_is_refused_for_multihead_attention(attention_net):
    comps = Components.discover(attention_net, kinds=("heads",))
    with pytest.raises(ComponentError, match=r"cannot observe the heads of 'attn'"):
        mean_values(attention_net, comps, torch.randn(2, 3, 16))
