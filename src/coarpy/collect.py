"""Collection: fill a component dataset by running the model under random ablations.

For every mask row of every unfinished block, the model runs over the whole (fixed)
example set with that mask's components ablated, and the output function gives one
number per example. The examples are moved to the device once. When the example set
is smaller than a batch, several masks share one forward pass (per-row masks).

Which blocks to compute is the caller's business: all of them, a shard ``(k, K)``,
or any iterable of block indices, which may hand them out lazily. ``coarpy.runs``
uses that for run directories: workers, lease claiming, heartbeats and launchers.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor, nn

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
from .errors import ArgumentError, CoarError, CollectError
from .masks import sample_masks
from .store import ComponentDataset

log = logging.getLogger(__name__)


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
    shard: tuple[int, int] | None = None,
    blocks: Iterable[int] | None = None,
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
    shard : ``(k, K)`` to do only blocks b with b % K == k (worker k of K). To read
        it from SLURM's or torchrun's variables, or to claim blocks through lease
        files, collect a run directory with ``coarpy.runs.collect_run``.
    blocks : only these block indices (default: all); finished ones are skipped. A
        collection (list, range) is checked whole before any work; any other
        iterable is read one block at a time, each asked for only when the previous
        one is computed, so it may decide lazily (``coarpy.runs.leases.Claims``).
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
    n_blocks = ds.n_blocks
    done_before = len(ds.done_blocks())
    if done_before:
        log.info("%s: resuming, %d of %d blocks already done", ds.path, done_before, n_blocks)
    order, total = _plan(ds, blocks, shard)
    first = next(order, None)
    if first is None:
        return ComponentDataset(ds.path)

    # Shared masks go into the weights where that is exact: no hook runs per forward.
    ablator = Ablator(model, components, mode=mode, means=means, edit_weights=True)
    # No autocast weight cache: weights change between masks (it is off under
    # inference_mode already; saying so keeps it off whatever torch decides).
    cast = autocast_context(device, autocast)
    bar = progress_bar(total, progress, desc=f"collect {ds.path.name}")
    pending: list[Future] = []
    started = time.perf_counter()
    try:
        with (
            eval_mode(model, "collect"),
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
            for count, b in enumerate(_chain(first, order), 1):
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
            while pending:
                pending.pop().result()
    finally:
        bar.close()
    return ComponentDataset(ds.path)


def _check_shard(shard: tuple[int, int] | None) -> tuple[int, int] | None:
    if shard is None:
        return None
    if isinstance(shard, str) or not (
        isinstance(shard, (tuple, list))
        and len(shard) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in shard)
    ):
        raise ArgumentError(
            f"shard must be a tuple (k, K): this worker's index k of K workers, e.g. (0, 4); "
            f"got {shard!r}. For 'k/K' text or SLURM/torchrun variables use "
            "coarpy.runs.collect_run(config, shard='k/K' or 'env')."
        )
    k, n = shard
    if not (n >= 1 and 0 <= k < n):
        raise ArgumentError(f"shard must be (k, K) with 0 <= k < K, got {tuple(shard)}.")
    return k, n


def _plan(
    ds: ComponentDataset, blocks: Iterable[int] | None, shard: tuple[int, int] | None
) -> tuple[Iterator[int], int]:
    """The unfinished blocks to compute, in order, and how many at most (for the bar)."""

    def wanted(b: int) -> bool:
        return (shard is None or b % shard[1] == shard[0]) and not ds.is_done(b)

    if blocks is None or isinstance(blocks, Collection):  # checked whole, before any work
        candidates = range(ds.n_blocks) if blocks is None else blocks
        todo = [b for b in _check_blocks(candidates, ds.n_blocks) if wanted(b)]
        return iter(todo), len(todo)

    def lazily() -> Iterator[int]:  # each checked when it comes
        for b in blocks:
            _check_blocks((b,), ds.n_blocks)
            if wanted(b):
                yield b

    return lazily(), sum(1 for b in range(ds.n_blocks) if wanted(b))


def _chain(first: int, rest: Iterator[int]) -> Iterator[int]:
    yield first
    yield from rest


def _check_blocks(blocks: Iterable[int], n_blocks: int) -> list[int]:
    chosen = list(blocks)
    bad = [
        b for b in chosen if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < n_blocks
    ]
    if bad:
        raise ArgumentError(
            f"blocks must be block indices in 0..{n_blocks - 1} (this run has {n_blocks} "
            f"blocks), got {bad[:5]}. Pass blocks=None for all of them."
        )
    return chosen


def _check_finite(values: Tensor, first_row: int) -> None:
    bad = ~torch.isfinite(values)
    if bad.any():
        row, example = (int(i) for i in bad.nonzero()[0])
        raise CollectError(
            f"Mask row {first_row + row} gave a non-finite output ({values[row, example].item()})"
            f" on example {example}. Check the model and output function, or pass "
            "allow_nonfinite=True to store such values."
        )
