"""Weight slices: which rows or columns of which parameters hold each component.

Zeroing a component's slices is the paper's ablation. One table serves three users:

- ``ablation.apply_ablation`` zeroes the slices for good, in a copy of the model;
- ``ablation.Ablator`` zeroes them in place and restores them bit for bit, for the
  units no hook can reach (``nn.MultiheadAttention`` heads and projection rows,
  recurrent units) and, with ``edit_weights``, for plain layers where that equals the
  hook;
- ``components.Components`` refuses two groups whose slices lie in one parameter: their
  in-place edits would save and restore each other's zeros, and a row and a column of
  one weight are one ablation too many to attribute.

A slice is ``(parameter, axis, index)``: zeroing ``parameter.index_fill_(axis, index,
0)`` removes the units.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

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
    """Every gate's row of each unit, in weight_ih, weight_hh and both biases.

    Units are grouped by layer and direction where they are (the CPU, for sampled
    masks); only the final indices move to the weights' device.
    """
    hidden = module.hidden_size
    layer_direction = units.div(hidden, rounding_mode="floor")
    slices = []
    for ld in layer_direction.unique().tolist():
        rows = units[layer_direction == ld] % hidden
        for param in _recurrent_parameters(module, ld):
            gates = param.shape[0] // hidden  # LSTM 4 (i, f, g, o), GRU 3, RNN 1
            index = (torch.arange(gates, device=rows.device)[:, None] * hidden + rows).reshape(-1)
            slices.append((param, 0, index.to(param.device, non_blocking=True)))
    return slices


def _segments(model: nn.Module, group) -> list[tuple[Tensor, int, int]]:
    """``(weight, axis, units)`` of each weight that holds some of the group's units.

    Units are numbered through the weights in this order: the first ``units`` belong
    to the first weight, the next ones to the second, and so on. Only the rows of an
    ``nn.MultiheadAttention``'s projections span several weights.
    """
    module = model.get_submodule(group.hook)
    if group.site == "param" and isinstance(module, nn.MultiheadAttention):
        if group.kind == "heads":  # heads are out_proj's input columns
            return [(module.out_proj.weight, 1, group.n_units)]
        return [(w, 0, w.shape[0]) for w in families.multihead_projection_rows(module)]
    if families.is_hook_point(module):  # TransformerLens hook_z / hook_post: W_O / W_out rows
        return [(families.hook_point_weight(model, group.hook), 0, group.n_units)]
    return [(module.weight, weight_axis(module, group.site), group.n_units)]


def slicer(model: nn.Module, group) -> Callable[[Tensor], list[Slice]]:
    """A function from unit numbers of ``group`` (a components.Group) to its weight slices.

    The modules and weights are looked up once, here, so an ablator can call the
    result for every mask. ``units`` are unit numbers within the group (int64). Output
    units keep their bias (the paper's convention: a zeroed filter becomes its bias);
    recurrent units lose their biases too, which is what makes their hidden state
    exactly zero.
    """
    module = model.get_submodule(group.hook)
    size = group.unit_size
    if group.site == "param" and isinstance(module, families.RECURRENT):
        return lambda units: _recurrent_slices(module, units)
    segments = _segments(model, group)
    if len(segments) == 1:
        weight, axis, _ = segments[0]

        def units_to_slices(units: Tensor) -> list[Slice]:
            index = feature_index(units, size).to(weight.device, non_blocking=True)
            return [(weight, axis, index)]

        return units_to_slices

    def units_to_split_slices(units: Tensor) -> list[Slice]:
        found, start = [], 0
        for weight, axis, count in segments:
            inside = units[(units >= start) & (units < start + count)] - start
            if inside.numel():
                index = feature_index(inside, size).to(weight.device, non_blocking=True)
                found.append((weight, axis, index))
            start += count
        return found

    return units_to_split_slices


def slices(model: nn.Module, group, units: Tensor) -> list[Slice]:
    """The weight slices whose zeroing ablates ``units`` of ``group`` (see :func:`slicer`)."""
    return slicer(model, group)(units)


def parameters(model: nn.Module, group) -> list[Tensor]:
    """Every parameter some unit of ``group`` has a slice in (read from shapes only)."""
    module = model.get_submodule(group.hook)
    if isinstance(module, families.RECURRENT):  # every layer and direction has units
        return list(module.parameters(recurse=False))
    return [weight for weight, _, _ in _segments(model, group)]
