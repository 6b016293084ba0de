"""Weight slices: which rows or columns of which parameters hold each component.

Zeroing a component's slices is the paper's ablation. One table serves three users:

- ``ablation.apply_ablation`` zeroes the slices for good, in a copy of the model;
- ``ablation.Ablator`` zeroes them in place and restores them bit for bit, for the
  units no hook can reach (``nn.MultiheadAttention`` heads, recurrent units) and, with
  ``edit_weights``, for plain layers where that equals the hook;
- ``components.Components`` refuses two groups whose slices lie in one parameter: their
  in-place edits would save and restore each other's zeros, and a row and a column of
  one weight are one ablation too many to attribute.

A slice is ``(parameter, axis, index)``: zeroing ``parameter.index_fill_(axis, index,
0)`` removes the units.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from . import families

Slice = tuple[Tensor, int, Tensor]


def feature_index(units: Tensor, unit_size: int) -> Tensor:
    """Feature positions of the given units: unit u covers u*size ... u*size+size-1."""
    if unit_size == 1:
        return units
    return (units[:, None] * unit_size + torch.arange(unit_size, device=units.device)).reshape(-1)


def weight_axis(module: nn.Module, site: str) -> int:
    """The axis of ``module.weight`` whose slices are the units at ``site``.

    Rows (axis 0) hold output units and columns (axis 1) input features, in torch's
    (out, in, ...) layout; transformers' Conv1D stores (in, out), so the axes swap.
    """
    axis = 0 if site == "output" else 1
    return 1 - axis if families.is_hf_conv1d(module) else axis


def _recurrent_parameters(module: nn.Module, layer_direction: int) -> Iterator[Tensor]:
    """``weight_ih``, ``weight_hh`` and the biases of one layer and direction."""
    if isinstance(module, nn.RNNCellBase):
        suffix = ""
    else:
        layer, direction = divmod(layer_direction, 2 if module.bidirectional else 1)
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        param = getattr(module, name + suffix, None)
        if isinstance(param, Tensor):
            yield param


def _recurrent_slices(module: nn.Module, units: Tensor) -> list[Slice]:
    """Every gate's row of each unit, in weight_ih, weight_hh and both biases."""
    hidden = module.hidden_size
    slices = []
    for ld in units.div(hidden, rounding_mode="floor").unique().tolist():
        rows = units[units.div(hidden, rounding_mode="floor") == ld] % hidden
        for param in _recurrent_parameters(module, ld):
            gates = param.shape[0] // hidden  # LSTM 4 (i, f, g, o), GRU 3, RNN 1
            index = (torch.arange(gates, device=rows.device)[:, None] * hidden + rows).reshape(-1)
            slices.append((param, 0, index))
    return slices


def slices(model: nn.Module, group, units: Tensor) -> list[Slice]:
    """The weight slices whose zeroing ablates ``units`` of ``group`` (a components.Group).

    ``units`` are unit numbers within the group (int64). Output units keep their bias
    (the paper's convention: a zeroed filter becomes its bias); recurrent units lose
    their biases too, which is what makes their hidden state exactly zero.
    """
    module = model.get_submodule(group.hook)
    if group.site == "param":
        if isinstance(module, nn.MultiheadAttention):  # heads are out_proj's input columns
            weight = module.out_proj.weight
            return [(weight, 1, feature_index(units, group.unit_size).to(weight.device))]
        return _recurrent_slices(module, units.to(next(module.parameters()).device))
    if families.is_hook_point(module):  # TransformerLens hook_z / hook_post: rows of W_O / W_out
        weight = families.hook_point_weight(model, group.hook)
        return [(weight, 0, units.to(weight.device))]
    weight = module.weight
    index = feature_index(units, group.unit_size).to(weight.device)
    return [(weight, weight_axis(module, group.site), index)]


def parameters(model: nn.Module, group) -> list[Tensor]:
    """Every parameter some unit of ``group`` has a slice in (read from shapes only)."""
    module = model.get_submodule(group.hook)
    if isinstance(module, families.RECURRENT):  # every layer and direction has units
        return list(module.parameters(recurse=False))
    return [param for param, _, _ in slices(model, group, torch.zeros(1, dtype=torch.long))]
