"""Components: the units of a model that COAR ablates, and their flat index.

A model's components are grouped by module. Each group is one module path, one kind
("conv", "linear", "heads", "neurons", "inputs") and a number of units; unit ``u`` of
group ``g`` has flat index ``g.offset + u`` and the printable name ``"path:u"``.
Groups are ordered by the model's module registration order, so the flat index is
stable for a given architecture.

Where the ablation happens (the *site*) is decided here too, because it is a fact
about the architecture: a conv channel or a linear unit is an output feature of its
module; an attention head is a slice of the input of the attention's output
projection; an MLP neuron is an input feature of the MLP's down projection.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import families
from .errors import ComponentError
from .families import SUPPORTED as _SUPPORTED
from .families import is_hf_conv1d as _is_hf_conv1d  # noqa: F401  (ablation.py imports it)
from .families import linear_shape as _linear_in_out

KINDS = ("conv", "linear", "heads", "neurons", "inputs")

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Group:
    """One module's components.

    Attributes
    ----------
    module : path of the module the names use (``"features.0"``).
    kind : one of ``KINDS``.
    n_units : number of components in the group.
    offset : flat index of unit 0.
    hook : path of the module whose input or output is masked.
    site : ``"output"`` (forward hook), ``"input"`` (forward pre-hook) or ``"param"``
        (weights zeroed in place and restored; torch ``nn.MultiheadAttention``).
    unit_size : features per unit at the site (the head dimension for heads, else 1).
    dim : the dimension that holds the units at the site: 1 for conv outputs, -2 for
        TransformerLens' hook_z (batch, pos, head, d_head), whose trailing d_head
        features all belong to the head; -1 otherwise.
    """

    module: str
    kind: str
    n_units: int
    offset: int
    hook: str
    site: str
    unit_size: int = 1
    dim: int = -1

    @property
    def n_features(self) -> int:
        return self.n_units * self.unit_size

    @property
    def stop(self) -> int:
        return self.offset + self.n_units


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def _group_for(model: nn.Module, path: str, kind: str, offset: int) -> Group:
    """Build the group of ``kind`` at ``path``; raise ComponentError if unsupported."""
    module = _submodule(model, path)
    if module is None:
        raise _unknown_path(model, path)
    what = type(module).__name__
    parent = _submodule(model, path.rpartition(".")[0])
    if isinstance(parent, nn.MultiheadAttention) and kind != "heads":
        raise ComponentError(
            f"Module {path!r} belongs to nn.MultiheadAttention, which uses its weights "
            "directly, so no hook can reach it. Select the attention module itself "
            f"with kind 'heads': {{{path.rpartition('.')[0]!r}: 'heads'}}."
        )
    if kind == "conv":
        if isinstance(module, _CONV):
            return Group(path, kind, module.out_channels, offset, path, "output", 1, 1)
    elif kind == "linear":
        shape = _linear_in_out(module)
        if shape is not None:
            return Group(path, kind, shape[1], offset, path, "output", 1, -1)
    elif kind == "inputs":
        shape = _linear_in_out(module)
        if shape is not None:
            return Group(path, kind, shape[0], offset, path, "input", 1, -1)
    elif kind in ("heads", "neurons"):
        shape = _linear_in_out(module) if kind == "neurons" else None
        if shape is not None:  # a down projection given directly
            return Group(path, kind, shape[0], offset, path, "input", 1, -1)
        found = _block_site(model, path, module, kind)
        if found is not None:
            return Group(
                found.module, kind, found.n_units, offset, found.hook, found.site,
                found.unit_size, found.dim,
            )  # fmt: skip
    else:
        raise ComponentError(
            f"Unknown component kind {kind!r} for module {path!r}. "
            f"Expected one of {', '.join(KINDS)}."
        )
    raise ComponentError(_unsupported_message(path, what, kind))


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


class Components:
    """An ordered set of component groups of one model, with a flat index.

    Build it with :meth:`discover` (by kind and name globs) or :meth:`from_spec`
    (an explicit ``{module_path: kind}`` mapping).

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
        self._by_module = {g.module: g for g in self.groups}
        starts = torch.tensor([g.offset for g in self.groups])
        self._starts = starts
        self._names: list[str] | None = None

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_spec(cls, model: nn.Module, spec: Mapping[str, str]) -> Components:
        """Components from an explicit ``{module_path: kind}`` mapping, in model order."""
        if not spec:
            raise ComponentError(
                "from_spec got an empty spec. Pass {module_path: kind}, e.g. "
                "{'features.0': 'conv'}."
            )
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        for path in spec:
            if path not in order:
                raise _unknown_path(model, path)
        groups: list[Group] = []
        offset = 0
        for path in sorted(spec, key=order.__getitem__):
            group = _group_for(model, path, spec[path], offset)
            groups.append(group)
            offset = group.stop
        return cls._checked(groups)

    @classmethod
    def discover(
        cls,
        model: nn.Module,
        kinds: Iterable[str] = ("conv",),
        *,
        include: Iterable[str] | str | None = None,
        exclude: Iterable[str] | str | None = None,
    ) -> Components:
        """Find every component of the given kinds, filtered by module-path globs.

        ``include``/``exclude`` are fnmatch globs on the module path (the name before
        ``:``); a module is kept if it matches any include glob (all, if None) and no
        exclude glob.
        """
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        for kind in kinds:
            if kind not in KINDS:
                raise ComponentError(
                    f"Unknown component kind {kind!r}. Expected one of {', '.join(KINDS)}."
                )
        include = [include] if isinstance(include, str) else include
        exclude = [exclude] if isinstance(exclude, str) else list(exclude or ())

        def wanted(path: str) -> bool:
            if include is not None and not any(fnmatch.fnmatchcase(path, p) for p in include):
                return False
            return not any(fnmatch.fnmatchcase(path, p) for p in exclude)

        found: dict[str, str] = {}
        heads_at: list[str] = []
        unrecognised: list[str] = []
        for path, module in model.named_modules():
            for kind in kinds:
                target = _discovered_path(model, path, module, kind)
                if target is None:
                    if kind == "heads" and families.looks_like_attention(module):
                        unrecognised.append(path)
                    continue
                if wanted(target) and target not in found:
                    found[target] = kind
                    if kind == "heads":
                        heads_at.append(target)
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
        if not found:
            raise ComponentError(
                f"No components of kinds {kinds} found in {type(model).__name__}"
                + (f" matching include={include}" if include is not None else "")
                + (f" and exclude={exclude}" if exclude else "")
                + ". Check the kinds, or pick modules with Components.from_spec."
            )
        return cls.from_spec(model, found)

    @classmethod
    def _checked(cls, groups: list[Group]) -> Components:
        seen: dict[tuple[str, str], str] = {}
        for g in groups:
            if (g.hook, g.site) in seen:
                raise ComponentError(
                    f"The {g.site} of module {g.hook!r} is selected twice "
                    f"({seen[g.hook, g.site]} and {g.kind}). Each module's input or output "
                    "may belong to one group only; drop one of the two."
                )
            seen[g.hook, g.site] = g.kind
        return cls(groups)

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


def _nested(inner: str, outer: str) -> bool:
    """True if module path ``inner`` is ``outer`` or lies inside it ("" is the root)."""
    return outer == "" or inner == outer or inner.startswith(outer + ".")


def _discovered_path(model: nn.Module, path: str, module: nn.Module, kind: str) -> str | None:
    """The spec path under which discovery selects ``module`` for ``kind``, or None."""
    if kind == "conv":
        return path if isinstance(module, _CONV) else None
    if kind in ("linear", "inputs"):
        parent = _submodule(model, path.rpartition(".")[0])
        if isinstance(parent, nn.MultiheadAttention):
            return None  # its out_proj is never called as a module
        return path if _linear_in_out(module) is not None else None
    if kind == "heads" and not families.looks_like_attention(module):
        return None
    if kind in ("heads", "neurons"):
        found = _block_site(model, path, module, kind)
        return found.module if found is not None else None
    return None


def _block_site(model: nn.Module, path: str, module: nn.Module, kind: str):
    """Where the heads or neurons of the block at ``path`` are masked (families.Site)."""
    if kind == "heads":
        return families.attention_site(model, path, module)
    return families.mlp_site(model, path, module)
