"""Validation at the door: small checks of user-given values, and of attributions
against the model and settings they are used with.

Every public entry point (``collect``, ``evaluate``, the baselines, the store, run
configurations, the launchers) checks its arguments here before it runs a model or
writes a file, so a bad value is refused the same way everywhere: an
``ArgumentError`` (both a ``ValueError`` and a ``TypeError``) that names the argument,
says what was expected and what was got, and how to fix it. A run configuration
re-raises it as a ``ConfigError`` naming the file.

:func:`check_attributions` is the one comparison of attributions' record
(``attr.meta``) with the model and settings at hand; ``evaluate``, ``evaluate_store``
and ``coarpy.edit`` call it, and ``check=False`` skips it everywhere.

Where ``coarpy.edit`` and ``coarpy.regression`` should call these: ``integer`` for
``k``/``ks``/``n_masks``/``max_iter``, ``fraction`` for ``val_fraction``, ``seed`` for
``seed``, ``choice`` for ``direction``/``method``, ``batch_size`` and ``device`` as
``collect`` does.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .errors import ArgumentError, CoarError
from .integrations import check_weights_in_memory

_MISSING = object()


def _got(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(value: Any, name: str, *, minimum: int | None = None, fix: str = "") -> int:
    """``value`` as an int, if it is an integer (not a bool, not a float) >= ``minimum``.

    Examples
    --------
    >>> integer(3, "n_masks", minimum=1)
    3
    >>> integer(2.5, "batch_size")
    Traceback (most recent call last):
    ...
    coarpy.errors.ArgumentError: batch_size must be an integer, got 2.5 (float).
    """
    if not _is_int(value):
        raise ArgumentError(f"{name} must be an integer, got {_got(value)}.{_tail(fix)}")
    if minimum is not None and value < minimum:
        raise ArgumentError(f"{name} must be >= {minimum}, got {int(value)}.{_tail(fix)}")
    return int(value)


def positive(value: Any, name: str, *, fix: str = "") -> int:
    """An integer >= 1 (a count of masks, a block size, a number of workers)."""
    return integer(value, name, minimum=1, fix=fix)


def batch_size(value: Any) -> int | None:
    """None (the data's own batches) or an integer >= 1."""
    if value is None:
        return None
    return integer(
        value, "batch_size", minimum=1,
        fix="Give the number of examples per forward pass, or None for the data's batches.",
    )  # fmt: skip


def device_budget(value: Any) -> int | None:
    """None (the default budget) or a number of bytes >= 1 that the examples may take on
    the device."""
    if value is None:
        return None
    return integer(
        value, "device_budget", minimum=1,
        fix="Give the bytes the examples may take on the device (e.g. 8 * 2**30), or "
        "None for half the free memory of a CUDA device.",
    )  # fmt: skip


def seed(value: Any, name: str = "seed") -> int:
    """An integer >= 0 (numpy's SeedSequence takes no negative seed)."""
    return integer(value, name, minimum=0, fix="Seeds are non-negative integers, e.g. 0.")


def number(value: Any, name: str, *, positive_only: bool = False, fix: str = "") -> float:
    """A finite real number (int or float, not a bool); with ``positive_only``, > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentError(f"{name} must be a number, got {_got(value)}.{_tail(fix)}")
    if not math.isfinite(float(value)):
        raise ArgumentError(f"{name} must be a finite number, got {value}.{_tail(fix)}")
    if positive_only and value <= 0:
        raise ArgumentError(f"{name} must be a positive number, got {value}.{_tail(fix)}")
    return float(value)


def fraction(value: Any, name: str = "alpha", *, open_interval: bool = False) -> float:
    """A number in [0, 1] (``open_interval``: strictly between 0 and 1).

    ``alpha`` is always the fraction of components ablated.

    Examples
    --------
    >>> fraction(0.05)
    0.05
    >>> fraction(0.5, "val_fraction", open_interval=True)
    0.5
    """
    what = "the fraction of components ablated" if name == "alpha" else "a fraction"
    x = number(value, name, fix=f"{name} is {what}, e.g. 0.05.")
    lo, hi = ("(", ")") if open_interval else ("[", "]")
    inside = 0.0 < x < 1.0 if open_interval else 0.0 <= x <= 1.0
    if not inside:
        raise ArgumentError(
            f"{name} is {what} and must lie in {lo}0, 1{hi}, got {value}. Give e.g. 0.05."
        )
    return x


def choice(value: Any, name: str, options: Iterable[Any]) -> Any:
    """``value`` if it is one of ``options`` (compared by equality, types kept apart)."""
    options = tuple(options)
    if not any(type(value) is type(o) and value == o for o in options):
        raise ArgumentError(f"{name} must be one of {options!r}, got {_got(value)}.")
    return value


def flag(value: Any, name: str) -> bool:
    """A bool (True or False; not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise ArgumentError(f"{name} must be True or False, got {_got(value)}.")
    return value


def optional_flag(value: Any, name: str) -> bool | None:
    """None or a bool (``progress``: None means "on a terminal")."""
    return None if value is None else flag(value, name)


def text(value: Any, name: str) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise ArgumentError(f"{name} must be a non-empty string, got {_got(value)}.")
    return value


def device(value: Any) -> torch.device | None:
    """None (where the model is) or a device torch understands ("cpu", "cuda:1")."""
    if value is None:
        return None
    if isinstance(value, torch.device):
        return value
    if not isinstance(value, str):
        raise ArgumentError(
            f"device must be a string such as 'cpu' or 'cuda:0', a torch.device or None, "
            f"got {_got(value)}."
        )
    try:
        return torch.device(value)
    except (RuntimeError, ValueError) as err:
        raise ArgumentError(
            f"device {value!r} is not a device torch knows ({err}). Use e.g. 'cpu', 'cuda' "
            "or 'cuda:1'."
        ) from None


def shard(value: Any) -> tuple[int, int] | None:
    """None, or ``(k, K)``: worker k of K, 0 <= k < K."""
    if value is None:
        return None
    if isinstance(value, str) or not (
        isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(x) for x in value)
    ):
        raise ArgumentError(
            f"shard must be a tuple (k, K): this worker's index k of K workers, e.g. (0, 4); "
            f"got {value!r}. For 'k/K' text or SLURM/torchrun variables use "
            "coarpy.runs.collect_run(config, shard='k/K' or 'env')."
        )
    k, n = (int(x) for x in value)
    if not (n >= 1 and 0 <= k < n):
        raise ArgumentError(
            f"shard must be (k, K) with 0 <= k < K, got {tuple(value)}: worker k of K "
            "counts from 0, e.g. (0, 4) ... (3, 4)."
        )
    return k, n


def mapping(value: Any, name: str) -> Mapping:
    """A mapping (dict)."""
    if not isinstance(value, Mapping):
        raise ArgumentError(f"{name} must be a mapping (dict), got {_got(value)}.")
    return value


def module(value: Any, name: str = "model") -> torch.nn.Module:
    """The ``torch.nn.Module`` to run: ``value`` itself, or the module a wrapper holds
    as ``_module`` (an nnsight envoy). Its weights must be in memory (not offloaded by
    accelerate, not on the meta device): ``integrations.check_weights_in_memory``."""
    inner = value if isinstance(value, torch.nn.Module) else getattr(value, "_module", None)
    if isinstance(inner, torch.nn.Module):
        check_weights_in_memory(inner)
        return inner
    raise ArgumentError(
        f"{name} must be a torch.nn.Module (or an nnsight wrapper of one), got "
        f"{type(value).__name__}. Pass the model itself."
    )


def example_ids(
    value: Any, n_examples: int, name: str = "example_ids", *, error: type = ArgumentError
) -> list[str | int]:
    """One id per example, in order: distinct ``str`` or ``int`` values (numpy and 0-d
    tensors become ``int``), as a list.

    Examples
    --------
    >>> example_ids(["a", "b"], 2)
    ['a', 'b']
    >>> example_ids([3, 3], 2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    coarpy.errors.ArgumentError: example_ids must be distinct, but 3 occurs twice ...
    """
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise error(
            f"{name} must be a sequence of one id (str or int) per example, got {_got(value)}."
        )
    ids: list[str | int] = []
    for i, v in enumerate(value):
        if isinstance(v, torch.Tensor) and v.ndim == 0:
            v = v.item()
        if _is_int(v):
            v = int(v)
        elif not isinstance(v, str):
            raise error(
                f"{name}[{i}] must be a str or an int, got {_got(v)}. Give ids such as "
                "dataset row numbers or keys."
            )
        ids.append(v)
    if len(ids) != n_examples:
        raise error(
            f"{name} has {len(ids)} ids for {n_examples} examples. Give exactly one id per "
            "example, in the order of the data."
        )
    first: dict[str | int, int] = {}
    for i, v in enumerate(ids):
        if v in first:
            raise error(
                f"{name} must be distinct, but {v!r} occurs twice (positions {first[v]} and "
                f"{i}). Give each example its own id."
            )
        first[v] = i
    return ids


def _tail(fix: str) -> str:
    return f" {fix}" if fix else ""


# -- attributions against a model and settings ------------------------------------------------

# What attributions record and what each field means, for messages.
RECORDED = {
    "fingerprint": "the model's weights",
    "structure": "the model's structure (module types, shapes and forward code)",
    "output": "the output function",
    "output_code": "the output function's code",
    "mode": "the ablation mode",
    "means_fingerprint": "the mean-ablation values",
    "autocast": "autocast",
    "data_fingerprint": "the examples",
}


def recorded(meta: Mapping[str, Any], key: str) -> Any:
    """A setting recorded by a baseline (``meta[key]``) or by fit (``meta["source"][key]``);
    a sentinel when neither records it."""
    if key in meta:
        return meta[key]
    source = meta.get("source")
    if isinstance(source, Mapping) and key in source:
        return source[key]
    return _MISSING


def differences(meta: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """The fields of ``actual`` that ``meta`` records with another value, described.

    A field ``meta`` does not record (attributions fitted on in-memory arrays, or by an
    older coarpy) is not compared; so is one ``actual`` leaves out.
    """
    out = []
    for key, value in actual.items():
        was = recorded(meta, key)
        if was is _MISSING or value is _MISSING:
            continue
        if key == "data_fingerprint" and not was:
            continue  # recorded as unknown
        if key in ("fingerprint", "structure", "output_code") and (not was or not value):
            continue  # unknown on one side
        if was != value:
            what = RECORDED.get(key, key)
            if key in ("fingerprint", "structure", "output_code", "data_fingerprint"):
                out.append(f"{what} differ (recorded {key} {was}, here {value})")
            else:
                out.append(f"{what}: recorded {was!r}, here {value!r}")
    return out


def check_attributions(
    attributions: Mapping[str, Any],
    actual: Mapping[str, Any],
    *,
    check: bool,
    error: type[CoarError],
    use: str,
) -> None:
    """Refuse attributions recorded under other settings than ``actual`` describes.

    Parameters
    ----------
    attributions : named Attributions (``{"coar": attr, ...}``).
    actual : what the caller runs with: a subset of ``fingerprint`` (weights),
        ``structure``, ``output``, ``output_code``, ``mode``, ``means_fingerprint``,
        ``autocast`` and ``data_fingerprint`` (``coarpy._fingerprint.record``).
    check : False skips the comparison (the explicit override, ``check=False``).
    error : the error class to raise (``EvaluationError``, ``EditError``).
    use : what the caller does, for the message ("evaluate", "edit").

    Raises
    ------
    error
        Naming each attributions and each differing setting, and the two fixes.
    """
    if not check:
        return
    for name, attr in attributions.items():
        diffs = differences(attr.meta, actual)
        if not diffs:
            continue
        weights = any(d.startswith(RECORDED["fingerprint"]) for d in diffs)
        who = f"Attributions {name!r}" if name else "The attributions"
        lead = (
            f"{who} were fitted on a model with other weights"
            if weights
            else f"{who} were fitted under other settings"
        )
        raise error(
            f"{lead} than {use} is given: {'; '.join(diffs)}. Use the model and settings "
            f"they were fitted under, or pass check=False to {use} anyway (the results then "
            "describe another model than the attributions)."
        )
