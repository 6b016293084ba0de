"""Attributions: the fitted linear models, one per example, over the components.

For example ``e`` the attribution predicts the output of the model with keep-mask ``v``
as ``bias[e] + weights[e] @ v`` (True / 1 keeps a component). Weights are on the raw
mask scale: ``weights[e, j]`` is the predicted change of the output when component
``j`` is kept rather than ablated, everything else fixed. A negative weight means the
component pulls the output down.

On disk an ``Attributions`` is a directory holding ``attributions.json`` (format tag,
version, shapes, component names, meta, and a SHA-256 of each array) and the arrays as
raw little-endian float32 in row-major order: ``weights.f32`` (n_examples x
n_components) and ``bias.f32`` (n_examples), readable anywhere with
``numpy.fromfile(path, "<f4").reshape(n_examples, n_components)``. Nothing is pickled,
so a file from an untrusted source cannot run code.

The layout is made for large results (ImageNet: 50,000 examples x 22,720 components,
4.5 GB): :meth:`Attributions.save` writes the weights straight from the tensor's memory
and :meth:`Attributions.load` memory-maps them (copy-on-write), so neither holds a
second copy; the checksums are computed a slice at a time. Format version 1 (one
``arrays.npz``, read with ``allow_pickle=False``) is still read.

Exports for tools that do not know coarpy (the ``export`` extra: ``pip install
'coarpy[export]'``): :meth:`Attributions.save_safetensors` (the arrays and a JSON
metadata header, for ``safetensors.numpy.load_file``), :meth:`Attributions.to_pandas`
and :meth:`Attributions.to_csv` (one row per example and component).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _checks, _fs
from .errors import ArgumentError, FitError, MaskError, MissingExtraError, StoreCorruptError

FORMAT = "coarpy.attributions"
VERSION = 2
_JSON_NAME = "attributions.json"
_WEIGHTS_NAME = "weights.f32"
_BIAS_NAME = "bias.f32"
_V1_ARRAYS_NAME = "arrays.npz"  # format version 1: weights and bias in one .npz
_DIGEST_STEP = 64 * 2**20  # bytes hashed at a time


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
    example_ids : list of str or int, optional
        One distinct id per row (the store's ``example_ids``, or the data's ``id``
        field); None when the examples were not named.

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
    example_ids: list[str | int] | None = None

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
        if self.example_ids is not None:
            try:
                ids = _checks.example_ids(self.example_ids, w.shape[0])
            except ArgumentError as err:
                raise FitError(f"Attributions.{err}") from None
            object.__setattr__(self, "example_ids", ids)

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
            raise ArgumentError(
                f"k must be an int >= 0 (how many components to return), got {k}. Pass e.g. "
                "k=10, or k=attr.n_components for all of them."
            )
        row = self.weights[example].cpu()
        order = torch.sort(row.abs(), descending=True, stable=True).indices[:k]
        return [(self.names[i], float(row[i])) for i in order.tolist()]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the attributions to the directory ``path`` (created if missing).

        Returns the directory. Existing files of a previous save are replaced atomically
        (the arrays first, then ``attributions.json``, which commits them). The weights are
        written from the tensor's own memory (after one copy to the host for a tensor on
        an accelerator), never serialised into a second buffer.
        """
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        weights = _as_le32(self.weights)
        bias = _as_le32(self.bias)
        header = {
            "format": FORMAT,
            "version": VERSION,
            "n_examples": self.n_examples,
            "n_components": self.n_components,
            "arrays": {
                "weights": {"file": _WEIGHTS_NAME, "dtype": "<f4", "shape": list(weights.shape)},
                "bias": {"file": _BIAS_NAME, "dtype": "<f4", "shape": list(bias.shape)},
            },
            "sha256": {"weights": _digest(weights), "bias": _digest(bias)},
            "names": self.names,
            "meta": self.meta,
        }
        if self.example_ids is not None:
            header["example_ids"] = self.example_ids
        header["header_sha256"] = _header_digest(header)
        _fs.atomic_write(root / _WEIGHTS_NAME, _raw(weights))
        _fs.atomic_write(root / _BIAS_NAME, _raw(bias))
        _fs.atomic_write(root / _JSON_NAME, json.dumps(header, allow_nan=False).encode())
        with contextlib.suppress(OSError):  # a version-1 save in the same directory
            (root / _V1_ARRAYS_NAME).unlink()
        return root

    def save_safetensors(self, path: str | os.PathLike) -> Path:
        """Write the weights and bias as one ``.safetensors`` file, for any reader.

        The file holds ``weights`` (n_examples x n_components) and ``bias``
        (n_examples), float32, and string metadata: ``format``
        (``"coarpy.attributions"``), ``names`` (the component names, a JSON list: column
        j of ``weights``), ``example_ids`` (a JSON list, or ``null``: row i) and
        ``meta`` (JSON). Read it without coarpy::

            from safetensors import safe_open
            with safe_open("attr.safetensors", "np") as f:
                weights = f.get_tensor("weights")
                names = json.loads(f.metadata()["names"])

        Needs ``safetensors`` (``pip install 'coarpy[export]'``). The file is
        serialised in memory first (one more copy of the weights), then written
        atomically.
        """
        st = _export_module("safetensors.numpy", "save_safetensors")
        metadata = {
            "format": FORMAT,
            "names": json.dumps(self.names),
            "example_ids": json.dumps(self.example_ids),
            "meta": json.dumps(self.meta, allow_nan=False),
        }
        arrays = {"weights": _as_le32(self.weights), "bias": _as_le32(self.bias)}
        path = Path(path)
        _fs.atomic_write(path, st.save(arrays, metadata=metadata))
        return path

    def to_pandas(self, *, wide: bool = False):
        """The weights as a pandas DataFrame.

        Parameters
        ----------
        wide : False (default) for the tidy form, one row per (example, component)
            with columns ``example``, ``component``, ``weight``, example-major; True for
            one row per example (indexed by ``example``) and one column per component.

        ``example`` is the example's id (:attr:`example_ids`) when the examples are
        named, else its row number. The bias is not included: it is ``self.bias``.
        Needs pandas (``pip install 'coarpy[export]'``).
        """
        pd = _export_module("pandas", "to_pandas")
        w = self.weights.detach().cpu().numpy()  # (E, N) float32
        if self.example_ids is None:
            examples = np.arange(self.n_examples)
        else:
            examples = np.asarray(self.example_ids, dtype=object)
        if wide:
            return pd.DataFrame(
                w, index=pd.Index(examples, name="example"), columns=pd.Index(self.names)
            )
        return pd.DataFrame(
            {
                "example": np.repeat(examples, self.n_components),
                "component": np.tile(np.asarray(self.names, dtype=object), self.n_examples),
                "weight": w.reshape(-1),
            }
        )

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the tidy table of :meth:`to_pandas` (``example,component,weight``, one
        row per example and component, example-major) as CSV. Weights are written in
        full precision, so they read back exactly. Needs pandas (``coarpy[export]``)."""
        frame = self.to_pandas()
        # as float64, whose shortest round-trip text holds every float32 exactly
        frame["weight"] = frame["weight"].astype(np.float64)
        path = Path(path)
        _fs.atomic_write(path, frame.to_csv(index=False).encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True) -> Attributions:
        """Read attributions written by :meth:`save` (format version 2, or 1).

        Parameters
        ----------
        path : str or PathLike
            The directory given to :meth:`save`.
        mmap : bool
            Memory-map the weights (copy-on-write: the tensor is writable, the file never
            changes) instead of reading them into memory. Default True: a 4.5 GB result
            is then never held twice, and pages are read as they are used.

        Raises
        ------
        StoreCorruptError
            If a file is missing, truncated, altered, or not a coarpy attributions file.
        """
        root = Path(path)
        jpath = root / _JSON_NAME
        if not jpath.is_file():
            raise StoreCorruptError(
                f"{jpath} does not exist. Expected a directory written by Attributions.save "
                f"holding {_JSON_NAME} and the arrays; check the path."
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
        version = header.get("version")
        if version == 1:
            weights, bias = _read_v1(root, jpath, header)
        elif version == VERSION:
            if header.get("header_sha256") != _header_digest(header):
                raise StoreCorruptError(
                    f"{jpath} does not match its own checksum: the names, settings or shapes "
                    "it records were altered or corrupted. Re-run the fit or restore the "
                    "file from a copy."
                )
            weights, bias = _read_v2(root, jpath, header, mmap=mmap)
        else:
            raise StoreCorruptError(
                f"{jpath} has format version {version!r}; this coarpy reads versions 1 and "
                f"{VERSION}. Upgrade coarpy or re-run the fit."
            )
        n_c = header.get("n_components")
        names = header.get("names")
        if not isinstance(names, list) or len(names) != n_c:
            raise StoreCorruptError(
                f"{jpath} records {n_c} components but "
                f"{len(names) if isinstance(names, list) else 'no list of'} names."
            )
        try:
            return cls(
                weights=torch.from_numpy(weights),
                bias=torch.from_numpy(bias),
                names=names,
                meta=header.get("meta") or {},
                example_ids=header.get("example_ids"),
            )
        except FitError as err:
            raise StoreCorruptError(f"{jpath}: {err}") from err


def _export_module(name: str, use: str) -> Any:
    """Import an optional export dependency, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as err:
        package = name.partition(".")[0]
        raise MissingExtraError(
            f"Attributions.{use} needs {package}, which is not installed. Install the "
            "export extra: pip install 'coarpy[export]'."
        ) from err


def _as_le32(t: Tensor) -> np.ndarray:
    """A C-contiguous little-endian float32 numpy view of ``t`` (a copy only if needed)."""
    arr = t.detach().cpu().numpy()
    return np.ascontiguousarray(arr, dtype=np.dtype("<f4"))


def _raw(arr: np.ndarray) -> memoryview:
    """The bytes of ``arr`` without copying them."""
    return memoryview(arr.reshape(-1).view(np.uint8))


def _digest(arr: np.ndarray) -> str:
    """SHA-256 of the array's bytes, hashed a slice at a time (no copy of the array)."""
    h = hashlib.sha256()
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    for i in range(0, flat.size, _DIGEST_STEP):
        h.update(memoryview(flat[i : i + _DIGEST_STEP]))
    return h.hexdigest()


def _header_digest(header: dict) -> str:
    """SHA-256 of the JSON header without its own checksum field (canonical key order)."""
    doc = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _check_digest(arr: np.ndarray, label: str, header: dict, where: Path, jpath: Path) -> None:
    digests = header.get("sha256") or {}
    if digests.get(label) != _digest(arr):
        raise StoreCorruptError(
            f"{where}: the {label} do not match the checksum recorded in {jpath}; the "
            "file was altered or corrupted. Re-run the fit or restore it from a copy."
        )


def _read_v2(root: Path, jpath: Path, header: dict, *, mmap: bool) -> tuple[np.ndarray, np.ndarray]:
    """Weights (memory-mapped or read) and bias of a version-2 directory, verified."""
    n_e, n_c = header.get("n_examples"), header.get("n_components")
    if not (isinstance(n_e, int) and isinstance(n_c, int) and n_e >= 0 and n_c >= 0):
        raise StoreCorruptError(
            f"{jpath} records n_examples={n_e!r}, n_components={n_c!r}; expected two ints "
            ">= 0. The file is corrupted; re-run the fit."
        )
    out = []
    files = (("weights", _WEIGHTS_NAME, (n_e, n_c)), ("bias", _BIAS_NAME, (n_e,)))
    for label, name, shape in files:
        p = root / name
        if not p.is_file():
            raise StoreCorruptError(
                f"{p} does not exist. Expected a directory written by Attributions.save "
                f"holding {_JSON_NAME}, {_WEIGHTS_NAME} and {_BIAS_NAME}; check the path."
            )
        want = 4 * int(np.prod(shape))
        size = p.stat().st_size
        if size != want:
            raise StoreCorruptError(
                f"{p} has {size} bytes, but {jpath} records {label} of shape {shape} float32 "
                f"({want} bytes): it is truncated or from another save. Re-run the fit or "
                "restore the file from a copy."
            )
        if want == 0:
            arr = np.zeros(shape, dtype=np.float32)
        elif mmap:
            arr = np.memmap(p, dtype=np.dtype("<f4"), mode="c", shape=shape)
        else:
            arr = np.fromfile(p, dtype=np.dtype("<f4")).reshape(shape)
        _check_digest(arr, label, header, p, jpath)
        out.append(arr.astype(np.float32, copy=False))
    return out[0], out[1]


def _read_v1(root: Path, jpath: Path, header: dict) -> tuple[np.ndarray, np.ndarray]:
    """Weights and bias of a version-1 directory (``arrays.npz``), verified."""
    apath = root / _V1_ARRAYS_NAME
    if not apath.is_file():
        raise StoreCorruptError(
            f"{apath} does not exist. Expected a directory written by Attributions.save "
            f"holding {_JSON_NAME} and {_V1_ARRAYS_NAME}; check the path."
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
    for label, arr in (("weights", weights), ("bias", bias)):
        _check_digest(arr, label, header, apath, jpath)
    return weights, bias
