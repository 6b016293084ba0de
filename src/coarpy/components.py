"""Components: the units of a model that COAR ablates, their names and flat index.

A model's components are grouped by module. Each group is one module, one kind and a
number of units; unit ``u`` of group ``g`` has flat index ``g.offset + u`` and the
printable name ``"path:u"``. Groups are ordered by the model's module registration
order, so the flat index is stable for a given architecture.

Kinds, and the module a name's path points to (one convention for all of them: the
module the units belong to, whatever module is hooked to ablate them):

- ``conv``: output channels of an ``nn.Conv1d/2d/3d``; named after the conv.
- ``linear``: output units (weight rows) of a linear layer; named after the layer. On an
  ``nn.MultiheadAttention`` (from a spec only), the rows of its input then output
  projection, named after the attention (``families.multihead_linear_site``).
- ``inputs``: input features (weight columns) of a linear layer; named after the layer.
- ``heads``: attention heads; named after the attention module
  (``"transformer.h.0.attn:3"``), also when TransformerLens' ``hook_z`` is selected.
- ``neurons``: the hidden units of an MLP block, named after the block
  (``"transformer.h.0.mlp:17"``; a down projection given to ``from_spec`` names the
  same neurons by its block, and TransformerLens' ``hook_post`` by its MLP), or of a
  recurrent layer (``nn.RNN``/``LSTM``/``GRU`` and their cells), named after the layer
  (``"lstm:5"``; see ``families.recurrent_site`` for the order of layers and
  directions). An MLP that is the whole model names its neurons after its down
  projection, since a name needs a path.

A module reachable by several paths (a TransformerLens 4 bridge registers each block
under the bridge and under the model it wraps) is named by its shortest path. Names are
unique and round-trip: ``comps.index(comps.names[i]) == i``.

Where the ablation happens (the *site*) is decided here too, because it is a fact
about the architecture: a conv channel or a linear unit is an output feature of its
module; an attention head is a slice of the input of the attention's output
projection; an MLP neuron is an input feature of the MLP's down projection; a
recurrent unit's weights are zeroed in place. Two groups whose ablations zero slices of
one parameter (``{"mlp": "neurons", "mlp.2": "linear"}``: columns and rows of
``mlp.2.weight``) are refused, naming both.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import warnings
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import _weights, families
from .errors import ComponentError
from .families import SUPPORTED as _SUPPORTED
from .families import Site
from .integrations import as_module, check_weights_in_memory

KINDS = ("conv", "linear", "heads", "neurons", "inputs")


@dataclass(frozen=True)
class Group:
    """One module's components.

    Attributes
    ----------
    module : path of the module the names use (``"features.0"``; see the module
        docstring for which module that is for each kind).
    kind : one of ``KINDS``.
    n_units : number of components in the group.
    offset : flat index of unit 0.
    hook : path of the module whose input or output is masked.
    site : ``"output"`` (forward hook), ``"input"`` (forward pre-hook) or ``"param"``
        (weights zeroed in place and restored: ``nn.MultiheadAttention`` heads and
        recurrent units, which no hook can reach).
    unit_size : features per unit at the site (the head dimension for heads, else 1).
    dim : the dimension that holds the units at the site: 1 for conv outputs, -2 for
        TransformerLens' hook_z (batch, pos, head, d_head), whose trailing d_head
        features all belong to the head; -1 otherwise.
    weights : names of the parameters whose slices ablating the units zeroes (see
        ``coarpy._weights``); two groups may not share one.
    """

    module: str
    kind: str
    n_units: int
    offset: int
    hook: str
    site: str
    unit_size: int = 1
    dim: int = -1
    weights: tuple[str, ...] = ()

    @property
    def n_features(self) -> int:
        return self.n_units * self.unit_size

    @property
    def stop(self) -> int:
        return self.offset + self.n_units


class _Paths:
    """Every module of a model by identity: its shortest path and its registration order.

    ``named_modules()`` lists a module registered twice under its first path only, which
    for a TransformerLens 4 bridge is the long path through the wrapped model
    (``blocks.0._original_component.attn``); names use the shortest one
    (``blocks.0.attn``), found breadth-first.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.order = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
        self.path = {id(model): ""}
        queue = deque([(model, "")])
        while queue:
            module, path = queue.popleft()
            for name, child in module._modules.items():
                if child is not None and id(child) not in self.path:
                    self.path[id(child)] = f"{path}.{name}" if path else name
                    queue.append((child, self.path[id(child)]))
        self._parameter_names: dict[int, str] | None = None

    def modules(self) -> list[tuple[str, nn.Module]]:
        """``(shortest path, module)`` of every module, in registration order."""
        return [(self.path[id(m)], m) for _, m in self.model.named_modules()]

    def of(self, path: str) -> str:
        """The shortest path of the module at ``path`` (which may be an alias)."""
        return self.path.get(id(self.model.get_submodule(path)), path)

    def in_model_order(self, groups: list[Group]) -> list[Group]:
        """Groups sorted by where the module of their names is registered (then kind)."""

        def key(g: Group) -> tuple[int, int]:
            module = self.model.get_submodule(g.module)
            return self.order.get(id(module), len(self.order)), KINDS.index(g.kind)

        return sorted(groups, key=key)

    def parameter_name(self, param: torch.Tensor) -> str:
        if self._parameter_names is None:
            self._parameter_names = {}
            for path, module in sorted(self.modules(), key=lambda pm: len(pm[0])):
                for name, p in module._parameters.items():
                    if p is not None:
                        self._parameter_names.setdefault(id(p), f"{path}.{name}" if path else name)
        return self._parameter_names.get(id(param), f"<tensor {tuple(param.shape)}>")


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _site_for(model: nn.Module, path: str, module: nn.Module, kind: str, *, explicit: bool):
    """Where the components of ``kind`` at ``path`` are masked (a families.Site), or None.

    ``explicit``: the path was named in a spec, where a bare linear layer given as
    ``neurons`` is a down projection (discovery finds neurons through their blocks).
    """
    if kind == "conv":
        if isinstance(module, families.CONVS):
            return Site(path, path, "output", module.out_channels, 1, 1)
        return None
    if kind in ("linear", "inputs", "neurons"):
        parent = _submodule(model, path.rpartition(".")[0]) if path else None
        if isinstance(parent, nn.MultiheadAttention):
            return None  # its out_proj is never called as a module
        if kind == "linear" and explicit and isinstance(module, nn.MultiheadAttention):
            return families.multihead_linear_site(path, module)
        found = families.wrapped_linear(module)
        if kind == "neurons" and found is not None and explicit:
            block = families.mlp_site(model, path.rpartition(".")[0], parent) if path else None
            if block is not None and model.get_submodule(block.hook) is found[1]:
                return block  # the down projection of a block: the block's neurons
            n_in = families.linear_shape(found[1])[0]
            return Site(path, _join(path, found[0]), "input", n_in)
        if kind == "neurons":
            return families.mlp_site(model, path, module) or families.recurrent_site(path, module)
        if found is None or families.idle_reason(model, path) is not None:
            return None
        n_in, n_out = families.linear_shape(found[1])
        hook = _join(path, found[0])
        if kind == "linear":
            return Site(path, hook, "output", n_out)
        return Site(path, hook, "input", n_in)
    if kind == "heads":
        if not explicit and not families.looks_like_attention(module):
            return None  # a block holding attention (a BertLayer) is not one itself
        return families.attention_site(model, path, module)
    raise ComponentError(
        f"Unknown component kind {kind!r} for module {path!r}. Expected one of {', '.join(KINDS)}."
    )


def _group(paths: _Paths, site: Site, kind: str) -> Group:
    """The group of ``site`` (offset 0), named and hooked by shortest paths."""
    hook = paths.of(site.hook)
    name = paths.of(site.module) or hook  # an MLP that is the whole model: its projection
    group = Group(name, kind, site.n_units, 0, hook, site.site, site.unit_size, site.dim)
    params = _weights.parameters(paths.model, group)
    return dataclasses.replace(group, weights=tuple(paths.parameter_name(p) for p in params))


def _explicit_group(model: nn.Module, paths: _Paths, path: str, kind: str) -> Group:
    """The group of ``kind`` at ``path``; raise ComponentError if unsupported."""
    module = _submodule(model, path)
    if module is None:
        raise _unknown_path(model, path)
    parent = _submodule(model, path.rpartition(".")[0]) if path else None
    if isinstance(parent, nn.MultiheadAttention) and kind != "heads":
        raise ComponentError(
            f"Module {path!r} belongs to nn.MultiheadAttention, which uses its weights "
            "directly, so no hook can reach it. Select the attention module itself "
            f"with kind 'heads': {{{path.rpartition('.')[0]!r}: 'heads'}}, or with kind "
            "'linear' for the rows of its input and output projections."
        )
    site = _site_for(model, path, module, kind, explicit=True)
    if site is None:
        idle = families.idle_reason(model, path) if kind in ("linear", "inputs") else None
        reason = idle or families.unusable_reason(module, kind)
        if reason is not None:
            raise ComponentError(
                f"Module {path!r} ({type(module).__name__}) cannot be ablated as {kind!r}: "
                f"{reason}."
            )
        raise ComponentError(_unsupported_message(path, type(module).__name__, kind))
    return _group(paths, site, kind)


def _unsupported_message(path: str, what: str, kind: str) -> str:
    return (
        f"Module {path!r} is a {what}, which has no {kind!r} components. "
        f"Kind {kind!r} expects {_SUPPORTED[kind]}. Pick another module or kind, "
        "e.g. Components.from_spec(model, {'<module path>': '<kind>'})."
    )


def _unknown_path(model: nn.Module, path: str) -> ComponentError:
    paths = [name for name, _ in model.named_modules() if name]
    close = difflib.get_close_matches(path, paths, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return ComponentError(
        f"Model {type(model).__name__} has no module {path!r}.{hint} "
        "List the paths with [name for name, _ in model.named_modules()]."
    )


def _check_kinds(kinds: Iterable[str]) -> None:
    for kind in kinds:
        if kind not in KINDS:
            raise ComponentError(
                f"Unknown component kind {kind!r}. Expected one of {', '.join(KINDS)}."
            )


def _describe(g: Group) -> str:
    return f"{g.module!r} ({g.kind})"


class Components:
    """An ordered set of component groups of one model, with a flat index.

    Build it with :meth:`discover` (by kind and name globs) or :meth:`from_spec`
    (an explicit ``{module_path: kind}`` mapping). Both accept a ``torch.nn.Module`` or
    an nnsight wrapper of one (see ``coarpy.integrations``).

    Examples
    --------
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    >>> comps = Components.discover(net, kinds=("conv",))
    >>> len(comps), comps.names[5], comps.index("2:1")
    (6, '2:1', 5)
    """

    def __init__(self, groups: Sequence[Group]):
        self.groups: tuple[Group, ...] = tuple(groups)
        if not self.groups:
            raise ComponentError(
                "The component selection is empty. Widen kinds= or include=, or check "
                "exclude= globs."
            )
        _check_groups(self.groups)
        self._by_module = {g.module: g for g in self.groups}
        starts = torch.tensor([g.offset for g in self.groups])
        self._starts = starts
        self._names: list[str] | None = None

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_spec(cls, model: Any, spec: Mapping[str, str]) -> Components:
        """Components from an explicit ``{module_path: kind}`` mapping, in model order.

        Raises
        ------
        ComponentError : a path is not a module, a module has no components of its
            kind, or two entries ablate the same weight (see the module docstring).
        """
        if not spec:
            raise ComponentError(
                "from_spec got an empty spec. Pass {module_path: kind}, e.g. "
                "{'features.0': 'conv'}."
            )
        model = as_module(model)
        check_weights_in_memory(model, shapes_only=True)
        paths = _Paths(model)
        for path, kind in spec.items():
            if _submodule(model, path) is None:
                raise _unknown_path(model, path)
            _check_kinds([kind])
        groups = [_explicit_group(model, paths, path, kind) for path, kind in spec.items()]
        return cls(_with_offsets(paths.in_model_order(groups)))

    @classmethod
    def discover(
        cls,
        model: Any,
        kinds: Iterable[str] = ("conv",),
        *,
        include: Iterable[str] | str | None = None,
        exclude: Iterable[str] | str | None = None,
    ) -> Components:
        """Find every component of the given kinds, filtered by module-path globs.

        ``include``/``exclude`` are fnmatch globs on the module path of the names (the
        part before ``:``); a module is kept if it matches any include glob (all, if
        None) and no exclude glob. A module that looks like it has components of a
        requested kind but cannot be ablated (an ``nn.ConvTranspose2d`` for
        ``"conv"``, an LSTM with ``proj_size``) is named in a warning, never skipped
        silently; an attention module whose heads cannot be read is an error.
        """
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        _check_kinds(kinds)
        model = as_module(model)
        check_weights_in_memory(model, shapes_only=True)
        include = [include] if isinstance(include, str) else include
        exclude = [exclude] if isinstance(exclude, str) else list(exclude or ())

        def wanted(path: str) -> bool:
            if include is not None and not any(fnmatch.fnmatchcase(path, p) for p in include):
                return False
            return not any(fnmatch.fnmatchcase(path, p) for p in exclude)

        paths = _Paths(model)
        found: dict[tuple[str, str], Group] = {}  # by (hook, site): the outermost block
        heads_at: list[str] = []
        unrecognised: list[str] = []
        skipped: dict[int, str] = {}  # by the module (or wrapped layer) skipped
        for path, module in paths.modules():
            for kind in kinds:
                site = _site_for(model, path, module, kind, explicit=False)
                if site is None:
                    if kind == "heads" and families.looks_like_attention(module):
                        unrecognised.append(path)
                    reason, layer = families.unusable_reason(module, kind), module
                    wrapped = families.wrapped_linear(module)
                    if kind in ("linear", "inputs") and wrapped is not None:
                        reason, layer = families.idle_reason(model, path), wrapped[1]
                    if reason is not None and wanted(path):  # a wrapper and its layer: once
                        described = f"{path!r} ({type(module).__name__}): {reason}"
                        skipped.setdefault(id(layer), described)
                    continue
                group = _group(paths, site, kind)
                if wanted(group.module) and (group.hook, group.site) not in found:
                    found[group.hook, group.site] = group
                    if kind == "heads":
                        heads_at.append(group.module)
        # An attention class we could not read is an error unless a recognised
        # attention module contains it or sits inside it (BertSelfAttention, or a
        # whole model whose class name says "Attention").
        missed = [
            p
            for p in unrecognised
            if wanted(p) and not any(_nested(p, h) or _nested(h, p) for h in heads_at)
        ]
        if missed:
            module = model.get_submodule(missed[0])
            raise ComponentError(
                f"Module {missed[0]!r} ({type(module).__name__}) looks like attention but "
                f"its heads could not be read. Supported: {_SUPPORTED['heads']}. Give the "
                "heads explicitly with Components.from_spec, or exclude= that module."
            )
        if skipped:
            warnings.warn(
                f"discover skipped {len(skipped)} module(s) it cannot ablate as {kinds}: "
                + "; ".join(skipped.values())
                + ". exclude= them to silence this, or select their weights with from_spec.",
                stacklevel=2,
            )
        if not found:
            raise ComponentError(
                f"No components of kinds {kinds} found in {type(model).__name__}"
                + (f" matching include={include}" if include is not None else "")
                + (f" and exclude={exclude}" if exclude else "")
                + ". Check the kinds, or pick modules with Components.from_spec."
            )
        return cls(_with_offsets(paths.in_model_order(list(found.values()))))

    # -- indexing -----------------------------------------------------------------
    def __len__(self) -> int:
        return self.groups[-1].stop

    def __repr__(self) -> str:
        kinds = sorted({g.kind for g in self.groups})
        return f"Components({len(self)} in {len(self.groups)} modules, kinds={kinds})"

    @property
    def names(self) -> list[str]:
        """Printable names, ``"module.path:unit"``, in flat-index order."""
        if self._names is None:
            self._names = [f"{g.module}:{u}" for g in self.groups for u in range(g.n_units)]
        return self._names

    def index(self, name: str) -> int:
        """Flat index of a component name (the inverse of ``names[i]``)."""
        path, sep, unit = name.rpartition(":")
        group = self._by_module.get(path)
        if not sep or group is None or not unit.isdigit() or int(unit) >= group.n_units:
            raise ComponentError(
                f"No component named {name!r}. Names look like {self.names[0]!r}; the "
                f"modules here are {', '.join(repr(g.module) for g in self.groups[:5])}"
                + (" ..." if len(self.groups) > 5 else "")
            )
        return group.offset + int(unit)

    def group_of(self, indices: torch.Tensor) -> torch.Tensor:
        """Group number of each flat index (vectorised)."""
        indices = torch.as_tensor(indices)
        return torch.searchsorted(self._starts, indices, right=True) - 1

    def locate(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(group number, unit within group)`` of each flat index."""
        indices = torch.as_tensor(indices)
        groups = self.group_of(indices)
        return groups, indices - self._starts[groups]

    @property
    def kinds(self) -> list[str]:
        """The kind of each component, in flat-index order."""
        return [g.kind for g in self.groups for _ in range(g.n_units)]

    def to_dict(self) -> dict:
        """A JSON-ready description (used by stores and saved attributions)."""
        return {"groups": [[g.module, g.kind, g.n_units] for g in self.groups]}


def _with_offsets(groups: list[Group]) -> list[Group]:
    placed, offset = [], 0
    for g in groups:
        placed.append(dataclasses.replace(g, offset=offset))
        offset += g.n_units
    return placed


def _check_groups(groups: tuple[Group, ...]) -> None:
    """Refuse repeated names, two groups on one weight, and gaps in the flat index."""
    names: dict[str, Group] = {}
    touched: dict[str, Group] = {}
    for g in groups:
        if g.module in names:
            raise ComponentError(
                f"Two groups are named {g.module!r} ({names[g.module].kind} and {g.kind}), "
                "so their component names would collide. Select each module once."
            )
        names[g.module] = g
        # Without recorded weights (a hand-built Group), the masked input or output
        # stands for them.
        for key in g.weights or (f"the {g.site} of {g.hook!r}",):
            other = touched.get(key)
            if other is not None:
                raise ComponentError(
                    f"Groups {_describe(other)} and {_describe(g)} both ablate {key!r} "
                    "(for instance rows and columns of one weight): their in-place edits "
                    "would overwrite each other and the same weight would be ablated "
                    "twice. Keep one of the two: drop it from the spec, or exclude= it "
                    f"from discover (e.g. exclude=[{g.module!r}])."
                )
            touched[key] = g
    offset = 0
    for g in groups:
        if g.offset != offset:
            raise ComponentError(
                f"Group {_describe(g)} starts at flat index {g.offset}, expected {offset}: "
                "groups must follow each other without gaps. Build components with "
                "Components.discover or Components.from_spec."
            )
        offset = g.stop


def _nested(inner: str, outer: str) -> bool:
    """True if module path ``inner`` is ``outer`` or lies inside it ("" is the root)."""
    return outer == "" or inner == outer or inner.startswith(outer + ".")
