"""Knowing when to stop collecting: the learning curve of a growing store, and a rule.

Masks are what COAR costs. As a store grows, :class:`StopRule` measures what the last
masks bought: it fits attributions on prefixes of the store's training rows (each
half the next) and scores them on the store's validation rows, per example. The
validation rows are a pure function of ``(seed, row index)``, so as the store grows
they grow with it and never enter a fit. The rule stops when doubling the training
masks raised the mean held-out Pearson r by less than ``r_gain``.

``collect(..., until=StopRule(...))`` checks the rule each time the store's finished
masks reach ``min_masks``, ``2 * min_masks``, ``4 * min_masks``, ... and stops after
the block that made a check say stop; ``n_masks`` stays the most it will collect. A
later ``collect`` on the same store resumes it (with ``until``, up to the next check).
Every check saves the curve next to the store as ``learning_curve.json``
(:func:`read_curve`), which ``coar status`` shows.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch

from . import _fs
from .errors import ArgumentError, CoarError, EvaluationError
from .store import ComponentDataset

CURVE = "learning_curve.json"  # next to the store's meta.json
_MIN_SIZE = 10  # the smallest prefix the curve fits on
_MAX_SIZES = 6


@dataclass(frozen=True)
class StopRule:
    """Stop collecting when doubling the masks raises held-out correlation too little.

    Parameters
    ----------
    r_gain : float
        Stop when the mean over examples of held-out Pearson r rose by less than this
        from fitting on half the training masks to fitting on all of them.
    min_masks : int
        Never stop before this many finished masks; the first check is there, and
        then every time the store doubles.
    val_fraction : float
        Share of the rows held out for scoring (a pure function of ``(seed, row)``).
    method : str
        The ``coarpy.fit`` method of the curve (no prior: the curve measures what the
        masks add; a prior fitted later only helps).
    seed : int
        Seed of the validation split.

    Examples
    --------
    >>> rule = StopRule(r_gain=0.005, min_masks=200)
    >>> [rule.next_check(n) for n in (0, 199, 200, 450)]
    [200, 200, 400, 800]
    """

    r_gain: float = 0.005
    min_masks: int = 200
    val_fraction: float = 0.2
    method: str = "group"
    seed: int = 0

    def __post_init__(self) -> None:
        from .regression import METHODS

        gain = self.r_gain
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not gain >= 0:
            raise ArgumentError(
                f"r_gain must be a number >= 0 (a gain in mean Pearson r), got {gain!r}. "
                "E.g. 0.005."
            )
        if (
            isinstance(self.min_masks, bool)
            or not isinstance(self.min_masks, int)
            or (self.min_masks < 2 * _MIN_SIZE)
        ):
            raise ArgumentError(
                f"min_masks must be an int >= {2 * _MIN_SIZE}, got {self.min_masks!r}."
            )
        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 < vf < 1:
            raise ArgumentError(f"val_fraction must be in (0, 1), got {vf!r}. E.g. 0.2.")
        if self.method not in METHODS:
            raise ArgumentError(f"method must be one of {METHODS}, got {self.method!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ArgumentError(f"seed must be an int >= 0, got {self.seed!r}.")

    def next_check(self, n_done: int) -> int:
        """The finished-mask count of the next check after ``n_done``: ``min_masks * 2**k``."""
        at = self.min_masks
        while at <= n_done:
            at *= 2
        return at

    def check(self, store: ComponentDataset, *, save: bool = True) -> dict[str, Any]:
        """Compute the store's learning curve and decide; save it as ``learning_curve.json``.

        Returns
        -------
        dict (JSON-ready): ``stop`` (bool), ``reason``, ``n_masks`` (finished),
        ``n_heldout``, ``gain`` and ``gain_se`` (mean r at all training rows minus at
        half of them, and its standard error over examples), ``points`` (per size:
        ``n_masks``, ``pearson_mean``, ``pearson_se``), ``rule`` and ``history`` (the
        earlier checks of this store, read from the saved file).

        Raises
        ------
        EvaluationError
            Too few validation rows (fewer than 3) for a correlation.
        """
        from .learning_curve import learning_curve, standard_error
        from .regression._stats import validation_rows

        rows = store.rows()  # (n,) int64, ascending
        V, Y = store.masks(), store.outputs()  # (n, N) bool, (n, E) float32
        is_val = validation_rows(rows, seed=self.seed, val_fraction=self.val_fraction)
        train_V, train_Y = V[~is_val], Y[~is_val]  # in row order: prefixes are early rows
        n_train = train_V.shape[0]
        sizes = [n_train >> k for k in range(_MAX_SIZES) if (n_train >> k) >= _MIN_SIZE]
        groups = None
        if self.method == "group":  # the store's modules, as fit(store) would group them
            spec = store.meta.get("components") or []
            groups = [str(g[0]) for g in spec for _ in range(int(g[2]))] or None
        curve = learning_curve(
            (train_V, train_Y), V[is_val], Y[is_val], sizes=sizes or [n_train],
            method=self.method, seed=self.seed, groups=groups,
        )  # fmt: skip
        mean, se = curve.mean_pearson.tolist(), curve.pearson_se.tolist()
        points = [
            {"n_masks": n, "pearson_mean": _num(m), "pearson_se": _num(s)}
            for n, m, s in zip(curve.sizes, mean, se, strict=True)
        ]
        gain = gain_se = None
        if len(curve.sizes) >= 2:
            diff = curve.pearson[-1] - curve.pearson[-2]  # (E,) paired over examples
            gain = _num(float(torch.nanmean(diff)))
            gain_se = _num(float(standard_error(diff)))
        n = int(rows.shape[0])
        if n < self.min_masks:
            stop, reason = False, f"{n} masks, fewer than min_masks {self.min_masks}"
        elif gain is None:
            stop, reason = False, "the gain is undefined (too few rows or constant outputs)"
        elif gain < self.r_gain:
            stop, reason = True, f"gain per doubling {gain:+.4f} < r_gain {self.r_gain}"
        else:
            stop, reason = False, f"gain per doubling {gain:+.4f} >= r_gain {self.r_gain}"
        previous = read_curve(store.path) if save else None
        history = list((previous or {}).get("history", []))
        history.append({"n_masks": n, "gain": gain, "gain_se": gain_se, "stop": stop})
        result = {
            "stop": stop,
            "reason": reason,
            "n_masks": n,
            "n_heldout": int(is_val.sum()),
            "method": self.method,
            "gain": gain,
            "gain_se": gain_se,
            "points": points,
            "rule": asdict(self),
            "history": history,
        }
        if save:
            path = _fs.path(store.path) / CURVE
            _fs.atomic_write(path, json.dumps(result, indent=1).encode())
        return result


def read_curve(store: str | os.PathLike | Any) -> dict[str, Any] | None:
    """The last saved check of the store at ``store`` (``learning_curve.json``), or None."""
    path = _fs.path(store) / CURVE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise CoarError(
            f"{path} is unreadable ({err}). Delete it: the next collect with until= "
            "writes it again."
        ) from err


def format_curve(curve: dict[str, Any]) -> list[str]:
    """Lines for ``coar status``: the curve's points and the last decision."""
    points = ", ".join(
        f"{p['n_masks']}: {_fmt(p['pearson_mean'])} +- {_fmt(p['pearson_se'])}"
        for p in curve["points"]
    )
    decision = "stop" if curve["stop"] else "continue"
    return [
        f"curve      held-out r ({curve['method']}, {curve['n_heldout']} held-out masks) by "
        f"training masks: {points}",
        f"stop rule  at {curve['n_masks']} masks: {decision} ({curve['reason']})",
    ]


class Watch:
    """Tells ``collect`` when a check is due (counting finished rows) and runs it."""

    def __init__(self, rule: StopRule, store: ComponentDataset):
        self.rule = rule
        self.path = store.path
        self.rows = len(store)
        self.checked_at = -1
        self.due_at = rule.next_check(self.rows)

    def add(self, n_rows: int) -> bool:
        """Count a finished block; True when a check is due."""
        self.rows += n_rows
        return self.rows >= self.due_at

    def check(self) -> bool:
        """Run the rule on the store as it is; True to stop (never on a failed check)."""
        self.checked_at = self.rows
        self.due_at = self.rule.next_check(self.rows)
        try:
            found = self.rule.check(ComponentDataset(self.path))
        except EvaluationError as err:
            warnings.warn(f"The stop rule could not score the store: {err}", stacklevel=3)
            return False
        return bool(found["stop"])

    def finish(self) -> None:
        """Save the curve of the final store unless the last check saw it already."""
        if self.rows != self.checked_at and self.rows >= self.rule.min_masks:
            self.check()


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
