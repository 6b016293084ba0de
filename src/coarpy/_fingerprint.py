"""Fingerprints: short hashes that say which model, code, examples and settings made a row.

A store records them in ``meta.json`` and refuses a resume that would mix rows of two
setups; attributions carry them (``attr.meta``) so that ``evaluate`` and ``edit`` can
refuse another model or other settings. :func:`record` is the one list of what a row
depends on besides the mask: the weights, the model's structure and forward code, the
output function and its code, the ablation mode and values, autocast, the examples.
Device and batch size are left out on purpose: they change rounding, not meaning, and a
run may mix devices.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import types
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import outputs as _outputs

_DEPTH = 3  # how deep closures and attributes of an output function are followed


def _update(h, t: Tensor) -> None:
    t = t.detach()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.dtype == torch.bfloat16:
        t = t.float()
    h.update(t.cpu().contiguous().numpy().tobytes())


def model_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter and buffer (names, dtypes, shapes, values)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        if isinstance(t, Tensor):
            h.update(name.encode())
            _update(h, t)
    return h.hexdigest()


def tensors_fingerprint(tensors: Iterable[Tensor]) -> str:
    """A hash of a sequence of tensors (the example set of a run)."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        _update(h, t)
    return h.hexdigest()


def _extra_repr(module: nn.Module) -> str:
    try:
        return module.extra_repr()
    except Exception:  # a user module whose extra_repr fails tells us nothing
        return ""


def _code_bytes(code: types.CodeType, doc: Any = None) -> bytes:
    """The bytecode, names and constants of a code object (nested ones too); a docstring
    (``doc``) is left out, so editing it changes nothing."""
    parts = [code.co_code, repr(code.co_names).encode(), repr(code.co_varnames).encode()]
    for i, c in enumerate(code.co_consts):
        if isinstance(c, types.CodeType):
            parts.append(_code_bytes(c))
        elif not (i == 0 and doc is not None and c == doc):
            parts.append(repr(c).encode())
    return b"\x00".join(parts)


def _function_code(fn: Any) -> bytes:
    fn = inspect.unwrap(fn) if callable(fn) else fn
    code = getattr(fn, "__code__", None)
    if isinstance(code, types.CodeType):
        return _code_bytes(code, getattr(fn, "__doc__", None))
    return b""


def structure_fingerprint(model: nn.Module) -> str:
    """A hash of the model's structure: every module's name, class and settings
    (``extra_repr``: kernel sizes, strides, ...), every tensor's name, dtype and shape,
    and the forward code of module classes defined outside torch.

    Two models with equal weights but another stride, activation or custom forward
    differ here. Bytecode depends on the Python version, so the same user-defined
    model fingerprints differently under another Python.
    """
    h = hashlib.blake2b(digest_size=16)
    seen: set[type] = set()
    for name, module in model.named_modules():
        cls = type(module)
        h.update(f"{name}|{cls.__module__}.{cls.__qualname__}|{_extra_repr(module)}\n".encode())
        if cls not in seen and not cls.__module__.startswith("torch."):
            seen.add(cls)
            h.update(_function_code(cls.forward))
    for name, t in model.state_dict().items():
        if isinstance(t, Tensor):
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
    return h.hexdigest()


def _value(h, value: Any, depth: int) -> None:
    """Feed a value an output function depends on (closure cell, attribute) to ``h``."""
    if isinstance(value, Tensor):
        h.update(tensors_fingerprint([value]).encode())
    elif value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        h.update(repr(value).encode())
    elif isinstance(value, (tuple, list, frozenset, set)) and len(value) <= 64:
        h.update(type(value).__name__.encode())
        for v in value if not isinstance(value, (set, frozenset)) else sorted(map(repr, value)):
            _value(h, v, depth)
    elif isinstance(value, Mapping) and len(value) <= 64:
        for k in sorted(value, key=repr):
            h.update(repr(k).encode())
            _value(h, value[k], depth)
    elif isinstance(value, nn.Module):
        h.update(f"module {type(value).__qualname__}".encode())  # its weights are the model's
    elif callable(value) and depth < _DEPTH:
        _callable(h, value, depth + 1)
    else:
        h.update(f"{type(value).__module__}.{type(value).__qualname__}".encode())


def _callable(h, fn: Any, depth: int) -> None:
    if isinstance(fn, functools.partial):
        h.update(b"partial")
        _callable(h, fn.func, depth)
        _value(h, fn.args, depth)
        _value(h, fn.keywords, depth)
        return
    if inspect.ismethod(fn):
        _callable(h, fn.__func__, depth)
        _value(h, getattr(fn.__self__, "__dict__", {}), depth)
        return
    if inspect.isfunction(fn):
        h.update(f"{fn.__module__}:{fn.__qualname__}".encode())
        h.update(_function_code(fn))
        _value(h, fn.__defaults__, depth)
        for cell in fn.__closure__ or ():
            try:
                _value(h, cell.cell_contents, depth)
            except ValueError:  # an empty cell
                h.update(b"<empty>")
        return
    cls = type(fn)
    h.update(f"{cls.__module__}:{cls.__qualname__}".encode())
    h.update(_function_code(inspect.getattr_static(cls, "__call__", None)))
    _value(h, getattr(fn, "__dict__", {}), depth)


def output_fingerprint(fn: Any) -> str:
    """A hash of an output function's code and the values it closes over; "" for a
    built-in one (``coarpy.outputs``), whose name says it all.

    Covers the bytecode of the function (or of a callable object's ``__call__``), its
    defaults, closure cells and attributes (numbers, strings, tensors, and nested
    functions a few levels deep). Globals it reads are not covered.
    """
    if any(fn is registered for registered in _outputs.REGISTRY.values()):
        return ""
    h = hashlib.blake2b(digest_size=16)
    _callable(h, fn, 0)
    return h.hexdigest()


def means_fingerprint(mode: str, means: Mapping[str, Tensor] | None) -> str:
    """A hash of mean-ablation values ("" for zero ablation): other means, other rows."""
    if mode != "mean" or means is None:
        return ""
    return tensors_fingerprint(means[k] for k in sorted(means))


def record(
    model: nn.Module,
    output_fn: Any,
    *,
    mode: str,
    means: Mapping[str, Tensor] | None,
    autocast: str | None,
    data_fingerprint: str | None = None,
) -> dict[str, Any]:
    """What a row depends on besides its mask, as recorded in a store's meta and in
    attributions' meta (compared by ``coarpy._checks.check_attributions``)."""
    out = {
        "fingerprint": model_fingerprint(model),
        "structure": structure_fingerprint(model),
        "output": _outputs.name_of(output_fn),
        "output_code": output_fingerprint(output_fn),
        "mode": mode,
        "means_fingerprint": means_fingerprint(mode, means),
        "autocast": autocast,
    }
    if data_fingerprint is not None:
        out["data_fingerprint"] = data_fingerprint
    return out
