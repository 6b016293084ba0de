"""Checks of what the report is given, shared by its figures and its page.

The report's own helper module: ``plots`` and ``page`` both validate example indices,
lay components out by module and recognise tables given as lists of row dicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..attributions import Attributions
from ..errors import ReportError


def check_examples(attributions: Attributions, examples: Sequence[int] | int) -> list[int]:
    """``examples`` as a list of ints, each an example of ``attributions``."""
    if isinstance(examples, (int, np.integer)):
        examples = [int(examples)]
    examples = [int(e) for e in examples]
    if not examples:
        raise ReportError("examples is empty; give at least one example index, e.g. (0,).")
    n = attributions.n_examples
    for e in examples:
        if not 0 <= e < n:
            raise ReportError(
                f"Example {e} is out of range: the attributions cover {n} examples "
                f"(0 ... {n - 1}). Pick example indices in that range."
            )
    return examples


def component_layout(names: Sequence[str], groups: Any) -> list[tuple[str, str, int, int]]:
    """(module, kind, n_units, offset) per group, checked against the names."""
    if groups is None:
        out: list[tuple[str, str, int, int]] = []
        for i, name in enumerate(names):
            module = name.rpartition(":")[0] if ":" in name else ""
            if out and out[-1][0] == module:
                m, k, n, off = out[-1]
                out[-1] = (m, k, n + 1, off)
            else:
                out.append((module, "", 1, i))
        return out
    groups = getattr(groups, "groups", groups)  # a Components holds its groups
    out, offset = [], 0
    for g in groups:
        if hasattr(g, "module"):
            module, kind, n_units = g.module, g.kind, g.n_units
        else:
            module, kind, n_units = g[0], g[1], int(g[2])
        out.append((str(module), str(kind), int(n_units), offset))
        offset += int(n_units)
    if offset != len(names):
        raise ReportError(
            f"The groups hold {offset} components but the attributions have {len(names)}. "
            "Pass the Components (or store.meta['components']) the attributions were fitted on."
        )
    return out


def is_row_list(value: Any) -> bool:
    """True for a non-empty list of mappings (a table given as one dict per row)."""
    return isinstance(value, list) and bool(value) and all(isinstance(r, Mapping) for r in value)
