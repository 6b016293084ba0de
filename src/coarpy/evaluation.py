"""The result of an evaluation: held-out correlations per attributions, alpha and example.

:class:`Evaluation` is what ``coarpy.evaluate`` and ``evaluate_store`` return and what
``coar evaluate`` saves (``RUN/evaluation.json``, checksummed). Its summaries average
every attribution over the same examples. ``coarpy.evaluate`` re-exports it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _fs
from .errors import EvaluationError

DEFAULT_NAME = "coar"
_STATS = ("mean", "median", "q25", "q75")


class Correlations(NamedTuple):
    """One Attributions' per-example correlations at one alpha, each (n_examples,)."""

    pearson: Tensor
    spearman: Tensor


def _quartiles(r: Tensor) -> dict[str, float | None]:
    if torch.isnan(r).all():
        return dict.fromkeys(_STATS)
    q = torch.nanquantile(r, torch.tensor([0.5, 0.25, 0.75], dtype=r.dtype))
    values = [torch.nanmean(r), *q]
    return {k: float(v) for k, v in zip(_STATS, values, strict=True)}


def _digest(doc: dict) -> str:
    """SHA-256 of a saved evaluation's contents (every field but the digest itself)."""
    body = {k: v for k, v in doc.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _nan_to_none(x: Tensor) -> list:
    return [None if math.isnan(v) else v for v in x.flatten().tolist()]


@dataclass(frozen=True, eq=False, repr=False)
class Evaluation:
    """Held-out correlations of one or more Attributions at one or more alphas.

    Attributes
    ----------
    attribution_names : the name of each Attributions evaluated, in the order given
        (the keys of the mapping passed to ``evaluate``; ``"coar"`` for a lone one).
    alphas : ablation fractions of the held-out masks.
    n_masks : held-out masks per alpha.
    pearson : (n_attributions, n_alphas, n_examples) float64; NaN where undefined.
    spearman : same shape, Spearman's rho (average ranks for ties).
    n_constant : per alpha, the number of examples whose true output did not vary over
        the masks. Their correlation is undefined (NaN) and summaries leave them out.
    meta : how the masks were made (seed, sampler, output, mode, source).
    example_ids : one id per example (the data's, the store's or the attributions'),
        or None when the examples were not named.

    Summaries (:meth:`to_rows`, :meth:`summary`) average every attribution over the
    same examples: at each alpha, those where every attribution's correlation is
    defined. An example where one attribution predicts a constant is left out of all
    of them, and the summary says how many were left out and why.
    """

    attribution_names: tuple[str, ...]
    alphas: tuple[float, ...]
    n_masks: int
    pearson: Tensor
    spearman: Tensor
    n_constant: tuple[int, ...]
    meta: dict = field(default_factory=dict)
    example_ids: list[str | int] | None = None

    @property
    def n_examples(self) -> int:
        return self.pearson.shape[-1]

    def _where(self, attribution: str, alpha: float | None) -> tuple[int, int]:
        names = self.attribution_names
        if attribution not in names:
            raise EvaluationError(
                f"No attributions named {attribution!r} in this evaluation; it has "
                f"{list(names)}. Pass one of those names."
            )
        if alpha is None:
            if len(self.alphas) != 1:
                raise EvaluationError(
                    f"This evaluation has several alphas {list(self.alphas)}; pass alpha=."
                )
            return names.index(attribution), 0
        for a, value in enumerate(self.alphas):
            if math.isclose(value, alpha, rel_tol=1e-9, abs_tol=1e-12):
                return names.index(attribution), a
        raise EvaluationError(f"No alpha {alpha} in this evaluation; it has {list(self.alphas)}.")

    def per_example(
        self, attribution: str = DEFAULT_NAME, alpha: float | None = None
    ) -> Correlations:
        """Per-example Pearson and Spearman (:class:`Correlations`, each (n_examples,)) of
        the attributions named ``attribution`` at ``alpha``.

        ``alpha`` may be left out when the evaluation has one alpha.
        """
        m, a = self._where(attribution, alpha)
        return Correlations(self.pearson[m, a], self.spearman[m, a])

    def common(self, alpha: float | None = None) -> Tensor:
        """(n_examples,) bool: the examples every attribution is averaged over at
        ``alpha``, those where all of them have defined correlations."""
        a = self._where(self.attribution_names[0], alpha)[1]
        return self._common(a)

    def _common(self, a: int) -> Tensor:
        undefined = torch.isnan(self.pearson[:, a]) | torch.isnan(self.spearman[:, a])
        return ~undefined.any(0)

    def _flat_predictions(self, m: int, a: int) -> int:
        """Examples where attributions ``m`` alone lack a correlation (they predict a
        constant, or a non-finite value), beyond the constant true outputs."""
        own = torch.isnan(self.pearson[m, a]) | torch.isnan(self.spearman[m, a])
        return max(0, int(own.sum()) - self.n_constant[a])

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per (attribution, alpha): counts and mean/median/quartiles of both
        correlations; ``row["attribution"]`` is the name.

        At each alpha every attribution is averaged over the same ``n_defined``
        examples (:meth:`common`); the others are left out of all of them:
        ``n_constant`` for a constant true output, and ``n_flat`` where this
        attribution predicts a constant. Statistics over no example are None.
        """
        rows = []
        for m, name in enumerate(self.attribution_names):
            for a, alpha in enumerate(self.alphas):
                common = self._common(a)
                row: dict[str, Any] = {
                    "attribution": name,
                    "alpha": alpha,
                    "n_masks": self.n_masks,
                    "n_examples": self.n_examples,
                    "n_defined": int(common.sum()),
                    "n_constant": self.n_constant[a],
                    "n_flat": self._flat_predictions(m, a),
                }
                for metric in ("pearson", "spearman"):
                    stats = _quartiles(getattr(self, metric)[m, a][common])
                    row.update({f"{metric}_{k}": v for k, v in stats.items()})
                rows.append(row)
        return rows

    def summary(self) -> str:
        """A plain-text table: per attribution and alpha, mean/median/quartiles of both
        correlations."""
        head = (
            f"Held-out correlation per example over {self.n_masks} masks, "
            f"{self.n_examples} examples"
        )
        columns = ["attribution", "alpha", "n"] + [
            f"{metric[0]}_{stat}" for metric in ("pearson", "spearman") for stat in _STATS
        ]
        rows = self.to_rows()
        cells = [
            [
                r["attribution"],
                f"{r['alpha']:g}",
                str(r["n_defined"]),
                *(
                    "nan" if r[f"{m}_{s}"] is None else f"{r[f'{m}_{s}']:.3f}"
                    for m in ("pearson", "spearman")
                    for s in _STATS
                ),
            ]
            for r in rows
        ]
        widths = [max(len(c[i]) for c in [columns, *cells]) for i in range(len(columns))]
        lines = [head, ""]
        for c in [columns, *cells]:
            lines.append(
                "  ".join(
                    v.ljust(w) if i == 0 else v.rjust(w)
                    for i, (v, w) in enumerate(zip(c, widths, strict=True))
                ).rstrip()
            )
        excluded = [
            f"alpha={alpha:g}: {n}" for alpha, n in zip(self.alphas, self.n_constant, strict=True)
        ]
        lines += ["", "n = examples every attribution is averaged over (all correlations defined)."]
        if any(self.n_constant):
            lines.append(
                f"Left out for a constant true output over the masks: {', '.join(excluded)}."
            )
        flat = [
            f"{r['attribution']!r} at alpha={r['alpha']:g}: {r['n_flat']}"
            for r in rows
            if r["n_flat"]
        ]
        if flat:
            lines.append(
                "Left out of every average where an attribution predicts a constant output: "
                f"{', '.join(flat)}."
            )
        lines.append("p_ = Pearson, s_ = Spearman; q25/q75 are the quartiles.")
        return "\n".join(lines)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the evaluation as JSON (NaN as null), atomically, with a SHA-256 of its
        contents; :meth:`load` reads it back and checks it."""
        path = Path(path)
        doc = {
            "format": "coarpy.evaluation",
            "version": 2,  # 1 named the attributions "methods"
            "attribution_names": list(self.attribution_names),
            "alphas": list(self.alphas),
            "n_masks": self.n_masks,
            "n_examples": self.n_examples,
            "n_constant": list(self.n_constant),
            "meta": self.meta,
            "pearson": _nan_to_none(self.pearson),
            "spearman": _nan_to_none(self.spearman),
            "summary": self.to_rows(),
        }
        if self.example_ids is not None:
            doc["example_ids"] = list(self.example_ids)
        doc["sha256"] = _digest(doc)
        _fs.atomic_write(path, json.dumps(doc, indent=1).encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Evaluation:
        """Read an evaluation written by :meth:`save` (version 2, or 1 with "methods").

        Raises
        ------
        EvaluationError
            The file is not a saved evaluation, is damaged, or was edited (its
            SHA-256, when it records one, does not match).
        """
        path = Path(path)
        fix = "Evaluate again (coar evaluate RUN) to rewrite it."
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise EvaluationError(
                f"No saved evaluation at {path}. Evaluate first (coar evaluate RUN, or "
                "Evaluation.save)."
            ) from None
        try:
            doc = json.loads(raw.decode())
        except (UnicodeDecodeError, ValueError) as err:
            raise EvaluationError(f"{path} is not valid JSON ({err}). {fix}") from None
        if not isinstance(doc, dict) or doc.get("format") != "coarpy.evaluation":
            raise EvaluationError(
                f"{path} is not a saved coarpy evaluation (no 'format': 'coarpy.evaluation'). "
                "Write one with Evaluation.save."
            )
        if "sha256" in doc and doc["sha256"] != _digest(doc):
            raise EvaluationError(f"{path} fails its checksum: it was edited or damaged. {fix}")
        try:
            names = doc["attribution_names"] if "attribution_names" in doc else doc["methods"]
            shape = (len(names), len(doc["alphas"]), doc["n_examples"])

            def tensor(values: list) -> Tensor:
                flat = [math.nan if v is None else v for v in values]
                return torch.tensor(flat, dtype=torch.float64).reshape(shape)

            return cls(
                attribution_names=tuple(names),
                alphas=tuple(float(a) for a in doc["alphas"]),
                n_masks=int(doc["n_masks"]),
                pearson=tensor(doc["pearson"]),
                spearman=tensor(doc["spearman"]),
                n_constant=tuple(int(n) for n in doc["n_constant"]),
                meta=doc["meta"],
                example_ids=doc.get("example_ids"),
            )
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise EvaluationError(
                f"{path} is damaged: {type(err).__name__}: {err}. {fix}"
            ) from None

    def __repr__(self) -> str:
        return (
            f"Evaluation(attribution_names={list(self.attribution_names)}, "
            f"alphas={list(self.alphas)}, "
            f"n_masks={self.n_masks}, n_examples={self.n_examples})"
        )
