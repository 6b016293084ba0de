"""Collection: fill a component dataset by running the model under random ablations.

For every mask row of every unfinished block, the model runs over the whole (fixed)
example set with that mask's components ablated, and the output function gives one
number per example. The examples are moved to the device once. When the example set
is smaller than a batch, several masks share one forward pass (per-row masks).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
import warnings
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from . import _fs, _leases
from . import outputs as _outputs
from . import prefix as _prefix
from ._engine import (
    ExampleSet,
    autocast_context,
    eval_mode,
    model_device,
    progress_bar,
    run_masks,
)
from ._fingerprint import model_fingerprint, tensors_fingerprint
from .ablation import Ablator
from .components import Components
from .errors import CoarError, CollectError
from .masks import sample_masks
from .store import ComponentDataset

log = logging.getLogger(__name__)

WORKERS = "workers"  # RUN/workers/<host>-<pid>.json: heartbeats read by `coar status`
_HEARTBEAT_S = 1.0  # at most one heartbeat write per second (tiny blocks finish faster)


def shard_from_env() -> tuple[int, int] | None:
    """``(k, K)`` from SLURM_ARRAY_TASK_ID/COUNT or RANK/WORLD_SIZE, else None."""
    for idx, count in (("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"), ("RANK", "WORLD_SIZE")):
        if idx in os.environ and count in os.environ:
            k, n = int(os.environ[idx]), int(os.environ[count])
            if idx.startswith("SLURM"):
                k -= int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
            return k, n
    return None


def _check_shard(shard: tuple[int, int] | str | None) -> tuple[int, int] | None:
    if shard == "env":
        shard = shard_from_env()
    if shard is None:
        return None
    if isinstance(shard, str):
        k, sep, n = shard.partition("/")
        if not (sep and k.strip().isdigit() and n.strip().isdigit()):
            raise ValueError(
                f"shard must be 'k/K' (this worker's index k of K workers, e.g. '0/4'), "
                f"a tuple (k, K) or 'env', got {shard!r}."
            )
        shard = (int(k), int(n))
    k, n = shard
    if not (n >= 1 and 0 <= k < n):
        raise ValueError(f"shard must be (k, K) with 0 <= k < K, got {shard}.")
    return int(k), int(n)


def collect(
    model: nn.Module,
    components: Components,
    data: Iterable,
    *,
    output: _outputs.OutputFn | str = _outputs.margin,
    path: str | os.PathLike,
    n_masks: int,
    alpha: float,
    seed: int = 0,
    sampler: str = "bernoulli",
    block_size: int = 100,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    mode: str = "zero",
    means: dict[str, Tensor] | None = None,
    shard: tuple[int, int] | str | None = None,
    blocks: Iterable[int] | None = None,
    claim: bool = False,
    lease_s: float = _leases.LEASE_S,
    autocast: str | None = None,
    dtype: str = "float32",
    allow_nonfinite: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    prefix: str | _prefix.Split | None = None,
    compile_model: bool = False,
) -> ComponentDataset:
    """Fill (or resume) the component dataset at ``path`` and return it.

    Parameters
    ----------
    model, components : the model and the components to ablate.
    data : the fixed example set: a DataLoader, a list of batches, or a tuple of
        tensors ``(inputs, labels)``.
    output : output function, or the name of a built-in one (``coarpy.outputs``).
    path : store directory; an existing compatible store is resumed.
    n_masks, alpha, seed, sampler : how many masks, the ablation fraction, and the
        seeded sampler (row i depends only on (seed, i)).
    block_size : masks per block file (the unit of work and of commit).
    batch_size : examples per forward pass (default: the data's own batches).
    device : where to run (default: where the model is).
    shard : ``(k, K)`` or ``"k/K"`` to do only blocks b with b % K == k; ``"env"``
        reads SLURM_ARRAY_TASK_ID/COUNT or RANK/WORLD_SIZE.
    blocks : only these block indices (default: all); finished ones are skipped.
    claim : take blocks dynamically through lease files (``RUN/leases``): this
        worker's shard first, then any unfinished block no live worker holds, and
        return only when every block is done. Fast workers then take more blocks,
        and the blocks of a dead worker are taken over once its lease is stale.
    lease_s : seconds after which an untouched lease counts as dead (claim mode).
    autocast : ``"bf16"`` or ``"fp16"`` to run under torch.autocast (GPU).
    dtype : ``"float32"`` or ``"float16"`` for the stored outputs.
    allow_nonfinite : store NaN/inf outputs instead of stopping at the first one.
    prefix : run once per example, not once per mask, the part of the model before a
        cut that every component lies after: the path of a module inside nested
        ``nn.Sequential`` containers (its input is cached), or a
        ``coarpy.prefix.Split(prefix_fn, suffix_fn)``. The cut is verified on 64
        examples before use (``SplitError`` if it does not reproduce the model);
        the cached activations of all examples stay on the device. The stored rows are
        the same as without it.
    compile_model : run the model through ``torch.compile`` (opt-in). Shared masks
        change weights in place, which a compiled graph reads without recompiling;
        compiling takes seconds to minutes and fused kernels round differently, so
        outputs agree with eager ones to float tolerance, not bit for bit.

    Raises
    ------
    StoreMismatchError : the store at ``path`` was built with other settings.
    CollectError : a block failed; the message names it and the cause is chained.
    """
    output_fn = _outputs.resolve(output)
    if sampler == "exact":
        warnings.warn(
            "sampler='exact' ablates the same number of components in every mask, so a "
            "common shift of all weights cannot be told apart from the bias: attributions "
            "fitted on such masks predict Bernoulli masks worse (bench/RESULTS_efficiency.md)."
            " Use the paper's sampler='bernoulli' unless you need exact sizes.",
            stacklevel=2,
        )
    shard = _check_shard(shard)
    if device is not None:
        model.to(device)
    device = model_device(model)
    autocast_context(device, autocast)  # validates the name before anything is written
    examples = ExampleSet(data, device, batch_size)
    ds = ComponentDataset.create(
        path,
        components=components.to_dict()["groups"],
        n_examples=examples.n_examples,
        n_masks=n_masks,
        alpha=alpha,
        seed=seed,
        sampler=sampler,
        block_size=block_size,
        output=_outputs.name_of(output_fn),
        mode=mode,
        dtype=dtype,
        fingerprint=model_fingerprint(model),
        data_fingerprint=examples.fingerprint(),
        # the ablation values are part of what a row means: other means, other data
        means_fingerprint=(
            tensors_fingerprint(means[k] for k in sorted(means))
            if mode == "mean" and means is not None
            else ""
        ),
        overwrite=overwrite,
    )
    n_blocks = -(-n_masks // block_size)
    candidates = range(n_blocks) if blocks is None else _check_blocks(blocks, n_blocks)
    todo = [
        b for b in candidates if (shard is None or b % shard[1] == shard[0]) and not ds.is_done(b)
    ]
    if claim:  # own shard first, then every other unfinished block: fast workers take more
        mine = set(todo)
        todo += [b for b in candidates if b not in mine and not ds.is_done(b)]
    done_before = n_blocks - len([b for b in range(n_blocks) if not ds.is_done(b)])
    if done_before:
        log.info("%s: resuming, %d of %d blocks already done", ds.path, done_before, n_blocks)
    if not todo:
        return ComponentDataset(ds.path)

    # Shared masks go into the weights where that is exact: no hook runs per forward.
    ablator = Ablator(model, components, mode=mode, means=means, edit_weights=True)
    # No autocast weight cache: weights change between masks (it is off under
    # inference_mode already; saying so keeps it off whatever torch decides).
    cast = autocast_context(device, autocast)
    bar = progress_bar(len(todo), progress, desc=f"collect {ds.path.name}")
    claims = _leases.Claims(ds, todo, lease_s=lease_s) if claim else nullcontext(todo)
    beat = _Heartbeat(ds, shard, device)
    pending: list[Future] = []
    started = time.perf_counter()
    try:
        with (
            eval_mode(model, "collect"),
            claims as order,
            ThreadPoolExecutor(max_workers=1) as writer,
            ablator,
            torch.inference_mode(),
            cast,
        ):
            run_model, run_examples = model, examples
            if prefix is not None:  # run what no mask changes once, then only the rest
                run_model, run_examples = _prefix.prepare(
                    model, components, ablator, examples, prefix, output_fn, autocast=autocast
                )
            if compile_model:
                run_model = torch.compile(run_model)
            for count, b in enumerate(order, 1):
                start, stop = ds.block_rows(b)
                keep = sample_masks(
                    start, stop, len(components), alpha=alpha, seed=seed, sampler=sampler
                )
                try:
                    values = run_masks(run_model, ablator, run_examples, keep, output_fn)
                except CoarError:
                    raise
                except Exception as err:
                    raise CollectError(
                        f"Block {b} (mask rows {start}..{stop - 1}) failed: "
                        f"{type(err).__name__}: {err}"
                    ) from err
                if not allow_nonfinite:
                    _check_finite(values, start)
                # Commit off the critical path; keep at most one write in flight.
                while pending:
                    pending.pop().result()
                pending.append(writer.submit(ds.write_block, b, keep, values.cpu()))
                bar.update(1)
                rate = count * (stop - start) / (time.perf_counter() - started)
                bar.set_postfix(masks_per_s=f"{rate:.1f}", refresh=False)
                beat.write("collecting")
            while pending:
                pending.pop().result()
        beat.write("finished", force=True)
    finally:
        bar.close()
    return ComponentDataset(ds.path)


def _check_blocks(blocks: Iterable[int], n_blocks: int) -> list[int]:
    chosen = list(blocks)
    bad = [
        b for b in chosen if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < n_blocks
    ]
    if bad:
        raise ValueError(
            f"blocks must be block indices in 0..{n_blocks - 1} (this run has {n_blocks} "
            f"blocks), got {bad[:5]}. Pass blocks=None for all of them."
        )
    return chosen


class _Heartbeat:
    """``RUN/workers/<host>-<pid>.json``: who is collecting, where, and when last seen.

    ``{"host", "pid", "shard", "device", "time", "state"}``, replaced atomically;
    ``coar status`` lists the recent ones. Written when the block loop starts, after
    blocks (at most once a second) and when the worker finishes. A failed write is
    logged and never stops the collection.
    """

    def __init__(self, ds: ComponentDataset, shard: tuple[int, int] | None, device):
        self.host, self.pid = platform.node(), os.getpid()
        self.path = ds.path / WORKERS / f"{self.host}-{self.pid}.json"
        self.shard = list(shard) if shard else None
        self.device = str(device)
        self.last = float("-inf")
        self.write("collecting", force=True)

    def write(self, state: str, *, force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last < _HEARTBEAT_S:
            return
        beat = {
            "host": self.host, "pid": self.pid, "shard": self.shard,
            "device": self.device, "time": now, "state": state,
        }  # fmt: skip
        try:
            self.path.parent.mkdir(exist_ok=True)
            _fs.atomic_write(self.path, json.dumps(beat).encode())
            self.last = now
        except OSError as err:
            log.warning("could not write the heartbeat %s: %s", self.path, err)


def _check_finite(values: Tensor, first_row: int) -> None:
    bad = ~torch.isfinite(values)
    if bad.any():
        row, example = (int(i) for i in bad.nonzero()[0])
        raise CollectError(
            f"Mask row {first_row + row} gave a non-finite output ({values[row, example].item()})"
            f" on example {example}. Check the model and output function, or pass "
            "allow_nonfinite=True to store such values."
        )
