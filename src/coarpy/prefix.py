"""Prefix caching: compute once what no mask changes.

When every component lies after some point of the network (say only the last stages
are ablated), the part of the network before that point computes the same thing under
every mask. Cut the model there into a *prefix* and a *suffix*: run the prefix once
per example, keep its output on the device, and run only the suffix per mask.

A cut is exact only where coarpy can see the data flow. Two kinds are offered:

- a module path inside nested ``nn.Sequential`` containers (``"3"``, ``"features.4"``):
  the prefix is everything that runs before that module, and the cache holds the
  module's input. Every container on the path must be an ``nn.Sequential`` (or a
  subclass that keeps its ``forward``), so running its children one after another is
  exactly what the model does.
- a :class:`Split` of two callables the user writes, ``suffix(prefix(*inputs))`` being
  the model's result (e.g. the embeddings and the first blocks of a transformer, then
  the rest).

Either way the cut is verified once before it is used: on the first 64 examples, the
suffix run on the prefix's output must reproduce the whole model's outputs, both
with nothing ablated and under a probe mask that ablates half of the components (a
component in the prefix would be missed by the cache and fail the check).

Memory: the cached activations of every example stay on the device, i.e.
``n_examples * (size of the prefix output per example)``, when they fit collect's
``device_budget``; otherwise on the host, moved a segment at a time like the examples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import _batching as B
from ._engine import ExampleSet
from .errors import SplitError

_CACHE_KEY = "coarpy_prefix_cache"  # where a dict batch carries the cached activations
_VERIFY_ROWS = 64  # examples the cut is verified on


@dataclass(frozen=True)
class Split:
    """A model cut in two: ``suffix(prefix(*args, **kwargs))`` equals ``model(*args, **kwargs)``.

    Attributes
    ----------
    prefix : called with the model's inputs (a batch's tensor, the first item of an
        ``(inputs, labels)`` tuple, or a dict batch without its labels as keyword
        arguments); returns a tensor, or a tuple/dict of tensors, with the example axis
        first. It runs once per example, with nothing ablated.
    suffix : called with what ``prefix`` returned; returns what the model returns. It
        runs once per mask, so every ablated component must be inside it.
    where : a short description used in messages.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> cut = Split(net[:2], net[2:], where="net[2]")
    >>> x = torch.randn(3, 4)
    >>> bool(torch.equal(cut.suffix(cut.prefix(x)), net(x)))
    True
    """

    prefix: Callable[..., Any]
    suffix: Callable[[Any], Any]
    where: str = "a user-supplied Split"


def _keeps_sequential_forward(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _run(parts: list[nn.Module], x: Any) -> Any:
    for part in parts:
        x = part(x)
    return x


class _Chain(nn.Module):
    """Modules run one after another (the prefix or the suffix of a Sequential cut)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = parts  # a plain list: the modules stay registered in the model only

    def forward(self, x: Any) -> Any:
        return _run(self.parts, x)


def split_sequential(model: nn.Module, path: str) -> Split:
    """Cut ``model`` just before the module at ``path`` (inside nested nn.Sequential).

    Returns a :class:`Split` whose prefix runs everything before that module and
    whose suffix runs that module and everything after it.

    Raises
    ------
    SplitError : ``path`` is not a module, a container on the way is not a plain
        ``nn.Sequential``, or a container carries hooks of its own.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 2)))
    >>> cut = split_sequential(net, "1.1")
    >>> x = torch.randn(3, 4)
    >>> bool(torch.equal(cut.suffix(cut.prefix(x)), net(x)))
    True
    """
    if not isinstance(path, str) or not path:
        raise SplitError(
            f"prefix must be the path of a module inside nn.Sequential containers "
            f"(e.g. '3' or 'features.4'), got {path!r}."
        )
    before: list[nn.Module] = []
    after: list[list[nn.Module]] = []  # innermost level last
    container, walked = model, ""
    for name in path.split("."):
        where = f"the model ({type(model).__name__})" if not walked else repr(walked)
        if not _keeps_sequential_forward(container):
            raise SplitError(
                f"Cannot cut the model at {path!r}: {where} is a {type(container).__name__}, "
                "not an nn.Sequential, so coarpy cannot tell what runs before that point. "
                "Cut at a module of an nn.Sequential, or pass "
                "coarpy.prefix.Split(prefix_fn, suffix_fn)."
            )
        if container._forward_hooks or container._forward_pre_hooks:
            raise SplitError(
                f"Cannot cut the model at {path!r}: {where} has forward hooks of its own, "
                "which a cut would skip. Remove them, or collect without prefix=."
            )
        names = list(container._modules)
        if name not in names:
            raise SplitError(
                f"Cannot cut the model at {path!r}: {where} has no child {name!r} (its "
                f"children are {', '.join(map(repr, names[:8]))}"
                + (" ..." if len(names) > 8 else "")
                + ")."
            )
        i = names.index(name)
        children = [container._modules[n] for n in names]
        before.extend(children[:i])
        after.append(children[i + 1 :])
        container = children[i]
        walked = f"{walked}.{name}" if walked else name
    suffix = [container]
    for level in reversed(after):
        suffix.extend(level)
    if not before:
        raise SplitError(
            f"Cutting at {path!r} leaves nothing before it: the whole model would run per "
            "mask anyway. Cut at a later module, or collect without prefix=."
        )
    return Split(_Chain(before), _Chain(suffix), where=f"the input of {path!r}")


def prefix_paths(model: nn.Module, path: str) -> list[str]:
    """Paths of the modules that run in the prefix of a Sequential cut at ``path``."""
    found: list[str] = []
    container, walked = model, ""
    for name in path.split("."):
        names = list(container._modules)
        for n in names[: names.index(name)]:
            found.append(f"{walked}.{n}" if walked else n)
        container = container._modules[name]
        walked = f"{walked}.{name}" if walked else name
    return found


def resolve(model: nn.Module, prefix: str | Split) -> Split:
    """The :class:`Split` for a ``prefix=`` argument of ``collect``."""
    if isinstance(prefix, Split):
        return prefix
    if isinstance(prefix, str):
        return split_sequential(model, prefix)
    raise SplitError(
        f"prefix must be a module path (str) or a coarpy.prefix.Split, got "
        f"{type(prefix).__name__}. For two callables write Split(prefix_fn, suffix_fn)."
    )


def check_components_after(model: nn.Module, prefix: str, hooks: list[str]) -> None:
    """Refuse a Sequential cut that leaves a component's module in the prefix."""
    early = prefix_paths(model, prefix)
    for hook in hooks:
        for p in early:
            if hook == p or hook.startswith(p + "."):
                raise SplitError(
                    f"Cannot cache the input of {prefix!r}: the component module {hook!r} "
                    f"runs before it (inside {p!r}), so its ablation would be lost. Cut "
                    "at a module that runs before every component."
                )


class Suffix(nn.Module):
    """Runs a Split's suffix on a batch whose inputs are the cached prefix output.

    Output functions call it as they call the model: on a tuple/tensor batch with
    the cache as the model input, or on a dict batch whose cache sits under a key.
    """

    def __init__(self, split: Split):
        super().__init__()
        self._suffix = split.suffix  # not registered: the model owns the modules

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if _CACHE_KEY in kwargs:
            return self._suffix(kwargs[_CACHE_KEY])
        return self._suffix(args[0])


def cached_batch(batch: Any, split: Split) -> Any:
    """``batch`` with its model inputs replaced by the prefix's output on them.

    Labels and other entries stay as they are, so the built-in output functions work
    unchanged on the suffix.
    """
    args, kwargs = B.model_inputs(batch)
    cache = split.prefix(*args, **kwargs)
    if not B.tensors(cache):
        raise SplitError(
            f"The prefix ({split.where}) returned {type(cache).__name__}, which holds no "
            "tensor. It must return a tensor, or a tuple/dict of tensors with the "
            "example axis first."
        )
    if isinstance(batch, Tensor):
        return cache if isinstance(cache, Tensor) else (cache,)
    if isinstance(batch, (tuple, list)):
        return type(batch)([cache, *batch[1:]])
    return {**dict(batch.items()), _CACHE_KEY: cache}


def verify(
    model: nn.Module,
    suffix: nn.Module,
    batch: Any,
    cached: Any,
    output: Callable[[nn.Module, Any], Tensor],
    ablator: Any,
    *,
    where: str,
    n_components: int,
    rtol: float,
) -> None:
    """Refuse the cut unless the suffix on the cache reproduces the model's outputs.

    Compared on ``batch``, with nothing ablated and under a seeded probe mask that
    ablates each component with probability 1/2 (outputs within ``rtol`` of their
    largest magnitude).
    """
    gen = torch.Generator().manual_seed(0)
    probe = torch.rand(n_components, generator=gen) >= 0.5  # (N,) bool, on the CPU
    try:
        for keep, what in ((None, "with nothing ablated"), (probe, "under a probe mask")):
            ablator.set(keep)
            full = output(model, batch).float()
            part = output(suffix, cached).float()
            scale = max(1.0, float(full.abs().max()))
            if part.shape != full.shape or not torch.allclose(
                part, full, rtol=rtol, atol=rtol * scale, equal_nan=True
            ):
                diff = (part - full).abs().max().item() if part.shape == full.shape else None
                raise SplitError(
                    f"Caching {where} does not reproduce the model {what}: the outputs "
                    f"differ by up to {diff} (tolerance {rtol:g} x {scale:.3g}). A component "
                    "may run before the cut, or the prefix/suffix may not compose to the "
                    "model. Cut later, fix the Split, or collect without prefix=."
                )
    finally:
        ablator.set(None)


def prepare(
    model: nn.Module,
    components: Any,
    ablator: Any,
    examples: Any,
    prefix: str | Split,
    output: Callable[[nn.Module, Any], Tensor],
    *,
    autocast: str | None = None,
) -> tuple[nn.Module, Any]:
    """``(suffix, cached examples)`` for ``collect``: the cut resolved, cached and verified.

    Runs under the caller's inference/autocast context, with the ablator entered.
    """
    split = resolve(model, prefix)
    if isinstance(prefix, str):
        check_components_after(model, prefix, [g.hook for g in components.groups])
    ablator.set(None)
    suffix = Suffix(split)
    probe = B.to_device(B.index(examples.batches[0], slice(0, _VERIFY_ROWS)), ablator.device)
    verify(
        model,
        suffix,
        probe,
        cached_batch(probe, split),
        output,
        ablator,
        where=split.where,
        n_components=len(components),
        rtol=1e-2 if autocast else 1e-4,
    )
    # Examples kept on the host keep their cache there too; the cache gets the budget.
    home = "cpu" if examples.streamed else ablator.device
    cached = [B.to_device(cached_batch(batch, split), home) for batch in examples.device_batches()]
    return suffix, ExampleSet(
        cached, ablator.device, examples.batch_size, device_budget=examples.device_budget
    )
