"""A store's consolidated copy: its finished rows as two contiguous, checksummed .npy files.

::

    RUN/consolidated/masks.npy     (rows, ceil(N/8)) uint8, the packed masks
    RUN/consolidated/outputs.npy   (rows, E) float32
    RUN/consolidated/blocks.json   which blocks, n_masks, identity, SHA-256 of both files

The copy is read (memory-mapped) only while ``blocks.json`` describes the store's
finished blocks now and both files match their SHA-256; otherwise the store reads its
blocks. Files are written under fresh names created exclusively (never through a
symlink), fsynced and renamed into place; ``blocks.json`` is written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from . import _fs
from .errors import StoreCorruptError

INFO = "blocks.json"
_FILES = ("masks", "outputs")


def write(
    folder: Path,
    rows: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    shapes: dict[str, tuple[int, int]],
    record: dict,
) -> None:
    """Write the copy: ``rows`` yields (packed masks uint8, outputs float32) per block,
    ``shapes`` gives each file's final shape, ``record`` what ``blocks.json`` notes."""
    if folder.is_symlink():
        raise StoreCorruptError(
            f"{folder} is a symbolic link; consolidate() writes only inside the store. "
            "Remove the link and call consolidate() again."
        )
    folder.mkdir(exist_ok=True)
    dtypes = {"masks": np.uint8, "outputs": np.float32}
    files, sums, temps = {}, {}, []
    try:
        for name in _FILES:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.npy~", suffix=".tmp", dir=folder)
            temps.append(tmp)
            os.fchmod(fd, 0o644)
            files[name] = os.fdopen(fd, "wb")
            head = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                head,
                {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(dtypes[name])),
                    "fortran_order": False,
                    "shape": shapes[name],
                },
            )
            files[name].write(head.getvalue())
            sums[name] = hashlib.sha256(head.getvalue())
        for packed, outputs in rows:
            for name, data in (("masks", packed), ("outputs", outputs)):
                raw = np.ascontiguousarray(data, dtype=dtypes[name]).tobytes()
                files[name].write(raw)
                sums[name].update(raw)
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for name, tmp in zip(_FILES, temps, strict=True):
            os.replace(tmp, folder / f"{name}.npy")
    except OSError as err:
        raise _fs.storage_error(err, folder, 0) from err
    finally:
        for f in files.values():
            f.close()
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    info = {**record, "sha256": {name: h.hexdigest() for name, h in sums.items()}}
    _fs.atomic_write(folder / INFO, json.dumps(info).encode())


def current(folder: Path, record: dict) -> dict | None:
    """``blocks.json`` if the copy describes ``record`` (the finished blocks now)."""
    try:
        info = json.loads((folder / INFO).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or any(info.get(k) != v for k, v in record.items()):
        return None
    sums = info.get("sha256")
    if not (isinstance(sums, dict) and all(isinstance(sums.get(k), str) for k in _FILES)):
        return None
    return info


def stat_key(folder: Path) -> tuple | None:
    """What identifies the two files' current contents (inode, size, time), or None."""
    try:
        stats = [os.stat(folder / f"{name}.npy") for name in _FILES]
    except OSError:
        return None
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


def problem(folder: Path, info: dict) -> str | None:
    """Why the copy ``info`` describes cannot be used (a file altered or missing), or None."""
    for name in _FILES:
        path = folder / f"{name}.npy"
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError:
            return f"{path} is missing or unreadable"
        if h.hexdigest() != info["sha256"][name]:
            return f"{path} fails its checksum: its bytes were altered"
    return None


def load(folder: Path, shapes: dict[str, tuple[int, int]]) -> tuple[np.ndarray, np.ndarray] | None:
    """The two arrays, memory-mapped copy-on-write, or None if they have other shapes."""
    # copy-on-write maps: torch tensors over them are writable (a read-only map makes
    # torch warn, and writing through it would crash); the files never change
    try:
        arrays = [
            np.load(folder / f"{name}.npy", mmap_mode="c", allow_pickle=False) for name in _FILES
        ]
    except (OSError, ValueError):
        return None
    if any(a.shape != shapes[name] for a, name in zip(arrays, _FILES, strict=True)):
        return None
    return arrays[0], arrays[1]


def remove(folder: Path) -> None:
    """Delete the copy (its files; the folder stays)."""
    for name in (INFO, *(f"{n}.npy" for n in _FILES)):
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
