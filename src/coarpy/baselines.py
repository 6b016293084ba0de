"""Baselines: cheaper attribution estimates to compare COAR against.

Both return :class:`~coarpy.attributions.Attributions` in COAR's convention, a linear
model g(v) = b + w . v of the keep-mask v (v_j = 1 keeps component j), so
``evaluate`` scores them on the same held-out masks as COAR:

- ``leave_one_out``: w_j = f(full) - f(all but j), the output lost when component j
  alone is ablated; b = f(full) - sum_j w_j, so g(full) = f(full) exactly.
- ``gradient`` (attribution patching): w_j = df/dv_j at v = 1, the first-order
  Taylor expansion around the full model; b = f(full) - sum_j w_j likewise.

On a model whose output is exactly additive in its components, both recover the
true weights and bias.

Both record in ``meta`` what their weights depend on (``coarpy._fingerprint.record``:
the model's weights and structure, the output function, mode, autocast, the
examples), so ``evaluate`` and ``edit`` refuse them on another model or settings. On a
model whose modules see another batch than the examples (a bi-encoder scoring sentence
pairs runs 2n sequences for n examples), per-row masks do not apply: both fall back
to one shared mask per pass (``gradient``: one example at a time), and say so in a
log line.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import closing
from typing import Any

import torch
from torch import Tensor, nn

from . import _batching as B
from . import _checks, _fingerprint
from . import outputs as _outputs
from ._engine import (
    ExampleSet,
    autocast_context,
    eval_mode,
    mark_progress,
    model_device,
    progress_bar,
    run_masks,
)
from .ablation import MODES, Ablator
from .attributions import Attributions
from .components import Components
from .errors import ArgumentError, ComponentError, MaskError

log = logging.getLogger(__name__)

_CHUNK = 64  # masks per progress step (rounded up to a multiple of the packing)


def _meta(method: str, model: nn.Module, examples: ExampleSet, output_fn, **settings) -> dict:
    return {
        "method": method,
        "n_examples": examples.n_examples,
        **_fingerprint.record(
            model, output_fn, data_fingerprint=examples.fingerprint(), **settings
        ),
    }


def _prepare(
    model: nn.Module, components: Any, data: Iterable, **args: Any
) -> tuple[nn.Module, Any, torch.device, ExampleSet, Any]:
    """Check the arguments a baseline shares with ``collect``; (model, output fn, device,
    examples, autocast context)."""
    model = _checks.module(model)
    if not isinstance(components, Components):
        raise ArgumentError(
            f"components must be a coarpy.Components, got {type(components).__name__}."
        )
    _checks.device(args["device"])
    _checks.device_budget(args["device_budget"])
    _checks.choice(args["mode"], "mode", MODES)
    _checks.optional_flag(args["progress"], "progress")
    output_fn = _outputs.resolve(args["output"])
    if args["device"] is not None:
        model.to(args["device"])
    device = model_device(model)
    cast = autocast_context(device, args["autocast"])
    examples = ExampleSet(data, device, args["batch_size"], device_budget=args["device_budget"])
    examples.check_labels(output_fn)
    return model, output_fn, device, examples, cast


def leave_one_out(
    model: nn.Module,
    components: Components,
    data: Iterable,
    *,
    output: _outputs.OutputFn | str = _outputs.margin,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    mode: str = "zero",
    means: dict[str, Tensor] | None = None,
    autocast: str | None = None,
    progress: bool | None = None,
    device_budget: int | None = None,
) -> Attributions:
    """Leave-one-out attributions: the output change when one component alone is ablated.

    ``weights[z, j] = f_z(full) - f_z(all but j)`` and ``bias[z] = f_z(full) -
    sum_j weights[z, j]``. Costs N + 1 masked passes over ``data``; a ``batch_size``
    larger than the example set runs several masks per forward pass.

    Parameters
    ----------
    model, components, data, output, batch_size, device, mode, means, autocast,
    progress, device_budget : as for ``collect``.

    Returns
    -------
    Attributions with ``meta["method"] == "leave_one_out"``.

    Examples
    --------
    >>> net = nn.Linear(3, 1).eval()
    >>> with torch.no_grad():
    ...     _ = net.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]])), net.bias.fill_(0.5)
    >>> comps = Components.from_spec(net, {"": "inputs"})
    >>> first = lambda model, batch: model(batch)[:, 0]
    >>> loo = leave_one_out(net, comps, torch.ones(2, 3), output=first)
    >>> loo.weights.tolist(), loo.bias.tolist()
    ([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], [0.5, 0.5])
    """
    model, output_fn, device, examples, cast = _prepare(
        model, components, data, output=output, batch_size=batch_size, device=device,
        mode=mode, autocast=autocast, progress=progress, device_budget=device_budget,
    )  # fmt: skip
    n = len(components)
    keep = torch.ones(n + 1, n, dtype=torch.bool)  # row 0: full model; row j+1: all but j
    keep[1:].fill_diagonal_(False)
    step = examples.pack * -(-_CHUNK // examples.pack)
    values = torch.empty(n + 1, examples.n_examples)  # (N+1, E)
    ablator = Ablator(model, components, mode=mode, means=means)
    bar = progress_bar(-(-(n + 1) // step), progress, desc="leave_one_out")
    try:
        with eval_mode(model, "leave_one_out"), ablator, torch.inference_mode(), cast:
            for start in range(0, n + 1, step):
                rows = keep[start : start + step].to(device)
                values[start : start + step] = run_masks(
                    model, ablator, examples, rows, output_fn
                ).cpu()
                bar.update(1)
    finally:
        bar.close()
    full = values[0]  # (E,)
    weights = (full[None, :] - values[1:]).T.contiguous()  # (E, N)
    bias = full - weights.sum(1)
    return Attributions(
        weights=weights,
        bias=bias,
        names=list(components.names),
        example_ids=examples.ids,
        meta=_meta(
            "leave_one_out", model, examples, output_fn, mode=mode, means=means, autocast=autocast
        ),
    )


def gradient(
    model: nn.Module,
    components: Components,
    data: Iterable,
    *,
    output: _outputs.OutputFn | str = _outputs.margin,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    mode: str = "zero",
    means: dict[str, Tensor] | None = None,
    autocast: str | None = None,
    progress: bool | None = None,
    device_budget: int | None = None,
) -> Attributions:
    """Gradient attributions (attribution patching): d f_z / d v_j at the full model.

    Each example of a batch gets its own float keep row (all ones, requires grad), so
    one forward and one backward pass per batch give every per-example gradient.
    ``weights`` is the gradient and ``bias[z] = f_z(full) - sum_j weights[z, j]``,
    the linear expansion around v = 1. The model's parameters get no ``.grad``.

    Parameters
    ----------
    model, components, data, output, batch_size, device, mode, means, autocast : as
        for ``collect``. Examples must not interact within a batch (the model is run in
        eval mode, so BatchNorm uses its running statistics). On a model whose modules
        see another batch than the examples, each example is run alone with one shared
        soft mask.
    progress : show a progress bar (one step per batch); None shows it on a terminal.
    device_budget : bytes the examples may take on the device, as for ``collect``.

    Returns
    -------
    Attributions with ``meta["method"] == "gradient"``.

    Raises
    ------
    ComponentError : heads of an ``nn.MultiheadAttention``, which are ablated by
        zeroing weights and so cannot take a per-example float mask.

    Examples
    --------
    >>> net = nn.Linear(3, 1).eval()
    >>> with torch.no_grad():
    ...     _ = net.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]])), net.bias.fill_(0.5)
    >>> comps = Components.from_spec(net, {"": "inputs"})
    >>> first = lambda model, batch: model(batch)[:, 0]
    >>> grad = gradient(net, comps, torch.tensor([[1.0, 1.0, 2.0]]), output=first)
    >>> grad.weights.tolist(), grad.bias.tolist()
    ([[1.0, 2.0, 6.0]], [0.5])
    """
    model, output_fn, device, examples, cast = _prepare(
        model, components, data, output=output, batch_size=batch_size, device=device,
        mode=mode, autocast=autocast, progress=progress, device_budget=device_budget,
    )  # fmt: skip
    _refuse_weight_zeroed_heads(components, "gradient")
    n = len(components)
    weights = torch.empty(examples.n_examples, n)  # (E, N)
    full = torch.empty(examples.n_examples)  # (E,)
    ablator = Ablator(model, components, mode=mode, means=means)
    bar = progress_bar(len(examples.batches), progress, desc="gradient", unit="batch")
    with eval_mode(model, "gradient"), ablator, torch.enable_grad(), cast, closing(bar):
        row = 0
        point = torch.ones(n, device=device)  # (N,): the unablated model
        for batch in examples.device_batches():
            size = B.batch_size(batch)
            grad, values = _gradient_at(
                model, ablator, examples, batch, point, size, output_fn, "gradient"
            )
            weights[row : row + size] = grad.float().cpu()  # (b, N)
            full[row : row + size] = values.cpu()
            row += size
            bar.update(1)
        ablator.set(None)
    bias = full - weights.sum(1)
    return Attributions(
        weights=weights,
        bias=bias,
        names=list(components.names),
        example_ids=examples.ids,
        meta=_meta(
            "gradient", model, examples, output_fn, mode=mode, means=means, autocast=autocast
        ),
    )


def _gradient(
    model: nn.Module, ablator: Ablator, batch: Any, keep: Tensor, size: int, output_fn: Any
) -> tuple[Tensor, Tensor]:
    """(d output / d keep, output) of one batch under the float mask ``keep``, both
    detached; keep is (size, N) per row or (N,) shared. autograd.grad leaves the
    parameters' .grad alone."""
    ablator.set(keep)
    values = _outputs.check_values(output_fn(model, batch), size, output_fn)  # (size,)
    grad = None
    if values.requires_grad:
        (grad,) = torch.autograd.grad(values.sum(), keep, allow_unused=True)
    if grad is None:  # the output does not depend on any component
        grad = torch.zeros_like(keep)
    mark_progress()
    return grad.detach(), values.detach().float()


# --------------------------------------------------------------------------- expected gradient

_STATES_STREAM = 2**32 - 1  # mask stream of the ablation states (collect: 0, evaluate: 1 + ...)


def expected_gradient(
    model: nn.Module,
    components: Components,
    data: Iterable,
    *,
    n_states: int = 16,
    alpha: float = 0.05,
    seed: int = 0,
    sampler: str = "bernoulli",
    output: _outputs.OutputFn | str = _outputs.margin,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    mode: str = "zero",
    means: dict[str, Tensor] | None = None,
    autocast: str | None = None,
    progress: bool | None = None,
    device_budget: int | None = None,
) -> Attributions:
    """The gradient w.r.t. the keep-mask averaged over random ablation states.

    ``gradient`` linearises at the full model (v = 1); COAR fits the outputs at masks
    with about ``alpha`` of the components ablated. This averages the per-example
    gradient ``d f_z / d v`` over ``n_states`` keep-masks ``v_s`` drawn like the masks
    (``sampler`` and ``alpha``; rows ``0 .. n_states - 1`` of ``coarpy.masks.sample_masks``
    with ``seed`` on a stream of their own, so never the collected masks), and sets
    ``bias[z] = mean_s f_z(v_s) - weights[z] . mean_s v_s``, so the linear model matches
    the mean output over the states. On a model additive in its components this is
    exact (the gradient is the same everywhere); with ``alpha=0`` every state is the
    full model and the result is ``gradient``'s. Costs ``n_states`` forward and
    backward passes over ``data``.

    Parameters
    ----------
    model, components, data, output, batch_size, device, mode, means, autocast,
    progress, device_budget : as for ``gradient``.
    n_states : ablation states to average over (>= 1).
    alpha, sampler, seed : how the states are drawn, as for ``collect``.

    Returns
    -------
    Attributions with ``meta["method"] == "expected_gradient"`` and
    ``meta["states"]`` recording ``n_states``, ``alpha``, ``sampler`` and ``seed``.

    Raises
    ------
    ComponentError : heads of an ``nn.MultiheadAttention`` (as for ``gradient``).

    Examples
    --------
    >>> net = nn.Linear(3, 1).eval()
    >>> with torch.no_grad():
    ...     _ = net.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]])), net.bias.fill_(0.5)
    >>> comps = Components.from_spec(net, {"": "inputs"})
    >>> first = lambda model, batch: model(batch)[:, 0]
    >>> eg = expected_gradient(net, comps, torch.ones(1, 3), output=first, alpha=0.3)
    >>> eg.weights.tolist(), round(eg.bias.item(), 5)
    ([[1.0, 2.0, 3.0]], 0.5)
    """
    from .masks import sample_masks

    model, output_fn, device, examples, cast = _prepare(
        model, components, data, output=output, batch_size=batch_size, device=device,
        mode=mode, autocast=autocast, progress=progress, device_budget=device_budget,
    )  # fmt: skip
    _refuse_weight_zeroed_heads(components, "expected_gradient")
    n_states = _checks.integer(n_states, "n_states", minimum=1)
    n = len(components)
    states = sample_masks(
        0, n_states, n, alpha=alpha, seed=seed, sampler=sampler, stream=_STATES_STREAM
    )  # (S, N) bool
    E = examples.n_examples
    weights = torch.zeros(E, n, dtype=torch.float64)  # (E, N) sum over states
    mean_f = torch.zeros(E, dtype=torch.float64)  # (E,) sum over states of f(v_s)
    ablator = Ablator(model, components, mode=mode, means=means)
    bar = progress_bar(
        n_states * len(examples.batches), progress, desc="expected_gradient", unit="batch"
    )
    with eval_mode(model, "expected_gradient"), ablator, torch.enable_grad(), cast, closing(bar):
        points = states.to(device=device, dtype=torch.float32)  # (S, N)
        for row, batches in examples.segments():  # each segment moved once, for every state
            for batch in batches:
                size = B.batch_size(batch)
                for point in points:
                    grad, values = _gradient_at(
                        model,
                        ablator,
                        examples,
                        batch,
                        point,
                        size,
                        output_fn,
                        "expected_gradient",
                    )
                    weights[row : row + size] += grad.double().cpu()
                    mean_f[row : row + size] += values.double().cpu()
                    bar.update(1)
                row += size
        ablator.set(None)
    weights /= n_states
    mean_f /= n_states
    bias = mean_f - weights @ states.double().mean(0)
    meta = _meta(
        "expected_gradient", model, examples, output_fn, mode=mode, means=means, autocast=autocast
    )
    meta["states"] = {"n_states": n_states, "alpha": alpha, "sampler": sampler, "seed": seed}
    return Attributions(
        weights=weights.float(),
        bias=bias.float(),
        names=list(components.names),
        example_ids=examples.ids,
        meta=meta,
    )


def _refuse_weight_zeroed_heads(components: Components, caller: str) -> None:
    """Gradients need a float mask; nn.MultiheadAttention heads are zeroed weights."""
    for g in components.groups:
        if g.site == "param":
            raise ComponentError(
                f"{caller} cannot differentiate through the heads of {g.module!r}: an "
                "nn.MultiheadAttention is ablated by zeroing its weights, which takes no "
                "float or per-example mask. Use leave_one_out for these components, or "
                "select components outside nn.MultiheadAttention."
            )


def _gradient_at(
    model: nn.Module,
    ablator: Ablator,
    examples: ExampleSet,
    batch: Any,
    point: Tensor,
    size: int,
    output_fn: Any,
    caller: str,
) -> tuple[Tensor, Tensor]:
    """(d output / d keep (size, N), output (size,)) of one batch at the float keep-mask
    ``point`` (N,): one row per example (row i of keep only reaches example i, so the
    gradient of the sum is every example's own), or one example at a time with a shared
    mask where per-row masks do not apply (a model whose modules see another batch)."""
    n = point.shape[0]
    if examples.rows_ok is not False:
        try:
            keep = point.expand(size, n).clone().requires_grad_(True)  # (b, N)
            out = _gradient(model, ablator, batch, keep, size, output_fn)
            examples.rows_ok = True
            return out
        except MaskError as err:
            if examples.rows_ok:
                raise
            examples.rows_ok = False
            log.info(
                "per-row masks do not apply to this model (%s); %s runs one example at a "
                "time with a shared mask instead",
                err,
                caller,
            )
    parts = []
    for i in range(size):
        keep = point.clone().requires_grad_(True)  # (N,)
        parts.append(_gradient(model, ablator, B.index(batch, slice(i, i + 1)), keep, 1, output_fn))
    return torch.cat([g.reshape(1, n) for g, _ in parts]), torch.cat([v for _, v in parts])
