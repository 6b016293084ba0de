"""Checks shared by the Coar-Edit modules: example sets, edit sizes, directions, and
whether attributions belong to a model.

Every check raises :class:`~coarpy.errors.EditError` with what was expected, what was
got, and how to fix it. ``check_compatible`` is public (``coarpy.edit.check_compatible``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_attributions
from .._engine import ExampleSet
from .._fingerprint import model_fingerprint, structure_fingerprint
from ..attributions import Attributions
from ..components import Components
from ..errors import EditError

DIRECTIONS = ("raise", "lower")
STATISTICS = ("welch", "paired")

Rows = Sequence[int] | Tensor  # example indices, or a bool mask over the examples


# -- example sets --------------------------------------------------------------------------


def as_rows(rows: Rows | None, n_examples: int, what: str) -> Tensor:
    """Example indices (int64, in the order given) from indices or a bool mask."""
    if rows is None:
        raise EditError(f"{what} is None; give example indices or a bool mask over examples.")
    t = torch.as_tensor(rows)
    if t.numel() == 0:  # torch.as_tensor([]) is float32
        t = t.long()
    if t.dtype == torch.bool:
        if t.shape != (n_examples,):
            raise EditError(
                f"{what} is a bool mask of shape {tuple(t.shape)}, but the attributions cover "
                f"{n_examples} examples. Give a mask of shape ({n_examples},) or indices."
            )
        return t.nonzero().flatten().cpu()
    if t.is_floating_point() or t.is_complex() or t.ndim > 1:
        raise EditError(
            f"{what} must be example indices (a list of int or an int tensor) or a bool mask, "
            f"got {t.dtype} of shape {tuple(t.shape)}."
        )
    t = t.flatten().long().cpu()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n_examples):
        bad = int(t[(t < 0) | (t >= n_examples)][0])
        raise EditError(
            f"{what} holds the index {bad}, outside the {n_examples} examples the attributions "
            f"cover. Use indices 0 ... {n_examples - 1}."
        )
    if t.unique().numel() != t.numel():
        values, counts = t.unique(return_counts=True)
        raise EditError(
            f"{what} lists example {int(values[counts > 1][0])} more than once. Give each "
            "example once."
        )
    return t


def example_sets(targets: Rows, references: Rows | None, n_examples: int) -> tuple[Tensor, Tensor]:
    """Checked ``(targets, references)`` as int64 index tensors.

    ``references=None`` means every example that is not a target.

    Raises
    ------
    EditError
        If a set is empty, an index is out of range or repeated, or the sets overlap.
    """
    t = as_rows(targets, n_examples, "targets")
    if references is None:
        keep = torch.ones(n_examples, dtype=torch.bool)
        keep[t] = False
        r = keep.nonzero().flatten()
    else:
        r = as_rows(references, n_examples, "references")
    for label, rows in (("targets", t), ("references", r)):
        if rows.numel() == 0:
            raise EditError(
                f"{label} is empty. Coar-Edit compares the attributions of at least one target "
                "and one reference example."
            )
    both = t[torch.isin(t, r)]
    if both.numel():
        raise EditError(
            f"targets and references share {both.numel()} example(s), e.g. {int(both[0])}. "
            "An example is either changed (target) or kept (reference); remove it from one set."
        )
    return t, r


def example_pairs(targets: Rows, references: Rows | None, n_examples: int) -> tuple[Tensor, Tensor]:
    """Checked ``(targets, references)`` that pair up: ``targets[i]`` with ``references[i]``.

    Raises
    ------
    EditError
        If references is None, the sets differ in size, hold fewer than two pairs, or
        fail :func:`example_sets`.
    """
    if references is None:
        raise EditError(
            "statistic='paired' needs references: references[i] is the unedited twin of "
            "targets[i] (e.g. the input without the trigger). Pass them in matching order, "
            "or use statistic='welch' for unpaired sets."
        )
    t, r = example_sets(targets, references, n_examples)
    if len(t) != len(r):
        raise EditError(
            f"statistic='paired' pairs targets[i] with references[i], but there are {len(t)} "
            f"targets and {len(r)} references. Give one reference per target, in the same "
            "order, or use statistic='welch' for unpaired sets."
        )
    if len(t) < 2:
        raise EditError(
            f"statistic='paired' needs at least two pairs to estimate a spread, got {len(t)}. "
            "Add pairs, or use statistic='welch'."
        )
    return t, r


# -- compatibility ---------------------------------------------------------------------------


def recorded(attr: Attributions, key: str) -> Any:
    """A setting recorded by a baseline (``meta[key]``) or by fit (``meta["source"][key]``)."""
    if key in attr.meta:
        return attr.meta[key]
    source = attr.meta.get("source")
    return source.get(key) if isinstance(source, Mapping) else None


def check_compatible(attributions: Attributions, model: nn.Module, components: Components) -> None:
    """Refuse attributions that were not fitted on this model and these components.

    The component names must match one for one. Where the attributions record a
    fingerprint of the model's weights (COAR's store and the baselines do), it must be
    this model's; attributions fitted on in-memory arrays record none.

    Raises
    ------
    EditError
        If the names differ, the weights differ, or the attributions used mean ablation
        (an edit zeroes weights, which is zero ablation).
    """
    attr = attributions
    names = list(components.names)
    if attr.names != names:
        if len(attr.names) != len(names):
            detail = f"{attr.n_components} components, but these Components have {len(names)}"
        else:
            j = next(i for i, (a, b) in enumerate(zip(attr.names, names, strict=True)) if a != b)
            detail = (
                f"component {j} named {attr.names[j]!r}, where these Components have {names[j]!r}"
            )
        raise EditError(
            f"The attributions cover {detail}. Edit with the model and Components the "
            "attributions were fitted on."
        )
    actual = {"fingerprint": model_fingerprint(model), "structure": structure_fingerprint(model)}
    check_attributions({"": attr}, actual, check=True, error=EditError, use="edit")
    mode = recorded(attr, "mode")
    if mode not in (None, "zero"):
        raise EditError(
            f"The attributions were fitted with mode={mode!r} ablation, but an edit zeroes "
            "weights (mode='zero'). Fit attributions collected with mode='zero'."
        )


# -- directions, sizes, selections, data ------------------------------------------------------


def check_direction(direction: str) -> None:
    """Refuse a direction other than ``"raise"`` and ``"lower"``."""
    if direction not in DIRECTIONS:
        raise EditError(
            f"direction must be 'raise' (raise the target outputs relative to the references) "
            f"or 'lower', got {direction!r}."
        )


def check_statistic(statistic: str) -> None:
    """Refuse a statistic other than ``"welch"`` and ``"paired"``."""
    if statistic not in STATISTICS:
        raise EditError(
            f"statistic must be 'welch' (unpaired targets and references, the paper's score) "
            f"or 'paired' (targets[i] is references[i] with the feature to edit), got "
            f"{statistic!r}."
        )


def check_k(k: Any, n: int) -> int:
    """``k``, if it is an int number of components in ``[0, n]``."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise EditError(f"k must be an int (the number of components to ablate), got {k!r}.")
    if not 0 <= k <= n:
        raise EditError(
            f"k={k} components cannot be ablated: the model has {n} components. Choose "
            f"0 <= k <= {n}."
        )
    return k


def check_selected(selected: Any, n: int) -> Tensor:
    """Distinct flat component indices in ``[0, n)`` as int64 on the CPU."""
    idx = torch.as_tensor(selected)
    if idx.numel() == 0:  # torch.as_tensor([]) is float32
        idx = idx.long()
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.ndim > 1:
        raise EditError(
            f"selected must be flat component indices (ints), got {idx.dtype} of shape "
            f"{tuple(idx.shape)}. Use coarpy.edit.select(...)."
        )
    idx = idx.flatten().long().cpu()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise EditError(
            f"selected holds indices in [{int(idx.min())}, {int(idx.max())}], outside the "
            f"{n} components. Select from the same Components the model uses."
        )
    if idx.unique().numel() != idx.numel():
        raise EditError("selected lists a component more than once; give each component once.")
    return idx


def check_ks(ks: Iterable[int], n: int) -> list[int]:
    """Edit sizes, each valid for ``n`` components, sorted, without duplicates."""
    ks = list(ks)
    if not ks:
        raise EditError("ks is empty; give the numbers of components to try, e.g. (0, 1, 2, 4).")
    for k in ks:
        check_k(k, n)
    return sorted(set(ks))


def check_data(attr: Attributions, examples: ExampleSet) -> None:
    """Refuse examples other than the ones the attributions were fitted on."""
    if examples.n_examples != attr.n_examples:
        raise EditError(
            f"data holds {examples.n_examples} examples but the attributions cover "
            f"{attr.n_examples}. Pass the examples the attributions were fitted on, in order."
        )
    fingerprint = recorded(attr, "data_fingerprint")
    if fingerprint and fingerprint != examples.fingerprint():
        raise EditError(
            "data differs from the examples the attributions were fitted on (their meta "
            "records another data fingerprint). Pass the same examples, in the same order."
        )
