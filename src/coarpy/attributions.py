"""Attributions: the fitted linear models, one per example, over the components.

For example ``e`` the attribution predicts the output of the model with keep-mask ``v``
as ``bias[e] + weights[e] @ v`` (True / 1 keeps a component). Weights are on the raw
mask scale: ``weights[e, j]`` is the predicted change of the output when component
``j`` is kept rather than ablated, everything else fixed. A negative weight means the
component pulls the output down.

On disk an ``Attributions`` is a directory holding ``arrays.npz`` (weights and bias as
float32, written by ``numpy.savez`` and read with ``allow_pickle=False``) and
``attributions.json`` (format tag, shapes, component names, meta, and a SHA-256 of each
array). Nothing is pickled, so a file from an untrusted source cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _fs
from .errors import FitError, MaskError, StoreCorruptError

FORMAT = "coarpy.attributions"
VERSION = 1
_JSON_NAME = "attributions.json"
_ARRAYS_NAME = "arrays.npz"


@dataclass(frozen=True, eq=False, repr=False)
class Attributions:
    """One linear model per example: ``output[e] ~ bias[e] + weights[e] @ keep``.

    Parameters
    ----------
    weights : Tensor, shape (n_examples, n_components)
        Stored as float32 on the device given.
    bias : Tensor, shape (n_examples,)
        Stored as float32.
    names : list of str
        The components' printable names (``"features.0:17"``), one per column.
    meta : dict
        JSON-able record of how the attributions were fitted (method, chosen ``l2``
        per example, split sizes, the store's own meta, ...).

    Examples
    --------
    >>> import torch
    >>> attr = Attributions(
    ...     weights=torch.tensor([[2.0, -3.0, 0.5]]),
    ...     bias=torch.tensor([1.0]),
    ...     names=["fc:0", "fc:1", "fc:2"],
    ... )
    >>> attr.predict(torch.tensor([[True, False, True], [True, True, True]]))
    tensor([[3.5000],
            [0.5000]])
    >>> attr.top(0, k=2)
    [('fc:1', -3.0), ('fc:0', 2.0)]
    """

    weights: Tensor
    bias: Tensor
    names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        w, b = self.weights, self.bias
        for label, t in (("weights", w), ("bias", b)):
            if not isinstance(t, Tensor):
                raise FitError(
                    f"Attributions.{label} must be a torch.Tensor, got {type(t).__name__}. "
                    f"Convert it with torch.as_tensor({label})."
                )
            if not t.is_floating_point():
                raise FitError(
                    f"Attributions.{label} must be floating point, got dtype {t.dtype}. "
                    f"Convert it with {label}.float()."
                )
        if w.ndim != 2:
            raise FitError(
                f"Attributions.weights must have shape (n_examples, n_components), got "
                f"{tuple(w.shape)}. Use weights[None] for a single example."
            )
        if b.shape != (w.shape[0],):
            raise FitError(
                f"Attributions.bias must have shape ({w.shape[0]},) to match weights of shape "
                f"{tuple(w.shape)}, got {tuple(b.shape)}. Give one bias per example."
            )
        if not isinstance(self.names, (list, tuple)) or not all(
            isinstance(n, str) for n in self.names
        ):
            raise FitError(
                "Attributions.names must be a list of str (component names), got "
                f"{type(self.names).__name__}. Use Components.names, or [str(i) for i in ...]."
            )
        if len(self.names) != w.shape[1]:
            raise FitError(
                f"Attributions.names has {len(self.names)} names but weights has {w.shape[1]} "
                "columns (components). Give exactly one name per component."
            )
        if not isinstance(self.meta, dict):
            raise FitError(f"Attributions.meta must be a dict, got {type(self.meta).__name__}.")
        try:
            json.dumps(self.meta, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise FitError(
                f"Attributions.meta must be JSON-able (it is saved as JSON): {err}. Convert "
                "tensors with .tolist() and paths with str()."
            ) from err
        # Normalise storage: detached float32, so predict/save never depend on the caller's dtype.
        object.__setattr__(self, "weights", w.detach().to(torch.float32).contiguous())
        object.__setattr__(self, "bias", b.detach().to(torch.float32, copy=False).contiguous())
        object.__setattr__(self, "names", list(self.names))

    @property
    def n_examples(self) -> int:
        """Number of examples E (rows of ``weights``)."""
        return self.weights.shape[0]

    @property
    def n_components(self) -> int:
        """Number of components N (columns of ``weights``)."""
        return self.weights.shape[1]

    def __repr__(self) -> str:
        method = self.meta.get("method", "?")
        return (
            f"Attributions(n_examples={self.n_examples}, n_components={self.n_components}, "
            f"method={method!r})"
        )

    def predict(self, keep: Tensor) -> Tensor:
        """Predicted outputs of every example under the given keep-masks.

        Parameters
        ----------
        keep : Tensor, shape (n_masks, n_components) or (n_components,)
            Bool (True keeps a component) or float in [0, 1].

        Returns
        -------
        Tensor, shape (n_masks, n_examples) or (n_examples,), float32
            ``keep.float() @ weights.T + bias``.

        Raises
        ------
        MaskError
            If ``keep`` is not a tensor, has the wrong width, or a non-float, non-bool dtype.
        """
        n = self.n_components
        if not isinstance(keep, Tensor):
            raise MaskError(
                f"keep must be a torch.Tensor of shape (n_masks, {n}), got "
                f"{type(keep).__name__}. Convert it with torch.as_tensor(keep)."
            )
        if keep.dtype != torch.bool and not keep.is_floating_point():
            raise MaskError(
                f"keep must be bool (True keeps a component) or float, got dtype {keep.dtype}. "
                "Convert it with keep.bool()."
            )
        if keep.ndim not in (1, 2) or keep.shape[-1] != n:
            raise MaskError(
                f"keep must have shape (n_masks, {n}) or ({n},) for these {n} components, got "
                f"{tuple(keep.shape)}. Build masks over the components the attributions were "
                "fitted on."
            )
        k = keep.to(device=self.weights.device, dtype=torch.float32)
        return k @ self.weights.T + self.bias

    def top(self, example: int, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` components with the largest ``|weight|`` for one example.

        Parameters
        ----------
        example : int
            Row of ``weights`` (negative values count from the end).
        k : int
            How many to return; all components if ``k`` exceeds their number.

        Returns
        -------
        list of (name, weight)
            Sorted by ``|weight|`` descending (ties by component index); signs are kept.
        """
        if not -self.n_examples <= example < self.n_examples:
            raise IndexError(
                f"example {example} is out of range for {self.n_examples} examples; "
                f"use 0 ... {self.n_examples - 1}."
            )
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}.")
        row = self.weights[example].cpu()
        order = torch.sort(row.abs(), descending=True, stable=True).indices[:k]
        return [(self.names[i], float(row[i])) for i in order.tolist()]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the attributions to the directory ``path`` (created if missing).

        Returns the directory. Existing files of a previous save are replaced atomically.
        """
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        weights = self.weights.cpu().numpy()
        bias = self.bias.cpu().numpy()
        buf = io.BytesIO()
        np.savez(buf, weights=weights, bias=bias)
        header = {
            "format": FORMAT,
            "version": VERSION,
            "n_examples": self.n_examples,
            "n_components": self.n_components,
            "sha256": {"weights": _digest(weights), "bias": _digest(bias)},
            "names": self.names,
            "meta": self.meta,
        }
        _fs.atomic_write(root / _ARRAYS_NAME, buf.getvalue())
        _fs.atomic_write(root / _JSON_NAME, json.dumps(header, allow_nan=False).encode())
        return root

    @classmethod
    def load(cls, path: str | os.PathLike) -> Attributions:
        """Read attributions written by :meth:`save`.

        Raises
        ------
        StoreCorruptError
            If a file is missing, truncated, altered, or not a coarpy attributions file.
        """
        root = Path(path)
        jpath, apath = root / _JSON_NAME, root / _ARRAYS_NAME
        for p in (jpath, apath):
            if not p.is_file():
                raise StoreCorruptError(
                    f"{p} does not exist. Expected a directory written by Attributions.save "
                    f"holding {_JSON_NAME} and {_ARRAYS_NAME}; check the path."
                )
        try:
            header = json.loads(jpath.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StoreCorruptError(
                f"{jpath} is not valid JSON ({err}); the file is corrupted or not a coarpy "
                "attributions file. Re-run the fit or restore the file from a copy."
            ) from err
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            got = header.get("format") if isinstance(header, dict) else type(header).__name__
            raise StoreCorruptError(
                f"{jpath} is not a coarpy attributions file: expected format {FORMAT!r}, got "
                f"{got!r}. Load it with the tool that wrote it."
            )
        if header.get("version") != VERSION:
            raise StoreCorruptError(
                f"{jpath} has format version {header.get('version')!r}; this coarpy reads "
                f"version {VERSION}. Upgrade coarpy or re-run the fit."
            )
        try:
            with np.load(apath, allow_pickle=False) as npz:
                keys = set(npz.files)
                if keys != {"weights", "bias"}:
                    raise StoreCorruptError(
                        f"{apath} holds arrays {sorted(keys)}, expected ['bias', 'weights']. "
                        "The file is not from Attributions.save; re-run the fit."
                    )
                weights, bias = npz["weights"], npz["bias"]
        except StoreCorruptError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise StoreCorruptError(
                f"{apath} cannot be read as .npz ({err}); it is truncated or corrupted. "
                "Re-run the fit or restore the file from a copy."
            ) from err
        n_e, n_c = header.get("n_examples"), header.get("n_components")
        if weights.dtype != np.float32 or weights.shape != (n_e, n_c):
            raise StoreCorruptError(
                f"{apath}: weights have shape {weights.shape} and dtype {weights.dtype}, but "
                f"{jpath} records ({n_e}, {n_c}) float32. The two files do not belong together."
            )
        if bias.dtype != np.float32 or bias.shape != (n_e,):
            raise StoreCorruptError(
                f"{apath}: bias has shape {bias.shape} and dtype {bias.dtype}, expected "
                f"({n_e},) float32. The two files do not belong together."
            )
        digests = header.get("sha256") or {}
        for label, arr in (("weights", weights), ("bias", bias)):
            if digests.get(label) != _digest(arr):
                raise StoreCorruptError(
                    f"{apath}: the {label} do not match the checksum recorded in {jpath}; the "
                    "file was altered or corrupted. Re-run the fit or restore it from a copy."
                )
        names = header.get("names")
        if not isinstance(names, list) or len(names) != n_c:
            raise StoreCorruptError(
                f"{jpath} records {n_c} components but "
                f"{len(names) if isinstance(names, list) else 'no list of'} names."
            )
        return cls(
            weights=torch.from_numpy(weights),
            bias=torch.from_numpy(bias),
            names=names,
            meta=header.get("meta") or {},
        )


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
