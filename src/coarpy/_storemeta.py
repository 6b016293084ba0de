"""The settings file of a store, ``meta.json``: its fields, their checks, the identity.

``meta.json`` records every setting a stored row depends on (``IDENTITY``) and
``identity``, a hash of them that every block of the store carries. ``check_meta``
refuses a file that was edited, truncated or is not a coarpy store; ``check_settings``
refuses bad arguments to ``ComponentDataset.create`` before anything is written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from . import _checks
from . import masks as _masks
from .errors import ArgumentError, StoreCorruptError

FORMAT_VERSION = 2
READABLE = (1, 2)
DTYPES = {"float32": (0, np.float32), "float16": (1, np.float16)}

# Settings that must agree for a resume (n_masks may grow); their hash is the identity.
IDENTITY_V1 = (
    "format_version", "n_components", "n_examples", "alpha", "sampler", "seed",
    "block_size", "output", "mode", "dtype", "fingerprint", "data_fingerprint",
    "means_fingerprint", "components",
)  # fmt: skip
IDENTITY = (
    *IDENTITY_V1, "structure", "output_code", "autocast", "prefix", "compile_model",
)  # fmt: skip
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "format_version": (int,),
    "n_components": (int,),
    "n_examples": (int,),
    "n_masks": (int,),
    "alpha": (int, float),
    "sampler": (str,),
    "seed": (int,),
    "block_size": (int,),
    "output": (str,),
    "mode": (str,),
    "dtype": (str,),
    "fingerprint": (str,),
    "data_fingerprint": (str,),
    "components": (list,),
}
_FIELD_TYPES_V2: dict[str, tuple[type, ...]] = {
    "structure": (str,),
    "output_code": (str,),
    "autocast": (str, type(None)),
    "prefix": (str, type(None)),
    "compile_model": (bool,),
    "identity": (str,),
}


def identity_of(meta: dict) -> str:
    """The identity of a store's settings: a hash of its ``IDENTITY`` fields (hex)."""
    fields = {k: meta.get(k) for k in IDENTITY}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _corrupt(where: Path, what: str) -> StoreCorruptError:
    return StoreCorruptError(f"{where}: {what}. Restore the file or start a new store directory.")


def check_meta(meta: Any, where: Path) -> dict:
    """``meta`` if it is a readable store's settings; a StoreCorruptError otherwise."""
    if not isinstance(meta, dict):
        raise StoreCorruptError(f"{where} should hold a JSON object, got {type(meta).__name__}.")
    version = meta.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version not in READABLE:
        raise StoreCorruptError(
            f"{where} has format version {version}; this coarpy reads versions "
            f"{', '.join(map(str, READABLE))}. Use the coarpy version that wrote it."
        )
    types = dict(_FIELD_TYPES, **(_FIELD_TYPES_V2 if version == 2 else {}))
    for field, kinds in types.items():
        if field not in meta:
            raise StoreCorruptError(
                f"{where} lacks the field {field!r}. The file was edited or is not a coarpy "
                "store; restore it or start a new store directory."
            )
        value = meta[field]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise _corrupt(
                where,
                f"field {field!r} should be {kinds[0].__name__}, got {type(value).__name__} "
                f"{value!r}"[:200],
            )
    checks = [
        ("n_components", meta["n_components"] >= 1),
        ("n_examples", meta["n_examples"] >= 1),
        ("n_masks", meta["n_masks"] >= 0),
        ("block_size", meta["block_size"] >= 1),
        ("seed", meta["seed"] >= 0),
        ("alpha", 0 <= meta["alpha"] <= 1),
        ("sampler", meta["sampler"] in _masks.SAMPLERS),
        ("dtype", meta["dtype"] in DTYPES),
    ]
    for field, ok in checks:
        if not ok:
            raise _corrupt(where, f"field {field!r} has an impossible value {meta[field]!r}")
    for group in meta["components"]:
        if not (
            isinstance(group, list)
            and len(group) == 3
            and isinstance(group[0], str)
            and isinstance(group[1], str)
            and isinstance(group[2], int)
            and not isinstance(group[2], bool)
            and group[2] >= 1
        ):
            raise _corrupt(
                where,
                "field 'components' should list [module, kind, n_units] groups, got the "
                f"entry {short(group)}",
            )
    if sum(g[2] for g in meta["components"]) != meta["n_components"]:
        raise _corrupt(
            where,
            f"the component groups add up to {sum(g[2] for g in meta['components'])} units, "
            f"but n_components is {meta['n_components']}",
        )
    if "example_ids" in meta:  # labels of the examples, outside the identity
        _checks.example_ids(
            meta["example_ids"], meta["n_examples"], f"{where}: example_ids",
            error=StoreCorruptError,
        )  # fmt: skip
    if version == 2 and meta["identity"] != identity_of(meta):
        raise StoreCorruptError(
            f"{where}: the settings do not match the identity recorded with them: the file "
            "was edited after the store was created. Its blocks were computed under the "
            "original settings; restore the file, or start a new store directory."
        )
    return meta


def check_settings(**given: Any) -> dict[str, Any]:
    """The settings of ``create``, checked (ArgumentError) and normalised for meta.json."""
    components = given["components"]
    if not (
        isinstance(components, (list, tuple))
        and components
        and all(
            isinstance(g, (list, tuple))
            and len(g) == 3
            and isinstance(g[0], str)
            and isinstance(g[1], str)
            and isinstance(g[2], int)
            and not isinstance(g[2], bool)
            and g[2] >= 1
            for g in components
        )
    ):
        raise ArgumentError(
            "components must be a non-empty list of [module, kind, n_units] groups "
            f"(Components.to_dict()['groups']), got {short(components)}."
        )
    n_components = sum(g[2] for g in components)
    out = {
        "n_components": n_components,
        "n_examples": _checks.positive(given["n_examples"], "n_examples"),
        "n_masks": _checks.integer(given["n_masks"], "n_masks", minimum=0),
        "alpha": _checks.fraction(given["alpha"]),
        "sampler": _checks.choice(given["sampler"], "sampler", _masks.SAMPLERS),
        "seed": _checks.seed(given["seed"]),
        "block_size": _checks.positive(given["block_size"], "block_size"),
        "output": _checks.text(given["output"], "output"),
        "output_code": given["output_code"],
        "mode": _checks.text(given["mode"], "mode"),
        "dtype": _checks.choice(given["dtype"], "dtype", tuple(DTYPES)),
        "fingerprint": given["fingerprint"],
        "structure": given["structure"],
        "data_fingerprint": given["data_fingerprint"],
        "means_fingerprint": given["means_fingerprint"],
        "autocast": given["autocast"],
        "prefix": given["prefix"],
        "compile_model": _checks.flag(given["compile_model"], "compile_model"),
        "components": [list(g) for g in components],
    }
    for key in ("output_code", "fingerprint", "structure", "data_fingerprint", "means_fingerprint"):
        if not isinstance(out[key], str):
            raise ArgumentError(
                f"{key} must be a string (a hex hash, or ''), got {short(out[key])}."
            )
    for key in ("autocast", "prefix"):
        if out[key] is not None:
            _checks.text(out[key], key)
    _checks.flag(given["overwrite"], "overwrite")
    if given["extra"] is not None:
        _checks.mapping(given["extra"], "extra")
        clash = sorted(set(given["extra"]) & {*IDENTITY, "identity", "n_masks", "created"})
        if clash:
            raise ArgumentError(f"extra may not set the store's own fields {clash}.")
    return out


def short(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
