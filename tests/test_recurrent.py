"""Recurrent hidden units as components (kind "neurons"): nn.LSTM, nn.GRU, nn.RNN, cells.

A unit is ablated by zeroing its row in every gate of weight_ih, weight_hh and both
biases. The tests check that this equals zeroing those rows by hand (written without
coarpy's index arithmetic), that the unit's hidden state is then exactly zero, and that
the weights come back bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from coarpy import Components, ablate, apply_ablation, collect, outputs
from coarpy.ablation import Ablator
from coarpy.errors import ComponentError, MaskError

IN, HID = 5, 6


class Tagger(nn.Module):
    """A recurrent layer over (batch, seq, IN) and a linear readout of its last step."""

    def __init__(self, rnn: nn.Module, width: int):
        super().__init__()
        self.rnn, self.readout = rnn, nn.Linear(width, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.readout(out[:, -1])


def _lstm(**kw):
    torch.manual_seed(0)
    return nn.LSTM(IN, HID, num_layers=2, bidirectional=True, batch_first=True, **kw)


def _gru():
    torch.manual_seed(0)
    return nn.GRU(IN, HID, num_layers=2, bidirectional=True, batch_first=True)


def _rnn():
    torch.manual_seed(0)
    return nn.RNN(IN, HID, num_layers=2, batch_first=True)


LAYERS = {"lstm": (_lstm, 4, 2), "gru": (_gru, 3, 2), "rnn": (_rnn, 1, 1)}  # gates, directions


def _x(n=4, seq=7):
    return torch.randn(n, seq, IN, generator=torch.Generator().manual_seed(1))


def _zero_unit_by_hand(rnn: nn.Module, layer: int, direction: int, unit: int, gates: int):
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            param = getattr(rnn, name + suffix)
            for gate in range(gates):
                param[gate * HID + unit] = 0


@pytest.mark.parametrize("arch", LAYERS)
def test_units_are_one_group_per_layer_module_in_layer_direction_order(arch):
    build, _, directions = LAYERS[arch]
    comps = Components.discover(Tagger(build(), directions * HID), kinds="neurons")
    (g,) = comps.groups
    assert (g.module, g.kind, g.n_units, g.site) == (
        "rnn",
        "neurons",
        2 * directions * HID,
        "param",
    )
    assert comps.names[HID] == "rnn:6"  # layer 0 reverse, unit 0 (or layer 1 for one direction)
    assert [comps.index(n) for n in comps.names] == list(range(len(comps)))


@pytest.mark.parametrize("arch", LAYERS)
def test_ablation_equals_zeroing_the_gate_rows_by_hand(arch):
    build, gates, directions = LAYERS[arch]
    rnn = build()
    comps = Components.from_spec(rnn, {"": "neurons"})
    ablated = [(0, 0, 1), (0, directions - 1, 4), (1, 0, 2), (1, directions - 1, 5)]
    keep = torch.ones(len(comps), dtype=torch.bool)
    for layer, direction, unit in ablated:
        keep[(layer * directions + direction) * HID + unit] = False
    x = _x()
    with torch.no_grad():
        with ablate(rnn, comps, keep):
            out, h = rnn(x)
        edited = build()
        for layer, direction, unit in ablated:
            _zero_unit_by_hand(edited, layer, direction, unit, gates)
        out_ref, h_ref = edited(x)
        persistent = apply_ablation(rnn, comps, keep)(x)
    assert torch.equal(out, out_ref)
    for got, want in zip(h if isinstance(h, tuple) else (h,), h_ref if isinstance(h_ref, tuple)
                         else (h_ref,), strict=True):  # fmt: skip
        assert torch.equal(got, want)
    assert torch.equal(persistent[0], out_ref)


@pytest.mark.parametrize("arch", LAYERS)
def test_an_ablated_unit_has_an_exactly_zero_hidden_state(arch):
    build, _, directions = LAYERS[arch]
    rnn = build()
    comps = Components.from_spec(rnn, {"": "neurons"})
    keep = torch.rand(len(comps), generator=torch.Generator().manual_seed(2)) >= 0.3
    with torch.no_grad(), ablate(rnn, comps, keep):
        out, h = rnn(_x())
    h_n = h[0] if isinstance(h, tuple) else h  # (layers * directions, batch, HID)
    ablated = (~keep).view(2 * directions, HID)
    assert (h_n.permute(1, 0, 2)[:, ablated] == 0).all()
    assert (h_n.permute(1, 0, 2)[:, ~ablated] != 0).all()
    last = ablated[-directions:].reshape(-1)  # the top layer's units are the output features
    assert (out[..., last] == 0).all()
    if isinstance(h, tuple):  # LSTM: the cell state too
        assert (h[1].permute(1, 0, 2)[:, ablated] == 0).all()


def test_cells_are_ablated_like_one_layer():
    torch.manual_seed(0)
    cell = nn.LSTMCell(IN, HID)
    comps = Components.from_spec(cell, {"": "neurons"})
    keep = torch.ones(HID, dtype=torch.bool)
    keep[[0, 3]] = False
    x = _x(seq=1)[:, 0]
    with torch.no_grad(), ablate(cell, comps, keep):
        h, c = cell(x)
    assert (h[:, [0, 3]] == 0).all() and (c[:, [0, 3]] == 0).all()
    assert (h[:, [1, 2, 4, 5]] != 0).all()


def test_weights_are_restored_bit_for_bit_also_after_an_error(snapshot, assert_unchanged):
    rnn = _lstm()
    comps = Components.from_spec(rnn, {"": "neurons"})
    saved = snapshot(rnn)
    keep = torch.zeros(len(comps), dtype=torch.bool)
    with pytest.raises(RuntimeError, match="inside"), ablate(rnn, comps, keep):
        assert rnn.weight_hh_l1.abs().sum() == 0
        raise RuntimeError("inside")
    assert_unchanged(rnn, saved)
    ablator = Ablator(rnn, comps)
    with ablator:
        for seed in range(3):  # mask after mask: each set restores the previous one first
            ablator.set(torch.rand(len(comps), generator=torch.Generator().manual_seed(seed)) > 0.5)
        ablator.set(None)
        assert_unchanged(rnn, saved)
    assert_unchanged(rnn, saved)


def test_per_row_and_soft_masks_are_refused_with_the_fix():
    rnn = _gru()
    comps = Components.from_spec(rnn, {"": "neurons"})
    assert not Ablator(rnn, comps).supports_rows
    rows = torch.ones(4, len(comps), dtype=torch.bool)
    match = r"recurrent layer \(GRU\).*one mask must share"
    with pytest.raises(MaskError, match=match), ablate(rnn, comps, rows):
        pass
    with pytest.raises(ComponentError, match=r"mode='mean' is not supported.*recurrent layer"):
        Ablator(rnn, comps, mode="mean", means={"": torch.zeros(len(comps))})


def test_collect_on_a_recurrent_model_equals_ablate_mask_by_mask(tmp_path):
    model = Tagger(_lstm(), 2 * HID).eval()
    comps = Components.discover(model, kinds=("neurons", "linear"))
    x, y = _x(n=6), torch.tensor([0, 1, 2, 0, 1, 2])
    ds = collect(model, comps, (x, y), path=tmp_path / "r", n_masks=5, alpha=0.3, progress=False)
    masks, values = ds.masks(), ds.outputs()
    for i in range(5):
        with torch.no_grad(), ablate(model, comps, masks[i]):
            torch.testing.assert_close(values[i], outputs.margin(model, (x, y)), rtol=0, atol=0)


def test_an_lstm_with_projections_is_reported_not_skipped():
    torch.manual_seed(0)
    model = Tagger(nn.LSTM(IN, HID, proj_size=2, batch_first=True), 2)
    with pytest.warns(UserWarning, match=r"'rnn' \(LSTM\): its hidden state is projected"):
        comps = Components.discover(model, kinds=("neurons", "linear"))
    assert [g.module for g in comps.groups] == ["readout"]
    with pytest.raises(ComponentError, match=r"'rnn' \(LSTM\) cannot be ablated as 'neurons'"):
        Components.from_spec(model, {"rnn": "neurons"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_cudnn_layers_are_ablated_exactly_and_restored(arch):
    # cuDNN runs from one flat weight buffer: in-place edits of the parameters (views
    # into it) must reach the kernel, and the buffer must come back bit for bit.
    build, gates, directions = LAYERS[arch]
    rnn = build().cuda()
    rnn.flatten_parameters()
    before = {k: v.clone() for k, v in rnn.state_dict().items()}
    comps = Components.from_spec(rnn, {"": "neurons"})
    keep = torch.ones(len(comps), dtype=torch.bool)
    keep[[1, HID + 4, 2 * directions * HID - 1]] = False
    x = _x().cuda()
    with torch.no_grad():
        with ablate(rnn, comps, keep):
            out, _ = rnn(x)
        edited = apply_ablation(rnn, comps, keep)
        edited.flatten_parameters()
        out_ref, _ = edited(x)
    assert torch.equal(out, out_ref)
    assert all(torch.equal(v, rnn.state_dict()[k]) for k, v in before.items())
