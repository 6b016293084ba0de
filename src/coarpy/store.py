"""The on-disk component dataset: a directory of blocks of (masks, outputs).

Layout::

    RUN/meta.json            settings; a resume with other settings is refused
    RUN/blocks/b000017.blk   rows 17*B .. 18*B-1: packed masks + outputs + checksum
    RUN/consolidated/        optional contiguous copies for memory-mapped reading

A block is the unit of work and of commit. It is written to a temporary name,
fsynced and renamed into place, so it either exists whole or not at all: a killed
worker loses at most the block it was computing, and two workers computing the same
block write identical bytes (masks are a function of (seed, row)). Block files are
plain binary read with numpy: nothing is ever unpickled.

Block file: magic ``COARBLK1``, a little-endian header (block, first_row, n_rows,
n_components, n_examples, dtype code), the packed masks (n_rows, ceil(N/8)) uint8,
the outputs (n_rows, n_examples) float32 or float16, then a SHA-256 of all of it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _fs
from . import masks as _masks
from .errors import StoreCorruptError, StoreMismatchError

FORMAT_VERSION = 1
_MAGIC = b"COARBLK1"
_HEADER = struct.Struct("<QQQQQB")
_DTYPES = {"float32": (0, np.float32), "float16": (1, np.float16)}
_DTYPE_BY_CODE = {code: (name, np_dtype) for name, (code, np_dtype) in _DTYPES.items()}
_DIGEST = 32

# Settings that must agree for a resume; n_masks may grow.
_IDENTITY = (
    "format_version",
    "n_components",
    "n_examples",
    "alpha",
    "sampler",
    "seed",
    "block_size",
    "output",
    "mode",
    "dtype",
    "fingerprint",
    "data_fingerprint",
    "means_fingerprint",
    "components",
)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "format_version": (int,),
    "n_components": (int,),
    "n_examples": (int,),
    "n_masks": (int,),
    "alpha": (int, float),
    "sampler": (str,),
    "seed": (int,),
    "block_size": (int,),
    "output": (str,),
    "mode": (str,),
    "dtype": (str,),
    "fingerprint": (str,),
    "data_fingerprint": (str,),
    "components": (list,),
}


def _check_meta(meta: Any, where: Path) -> dict:
    if not isinstance(meta, dict):
        raise StoreCorruptError(f"{where} should hold a JSON object, got {type(meta).__name__}.")
    for field, types in _FIELD_TYPES.items():
        if field not in meta:
            raise StoreCorruptError(
                f"{where} lacks the field {field!r}. The file was edited or is not a coarpy "
                "store; restore it or start a new store directory."
            )
        value = meta[field]
        if not isinstance(value, types) or isinstance(value, bool):
            raise StoreCorruptError(
                f"{where}: field {field!r} should be {types[0].__name__}, got "
                f"{type(value).__name__} {value!r}. Restore the file or start a new store."
            )
    if meta["format_version"] != FORMAT_VERSION:
        raise StoreCorruptError(
            f"{where} has format version {meta['format_version']}; this coarpy reads "
            f"version {FORMAT_VERSION}. Use the coarpy version that wrote it."
        )
    checks = [
        ("n_components", meta["n_components"] >= 1),
        ("n_examples", meta["n_examples"] >= 1),
        ("n_masks", meta["n_masks"] >= 0),
        ("block_size", meta["block_size"] >= 1),
        ("seed", meta["seed"] >= 0),
        ("alpha", 0 <= meta["alpha"] <= 1),
        ("sampler", meta["sampler"] in _masks.SAMPLERS),
        ("dtype", meta["dtype"] in _DTYPES),
    ]
    for field, ok in checks:
        if not ok:
            raise StoreCorruptError(
                f"{where}: field {field!r} has an impossible value {meta[field]!r}. Restore "
                "the file or start a new store directory."
            )
    for group in meta["components"]:
        if not (
            isinstance(group, list)
            and len(group) == 3
            and isinstance(group[0], str)
            and isinstance(group[1], str)
            and isinstance(group[2], int)
            and not isinstance(group[2], bool)
            and group[2] >= 1
        ):
            raise StoreCorruptError(
                f"{where}: field 'components' should list [module, kind, n_units] groups, "
                f"got the entry {_short(group)}. Restore the file or start a new store."
            )
    if sum(g[2] for g in meta["components"]) != meta["n_components"]:
        raise StoreCorruptError(
            f"{where}: the component groups add up to {sum(g[2] for g in meta['components'])}"
            f" units, but n_components is {meta['n_components']}. Restore the file."
        )
    return meta


class ComponentDataset:
    """A component dataset on disk: masks and the outputs of the ablated model.

    Open an existing one with ``ComponentDataset(path)``; ``create`` makes a new one
    or reopens a compatible one (``collect`` calls it).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = _fs.path(path)  # a Path, or a RemotePath for s3://, gs://, ...
        meta_path = self.path / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(
                f"No component dataset at {self.path} (no meta.json). Create one with "
                "coarpy.collect(...) or check the path."
            )
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreCorruptError(
                f"{meta_path} is not valid JSON ({err}). Restore it or start a new store."
            ) from err
        self.meta: dict = _check_meta(meta, meta_path)
        self._names: list[str] | None = None
        self._row_bytes = math.ceil(self.n_components / 8)
        self._np_dtype = _DTYPES[self.meta["dtype"]][1]

    # -- creation -----------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        components: list,
        n_examples: int,
        n_masks: int,
        alpha: float,
        seed: int,
        sampler: str = "bernoulli",
        block_size: int = 100,
        output: str = "margin",
        mode: str = "zero",
        dtype: str = "float32",
        fingerprint: str = "",
        data_fingerprint: str = "",
        means_fingerprint: str = "",
        overwrite: bool = False,
        extra: dict | None = None,
    ) -> ComponentDataset:
        """Create a store, or reopen the one at ``path`` if its settings agree.

        ``components`` is ``Components.to_dict()["groups"]``. A store with other
        settings is refused (``StoreMismatchError`` naming the fields) unless
        ``overwrite``, which deletes its blocks first. A larger ``n_masks`` grows it.
        """
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}.")
        _masks._check(sum(g[2] for g in components), alpha, sampler)
        if block_size < 1 or n_masks < 0:
            raise ValueError(
                f"block_size must be >= 1 and n_masks >= 0, got {block_size} and {n_masks}."
            )
        path = _fs.path(path)
        meta = {
            "format_version": FORMAT_VERSION,
            "n_components": int(sum(g[2] for g in components)),
            "n_examples": int(n_examples),
            "n_masks": int(n_masks),
            "alpha": float(alpha),
            "sampler": sampler,
            "seed": int(seed),
            "block_size": int(block_size),
            "output": output,
            "mode": mode,
            "dtype": dtype,
            "fingerprint": fingerprint,
            "data_fingerprint": data_fingerprint,
            "means_fingerprint": means_fingerprint,
            "components": [list(g) for g in components],
            "created": {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "host": platform.node(),
                "torch": torch.__version__,
            },
            **(extra or {}),
        }
        meta_path = path / "meta.json"
        if meta_path.exists():
            existing = cls(path)
            # means_fingerprint may be absent (stores written before it existed): ""
            diffs = [f for f in _IDENTITY if existing.meta.get(f, "") != meta[f]]
            if diffs and not overwrite:
                parts = [
                    f"{f}: stored {_short(existing.meta.get(f))}, given {_short(meta[f])}"
                    for f in diffs
                ]
                raise StoreMismatchError(
                    f"{meta_path} was written with other settings ({'; '.join(parts)}). "
                    "Resume with the settings and model the store was built from, pass "
                    "overwrite=True to discard it, or use a new directory."
                )
            if diffs:
                existing._clear_blocks()
                _fs.atomic_write(meta_path, json.dumps(meta, indent=1).encode())
            elif n_masks > existing.meta["n_masks"]:
                existing.meta["n_masks"] = int(n_masks)
                _fs.atomic_write(meta_path, json.dumps(existing.meta, indent=1).encode())
            return cls(path)
        (path / "blocks").mkdir(parents=True, exist_ok=True)
        if not _fs.write_new(meta_path, json.dumps(meta, indent=1).encode()):
            # another worker created it first: reopen it (or refuse a mismatch)
            return cls.create(
                path, components=components, n_examples=n_examples, n_masks=n_masks,
                alpha=alpha, seed=seed, sampler=sampler, block_size=block_size,
                output=output, mode=mode, dtype=dtype, fingerprint=fingerprint,
                data_fingerprint=data_fingerprint, means_fingerprint=means_fingerprint,
                overwrite=overwrite, extra=extra,
            )  # fmt: skip
        return cls(path)

    def _clear_blocks(self) -> None:
        for f in (self.path / "blocks").glob("*.blk"):
            f.unlink()
        cons = self.path / "consolidated"
        if cons.exists():
            for f in cons.iterdir():
                f.unlink()

    # -- settings -----------------------------------------------------------------
    @property
    def n_components(self) -> int:
        return self.meta["n_components"]

    @property
    def n_examples(self) -> int:
        return self.meta["n_examples"]

    @property
    def n_masks(self) -> int:
        """The number of masks the run aims for (finished rows: ``len(self)``)."""
        return self.meta["n_masks"]

    @property
    def block_size(self) -> int:
        return self.meta["block_size"]

    @property
    def alpha(self) -> float:
        return self.meta["alpha"]

    @property
    def seed(self) -> int:
        return self.meta["seed"]

    @property
    def names(self) -> list[str]:
        if self._names is None:
            self._names = [f"{m}:{u}" for m, _, n in self.meta["components"] for u in range(n)]
        return self._names

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.n_masks / self.block_size)

    def block_rows(self, block: int) -> tuple[int, int]:
        """First row and one past the last row of ``block``."""
        start = block * self.block_size
        return start, min(start + self.block_size, self.n_masks)

    def block_path(self, block: int) -> Path:
        return self.path / "blocks" / f"b{block:06d}.blk"

    def _expected_size(self, n_rows: int) -> int:
        item = np.dtype(self._np_dtype).itemsize
        return (
            len(_MAGIC)
            + _HEADER.size
            + n_rows * (self._row_bytes + self.n_examples * item)
            + _DIGEST
        )

    # -- state --------------------------------------------------------------------
    def is_done(self, block: int) -> bool:
        """True iff the block's file exists with the size its rows need."""
        start, stop = self.block_rows(block)
        try:
            return self.block_path(block).stat().st_size == self._expected_size(stop - start)
        except FileNotFoundError:
            return False

    def _damaged(self, block: int) -> bool:
        """True if the block's file exists with a size no block of this store can have.

        A shorter block left from before ``n_masks`` grew is not damaged: it is a
        finished block of the smaller run, which the next ``collect`` recomputes.
        Anything else (truncated, appended to) is damage, never read as data.
        """
        start, stop = self.block_rows(block)
        try:
            size = self.block_path(block).stat().st_size
        except FileNotFoundError:
            return False
        if size == self._expected_size(stop - start):
            return False
        per_row = self._expected_size(1) - self._expected_size(0)
        rows, rest = divmod(size - self._expected_size(0), per_row)
        return not (rest == 0 and 0 < rows < stop - start)

    def done_blocks(self) -> list[int]:
        return [b for b in range(self.n_blocks) if self.is_done(b)]

    def missing_blocks(self) -> list[int]:
        return [b for b in range(self.n_blocks) if not self.is_done(b)]

    def __len__(self) -> int:
        return sum(self.block_rows(b)[1] - self.block_rows(b)[0] for b in self.done_blocks())

    def progress(self) -> dict:
        """Finished and total rows and blocks, and the time of the last finished block."""
        done = self.done_blocks()
        rows = sum(self.block_rows(b)[1] - self.block_rows(b)[0] for b in done)
        times = [self.block_path(b).stat().st_mtime for b in done]
        return {
            "done_rows": rows,
            "n_masks": self.n_masks,
            "done_blocks": len(done),
            "n_blocks": self.n_blocks,
            "fraction": rows / self.n_masks if self.n_masks else 1.0,
            "first_block_time": min(times) if times else None,
            "last_block_time": max(times) if times else None,
        }

    # -- blocks -------------------------------------------------------------------
    def encode_block(self, block: int, keep: Tensor, outputs: Tensor) -> bytes:
        start, stop = self.block_rows(block)
        n_rows = stop - start
        if tuple(keep.shape) != (n_rows, self.n_components):
            raise ValueError(
                f"Block {block} needs masks of shape ({n_rows}, {self.n_components}), got "
                f"{tuple(keep.shape)}."
            )
        if tuple(outputs.shape) != (n_rows, self.n_examples):
            raise ValueError(
                f"Block {block} needs outputs of shape ({n_rows}, {self.n_examples}), got "
                f"{tuple(outputs.shape)}."
            )
        code = _DTYPES[self.meta["dtype"]][0]
        body = b"".join(
            [
                _MAGIC,
                _HEADER.pack(block, start, n_rows, self.n_components, self.n_examples, code),
                _masks.pack(keep).tobytes(),
                outputs.detach().cpu().numpy().astype(self._np_dtype).tobytes(),
            ]
        )
        return body + hashlib.sha256(body).digest()

    def write_block(self, block: int, keep: Tensor, outputs: Tensor) -> None:
        """Commit a finished block atomically (temporary file, fsync, rename)."""
        _fs.atomic_write(self.block_path(block), self.encode_block(block, keep, outputs))

    def read_block(self, block: int) -> tuple[Tensor, Tensor]:
        """(masks bool (rows, N), outputs float32 (rows, E)) of a finished block, verified."""
        path = self.block_path(block)
        start, stop = self.block_rows(block)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreCorruptError(f"Block {block} is not finished ({path} is missing).") from None
        return self._decode(data, block, start, stop - start, path)

    def _decode(
        self, data: bytes, block: int, start: int, n_rows: int, path: Path
    ) -> tuple[Tensor, Tensor]:
        fix = f"Delete {path} and run collect again to recompute it."
        if len(data) != self._expected_size(n_rows):
            raise StoreCorruptError(
                f"{path} has {len(data)} bytes, expected {self._expected_size(n_rows)} for "
                f"{n_rows} rows: it is truncated or from another store. {fix}"
            )
        if data[: len(_MAGIC)] != _MAGIC:
            raise StoreCorruptError(f"{path} is not a coarpy block (bad magic). {fix}")
        if hashlib.sha256(data[:-_DIGEST]).digest() != data[-_DIGEST:]:
            raise StoreCorruptError(f"{path} fails its checksum: its bytes were altered. {fix}")
        header = _HEADER.unpack_from(data, len(_MAGIC))
        code = _DTYPES[self.meta["dtype"]][0]
        expected = (block, start, n_rows, self.n_components, self.n_examples, code)
        if header != expected:
            raise StoreCorruptError(
                f"{path} describes block/first row/rows/components/examples/dtype {header}, "
                f"but this store expects {expected}. {fix}"
            )
        offset = len(_MAGIC) + _HEADER.size
        mask_bytes = n_rows * self._row_bytes
        packed = np.frombuffer(data, np.uint8, mask_bytes, offset).reshape(n_rows, self._row_bytes)
        outputs = np.frombuffer(data, self._np_dtype, n_rows * self.n_examples, offset + mask_bytes)
        outputs = torch.from_numpy(outputs.astype(np.float32).reshape(n_rows, self.n_examples))
        return _masks.unpack(packed, self.n_components), outputs

    def iter_blocks(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        """``(first_row, masks, outputs)`` of every finished block, in row order.

        Unfinished rows are never read; a damaged block file (one whose size or
        checksum is wrong) raises ``StoreCorruptError`` instead of being skipped.
        """
        for b in range(self.n_blocks):
            if self.is_done(b):
                keep, outputs = self.read_block(b)
                yield self.block_rows(b)[0], keep, outputs
            elif self._damaged(b):
                path = self.block_path(b)
                raise StoreCorruptError(
                    f"{path} has {path.stat().st_size} bytes, which no block of this store "
                    "can have: it is truncated or was appended to. Delete it (or call "
                    "verify(repair=True)) and run collect again to recompute it."
                )

    def verify(self, *, repair: bool = False) -> list[int]:
        """Check every block file (size and checksum); return the bad blocks.

        With ``repair=True`` the bad block files are deleted, so the next ``collect``
        recomputes them (masks are deterministic, so nothing is lost).
        """
        bad = []
        for b in range(self.n_blocks):
            if self.is_done(b):
                try:
                    self.read_block(b)
                    continue
                except StoreCorruptError:
                    pass
            elif not self._damaged(b):
                continue
            bad.append(b)
            if repair:
                self.block_path(b).unlink()
        return bad

    # -- whole arrays -------------------------------------------------------------
    def rows(self) -> Tensor:
        """Row indices of the finished rows, ascending (int64)."""
        parts = [torch.arange(*self.block_rows(b)) for b in self.done_blocks()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def masks(self) -> Tensor:
        """Masks of the finished rows, (len(self), N) bool."""
        cons = self._consolidated()
        if cons is not None:
            return _masks.unpack(np.asarray(cons[0]), self.n_components)
        parts = [k for _, k, _ in self.iter_blocks()]
        return torch.cat(parts) if parts else torch.zeros(0, self.n_components, dtype=torch.bool)

    def outputs(self) -> Tensor:
        """Outputs of the finished rows, (len(self), E) float32."""
        cons = self._consolidated()
        if cons is not None:
            return torch.from_numpy(np.asarray(cons[1], dtype=np.float32))
        parts = [y for _, _, y in self.iter_blocks()]
        return torch.cat(parts) if parts else torch.zeros(0, self.n_examples)

    def consolidate(self) -> Path:
        """Write the finished rows as contiguous .npy arrays that memory-map.

        The copy is used for reading while the set of finished blocks is unchanged.
        """
        if _fs.is_remote(self.path):
            raise NotImplementedError(
                f"consolidate() writes memory-mapped files, which need a local directory; "
                f"{self.path} is on a remote filesystem. Read it with masks()/outputs() "
                "(they stream the blocks), or copy the store to a local directory first."
            )
        folder = self.path / "consolidated"
        folder.mkdir(exist_ok=True)
        done = self.done_blocks()
        n = len(self)
        packed = np.lib.format.open_memmap(
            folder / ".masks.npy.tmp", mode="w+", dtype=np.uint8, shape=(n, self._row_bytes)
        )
        outputs = np.lib.format.open_memmap(
            folder / ".outputs.npy.tmp", mode="w+", dtype=np.float32, shape=(n, self.n_examples)
        )
        row = 0
        for _, keep, y in self.iter_blocks():
            packed[row : row + len(keep)] = _masks.pack(keep)
            outputs[row : row + len(keep)] = y.numpy()
            row += len(keep)
        packed.flush()
        outputs.flush()
        del packed, outputs
        os.replace(folder / ".masks.npy.tmp", folder / "masks.npy")
        os.replace(folder / ".outputs.npy.tmp", folder / "outputs.npy")
        _fs.atomic_write(
            folder / "blocks.json", json.dumps({"blocks": done, "n_masks": self.n_masks}).encode()
        )
        return folder

    def _consolidated(self) -> tuple[np.ndarray, np.ndarray] | None:
        folder = self.path / "consolidated"
        try:
            info = json.loads((folder / "blocks.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if info != {"blocks": self.done_blocks(), "n_masks": self.n_masks}:
            return None
        # copy-on-write maps: torch tensors over them are writable (a read-only map
        # makes torch warn, and writing through it would crash), the file never changes
        packed = np.load(folder / "masks.npy", mmap_mode="c", allow_pickle=False)
        outputs = np.load(folder / "outputs.npy", mmap_mode="c", allow_pickle=False)
        if packed.shape != (len(self), self._row_bytes) or outputs.shape != (
            len(self),
            self.n_examples,
        ):
            return None
        return packed, outputs

    def __repr__(self) -> str:
        return (
            f"ComponentDataset({str(self.path)!r}: {len(self)}/{self.n_masks} masks, "
            f"{self.n_components} components, {self.n_examples} examples, alpha={self.alpha})"
        )


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
