"""Importing user code named as ``"package.module:attribute"`` (configs, output functions).

Shared by ``coarpy.runs.config`` (factories) and ``coarpy.outputs`` (output functions).
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import ArgumentError


def import_object(spec: str) -> Any:
    """The object named by ``"package.module:attr.sub"``; a clear error otherwise."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ArgumentError(
            f"Expected 'package.module:attribute', got {spec!r}, e.g. 'mypkg.models:build'."
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ArgumentError(
            f"Cannot import module {module_name!r} named in {spec!r}: {err}. Check the "
            "name and that its package is installed or on PYTHONPATH."
        ) from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ArgumentError(
                f"Module {module_name!r} has no attribute {attr!r} (from {spec!r}). Check "
                "the spelling after the colon."
            )
        obj = getattr(obj, part)
    return obj
