"""Models as other libraries hand them over: the torch module coarpy works on.

coarpy ablates by hooking a model's modules and editing slices of its weights, so it
needs the ``torch.nn.Module`` that runs, with every weight in memory:

- an nnsight wrapper (``nnsight.NNsight(model)``, ``nnsight.LanguageModel``) is not a
  module but an envoy around one; :func:`as_module` unwraps it, and every entry point
  that takes a model (``Components.discover``/``from_spec``, ``ablate``,
  ``apply_ablation``, ``Ablator``) calls it, so an envoy is accepted wherever a model
  is. Hooks go on the wrapped module, where nnsight's own interventions run too (see
  ``coarpy.ablation.ablate`` for how the two compose).
- a model offloaded by accelerate (``cpu_offload``, ``disk_offload``, or
  ``dispatch_model`` / ``from_pretrained(device_map=...)`` with offloaded layers) keeps
  its weights on the ``meta`` device and loads them inside each forward;
  :func:`check_weights_in_memory` refuses it with what to do instead of letting a
  "Cannot copy out of meta tensor" surface later.

TransformerLens (``HookedTransformer`` and 4.x ``TransformerBridge``) and transformers
models are plain modules; their blocks are recognised in :mod:`coarpy.families`.
Nothing here imports those libraries: wrappers are recognised by their attributes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import ArgumentError


def is_nnsight(model: Any) -> bool:
    """True for an nnsight envoy (``NNsight``, ``LanguageModel``, or one of their modules)."""
    return type(model).__module__.split(".")[0] == "nnsight" and isinstance(
        getattr(model, "_module", None), nn.Module
    )


def as_module(model: Any) -> nn.Module:
    """The ``torch.nn.Module`` to hook: ``model`` itself, or the module an nnsight envoy wraps.

    nnsight keeps the wrapped module as the envoy's ``_module`` (its documented
    attribute; there is no public accessor), and runs it unchanged outside a ``trace``.

    Raises
    ------
    ArgumentError : ``model`` is neither a module nor an nnsight envoy.

    Examples
    --------
    >>> net = nn.Linear(2, 2)
    >>> as_module(net) is net
    True
    """
    if isinstance(model, nn.Module):
        return model
    if is_nnsight(model):
        return model._module
    raise ArgumentError(
        f"Expected a torch.nn.Module (or an nnsight wrapper of one), got "
        f"{type(model).__module__}.{type(model).__qualname__}. Pass the model itself."
    )


def _offloaded(model: nn.Module) -> bool:
    return any(hasattr(m, "_hf_hook") for m in model.modules())


def check_weights_in_memory(model: nn.Module, *, shapes_only: bool = False) -> None:
    """Refuse a model whose parameters or buffers are on the ``meta`` device.

    accelerate's offloading leaves such placeholders and loads the real tensors only
    inside each module's forward. coarpy reads biases to ablate towards, edits weight
    slices in place and fingerprints the weights, none of which a placeholder has.

    ``shapes_only=True`` (finding components, which reads shapes) accepts a model
    built on the meta device to count its components, and refuses only an offloaded
    one: its components could be found but never ablated.

    Raises
    ------
    ArgumentError : a parameter or buffer is on the meta device; the message names it
        and says whether accelerate's hooks put it there.
    """
    for what, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in items:
            if tensor.device.type != "meta":
                continue
            offloaded = _offloaded(model)
            if shapes_only and not offloaded:
                return
            cause = (
                "accelerate offloaded it (a module carries an accelerate hook, as after "
                "cpu_offload, disk_offload or dispatch_model with offloaded layers)"
                if offloaded
                else "the model was built on the meta device and never loaded"
            )
            fix = (
                "Load the model without offloading, on one device where it fits (e.g. "
                "from_pretrained(..., device_map=None) then .to(device)), or restore the "
                "weights first with accelerate.hooks.remove_hook_from_module(model, "
                "recurse=True)."
                if offloaded
                else "Load its weights (e.g. load_state_dict(..., assign=True)) first."
            )
            raise ArgumentError(
                f"The model's {what} {name!r} is on the meta device: {cause}. coarpy needs "
                f"every weight in memory to ablate components and fingerprint runs. {fix}"
            )
