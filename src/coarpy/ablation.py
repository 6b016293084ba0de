"""Ablation: running a model with some components replaced by an ablation value.

``ablate(model, components, keep)`` masks activations with hooks while the model
runs; it reproduces the paper's weight zeroing exactly (a conv channel or linear unit
becomes its bias, a head or neuron becomes zero) without copying or rewriting the
model. ``mode="mean"`` replaces a unit by its mean over a reference set instead.
``apply_ablation(model, components, keep)`` makes the same edit permanent, in the
weights of a copy: it is the one function that zeroes weights for good.

keep: bool tensor of shape (n_components,) shared by the batch, or (batch,
n_components) with one mask per batch row. True keeps the component. A floating
keep in [0, 1] interpolates (out * m + value * (1 - m)) and is differentiable; the
gradient baseline uses it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import _weights, families
from ._batching import batches_on, run_model_input
from ._engine import eval_mode, model_device
from .components import Components, Group
from .errors import ComponentError, MaskError
from .integrations import as_module, check_weights_in_memory

MODES = ("zero", "mean")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _feature_mask(keep_g: Tensor, unit_size: int) -> Tensor:
    return keep_g if unit_size == 1 else keep_g.repeat_interleave(unit_size, dim=-1)


def _ablated_units(keep: Tensor, groups: tuple[Group, ...]) -> list[Tensor]:
    """Per group, the units a shared bool mask ablates (int64, on keep's device).

    One pass over the whole mask, not one per group: on the CPU with numpy (cheap for
    small masks), elsewhere with one nonzero() (one wait for the device, not one each).
    """
    bounds = [g.offset for g in groups] + [groups[-1].stop]
    if keep.device.type == "cpu":
        flat = np.flatnonzero(~keep.numpy())
        cuts = np.searchsorted(flat, bounds).tolist()
        return [
            torch.from_numpy(flat[a:b] - g.offset)
            for g, a, b in zip(groups, cuts[:-1], cuts[1:], strict=True)
        ]
    flat = torch.nonzero(~keep).flatten()
    cuts = torch.searchsorted(flat, torch.tensor(bounds, device=flat.device)).tolist()
    return [flat[a:b] - g.offset for g, a, b in zip(groups, cuts[:-1], cuts[1:], strict=True)]


def _zero_values(model: nn.Module, group: Group) -> Tensor:
    """The value a unit takes when its weights are zeroed: its bias, else 0."""
    module = model.get_submodule(group.hook)
    ref = next(module.parameters(), None)
    device = ref.device if ref is not None else model_device(model)
    dtype = ref.dtype if ref is not None else torch.float32
    bias = getattr(module, "bias", None)
    if group.site == "output" and isinstance(bias, Tensor):
        return bias.detach().clone()
    return torch.zeros(group.n_features, device=device, dtype=dtype)


def _check_keep(keep: Tensor, n: int, device: torch.device) -> None:
    if not isinstance(keep, Tensor):
        raise MaskError(
            f"keep must be a torch.Tensor of shape ({n},) or (batch, {n}), got "
            f"{type(keep).__name__}. Build it with torch.ones({n}, dtype=torch.bool)."
        )
    if keep.dtype != torch.bool and not keep.is_floating_point():
        raise MaskError(
            f"keep must be a bool tensor (True keeps a component), got dtype {keep.dtype}. "
            "Convert with keep.bool()."
        )
    if keep.ndim not in (1, 2) or keep.shape[-1] != n:
        raise MaskError(
            f"keep must have shape ({n},) or (batch, {n}) for these {n} components, got "
            f"{tuple(keep.shape)}. Build masks for the same Components the model uses."
        )
    if keep.device != device and keep.device.type != "cpu":
        raise MaskError(
            f"keep is on {keep.device} but the model is on {device}. Move it with "
            f"keep.to('{device}') (a keep on the CPU is accepted too)."
        )


def _by_weights(model: nn.Module, group: Group, mode: str) -> bool:
    """Whether zeroing the group's weight slices equals its hook exactly.

    That is: zero mode, a plain nn.Linear / nn.Conv1d/2d/3d / transformers Conv1D (a
    subclass may use its weight differently), and a weight that is an unshared,
    unparametrized Parameter (a tied weight would be ablated in its other use too).
    """
    if mode != "zero" or group.site not in ("output", "input"):
        return False
    module = model.get_submodule(group.hook)
    conv1d = families.is_hf_conv1d(module)
    if type(module) not in (nn.Linear, *_CONVS) and not conv1d:
        return False
    if group.site == "input" and type(module) in _CONVS:
        return False
    weight = module._parameters.get("weight")
    if not isinstance(weight, nn.Parameter) or parametrize.is_parametrized(module):
        return False
    return sum(p is weight for _, p in model.named_parameters(remove_duplicate=False)) == 1


def _param_site_name(model: nn.Module, group: Group) -> tuple[str, str]:
    """``(what the module is, what its units are)`` of a ``site="param"`` group."""
    module = model.get_submodule(group.hook)
    if isinstance(module, nn.MultiheadAttention):
        units = "heads" if group.kind == "heads" else "projection rows"
        return "an nn.MultiheadAttention", units
    return f"a recurrent layer ({type(module).__name__})", "hidden units"


class Ablator:
    """Hooks that stay on a model while ``set(keep)`` changes what they ablate.

    ``ablate`` is the everyday interface; collection uses an Ablator directly so the
    hooks are registered once for thousands of masks.

    Units no hook can reach (``nn.MultiheadAttention`` heads and projection rows,
    recurrent units: ``site="param"``) are ablated by zeroing their weight slices in
    place; one mask
    must then be shared by the batch. With ``edit_weights=True``, a bool mask shared by
    the batch (shape (N,)) is applied the same way to the other groups where that
    equals the hook exactly (see ``_by_weights``: zero mode, plain Linear/Conv
    modules): the forward pass then runs with no hook at all. Zeroed slices are
    restored exactly by the next ``set`` and on exit. Per-row and soft masks still use
    hooks. Use ``edit_weights`` only where no gradient flows through those weights
    (``collect`` runs under inference_mode).
    """

    def __init__(
        self,
        model: Any,
        components: Components,
        *,
        mode: str = "zero",
        means: Mapping[str, Tensor] | None = None,
        edit_weights: bool = False,
    ):
        if mode not in MODES:
            raise ComponentError(f"mode must be one of {MODES}, got {mode!r}.")
        if mode == "mean" and means is None:
            raise ComponentError(
                "mode='mean' needs means=: compute them once with "
                "coarpy.ablation.mean_values(model, components, data)."
            )
        model = as_module(model)
        check_weights_in_memory(model)
        self.model = model
        self.components = components
        self.mode = mode
        self.device = model_device(model)
        self.values: list[Tensor] = []
        for g in components.groups:
            if mode == "zero":
                value = _zero_values(model, g)
            else:
                if g.module not in means:
                    raise ComponentError(
                        f"means has no entry for module {g.module!r}. Compute means with "
                        "mean_values() for the same Components."
                    )
                value = means[g.module].to(self.device)
                _refuse_mean_on_head_axis(g)
                if g.site == "param":
                    what, units = _param_site_name(model, g)
                    raise ComponentError(
                        f"mode='mean' is not supported for {g.module!r} ({what} has no "
                        f"hook point for its {units}). Use mode='zero' for it."
                    )
            if value.numel() != g.n_features:
                raise ComponentError(
                    f"Ablation values for {g.module!r} have {value.numel()} entries, "
                    f"expected {g.n_features}."
                )
            self.values.append(value)
        self.state: list[tuple[str, Tensor, Tensor] | None] = [None] * len(components.groups)
        self._handles: dict[int, torch.utils.hooks.RemovableHandle] = {}
        # Groups a shared mask ablates by zeroing weight slices: always the param
        # sites, and with edit_weights every group where that equals the hook.
        self._weighted = {
            gi: _weights.slicer(model, g)
            for gi, g in enumerate(components.groups)
            if g.site == "param" or (edit_weights and _by_weights(model, g, mode))
        }
        self._zeroed: list[tuple[Tensor, int, Tensor, Tensor]] = []  # (param, axis, idx, saved)
        self._weight_units: list[Tensor] | None = None  # of the shared mask now set
        self._entered = False

    @property
    def supports_rows(self) -> bool:
        """Whether per-row masks (batch, N) work: not where units are ablated by zeroing
        weights (nn.MultiheadAttention heads and projection rows, recurrent units),
        which one mask must share across the batch."""
        return all(g.site != "param" for g in self.components.groups)

    # -- masks --------------------------------------------------------------------
    def set(self, keep: Tensor | None) -> None:
        """Ablate what ``keep`` says from the next forward pass on (None: ablate nothing).

        May be called before the hooks are on (``ablate`` does); weight slices are then
        zeroed when the context is entered.
        """
        if keep is None:
            self.state = [None] * len(self.components.groups)
            self._weight_units = None
            self._write_weights()
            return
        _check_keep(keep, len(self.components), self.device)
        soft = keep.is_floating_point()
        shared = keep.ndim == 1 and not soft
        # Find ablated units on the CPU when keep is there: nonzero() on an accelerator
        # would wait for the work queued before it.
        keep_dev = keep.to(self.device, non_blocking=True) if not shared else keep
        units = _ablated_units(keep, self.components.groups) if shared else None
        state: list[tuple[str, Tensor, Tensor] | None] = []
        for gi, (g, value) in enumerate(zip(self.components.groups, self.values, strict=True)):
            keep_g = keep_dev[..., g.offset : g.stop] if not shared else None
            if g.site == "param" and not shared:
                what, kind = _param_site_name(self.model, g)
                raise MaskError(
                    f"{g.module!r} is {what}: its {kind} are ablated by zeroing weights, "
                    "which one mask must share across the batch. Pass a "
                    f"bool keep of shape ({len(self.components)},), not "
                    f"{tuple(keep.shape)} {keep.dtype}."
                )
            if shared and gi in self._weighted:
                state.append(None)  # written into the weights by _write_weights
            elif soft:
                state.append(("soft", _feature_mask(keep_g, g.unit_size), value))
            elif keep.ndim == 2:
                state.append(("rows", _feature_mask(keep_g, g.unit_size), value))
            elif units[gi].numel() == 0:
                state.append(None)
            else:
                idx = _weights.feature_index(units[gi], g.unit_size)
                idx = idx.to(self.device, non_blocking=True)
                state.append(("idx", idx, value[idx]))
        self.state = state
        self._weight_units = units
        self._write_weights()
        if self._entered and not shared:  # a shared mask needs no hook beyond __enter__'s
            self._hook_groups()

    def _write_weights(self) -> None:
        """Restore the slices zeroed for the previous mask, then zero this mask's.

        Only while the context is entered. Restored last-zeroed first, so each slice
        gets back exactly the values it had.
        """
        if not self._entered:
            return
        with torch.no_grad():
            while self._zeroed:
                param, axis, idx, saved = self._zeroed.pop()
                param.index_copy_(axis, idx, saved)
            if self._weight_units is None:
                return
            for gi, units_to_slices in self._weighted.items():
                units = self._weight_units[gi]
                if units.numel() == 0:
                    continue
                for param, axis, idx in units_to_slices(units):
                    self._zeroed.append((param, axis, idx, param.index_select(axis, idx)))
                    param.index_fill_(axis, idx, 0)

    def _hook_groups(self) -> None:
        """Register the hooks a group needs now (weight-edited groups need none)."""
        for gi, g in enumerate(self.components.groups):
            if gi in self._handles or g.site == "param":
                continue
            if gi in self._weighted and self.state[gi] is None:
                continue
            module = self.model.get_submodule(g.hook)
            if g.site == "output":
                self._handles[gi] = module.register_forward_hook(self._output_hook(gi))
            else:
                self._handles[gi] = module.register_forward_pre_hook(
                    self._input_hook(gi), with_kwargs=True
                )

    # -- hooks --------------------------------------------------------------------
    def _apply(self, gi: int, x: Tensor, inplace: bool) -> Tensor:
        st = self.state[gi]
        if st is None:
            return x
        g = self.components.groups[gi]
        how, mask, value = st
        dim = g.dim if g.dim >= 0 else x.ndim + g.dim
        if how == "idx":
            if not inplace or x.requires_grad and torch.is_grad_enabled():
                x = x.clone()
            fill = value.to(x.dtype)
            if dim == x.ndim - 1:
                x[..., mask] = fill
            else:
                x[(slice(None),) * dim + (mask,)] = fill.view(-1, *([1] * (x.ndim - dim - 1)))
            return x
        shape = [1] * x.ndim
        shape[dim] = -1
        value = value.to(x.dtype).view(shape)
        if mask.ndim == 2:
            if x.shape[0] != mask.shape[0]:
                raise MaskError(
                    f"keep has {mask.shape[0]} rows but {g.hook!r} got a batch of "
                    f"{x.shape[0]}. Per-row masks need one row per example in the batch."
                )
            mshape = [1] * x.ndim
            mshape[0], mshape[dim] = mask.shape[0], -1
            mask = mask.view(mshape)
        else:
            mask = mask.view(shape)
        if how == "rows":
            return torch.where(mask, x, value)
        mask = mask.to(x.dtype)
        return x * mask + value * (1 - mask)

    def __enter__(self) -> Ablator:
        try:
            self._entered = True
            self._hook_groups()
            self._write_weights()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        with torch.no_grad():
            while self._zeroed:
                param, axis, idx, saved = self._zeroed.pop()
                param.index_copy_(axis, idx, saved)
        self._entered = False

    def _output_hook(self, gi: int):
        def hook(module, args, out):
            if self.state[gi] is None:
                return None
            if not isinstance(out, Tensor):
                raise ComponentError(
                    f"{self.components.groups[gi].hook!r} returned {type(out).__name__}, "
                    "not a tensor; its output cannot be masked. Select a module that "
                    "returns a tensor."
                )
            return self._apply(gi, out, inplace=True)

        return hook

    def _input_hook(self, gi: int):
        def hook(module, args, kwargs):
            if self.state[gi] is None:
                return None
            if args:
                return (self._apply(gi, args[0], inplace=False), *args[1:]), kwargs
            key = next(iter(kwargs))
            return args, {**kwargs, key: self._apply(gi, kwargs[key], inplace=False)}

        return hook


@contextmanager
def ablate(
    model: Any,
    components: Components,
    keep: Tensor,
    *,
    mode: str = "zero",
    means: Mapping[str, Tensor] | None = None,
) -> Iterator[Any]:
    """Run ``model`` with the components where ``keep`` is False ablated.

    Hooks (and temporarily zeroed weights, for nn.MultiheadAttention heads and
    projection rows, and recurrent units) are removed on exit, also when the body
    raises, leaving the model bit for bit as it was. ``model`` may be an nnsight
    wrapper: the hooks go on the module it wraps, and the context yields the wrapper.

    With nnsight, a ``trace`` inside the context runs the ablated model: the model's
    output and every ``.input``/``.output`` downstream of an ablated component show
    the ablation, and interventions written in the trace compose with it. nnsight
    reads a module's ``.output`` inside its forward, before coarpy's mask (a hook
    after the forward) applies, so the ``.output`` of an ablated conv/linear layer
    itself still shows the unablated value (read the next module's ``.input``), and a
    value written to it is masked again on its ablated units.

    Examples
    --------
    >>> net = nn.Linear(2, 3)
    >>> comps = Components.from_spec(net, {"": "linear"})
    >>> with ablate(net, comps, torch.tensor([True, False, True])):
    ...     out = net(torch.ones(1, 2))
    >>> bool(out[0, 1] == net.bias[1])
    True
    """
    ablator = Ablator(model, components, mode=mode, means=means)
    ablator.set(keep)
    with ablator:
        yield model


def mean_values(
    model: Any,
    components: Components,
    data: Iterable,
    *,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Mean of every unit's activation over ``data``, for ``mode="mean"``.

    The mean is over examples and every position other than the unit's own feature
    (the spatial map of a conv channel, the tokens of a sequence). ``data`` yields
    batches in the form the model's forward takes (see ``collect``). The model runs
    in eval mode, as in ``collect``; its mode is restored afterwards.
    """
    model = as_module(model)
    check_weights_in_memory(model)
    device = torch.device(device) if device is not None else model_device(model)
    sums = [
        torch.zeros(g.n_features, dtype=torch.float64, device=device) for g in components.groups
    ]
    counts = [0] * len(components.groups)
    handles = []

    def record(gi: int, x: Tensor) -> None:
        g = components.groups[gi]
        dim = g.dim if g.dim >= 0 else x.ndim + g.dim
        flat = x.detach().movedim(dim, -1).reshape(-1, x.shape[dim])
        sums[gi] += flat.sum(0, dtype=torch.float64)
        counts[gi] += flat.shape[0]

    for gi, g in enumerate(components.groups):
        module = model.get_submodule(g.hook)
        _refuse_mean_on_head_axis(g)
        if g.site == "param":
            what, units = _param_site_name(model, g)
            raise ComponentError(
                f"mean_values cannot observe the {units} of {g.module!r} ({what} has no "
                "hook point for them). Use mode='zero' for it."
            )
        if g.site == "output":
            handles.append(module.register_forward_hook(lambda m, a, o, gi=gi: record(gi, o)))
        else:
            handles.append(module.register_forward_pre_hook(lambda m, a, gi=gi: record(gi, a[0])))
    # The means of the model collect runs: no dropout, BN running statistics.
    try:
        with eval_mode(model, "mean_values", warn=False), torch.inference_mode():
            for batch in batches_on(data, device):
                run_model_input(model, batch)
    finally:
        for h in handles:
            h.remove()
    if not any(counts):
        raise ComponentError("mean_values got no batches from data; pass a non-empty iterable.")
    return {
        g.module: (s / max(c, 1)).to(torch.float32)
        for g, s, c in zip(components.groups, sums, counts, strict=True)
    }


def _refuse_mean_on_head_axis(g: Group) -> None:
    # hook_z heads sit on dim -2 with d_head features each; a per-unit scalar mean
    # would replace a head by a constant, not by its mean vector.
    if g.dim == -2:
        raise ComponentError(
            f"mode='mean' does not support {g.module!r} (TransformerLens hook_z heads) yet; "
            "use mode='zero' for these components."
        )


def _ablated_indices(components: Components, keep: Tensor | Sequence[str]) -> Tensor:
    """Flat indices (int64, on the CPU) of the components ``keep`` ablates.

    ``keep`` is a bool keep-mask of shape (N,) (False ablates) or a list of the names of
    the components to ablate. Anything else is refused: an int tensor of indices taken
    for a mask would ablate the wrong components without a word.
    """
    n = len(components)
    how = (
        f"Pass a bool keep-mask of shape ({n},) (True keeps a component, as for ablate) or "
        "a list of the names of the components to ablate"
    )
    if isinstance(keep, Tensor):
        if keep.dtype != torch.bool:
            fix = (
                f"; to ablate components by index, build keep = torch.ones({n}, "
                "dtype=torch.bool) and set keep[indices] = False"
                if not keep.is_floating_point()
                else "; a soft (float) mask has no persistent form, use keep >= 0.5 or ablate()"
            )
            raise MaskError(
                f"apply_ablation got a {keep.dtype} tensor of shape {tuple(keep.shape)}. "
                f"{how}{fix}."
            )
        if keep.shape != (n,):
            raise MaskError(
                f"apply_ablation needs keep of shape ({n},) for these {n} components, got "
                f"{tuple(keep.shape)}. Zeroed weights are shared by every example, so a "
                "persistent edit takes one mask, not one per batch row. Build the mask for the "
                "same Components."
            )
        return (~keep).nonzero().flatten().cpu()
    if isinstance(keep, (list, tuple)) and all(isinstance(name, str) for name in keep):
        indices = [components.index(name) for name in keep]  # ComponentError if unknown
        if len(set(indices)) != len(indices):
            twice = next(name for name in keep if keep.count(name) > 1)
            raise ComponentError(
                f"apply_ablation got the name {twice!r} more than once; list each component "
                "to ablate once."
            )
        return torch.tensor(indices, dtype=torch.long)
    got = type(keep).__name__
    if isinstance(keep, (list, tuple)) and keep:
        got = f"a {got} of {type(next(k for k in keep if not isinstance(k, str))).__name__}"
    raise MaskError(f"apply_ablation got {got}. {how}, e.g. [{components.names[0]!r}].")


def _zero_weights_(model: nn.Module, components: Components, ablated: Tensor) -> None:
    """Zero, in place, the weight slices of the components with flat indices ``ablated``.

    This is the paper's definition of ablation; ``ablate(..., mode="zero")`` matches it.
    Indices must be valid (``_ablated_indices`` makes them).
    """
    groups, units = components.locate(ablated)
    with torch.no_grad():
        for gi, g in enumerate(components.groups):
            sel = units[groups == gi]
            if sel.numel():
                for param, axis, idx in _weights.slices(model, g, sel):
                    param.index_fill_(axis, idx, 0)


def apply_ablation(model: Any, components: Components, keep: Tensor | Sequence[str]) -> nn.Module:
    """A copy of ``model`` whose ablated components have zeroed weights.

    The persistent form of ``ablate(model, components, keep)`` (zero mode): a conv
    filter's or linear unit's weights become zero (its bias stays), a head's or
    neuron's output weights become zero, and a recurrent unit's rows in every gate
    (weights and biases) become zero. The copy is a plain module that runs, saves
    and loads without coarpy; the original is untouched. This is the one function in
    coarpy that zeroes weights for good; ``coarpy.edit`` applies edits with it.

    Parameters
    ----------
    model : the model to copy (an nnsight wrapper's module is copied; the copy is a
        plain torch module).
    components : its components.
    keep : a bool tensor of shape (n_components,), True keeps a component (as for
        :func:`ablate`); or a list of the names of the components to ablate.

    Returns
    -------
    nn.Module, the edited copy.

    Raises
    ------
    MaskError
        ``keep`` is not a bool tensor of shape (n_components,) or a list of names (int
        indices are refused: build a keep-mask from them).
    ComponentError
        A name is not a component of ``components``, or is given twice.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(2, 3))
    >>> comps = Components.from_spec(net, {"0": "linear"})  # names "0:0", "0:1", "0:2"
    >>> apply_ablation(net, comps, torch.tensor([True, False, True]))[0].weight[1].tolist()
    [0.0, 0.0]
    >>> apply_ablation(net, comps, ["0:2"])[0].weight[2].tolist()
    [0.0, 0.0]
    """
    ablated = _ablated_indices(components, keep)
    model = as_module(model)
    check_weights_in_memory(model)
    edited = copy.deepcopy(model)
    _zero_weights_(edited, components, ablated)
    return edited
