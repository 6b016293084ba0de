"""The prior of ``fit(..., method="group", prior="gradient")``: computed from the model.

Two priors can be computed from the model: ``"gradient"`` (``coarpy.baselines.gradient``,
the linearisation at the full model, one backward pass) and ``"expected_gradient"``
(``coarpy.baselines.expected_gradient``, the gradient averaged over 16 ablation states
drawn like the store's masks: the linearisation where COAR fits, 16 backward passes).
Either must describe the rows it centres: the same components in the same order, the
same examples, model weights, output function and ablation mode the store recorded.
:func:`gradient_prior` computes it with the store's ablation mode, autocast, ``alpha``
and sampler and refuses it when anything recorded differs, so a prior from another
model never silently shapes the attributions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from .._checks import differences
from ..attributions import Attributions
from ..errors import FitError

PRIORS = ("gradient", "expected_gradient")  # the priors fit can compute itself
N_STATES = 16  # ablation states of prior="expected_gradient"


def gradient_prior(
    meta: dict | None,
    names: list[str],
    n_examples: int,
    *,
    model: nn.Module | None,
    components: Any,
    data: Iterable | None,
    output: Any,
    progress: bool | None,
    batch_size: int | None = None,
    method: str = "gradient",
    alpha: float | None = None,
) -> Attributions:
    """``baselines.gradient`` (or ``expected_gradient``) on the store's model, components
    and examples, checked.

    Parameters
    ----------
    meta : the store's meta (None for in-memory masks: only shapes are checked).
    names : the store's component names, in order.
    n_examples : the store's number of examples.
    model, components, data, output : as for ``collect``; output None is the margin.
    progress : progress bar of the gradient pass.
    batch_size : examples per pass (default: the data's own batches).
    method : ``"gradient"`` or ``"expected_gradient"`` (one of :data:`PRIORS`).
    alpha : the ablation fraction of the expected gradient's states when ``meta`` does
        not record one (in-memory masks: their mean ablated share).

    Raises
    ------
    FitError
        Missing model, components or data; components or examples other than the
        store's; or a model, output function, ablation mode or examples other than the
        store recorded. The message names the difference and the fix.
    """
    from .. import baselines
    from .. import outputs as _outputs
    from ..components import Components

    missing = [
        k for k, v in (("model", model), ("components", components), ("data", data)) if v is None
    ]
    if missing:
        raise FitError(
            f"prior={method!r} computes the gradient of the model the store was collected "
            f"from, so fit needs model=, components= and data= as given to collect; missing "
            f"{', '.join(missing)}. Pass them, or pass prior=None (no prior) or a precomputed "
            "prior (coarpy.baselines.gradient(...))."
        )
    if not isinstance(components, Components):
        raise FitError(f"components must be a coarpy.Components, got {type(components).__name__}.")
    if len(components) != len(names) or (
        meta is not None and list(components.names) != list(names)
    ):
        first = [n for n, m in zip(components.names, names, strict=False) if n != m][:1]
        detail = f"first difference {first[0]!r}" if first else f"{len(components)} vs {len(names)}"
        raise FitError(
            f"prior={method!r}: the components given ({len(components)}) are not the "
            f"store's ({len(names)}; {detail}). Pass the Components the store was collected "
            "with."
        )
    recorded = meta or {}
    mode = recorded.get("mode", "zero")
    if mode == "mean":
        raise FitError(
            f"prior={method!r} cannot rebuild the mean-ablation values the store was "
            "collected with. Compute coarpy.baselines.gradient (or expected_gradient)(model, "
            "components, data, mode='mean', means=...) yourself and pass it as prior=."
        )
    output_fn = _outputs.margin if output is None else output
    common = dict(
        output=output_fn, batch_size=batch_size, mode=mode, autocast=recorded.get("autocast"),
        progress=progress,
    )  # fmt: skip
    if method == "expected_gradient":
        grad = baselines.expected_gradient(
            model, components, data, n_states=N_STATES,
            alpha=float(recorded.get("alpha", 0.05 if alpha is None else alpha)),
            sampler=recorded.get("sampler", "bernoulli"), seed=int(recorded.get("seed", 0)),
            **common,
        )  # fmt: skip
    else:
        grad = baselines.gradient(model, components, data, **common)
    if grad.weights.shape[0] != n_examples:
        raise FitError(
            f"prior={method!r}: data has {grad.weights.shape[0]} examples but the store "
            f"{n_examples}. Pass the examples the store was collected on, in the same order."
        )
    if meta is not None:
        actual = {k: grad.meta[k] for k in grad.meta if k != "method" and k != "n_examples"}
        diffs = differences(meta, actual)
        if diffs:
            raise FitError(
                f"prior={method!r}: the store was collected under other settings than the "
                f"model and data given: {'; '.join(diffs)}. Pass the model, data and output "
                "the store was collected with, or fit without a prior (prior=None)."
            )
    return grad
