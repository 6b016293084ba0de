"""The Edit record: which components an edit ablates, why, and what it did.

``make`` scores, selects and (with data) measures an edit in one call and returns an
:class:`Edit`. An Edit applies itself to the model it was made for (by component
name, through :func:`coarpy.ablation.apply_ablation`), and saves as JSON next to a
standard ``state_dict`` file of the edited model that loads without coarpy.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import _fs
from .. import outputs as _outputs
from .._fingerprint import model_fingerprint
from ..ablation import apply_ablation
from ..attributions import Attributions
from ..components import Components
from ..errors import ComponentError, EditError
from ..integrations import as_module
from ._checks import (
    Rows,
    check_compatible,
    check_direction,
    check_k,
    check_statistic,
    example_pairs,
    example_sets,
)
from .measuring import Metric, sweep
from .scoring import scores, select

FORMAT = "coarpy.edit"
VERSION = 1


@dataclass(frozen=True)
class Edit:
    """Which components an edit ablates, why, and what it did.

    Parameters
    ----------
    names : the ablated components' names, strongest score first.
    indices : their flat indices in the Components (same order).
    scores : their t scores (Welch's or paired, as ``meta["statistic"]`` says).
    direction : ``"raise"`` or ``"lower"``.
    targets, references : the example indices the scores compared.
    before, after : measured metrics of the unedited and the edited model (columns
        of a :func:`sweep` row); empty if nothing was measured.
    curve : an optional :func:`sweep` table, one dict per ``k``.
    meta : the attributions' method, the unedited model's fingerprint, and so on.
    """

    names: tuple[str, ...]
    indices: tuple[int, ...]
    scores: tuple[float, ...]
    direction: str
    targets: tuple[int, ...]
    references: tuple[int, ...]
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    curve: tuple[dict[str, float], ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_direction(self.direction)
        for name in ("names", "indices", "scores", "targets", "references", "curve"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not len(self.names) == len(self.indices) == len(self.scores):
            raise EditError(
                f"An Edit needs one name, index and score per component, got {len(self.names)} "
                f"names, {len(self.indices)} indices and {len(self.scores)} scores."
            )

    @property
    def k(self) -> int:
        """The number of components ablated."""
        return len(self.indices)

    def summary(self, *, max_names: int = 10) -> str:
        """A few lines: what was ablated, for whom, and the metrics before and after."""
        method = self.meta.get("method") or "?"
        lines = [
            f"Edit: ablate {self.k} component(s) to {self.direction} the outputs of "
            f"{len(self.targets)} target(s) relative to {len(self.references)} reference(s) "
            f"(attributions: {method})"
        ]
        shown = [f"{n} (t={s:+.3g})" for n, s in zip(self.names, self.scores, strict=True)][
            :max_names
        ]
        if shown:
            more = f", ... ({self.k - len(shown)} more)" if self.k > len(shown) else ""
            lines.append("  components: " + ", ".join(shown) + more)
        for column, value in self.after.items():
            if column in self.before:
                lines.append(f"  {column:<24} {self.before[column]:9.4f} -> {value:9.4f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready record (what :meth:`save` writes, less the state_dict entry)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "k": self.k,
            "direction": self.direction,
            "names": list(self.names),
            "indices": [int(i) for i in self.indices],
            "scores": [_json_float(s) for s in self.scores],
            "targets": [int(i) for i in self.targets],
            "references": [int(i) for i in self.references],
            "before": dict(self.before),
            "after": dict(self.after),
            "curve": [dict(r) for r in self.curve],
            "meta": dict(self.meta),
        }

    def apply_to(self, model: nn.Module, components: Components) -> nn.Module:
        """The edited copy of ``model``: these components, found by name, zeroed.

        Raises
        ------
        EditError
            If ``model`` is not the model the edit was made for (its recorded
            fingerprint differs) or a component name is unknown.
        """
        recorded = self.meta.get("fingerprint")
        if recorded and recorded != model_fingerprint(model):
            raise EditError(
                "This edit was made for a model with other weights (fingerprint "
                f"{recorded}, this model's is {model_fingerprint(model)}). Apply it to the "
                "unedited model it was made for."
            )
        try:
            return apply_ablation(model, components, list(self.names))
        except ComponentError as err:
            raise EditError(f"{err}. Apply the edit with the Components it was made with.") from err

    def save(self, path: str | os.PathLike, *, model: nn.Module | None = None) -> Path:
        """Write the edit to ``path`` (JSON) and, if given, ``model``'s state_dict beside it.

        The state_dict goes to ``path`` with the suffix ``.pt`` (``torch.save`` of
        ``model.state_dict()``; load it with ``torch.load(..., weights_only=True)`` or
        :func:`load_state_dict`). Pass the edited model (from :func:`apply` or
        :meth:`apply_to`). Files are replaced atomically.

        Returns
        -------
        Path of the JSON file.
        """
        path = Path(path)
        if path.suffix != ".json":
            raise EditError(f"Save an edit to a .json path (e.g. RUN/edits/fix.json), got {path}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = self.to_dict()
        doc["state_dict"] = None
        if model is not None:
            fingerprint = model_fingerprint(model)
            if self.k and fingerprint == self.meta.get("fingerprint"):
                raise EditError(
                    "model is the unedited model (its fingerprint is the one the edit was made "
                    "for). Pass the edited copy: edit.apply_to(model, components)."
                )
            buf = io.BytesIO()
            torch.save(model.state_dict(), buf)
            data = buf.getvalue()
            weights = path.with_suffix(".pt")
            _fs.atomic_write(weights, data)
            doc["state_dict"] = {
                "file": weights.name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "fingerprint": fingerprint,
            }
        _fs.atomic_write(path, json.dumps(doc, indent=1, allow_nan=False).encode())
        return path

    def save_pretrained(
        self,
        directory: str | os.PathLike,
        *,
        model: nn.Module,
        components: Components,
        **kwargs: Any,
    ) -> Path:
        """Save the edited Hugging Face model as ``transformers`` saves any model.

        Applies the edit to a copy of ``model`` (:meth:`apply_to`; ``model`` itself is
        untouched) and calls the copy's ``save_pretrained(directory, **kwargs)``, so
        ``AutoModel.from_pretrained(directory)`` loads the edited model without
        coarpy. The edit's record goes beside it as ``directory/coarpy_edit.json``.

        Parameters
        ----------
        directory : the folder to write (created if missing).
        model : the unedited ``transformers`` model the edit was made for (a
            ``PreTrainedModel``; an nnsight wrapper of one is unwrapped).
        components : the Components the edit was made with.
        **kwargs : passed to ``save_pretrained`` (``safe_serialization``, ...).

        Returns
        -------
        Path of the directory.

        Raises
        ------
        EditError
            ``model`` is not a Hugging Face model (no ``save_pretrained``), or not the
            model the edit was made for.
        """
        module = as_module(model)
        if not (callable(getattr(module, "save_pretrained", None)) and hasattr(module, "config")):
            raise EditError(
                f"save_pretrained needs a Hugging Face transformers model (a "
                f"PreTrainedModel), got {type(module).__name__}. For any other model save "
                "the weights: edit.save(path, model=edit.apply_to(model, components))."
            )
        edited = self.apply_to(module, components)
        directory = Path(directory)
        edited.save_pretrained(directory, **kwargs)
        self.save(directory / "coarpy_edit.json")
        return directory

    @classmethod
    def load(cls, path: str | os.PathLike) -> Edit:
        """Read an edit written by :meth:`save`.

        Raises
        ------
        EditError
            If the file is missing, not JSON, or not a coarpy edit.
        """
        doc = _read_doc(Path(path))
        return cls(
            names=doc["names"],
            indices=doc["indices"],
            scores=[_from_json_float(s) for s in doc["scores"]],
            direction=doc["direction"],
            targets=doc["targets"],
            references=doc["references"],
            before=doc.get("before") or {},
            after=doc.get("after") or {},
            curve=doc.get("curve") or (),
            meta=doc.get("meta") or {},
        )


def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The edited model's state_dict saved with the edit at ``path`` (the .json file).

    Loaded with ``weights_only=True`` and checked against the SHA-256 the edit records.

    Raises
    ------
    EditError
        If the edit was saved without a model, or the weights file is missing or altered.
    """
    path = Path(path)
    entry = _read_doc(path).get("state_dict")
    if not entry:
        raise EditError(
            f"{path} was saved without a model. Rebuild the edited model with "
            "Edit.load(path).apply_to(model, components)."
        )
    weights = path.with_name(entry["file"])
    if not weights.is_file():
        raise EditError(f"{weights}, the weights {path} names, does not exist; check the folder.")
    data = weights.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise EditError(
            f"{weights} does not match the checksum recorded in {path}; it was altered or "
            "belongs to another edit. Save the edit again."
        )
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _read_doc(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise EditError(f"{path} does not exist. Pass the .json file Edit.save wrote.")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EditError(f"{path} is not valid JSON ({err}); it is not a saved edit.") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise EditError(f"{path} is not a coarpy edit (expected format {FORMAT!r}).")
    if doc.get("version") != VERSION:
        raise EditError(
            f"{path} has edit format version {doc.get('version')!r}; this coarpy reads "
            f"version {VERSION}. Upgrade coarpy or make the edit again."
        )
    return doc


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _from_json_float(x: float | str) -> float:
    return float(x)


# -- one call ----------------------------------------------------------------------------------


def make(
    attributions: Attributions,
    model: nn.Module,
    components: Components,
    data: Any = None,
    *,
    targets: Rows,
    references: Rows | None = None,
    k: int,
    direction: str = "raise",
    statistic: str = "welch",
    output: _outputs.OutputFn | str = _outputs.margin,
    metrics: Mapping[str, Metric] | None = None,
    ks: Iterable[int] | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> Edit:
    """Score, select and (with ``data``) measure an edit of ``k`` components.

    Parameters
    ----------
    attributions, model, components, targets, references, direction, statistic, output,
    metrics, batch_size, progress : as for :func:`~coarpy.edit.sweep`.
    data : the attributions' examples. With it, ``before``/``after`` hold the measured
        metrics of the unedited and the edited model; without it they are empty and
        the model does not run.
    k : the number of components to ablate.
    ks : with ``data``, also record a sweep over these sizes in ``curve`` (``k`` and 0
        are added).

    Returns
    -------
    Edit; the edited model is ``edit.apply_to(model, components)``.

    Raises
    ------
    EditError
        Bad example sets, a bad ``k`` or direction, data or attributions of another model.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(2, 2))
    >>> comps = Components.from_spec(net, {"0": "linear"})
    >>> w = torch.tensor([[-1.0, 1.0], [0.0, 1.0], [2.0, 1.0]])  # 3 examples x 2 components
    >>> attr = Attributions(weights=w, bias=torch.zeros(3), names=comps.names)
    >>> e = make(attr, net, comps, targets=[0], references=[1, 2], k=1)
    >>> e.names, round(e.scores[0], 3)  # (-1 - 1) / sqrt(0 / 1 + 1 / 2)
    (('0:0',), -2.828)
    """
    attr = attributions
    check_direction(direction)
    check_compatible(attr, model, components)
    check_k(k, len(components))
    check_statistic(statistic)
    if statistic == "paired":
        t, r = example_pairs(targets, references, attr.n_examples)
    else:
        t, r = example_sets(targets, references, attr.n_examples)
    s = scores(attr, t, r, statistic=statistic)
    chosen = select(s, k, direction=direction)
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    curve: list[dict[str, float]] = []
    if data is not None:
        sizes = {0, k, *(ks or ())}
        curve = sweep(
            attr, model, components, data, targets=t, references=r, ks=sizes,
            direction=direction, statistic=statistic, output=output, metrics=metrics,
            batch_size=batch_size, progress=progress,
        )  # fmt: skip
        by_k = {row["k"]: row for row in curve}
        before = {c: v for c, v in by_k[0].items() if c != "k"}
        after = {c: v for c, v in by_k[k].items() if c != "k"}
        if ks is None:
            curve = []
    return Edit(
        names=[components.names[i] for i in chosen.tolist()],
        indices=chosen.tolist(),
        scores=s[chosen].tolist(),
        direction=direction,
        targets=t.tolist(),
        references=r.tolist(),
        before=before,
        after=after,
        curve=curve,
        meta={
            "method": attr.meta.get("method"),
            "statistic": statistic,
            "output": _outputs.name_of(_outputs.resolve(output)),
            "fingerprint": model_fingerprint(model),
            "n_components": len(components),
            **_ids(attr, t, r),
        },
    )


def _ids(attr: Attributions, targets: Tensor, references: Tensor) -> dict[str, list]:
    """The targets' and references' example ids, where the attributions name examples."""
    ids = attr.example_ids
    if ids is None:
        return {}
    return {
        "target_ids": [ids[i] for i in targets.tolist()],
        "reference_ids": [ids[i] for i in references.tolist()],
    }
