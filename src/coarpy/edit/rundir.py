"""Coar-Edit on a run directory: edit a run's model with its fitted attributions.

``edit_run(RUN, targets=..., k=...)`` rebuilds the run's setup through the public
``coarpy.runs`` functions, makes the edit over the run's examples and saves it, with
the edited weights, under ``RUN/edits/``. ``coar edit`` calls it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _batching as B
from .. import outputs as _outputs
from .._engine import model_device
from ..attributions import Attributions
from ..errors import EditError
from ._checks import Rows
from .measuring import Metric
from .record import Edit, make

log = logging.getLogger(__name__)

EDITS = "edits"  # the folder of a run directory that holds saved edits


def edit_run(
    run: str | os.PathLike,
    *,
    targets: Rows,
    references: Rows | None = None,
    k: int,
    direction: str = "raise",
    name: str | None = None,
    ks: Iterable[int] | None = None,
    progress: bool | None = None,
) -> Edit:
    """Edit a run's model with its fitted attributions; save ``RUN/edits/<name>.json``.

    Rebuilds the model, components and examples from ``RUN/config.toml``, loads
    ``RUN/attributions``, makes the edit (:func:`~coarpy.edit.make`) over the run's
    examples and saves it with the edited model's state_dict (``RUN/edits/<name>.pt``).
    When the run's factory returns ``heldout`` data, its mean output and accuracy
    (share of positive outputs) before and after are recorded too, as
    ``heldout_output`` and ``heldout_acc``.

    Parameters
    ----------
    run : the run directory (``coar collect``'s path, after ``coar fit``).
    targets, references, k, direction, progress : as for :func:`~coarpy.edit.make`;
        indices into the run's examples; ``references=None`` takes every other example.
    name : file name of the edit (default ``"<direction>-k<k>"``).
    ks : sweep sizes for the edit curve (default: 0, powers of two up to ``k``, and
        ``k``); pass ``()`` for none.

    Raises
    ------
    EditError
        The run has no fitted attributions, or the edit's inputs are inconsistent.
    """
    from .. import runs

    run = Path(run)
    if not (run / runs.ATTRIBUTIONS).is_dir():
        raise EditError(f"{run} has no fitted attributions yet. Run `coar fit {run}` first.")
    cfg = runs.load_config(run)
    setup = runs.build(run)
    if cfg.device is not None:
        setup.model.to(cfg.device)
    attr = Attributions.load(run / runs.ATTRIBUTIONS)
    output_fn = _outputs.resolve(setup.output)
    metrics: dict[str, Metric] = {}
    heldout = setup.extra.get("heldout") if isinstance(setup.extra, Mapping) else None
    if heldout is not None:
        metrics["heldout_output"] = lambda m: _mean_output(m, heldout, output_fn, share=False)
        metrics["heldout_acc"] = lambda m: _mean_output(m, heldout, output_fn, share=True)
    if ks is None:
        ks = [0, *(2**i for i in range(max(int(k), 1).bit_length()) if 2**i < k), k]
    e = make(
        attr, setup.model, setup.components, setup.data, targets=targets,
        references=references, k=k, direction=direction, output=output_fn, metrics=metrics,
        ks=ks or None, batch_size=cfg.batch_size, progress=progress,
    )  # fmt: skip
    edited = e.apply_to(setup.model, setup.components)
    path = run / EDITS / f"{name or f'{direction}-k{k}'}.json"
    e.save(path, model=edited)
    log.info("saved the edit to %s and the edited weights to %s", path, path.with_suffix(".pt"))
    return e


def _mean_output(model: nn.Module, data: Any, output_fn, *, share: bool) -> float:
    """Mean output over ``data`` (``share=True``: the share of positive outputs)."""
    device = model_device(model)
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in B.batches_on(data, device):
            values = _outputs.check_values(output_fn(model, batch), B.batch_size(batch), output_fn)
            total += float((values > 0).double().sum() if share else values.double().sum())
            count += values.shape[0]
    if count == 0:
        raise EditError("The held-out data yielded no examples.")
    return total / count
