"""Collection: fill a component dataset by running the model under random ablations.

For every mask row of every unfinished block, the model runs over the whole (fixed)
example set with that mask's components ablated, and the output function gives one
number per example. The examples are moved to the device once, or, when they exceed
``device_budget``, a segment at a time per block. When the example set is smaller
than a batch, several masks share one forward pass (per-row masks).

Which blocks to compute is the caller's business: all of them, a shard ``(k, K)``,
or any iterable of block indices, which may hand them out lazily. ``coarpy.runs``
uses that for run directories: workers, lease claiming, heartbeats and launchers.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn

from . import _checks, _fingerprint, _fs
from . import outputs as _outputs
from . import prefix as _prefix
from . import stopping as _stopping
from ._engine import (
    AUTOCAST,
    ExampleSet,
    autocast_context,
    eval_mode,
    model_device,
    progress_bar,
    run_masks,
)
from .ablation import MODES, Ablator
from .components import Components
from .errors import ArgumentError, CoarError, CollectError, SplitError
from .masks import SAMPLERS, sample_masks
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
    until: _stopping.StopRule | None = None,
    example_ids: Sequence[str | int] | None = None,
    device_budget: int | None = None,
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
        the cached activations stay where the examples are (on the device, or on the
        host when streamed). The stored rows are the same as without it.
    compile_model : run the model through ``torch.compile`` (opt-in). Shared masks
        change weights in place, which a compiled graph reads without recompiling;
        compiling takes seconds to minutes and fused kernels round differently, so
        outputs agree with eager ones to float tolerance, not bit for bit.
    until : a ``coarpy.StopRule``: stop before ``n_masks`` once more masks stop raising
        held-out correlation. Checked at ``min_masks``, then each time the finished
        masks double, fitting on prefixes of the store (``coarpy.stopping``); each
        check saves ``learning_curve.json`` next to the store. One process only: not
        with ``shard``.
    example_ids : one distinct id (str or int) per example, in the data's order, kept in
        the store and carried into the attributions and evaluations. By default the
        data's own ``id`` or ``idx`` field (dict rows or batches; never passed to the
        model), if it has one.
    device_budget : bytes the examples may take on the device (default: half the free
        memory of a CUDA device; no limit on the CPU). Examples that fit stay on the
        device; larger sets stay on the host (pinned for CUDA, in their own dtype:
        uint8 stays uint8 until the model's input) and are moved a segment of whole
        batches at a time, each segment once per block. The rows and the store's
        identity are the same either way, so a run may resume under another budget.
        A budget that cannot hold one batch is refused (``ArgumentError``).

    Every argument is checked before the model runs or anything is written. The store
    records what each row depends on (the model's weights and structure, the output
    function and its code, mode and means, autocast, dtype, sampler, seed, the
    examples, a ``Split`` prefix) and refuses a resume under anything else; device,
    batch size and a module-path prefix change rounding only and may differ between
    workers. On a resume every finished block of this worker's part is checked once
    (its checksum) and recomputed if damaged.

    Raises
    ------
    ArgumentError : a bad argument (the message names it and says what to give).
    DataError : unusable data, or labels a class-index output would misread.
    StoreMismatchError : the store at ``path`` was built with other settings.
    CollectError : a block failed; the message names it and the cause is chained.
        Also a non-finite output (or one beyond float16's range with
        ``dtype="float16"``) unless ``allow_nonfinite``.
    StorageError : a block could not be written (disk full); nothing partial is left.
    """
    settings = _check_args(
        model=model, components=components, output=output, path=path, n_masks=n_masks,
        alpha=alpha, seed=seed, sampler=sampler, block_size=block_size,
        batch_size=batch_size, device=device, mode=mode, means=means, shard=shard,
        autocast=autocast, dtype=dtype, allow_nonfinite=allow_nonfinite,
        overwrite=overwrite, progress=progress, prefix=prefix, compile_model=compile_model,
        device_budget=device_budget,
    )  # fmt: skip
    output_fn, shard = settings["output_fn"], settings["shard"]
    if until is not None and not isinstance(until, _stopping.StopRule):
        raise ArgumentError(f"until must be a coarpy.StopRule, got {type(until).__name__}.")
    if until is not None and shard is not None:
        raise ArgumentError(
            "until= decides for the whole store after this process's blocks, so it needs "
            "one process; got shard=. Drop it, or collect without until= and read the "
            "curve with StopRule().check(store)."
        )
    model = _checks.module(model)  # an nnsight envoy runs as the module it wraps
    if isinstance(blocks, Collection):  # checked whole before anything is written
        _check_blocks(blocks, _n_blocks_after(path, n_masks, block_size))
    if sampler == "exact":
        warnings.warn(
            "sampler='exact' ablates the same number of components in every mask, so a "
            "common shift of all weights cannot be told apart from the bias: attributions "
            "fitted on such masks predict Bernoulli masks worse (bench/RESULTS_efficiency.md)."
            " Use the paper's sampler='bernoulli' unless you need exact sizes.",
            stacklevel=2,
        )
    if device is not None:
        model.to(device)
    device = model_device(model)
    autocast_context(device, autocast)  # validates the name before anything is written
    examples = ExampleSet(data, device, batch_size, device_budget=device_budget)
    examples.check_labels(output_fn)
    ids = _example_ids(example_ids, examples)
    # Shared masks go into the weights where that is exact: no hook runs per forward.
    # Made before the store: a bad mode or means is refused before anything is written.
    ablator = Ablator(model, components, mode=mode, means=means, edit_weights=True)
    row_record = _fingerprint.record(
        model, output_fn, mode=mode, means=means, autocast=autocast,
        data_fingerprint=examples.fingerprint(),
    )  # fmt: skip
    ds = ComponentDataset.create(
        path,
        components=components.to_dict()["groups"],
        n_examples=examples.n_examples,
        n_masks=n_masks,
        alpha=alpha,
        seed=seed,
        sampler=sampler,
        block_size=block_size,
        dtype=dtype,
        prefix=_prefix_name(prefix),
        compile_model=compile_model,
        overwrite=overwrite,
        example_ids=ids,
        **row_record,
    )
    if ds.sweep():
        log.info("%s: removed files left by killed workers or a smaller n_masks", ds.path)
    n_blocks = ds.n_blocks
    done_before = len(ds.done_blocks())
    if done_before:
        log.info("%s: resuming, %d of %d blocks already done", ds.path, done_before, n_blocks)
    order, total = _plan(ds, blocks, shard)
    watch = None if until is None else _stopping.Watch(until, ds)
    first = next(order, None)
    if first is None:
        if watch is not None:
            watch.finish()
        return ComponentDataset(ds.path)

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
                    _check_finite(values, start, dtype)
                # Commit off the critical path; keep at most one write in flight.
                while pending:
                    pending.pop().result()
                pending.append(writer.submit(ds.write_block, b, keep, values.cpu()))
                bar.update(1)
                rate = count * (stop - start) / (time.perf_counter() - started)
                bar.set_postfix(masks_per_s=f"{rate:.1f}", refresh=False)
                if watch is not None and watch.add(stop - start):
                    while pending:  # the check reads the store: this block first
                        pending.pop().result()
                    if watch.check():
                        log.info("%s: the stop rule says stop at %d masks", ds.path, watch.rows)
                        watch = None
                        break
            while pending:
                pending.pop().result()
    finally:
        bar.close()
    if watch is not None:
        watch.finish()
    return ComponentDataset(ds.path)


def _check_args(**args: Any) -> dict[str, Any]:
    """Check every argument of ``collect`` (ArgumentError) before anything runs or is
    written; the resolved output function and shard."""
    _checks.module(args["model"])
    if not isinstance(args["components"], Components):
        raise ArgumentError(
            f"components must be a coarpy.Components, got {type(args['components']).__name__}."
            " Build one with Components.discover(model, ...) or Components.from_spec(...)."
        )
    if not isinstance(args["path"], (str, os.PathLike)) or not str(args["path"]).strip():
        raise ArgumentError(
            f"path must be the store's directory (a str or Path), got {args['path']!r}."
        )
    _checks.positive(args["n_masks"], "n_masks", fix="Collect at least one mask.")
    _checks.fraction(args["alpha"])
    _checks.seed(args["seed"])
    _checks.choice(args["sampler"], "sampler", SAMPLERS)
    _checks.positive(args["block_size"], "block_size", fix="Masks per block file, e.g. 100.")
    _checks.batch_size(args["batch_size"])
    _checks.device(args["device"])
    _checks.device_budget(args["device_budget"])
    _checks.choice(args["mode"], "mode", MODES)
    if args["means"] is not None:
        _checks.mapping(args["means"], "means")
    _checks.choice(args["dtype"], "dtype", ("float32", "float16"))
    if args["autocast"] is not None and args["autocast"] not in AUTOCAST:
        raise ArgumentError(
            f"autocast must be one of {tuple(AUTOCAST)} or None, got {args['autocast']!r}."
        )
    for name in ("allow_nonfinite", "overwrite", "compile_model"):
        _checks.flag(args[name], name)
    _checks.optional_flag(args["progress"], "progress")
    prefix = args["prefix"]
    if prefix is not None and not isinstance(prefix, (str, _prefix.Split)):
        raise SplitError(
            f"prefix must be a module path (str) or a coarpy.prefix.Split, got "
            f"{type(prefix).__name__}. For two callables write Split(prefix_fn, suffix_fn)."
        )
    try:
        output_fn = _outputs.resolve(args["output"])
    except CoarError:
        raise
    except (ValueError, TypeError) as err:
        raise ArgumentError(str(err)) from err
    return {"output_fn": output_fn, "shard": _checks.shard(args["shard"])}


def _example_ids(given: Any, examples: ExampleSet) -> list[str | int] | None:
    """``example_ids`` checked against the examples, else the data's own ids (or None)."""
    if given is None:
        return examples.ids
    ids = _checks.example_ids(given, examples.n_examples)
    if examples.ids is not None and examples.ids != ids:
        raise ArgumentError(
            f"example_ids differ from the ids in the data's id field (first: {ids[:3]} vs "
            f"{examples.ids[:3]}). Give one of them: drop example_ids=, or the field."
        )
    return ids


def _n_blocks_after(path: str | os.PathLike, n_masks: int, block_size: int) -> int:
    """How many blocks the store at ``path`` will have once ``n_masks`` is asked for (an
    existing store keeps a larger n_masks); read only, nothing is written."""
    existing = n_masks
    try:
        meta = json.loads((_fs.path(path) / "meta.json").read_text())
        if isinstance(meta.get("n_masks"), int):
            existing = max(existing, meta["n_masks"])
    except (OSError, ValueError, AttributeError):
        pass  # no store yet, or one the store itself will refuse with a clear message
    return -(-existing // block_size)


def _prefix_name(prefix: str | _prefix.Split | None) -> str | None:
    """How the store's identity records ``prefix``.

    A module path only caches the input of a module inside nested Sequentials: the
    same modules run on the same tensors, so like ``batch_size`` it changes no row
    (rounding aside) and a store may be resumed with or without it: None. A Split is
    user code whose cut is verified on a few examples only: its description and the
    code of its two parts.
    """
    if prefix is None or isinstance(prefix, str):
        return None
    code = [_fingerprint.output_fingerprint(f) for f in (prefix.prefix, prefix.suffix)]
    return f"split: {prefix.where} {'/'.join(code)}"


def _plan(
    ds: ComponentDataset, blocks: Iterable[int] | None, shard: tuple[int, int] | None
) -> tuple[Iterator[int], int]:
    """The unfinished blocks to compute, in order, and how many at most (for the bar)."""

    def wanted(b: int) -> bool:
        if shard is not None and b % shard[1] != shard[0]:
            return False
        if ds.intact(b):  # done, and its bytes pass the checksum (read once per resume)
            return False
        if ds.is_done(b):
            log.warning("%s fails its checksum: recomputing block %d", ds.block_path(b), b)
        return True

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


def _check_finite(values: Tensor, first_row: int, dtype: str) -> None:
    """Refuse NaN/inf outputs, checked in the stored precision (float16 overflows)."""
    bad = ~torch.isfinite(values)
    if bad.any():
        row, example = (int(i) for i in bad.nonzero()[0])
        raise CollectError(
            f"Mask row {first_row + row} gave a non-finite output ({values[row, example].item()})"
            f" on example {example}. Check the model and output function, or pass "
            "allow_nonfinite=True to store such values."
        )
    if dtype == "float16":
        bad = ~torch.isfinite(values.to(torch.float16))
        if bad.any():
            row, example = (int(i) for i in bad.nonzero()[0])
            raise CollectError(
                f"Mask row {first_row + row} gave the output {values[row, example].item():g} on "
                f"example {example}, beyond float16's range (+-65504): stored as float16 it "
                "would be infinite. Collect with dtype='float32', or pass "
                "allow_nonfinite=True to store it as inf."
            )
