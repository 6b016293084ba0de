"""The on-disk component dataset: a directory of blocks of (masks, outputs).

Layout::

    RUN/meta.json              settings and identity; a resume with other settings is refused
    RUN/blocks/b000017.blk     rows 17*B .. 18*B-1: packed masks + outputs + checksum
    RUN/blocks/b000020-42.blk  a last block of 42 rows, short of B (n_masks not a multiple)
    RUN/consolidated/          optional contiguous copies for memory-mapped reading

A block is the unit of work and of commit. It is written to a temporary name,
fsynced and renamed into place, so it either exists whole or not at all: a killed
worker loses at most the block it was computing, and two workers computing the same
block write identical bytes (masks are a function of (seed, row)). Block files are
plain binary read with numpy: nothing is ever unpickled.

Identity. ``meta.json`` records every setting a row depends on (``IDENTITY``: the
sampler, the model's weights and structure, the output function and its code, the
ablation mode, autocast, the examples, ...) and ``identity``, a hash of them. Every
block carries that hash in its header, so a block copied from a store with other
settings, or left from before ``meta.json`` was lost and the run restarted with
another model, is never counted done: it is recomputed. A block with this store's
identity was computed under exactly these settings, whichever store wrote it. A short
last block has its own name, so a worker still running with a smaller ``n_masks``
never replaces the full block of a grown run. ``meta.json`` is updated under a lock
(read, compare, write), so concurrent growth never loses a larger ``n_masks``.

Why a format of our own, not zarr, HDF5 or a ``datasets`` table: what a run needs is
(1) "a block is done iff its file exists" as the only coordination between workers
that share nothing but a directory (no server, no single writer as HDF5 has), (2) an
identity and a checksum in every block, so a block computed under other settings, or
damaged, is recomputed rather than read as data (chunked array formats record what a
chunk holds, not what it was computed under), and (3) masks packed to one bit per
component and regenerable from (seed, row). Each of these is a few lines on numpy and
``os.replace``; the files stay readable with numpy alone.

Block file (format 2): magic ``COARBLK2``, a little-endian header (block, first_row,
n_rows, n_components, n_examples, dtype code, the store's 16-byte identity), the
packed masks (n_rows, ceil(N/8)) uint8, the outputs (n_rows, n_examples) float32 or
float16, then a SHA-256 of all of it. Stores of format 1 (no identity) stay readable
(every block is checksummed) but are not resumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import re
import struct
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import _checks, _consolidated, _fs
from . import masks as _masks
from ._storemeta import (
    DTYPES,
    FORMAT_VERSION,
    IDENTITY,
    check_meta,
    check_settings,
    identity_of,
    short,
)
from .errors import ArgumentError, StoreCorruptError, StoreMismatchError

log = logging.getLogger(__name__)

_MAGIC = {1: b"COARBLK1", 2: b"COARBLK2"}
_HEADER = {1: struct.Struct("<QQQQQB"), 2: struct.Struct("<QQQQQB16s")}
_DIGEST = 32
_BLOCK_NAME = re.compile(r"^b(\d{6,})(?:-(\d+))?\.blk$")
_LOCK = ".meta.lock"  # held while meta.json is read, compared and rewritten


class ComponentDataset:
    """A component dataset on disk: masks and the outputs of the ablated model.

    Open an existing one with ``ComponentDataset(path)``; ``create`` makes a new one
    or reopens a compatible one (``collect`` calls it).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = _fs.path(path)  # a Path, or a RemotePath for s3://, gs://, ...
        meta_path = self.path / "meta.json"
        try:
            text = meta_path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(
                f"No component dataset at {self.path} (no meta.json). Create one with "
                "coarpy.collect(...) or check the path."
            ) from None
        try:
            meta = json.loads(text.decode())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreCorruptError(
                f"{meta_path} is not valid JSON ({err}). Restore it or start a new store."
            ) from err
        self.meta: dict = check_meta(meta, meta_path)
        self.version: int = self.meta["format_version"]
        self._names: list[str] | None = None
        self._row_bytes = math.ceil(self.n_components / 8)
        self._np_dtype = DTYPES[self.meta["dtype"]][1]
        self._identity = bytes.fromhex(self.meta["identity"]) if self.version >= 2 else b""
        self._verified: dict[int, tuple] = {}  # block -> file stat that passed its checksum
        self._consolidated_ok: tuple | None = None

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
        output_code: str = "",
        mode: str = "zero",
        dtype: str = "float32",
        fingerprint: str = "",
        structure: str = "",
        data_fingerprint: str = "",
        means_fingerprint: str = "",
        autocast: str | None = None,
        prefix: str | None = None,
        compile_model: bool = False,
        overwrite: bool = False,
        extra: dict | None = None,
        example_ids: list | None = None,
    ) -> ComponentDataset:
        """Create a store, or reopen the one at ``path`` if its settings agree.

        ``components`` is ``Components.to_dict()["groups"]``. A store with other
        settings is refused (``StoreMismatchError`` naming the fields) unless
        ``overwrite``, which deletes its blocks first. A larger ``n_masks`` grows it.
        ``example_ids`` (one distinct str or int per example) label the examples: they
        are kept in ``meta.json`` but are not part of the identity (no row depends on
        them), so a store without ids takes them on a resume, and other ids are refused
        unless ``overwrite`` (which then keeps the blocks: only the labels change).
        Every argument is checked before anything is written.
        """
        settings = check_settings(
            components=components, n_examples=n_examples, n_masks=n_masks, alpha=alpha,
            seed=seed, sampler=sampler, block_size=block_size, output=output,
            output_code=output_code, mode=mode, dtype=dtype, fingerprint=fingerprint,
            structure=structure, data_fingerprint=data_fingerprint,
            means_fingerprint=means_fingerprint, autocast=autocast, prefix=prefix,
            compile_model=compile_model, overwrite=overwrite, extra=extra,
        )  # fmt: skip
        if example_ids is not None:
            settings["example_ids"] = _checks.example_ids(example_ids, settings["n_examples"])
        path = _fs.path(path)
        meta = {
            "format_version": FORMAT_VERSION,
            **settings,
            "created": {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "host": platform.node(),
                "torch": torch.__version__,
            },
            **(extra or {}),
        }
        meta["identity"] = identity_of(meta)
        meta_path = path / "meta.json"
        if meta_path.exists():
            with _fs.locked(path / _LOCK, what=" (meta.json updates)"):
                cls._reopen(path, meta, overwrite=overwrite)
            return cls(path)
        (path / "blocks").mkdir(parents=True, exist_ok=True)
        if not _fs.write_new(meta_path, json.dumps(meta, indent=1).encode()):
            # another worker created it first: reopen it (or refuse a mismatch)
            with _fs.locked(path / _LOCK, what=" (meta.json updates)"):
                cls._reopen(path, meta, overwrite=overwrite)
        return cls(path)

    @classmethod
    def _reopen(cls, path: Path, meta: dict, *, overwrite: bool) -> None:
        """Compare ``meta`` with the store at ``path``; grow, overwrite or refuse.

        Runs under the meta lock: the read, the comparison and the write are one step,
        so two workers growing ``n_masks`` at once end with the larger.
        """
        meta_path = path / "meta.json"
        existing = cls(path)
        if existing.version != FORMAT_VERSION and not overwrite:
            raise StoreMismatchError(
                f"{meta_path} was written by an older coarpy (store format "
                f"{existing.version}), whose blocks carry no identity, so new blocks cannot "
                "be proven to match them. Its rows can still be read (fit, evaluate_store); "
                "to collect more, start a new store directory, or pass overwrite=True to "
                "recompute it in the new format."
            )
        diffs = [f for f in IDENTITY if existing.meta.get(f) != meta[f]]
        stored_ids, given_ids = existing.meta.get("example_ids"), meta.get("example_ids")
        relabel = given_ids is not None and stored_ids != given_ids
        if (diffs or (relabel and stored_ids is not None)) and not overwrite:
            parts = [
                f"{f}: stored {short(existing.meta.get(f))}, given {short(meta[f])}"
                for f in [*diffs, *(["example_ids"] if relabel else [])]
            ]
            raise StoreMismatchError(
                f"{meta_path} was written with other settings ({'; '.join(parts)}). "
                "Resume with the settings and model the store was built from, pass "
                "overwrite=True to discard it, or use a new directory."
            )
        if diffs or existing.version != FORMAT_VERSION:
            existing._clear_blocks()
            _fs.atomic_write(meta_path, json.dumps(meta, indent=1).encode())
        elif meta["n_masks"] > existing.meta["n_masks"] or relabel:
            existing.meta["n_masks"] = max(meta["n_masks"], existing.meta["n_masks"])
            if relabel:  # labels only: no row depends on them, the blocks stay
                existing.meta["example_ids"] = given_ids
            _fs.atomic_write(meta_path, json.dumps(existing.meta, indent=1).encode())

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
    def example_ids(self) -> list[str | int] | None:
        """The examples' ids (``collect(..., example_ids=)`` or the data's ``id`` field),
        one per example in order; None when the store was collected without them."""
        return self.meta.get("example_ids")

    @property
    def identity(self) -> str:
        """The hash of the settings every block of this store carries ("" for format 1)."""
        return self.meta.get("identity", "")

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
        """The file of ``block``; a last block short of ``block_size`` rows has its row
        count in its name (format 2), so it never replaces a full block of a grown run."""
        start, stop = self.block_rows(block)
        if self.version >= 2 and stop - start != self.block_size:
            return self.path / "blocks" / f"b{block:06d}-{stop - start}.blk"
        return self.path / "blocks" / f"b{block:06d}.blk"

    def _expected_size(self, n_rows: int) -> int:
        item = np.dtype(self._np_dtype).itemsize
        return (
            len(_MAGIC[self.version])
            + _HEADER[self.version].size
            + n_rows * (self._row_bytes + self.n_examples * item)
            + _DIGEST
        )

    def _expected_header(self, block: int) -> tuple:
        start, stop = self.block_rows(block)
        code = DTYPES[self.meta["dtype"]][0]
        head = (block, start, stop - start, self.n_components, self.n_examples, code)
        return head + ((self._identity,) if self.version >= 2 else ())

    # -- state --------------------------------------------------------------------
    def _head(self, path: Path) -> bytes:
        n = len(_MAGIC[self.version]) + _HEADER[self.version].size
        if _fs.is_remote(path):
            return path.read_range(0, n)
        with open(path, "rb") as f:
            return f.read(n)

    def is_done(self, block: int) -> bool:
        """True iff the block's file exists with the size its rows need and a header
        naming this block of this store (its identity). Cheap: the rest of the file is
        checked by :meth:`intact` and on every read."""
        path = self.block_path(block)
        start, stop = self.block_rows(block)
        try:
            if path.stat().st_size != self._expected_size(stop - start):
                return False
            head = self._head(path)
        except FileNotFoundError:
            return False
        magic = _MAGIC[self.version]
        if head[: len(magic)] != magic:
            return False
        return _HEADER[self.version].unpack_from(head, len(magic)) == self._expected_header(block)

    def intact(self, block: int) -> bool:
        """True iff the block is done and its whole file passes its checksum.

        A block verified once is not read again while its file is unchanged (same
        inode, size and time), so a resume reads each finished block once.
        """
        if not self.is_done(block):
            return False
        path = self.block_path(block)
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        key = (getattr(st, "st_ino", None), st.st_size, getattr(st, "st_mtime_ns", st.st_mtime))
        if self._verified.get(block) == key:
            return True
        try:
            self.read_block(block)
        except StoreCorruptError:
            return False
        self._verified[block] = key
        return True

    def _damaged(self, block: int) -> bool:
        """True if a file at the block's name is not a finished block of this store:
        truncated, appended to, altered, or from another store.

        In a format-1 store a shorter block left from before ``n_masks`` grew is not
        damaged (it is a finished block of the smaller run, which ``collect``
        recomputes); in format 2 such a block has another name.
        """
        path = self.block_path(block)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        if self.is_done(block):
            return False
        if self.version >= 2:
            return True
        start, stop = self.block_rows(block)
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
        times = []
        for b in done:
            with contextlib.suppress(FileNotFoundError):
                times.append(self.block_path(b).stat().st_mtime)
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
        if self.version != FORMAT_VERSION:
            raise StoreMismatchError(
                f"{self.path} is a store of format {self.version}; blocks are only written "
                "to stores of the current format. Collect into a new directory."
            )
        start, stop = self.block_rows(block)
        n_rows = stop - start
        if tuple(keep.shape) != (n_rows, self.n_components):
            raise ArgumentError(
                f"Block {block} needs masks of shape ({n_rows}, {self.n_components}), got "
                f"{tuple(keep.shape)}."
            )
        if tuple(outputs.shape) != (n_rows, self.n_examples):
            raise ArgumentError(
                f"Block {block} needs outputs of shape ({n_rows}, {self.n_examples}), got "
                f"{tuple(outputs.shape)}."
            )
        with np.errstate(over="ignore"):  # collect refuses overflow unless asked to keep it
            values = outputs.detach().cpu().numpy().astype(self._np_dtype)
        body = b"".join(
            [
                _MAGIC[self.version],
                _HEADER[self.version].pack(*self._expected_header(block)),
                _masks.pack(keep).tobytes(),
                values.tobytes(),
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
        return self._decode(data, block, stop - start, path)

    def _decode(self, data: bytes, block: int, n_rows: int, path: Path) -> tuple[Tensor, Tensor]:
        fix = f"Delete {path} (or call verify(repair=True)) and run collect again to recompute it."
        magic, header = _MAGIC[self.version], _HEADER[self.version]
        if len(data) != self._expected_size(n_rows):
            raise StoreCorruptError(
                f"{path} has {len(data)} bytes, expected {self._expected_size(n_rows)} for "
                f"{n_rows} rows: it is truncated or from another store. {fix}"
            )
        if data[: len(magic)] != magic:
            raise StoreCorruptError(f"{path} is not a coarpy block (bad magic). {fix}")
        if hashlib.sha256(data[:-_DIGEST]).digest() != data[-_DIGEST:]:
            raise StoreCorruptError(f"{path} fails its checksum: its bytes were altered. {fix}")
        got = header.unpack_from(data, len(magic))
        expected = self._expected_header(block)
        if got[6:] != expected[6:]:
            raise StoreCorruptError(
                f"{path} belongs to another store (identity {got[6].hex()}, this store's is "
                f"{self.identity}): it was computed under other settings. {fix}"
            )
        if got != expected:
            raise StoreCorruptError(
                f"{path} describes block/first row/rows/components/examples/dtype {got[:6]}, "
                f"but this store expects {expected[:6]}. {fix}"
            )
        offset = len(magic) + header.size
        mask_bytes = n_rows * self._row_bytes
        packed = np.frombuffer(data, np.uint8, mask_bytes, offset).reshape(n_rows, self._row_bytes)
        outputs = np.frombuffer(data, self._np_dtype, n_rows * self.n_examples, offset + mask_bytes)
        outputs = torch.from_numpy(outputs.astype(np.float32).reshape(n_rows, self.n_examples))
        return _masks.unpack(packed, self.n_components), outputs

    def iter_blocks(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        """``(first_row, masks, outputs)`` of every finished block, in row order.

        Unfinished rows are never read; a damaged block file (one whose size, header,
        identity or checksum is wrong) raises ``StoreCorruptError`` instead of being
        skipped.
        """
        for b in range(self.n_blocks):
            if self.is_done(b):
                keep, outputs = self.read_block(b)
                yield self.block_rows(b)[0], keep, outputs
            elif self._damaged(b):
                path = self.block_path(b)
                try:
                    self._decode(path.read_bytes(), b, self._rows(b), path)
                except (StoreCorruptError, FileNotFoundError) as err:
                    raise StoreCorruptError(str(err)) from None
                raise StoreCorruptError(f"{path} is not a finished block of {self.path}.")

    def _rows(self, block: int) -> int:
        start, stop = self.block_rows(block)
        return stop - start

    def verify(self, *, repair: bool = False) -> list[int]:
        """Check every block file (size, header, identity and checksum); return the bad
        blocks.

        With ``repair=True`` the bad block files are deleted, so the next ``collect``
        recomputes them (masks are deterministic, so nothing is lost); temporary files
        of dead writers, short blocks left from a smaller ``n_masks`` and a consolidated
        copy that fails its checksum are deleted too.
        """
        bad = []
        for b in range(self.n_blocks):
            if self.is_done(b):
                self._verified.pop(b, None)
                if self.intact(b):
                    continue
            elif not self._damaged(b):
                continue
            bad.append(b)
            if repair:
                with contextlib.suppress(FileNotFoundError):
                    self.block_path(b).unlink()
        if repair:
            self.sweep()
            if self.consolidated_problem() is not None:
                _consolidated.remove(self.path / "consolidated")
        return bad

    def sweep(self) -> int:
        """Delete what no reader will use: temporary files of dead writers, and short
        last blocks of a smaller ``n_masks`` (format 2). Returns how many files."""
        removed = sum(
            _fs.sweep_temp(folder)
            for folder in (self.path, self.path / "blocks", self.path / "consolidated")
        )
        if self.version >= 2:
            for f in (self.path / "blocks").glob("b*-*.blk"):
                m = _BLOCK_NAME.match(f.name)
                if m and m[2] is not None and f != self.block_path(int(m[1])):
                    with contextlib.suppress(FileNotFoundError):
                        f.unlink()
                        removed += 1
        return removed

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

        The copy is used for reading while the set of finished blocks is unchanged,
        and only while both files match the SHA-256 recorded with them
        (``coarpy._consolidated``).
        """
        if _fs.is_remote(self.path):
            raise NotImplementedError(
                f"consolidate() writes memory-mapped files, which need a local directory; "
                f"{self.path} is on a remote filesystem. Read it with masks()/outputs() "
                "(they stream the blocks), or copy the store to a local directory first."
            )
        folder = self.path / "consolidated"
        record = self._consolidated_record()
        rows = ((_masks.pack(k), y.numpy()) for _, k, y in self.iter_blocks())
        _consolidated.write(folder, rows, shapes=self._consolidated_shapes(), record=record)
        self._consolidated_ok = None
        return folder

    def _consolidated_record(self) -> dict:
        return {"blocks": self.done_blocks(), "n_masks": self.n_masks, "identity": self.identity}

    def _consolidated_shapes(self) -> dict[str, tuple[int, int]]:
        n = len(self)
        return {"masks": (n, self._row_bytes), "outputs": (n, self.n_examples)}

    def consolidated_problem(self) -> str | None:
        """Why the consolidated copy, which describes the finished blocks, cannot be
        used (a file altered or missing); None if it is sound, absent or out of date."""
        if _fs.is_remote(self.path):
            return None
        folder = self.path / "consolidated"
        info = _consolidated.current(folder, self._consolidated_record())
        if info is None:
            return None
        key = _consolidated.stat_key(folder)
        if key is not None and key == self._consolidated_ok:
            return None
        found = _consolidated.problem(folder, info)
        if found is None:
            self._consolidated_ok = key
        return found

    def _consolidated(self) -> tuple[np.ndarray, np.ndarray] | None:
        folder = self.path / "consolidated"
        if _fs.is_remote(self.path) or not (folder / _consolidated.INFO).exists():
            return None
        if _consolidated.current(folder, self._consolidated_record()) is None:
            return None
        found = self.consolidated_problem()
        if found is not None:
            warnings.warn(
                f"The consolidated copy of {self.path} is not used: {found}. Reading the "
                "blocks instead; call consolidate() again (or verify(repair=True)).",
                stacklevel=3,
            )
            return None
        return _consolidated.load(folder, self._consolidated_shapes())

    def __repr__(self) -> str:
        return (
            f"ComponentDataset({str(self.path)!r}: {len(self)}/{self.n_masks} masks, "
            f"{self.n_components} components, {self.n_examples} examples, alpha={self.alpha})"
        )
