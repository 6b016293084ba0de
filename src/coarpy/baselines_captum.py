"""Captum baselines: neuron conductance and internal influence as component attributions.

The paper's Figure 1 compares COAR with four baselines: leave-one-out and a gradient
estimate (:mod:`coarpy.baselines`), and two attribution methods for hidden units,
computed here with captum (``pip install 'coarpy[captum]'``):

- :func:`conductance`: neuron conductance (Dhamdhere et al., 2019; captum's
  ``LayerConductance``): the share of the output change from a baseline input to the
  example that flows through the unit, along the straight path between them.
- :func:`internal_influence`: internal influence (Leino et al., 2018; captum's
  ``InternalInfluence``): the output's gradient with respect to the unit, integrated
  along the same path.

Both are per activation element; a component's weight sums them over its elements (the
positions of a conv channel or of a token sequence, the features of a head). They are
returned as :class:`~coarpy.attributions.Attributions` in COAR's convention, one
weight per component per example, with ``bias[e] = f_e(full) - sum_j weights[e, j]``
like the other baselines, so ``evaluate`` scores them on the same held-out masks. The
paper found both near zero correlation: they explain the input, not ablations.

The examples must be ``(inputs, ...)`` batches (or bare input tensors) whose inputs can
be interpolated: floating point, or uint8 pixels (turned into float; the output
function must take float inputs, as ``coarpy.recipes.imagenet_margin`` does).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import closing
from typing import Any

import torch
from torch import Tensor, nn

from . import outputs as _outputs
from ._engine import ExampleSet, eval_mode, model_device, progress_bar
from ._fingerprint import model_fingerprint
from .attributions import Attributions
from .components import Components, Group
from .errors import ArgumentError, ComponentError, DataError, MissingExtraError

METHODS = ("conductance", "internal_influence")


def conductance(
    model: nn.Module,
    components: Components,
    data: Iterable,
    *,
    output: _outputs.OutputFn | str = _outputs.margin,
    baseline: float = 0.0,
    n_steps: int = 50,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> Attributions:
    """Neuron conductance of every component, per example (captum's ``LayerConductance``).

    ``weights[e, j]`` is the conductance of component ``j``'s unit for example ``e``,
    summed over the unit's activation elements: for a layer every path from the input
    to the output crosses, the weights of its units add up to ``f_e(x) - f_e(baseline)``.

    Parameters
    ----------
    model, components, data, output, batch_size, device :
        as for ``coarpy.collect``.
    baseline : the input the path starts from (a constant; 0 is captum's default).
    n_steps : points on the path (Gauss-Legendre, captum's default method).
    progress : a progress bar over batches and modules (None: on a terminal).

    Returns
    -------
    Attributions with ``meta["method"] == "conductance"``.

    Raises
    ------
    MissingExtraError : captum is not installed.
    ComponentError : a group has no activation to attribute to (the units of an
        ``nn.MultiheadAttention`` or a recurrent layer, which are weight slices).
    DataError : the batches' inputs cannot be interpolated (token ids, dict batches).

    Examples
    --------
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)).eval()
    >>> comps = Components.from_spec(net, {"0": "linear"})
    >>> first = lambda model, batch: model(batch)[:, 0]
    >>> x = torch.tensor([[1.0, 2.0]])
    >>> c = conductance(net, comps, x, output=first, progress=False)
    >>> change = first(net, x) - first(net, torch.zeros_like(x))  # f(x) - f(baseline)
    >>> torch.allclose(c.weights.sum(1), change, atol=1e-3)  # up to the path quadrature
    True
    """
    return _attribute(
        "conductance", model, components, data, output=output, baseline=baseline,
        n_steps=n_steps, batch_size=batch_size, device=device, progress=progress,
    )  # fmt: skip


def internal_influence(
    model: nn.Module,
    components: Components,
    data: Iterable,
    *,
    output: _outputs.OutputFn | str = _outputs.margin,
    baseline: float = 0.0,
    n_steps: int = 50,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> Attributions:
    """Internal influence of every component, per example (captum's ``InternalInfluence``).

    ``weights[e, j]`` is the gradient of ``f_e`` with respect to component ``j``'s unit,
    integrated along the straight path from ``baseline`` to the example and summed over
    the unit's activation elements.

    Parameters and errors are those of :func:`conductance`.

    Returns
    -------
    Attributions with ``meta["method"] == "internal_influence"``.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)).eval()
    >>> comps = Components.from_spec(net, {"0": "linear"})
    >>> first = lambda model, batch: model(batch)[:, 0]
    >>> ii = internal_influence(net, comps, torch.ones(1, 2), output=first, progress=False)
    >>> torch.allclose(ii.weights, net[1].weight)  # d output / d unit, on every path point
    True
    """
    return _attribute(
        "internal_influence", model, components, data, output=output, baseline=baseline,
        n_steps=n_steps, batch_size=batch_size, device=device, progress=progress,
    )  # fmt: skip


def _captum_method(method: str):
    try:
        from captum.attr import InternalInfluence, LayerConductance
    except ImportError as err:
        raise MissingExtraError(
            f"coarpy.baselines_captum.{method} needs captum, which is not installed: "
            "pip install 'coarpy[captum]'."
        ) from err
    return LayerConductance if method == "conductance" else InternalInfluence


def _check(components: Components, n_steps: Any, baseline: Any) -> None:
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 2:
        raise ArgumentError(f"n_steps must be an int >= 2, got {n_steps!r}. Pass e.g. n_steps=50.")
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float)):
        raise ArgumentError(
            f"baseline must be a number (the constant input the path starts from), got "
            f"{type(baseline).__name__}. Pass e.g. baseline=0.0."
        )
    for g in components.groups:
        if g.site == "param":
            raise ComponentError(
                f"captum attributes to a module's activations, but the units of {g.module!r} "
                "are weight slices no activation holds (nn.MultiheadAttention heads or "
                "projection rows, recurrent units). Leave them out of the components, or use "
                "coarpy.baselines.leave_one_out for them."
            )


def _split_batch(batch: Any) -> tuple[Tensor, tuple, bool]:
    """``(inputs as float, the rest of the batch, whether it was a tuple)``."""
    if isinstance(batch, Tensor):
        inputs, rest, is_tuple = batch, (), False
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        inputs, rest, is_tuple = batch[0], tuple(batch[1:]), True
    else:
        raise DataError(
            f"captum interpolates a batch's input tensor from a baseline, so batches must be "
            f"(inputs, ...) tuples or tensors; got {type(batch).__name__}. For token "
            "batches (dicts of input_ids) these baselines are not available."
        )
    if inputs.dtype == torch.uint8:
        inputs = inputs.float()
    if not inputs.is_floating_point():
        raise DataError(
            f"captum interpolates the inputs from a baseline, but they are {inputs.dtype} "
            "(token ids cannot be interpolated). Pass floating-point inputs."
        )
    return inputs, rest, is_tuple


def _forward(model: nn.Module, output_fn: _outputs.OutputFn, is_tuple: bool):
    """The function captum differentiates: the output of (interpolated inputs, rest)."""

    def forward(x: Tensor, *rest: Any) -> Tensor:
        values = output_fn(model, (x, *rest) if is_tuple else x)
        return _outputs.check_values(values, x.shape[0], output_fn)

    return forward


def _per_unit(attribution: Tensor, g: Group) -> Tensor:
    """Sum an activation-shaped attribution over each unit's elements: (batch, n_units)."""
    dim = g.dim if g.dim >= 0 else attribution.ndim + g.dim
    moved = attribution.movedim(dim, -1)  # (batch, ..., features)
    per_feature = moved.reshape(moved.shape[0], -1, moved.shape[-1]).sum(1)  # (batch, features)
    return per_feature.reshape(per_feature.shape[0], g.n_units, g.unit_size).sum(-1)


def _attribute(
    method: str,
    model: nn.Module,
    components: Components,
    data: Iterable,
    *,
    output: _outputs.OutputFn | str,
    baseline: float,
    n_steps: int,
    batch_size: int | None,
    device: torch.device | str | None,
    progress: bool | None,
) -> Attributions:
    captum_class = _captum_method(method)
    _check(components, n_steps, baseline)
    output_fn = _outputs.resolve(output)
    if device is not None:
        model.to(device)
    device = model_device(model)
    examples = ExampleSet(data, device, batch_size)
    n = len(components)
    weights = torch.empty(examples.n_examples, n)  # (E, N)
    bar = progress_bar(len(examples.batches) * len(components.groups), progress, desc=method)
    for batch in examples.batches:  # refuse before running
        _split_batch(batch)
    with eval_mode(model, method), closing(bar):
        with torch.inference_mode():
            full = examples.outputs(model, output_fn).cpu()  # (E,)
        row = 0
        for batch in examples.device_batches():
            inputs, rest, is_tuple = _split_batch(batch)
            size = inputs.shape[0]
            forward = _forward(model, output_fn, is_tuple)
            for g in components.groups:
                layer = model.get_submodule(g.hook)
                found = captum_class(forward, layer).attribute(
                    inputs, baselines=float(baseline), additional_forward_args=rest or None,
                    n_steps=n_steps, internal_batch_size=max(examples.batch_size, 2 * size),
                    attribute_to_layer_input=g.site == "input",
                )  # fmt: skip
                if isinstance(found, tuple):  # a module with several inputs: the first
                    found = found[0]
                weights[row : row + size, g.offset : g.stop] = _per_unit(found.detach(), g).cpu()
                bar.update(1)
            row += size
    return Attributions(
        weights=weights,
        bias=full - weights.sum(1),
        names=list(components.names),
        example_ids=examples.ids,
        meta={
            "method": method,
            "output": _outputs.name_of(output_fn),
            "baseline": float(baseline),
            "n_steps": n_steps,
            "n_examples": examples.n_examples,
            "fingerprint": model_fingerprint(model),
            "data_fingerprint": examples.fingerprint(),
        },
    )
