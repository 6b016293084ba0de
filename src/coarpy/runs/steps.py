"""The steps after collection, on a run directory: fit, evaluate, verify, and their
saved tables.

``fit_run`` fits the run's store (by default centred on the gradient of the run's
model) and saves ``RUN/attributions``; ``evaluate_run``
rebuilds the run's model from its configuration, evaluates the attributions (and
baselines) on fresh masks and saves ``RUN/evaluation.json`` and ``.csv``. Both write
next to the store, so the run must be a local directory. ``verify_run`` checks every
file of a run (and with ``repair`` deletes what is damaged, to be recomputed).

``verify_run`` and ``fit_run(prior="none")`` import nothing a configuration names;
``evaluate_run`` and the default ``fit_run`` (its gradient prior) build the model
(trusted code: see ``coarpy.runs.config``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..store import ComponentDataset
from .config import load_config
from .layout import ATTRIBUTIONS, CONFIG, EVALUATION, is_local, where

BASELINES = ("leave_one_out", "gradient")


def _local(run: str | os.PathLike, step: str) -> Path:
    if not is_local(run):
        raise ConfigError(
            f"coar {step} saves its results next to the store, which needs a local "
            f"directory, but the run is at {run}. Copy the run to a local directory first."
        )
    return Path(run)


PRIORS = ("auto", "gradient", "expected_gradient", "none")


def fit_run(
    run: str | os.PathLike,
    *,
    method: str = "group",
    prior: str = "auto",
    solver: str = "auto",
    l2_grid: Sequence[float] | None = None,
    val_fraction: float | None = None,
    progress: bool = True,
):
    """Fit attributions to a run's store and save them in ``RUN/attributions``.

    By default the group model centred on the gradient (``coarpy.fit``'s default
    method with ``prior="gradient"``), the estimator ``bench/RESULTS_efficiency.md``
    measured to need the fewest masks.

    Parameters
    ----------
    run : a local run directory.
    method, solver, l2_grid, val_fraction : as for ``coarpy.fit``.
    prior : ``"auto"`` (default): ``"gradient"`` for ``method="group"`` when the run
        has a configuration to build its model from, else ``"none"``. ``"gradient"``
        imports and calls the configuration's factory (trusted code: see
        ``coarpy.runs.config``) and refuses a model other than the store's;
        ``"expected_gradient"`` likewise, averaging the gradient over 16 ablation states
        at the run's alpha (``coarpy.baselines.expected_gradient``: 16 backward passes);
        ``"none"`` imports nothing the configuration names.

    Returns
    -------
    Attributions, with ``meta["prior"]`` saying which prior was used (group only).

    Raises
    ------
    ConfigError
        An unknown prior, ``"gradient"`` with another method than ``"group"`` or on a run
        without a configuration.
    FitError
        As for ``coarpy.fit``.
    """
    from ..regression import _prior, fit

    run = _local(run, "fit")
    if prior not in PRIORS:
        raise ConfigError(f"prior must be one of {', '.join(PRIORS)}, got {prior!r}.")
    has_config = (run / CONFIG).exists()
    if prior == "auto":
        prior = "gradient" if method == "group" and has_config else "none"
    computed = prior in ("gradient", "expected_gradient")
    if computed and method != "group":
        raise ConfigError(
            f"The {prior.replace('_', ' ')} prior centres method 'group', got method "
            f"{method!r}. Fit with method 'group', or with prior 'none'."
        )
    if computed and not has_config:
        raise ConfigError(
            f"{run} has no {CONFIG} to build the model from, which the "
            f"{prior.replace('_', ' ')} prior needs. Fit with prior 'none', or call "
            f"coarpy.fit(..., prior={prior!r}, model=...)."
        )
    ds = ComponentDataset(run)
    kw: dict[str, Any] = dict(method=method, solver=solver, l2_grid=l2_grid, progress=progress)
    if val_fraction is not None:
        kw["val_fraction"] = val_fraction
    grad = None
    if computed:
        cfg = load_config(run)
        setup = cfg.build()
        if cfg.device is not None:
            setup.model.to(cfg.device)
        grad = _prior.gradient_prior(
            ds.meta, ds.names, ds.n_examples, model=setup.model,
            components=setup.components, data=setup.data, output=setup.output,
            progress=progress, batch_size=cfg.batch_size, method=prior,
        )  # fmt: skip
        kw["prior"] = grad
    attr = fit(ds, **kw)
    if grad is not None:
        attr.meta["prior"] = prior
    attr.save(run / ATTRIBUTIONS)
    return attr


def evaluate_run(
    run: str | os.PathLike,
    *,
    alphas: tuple[float, ...] | None = None,
    n_masks: int = 100,
    seed: int = 1,
    baselines: tuple[str, ...] = BASELINES,
    progress: bool | None = None,
    check: bool = True,
):
    """Evaluate a run's attributions (and baselines) on fresh masks; save the table.

    Writes ``RUN/evaluation.json`` and ``RUN/evaluation.csv`` and returns the
    ``Evaluation``. ``alphas`` defaults to the run's alpha; baselines are computed on
    the same model and examples. ``check=False`` evaluates even if the attributions
    were fitted under another model or other settings (see ``coarpy.evaluate``).

    Raises
    ------
    ConfigError
        The run has no fitted attributions or configuration, or a baseline is unknown.
    """
    from .. import baselines as _baselines
    from ..attributions import Attributions
    from ..evaluate import evaluate

    run = _local(run, "evaluate")
    ds = ComponentDataset(run)
    if not (run / ATTRIBUTIONS).exists():
        raise ConfigError(f"{run} has no fitted attributions yet. Run `coar fit {run}` first.")
    known = {
        "leave_one_out": _baselines.leave_one_out,
        "gradient": _baselines.gradient,
        "expected_gradient": functools.partial(
            _baselines.expected_gradient,
            alpha=ds.alpha,
            seed=int(ds.meta.get("seed", 0)),
            sampler=ds.meta.get("sampler", "bernoulli"),
        ),  # its states drawn like the run's masks
    }
    unknown = [name for name in baselines if name not in known]
    if unknown:
        raise ConfigError(
            f"Unknown baseline(s) {', '.join(map(repr, unknown))}. Choose from {', '.join(known)}."
        )
    cfg = load_config(run)
    setup = cfg.build()
    methods = {"coar": Attributions.load(run / ATTRIBUTIONS)}
    for name in baselines:
        methods[name] = known[name](
            setup.model, setup.components, setup.data, output=setup.output,
            batch_size=cfg.batch_size, device=cfg.device, mode=cfg.mode,
            autocast=cfg.autocast, device_budget=cfg.device_budget,
        )  # fmt: skip
    result = evaluate(
        methods, setup.model, setup.components, setup.data, output=setup.output,
        alphas=tuple(alphas) if alphas else (ds.alpha,), n_masks=n_masks, seed=seed,
        batch_size=cfg.batch_size, device=cfg.device, mode=cfg.mode,
        autocast=cfg.autocast, progress=progress, check=check,
        device_budget=cfg.device_budget,
    )  # fmt: skip
    result.save(run / f"{EVALUATION}.json")
    write_csv(run / f"{EVALUATION}.csv", result.to_rows())
    return result


def verify_run(run: str | os.PathLike, *, repair: bool = False) -> dict[str, Any]:
    """Check every file of a run; with ``repair``, delete what is damaged.

    Checks ``meta.json`` (fields and identity), every block (size, header, identity,
    checksum), the consolidated copy, ``config.toml`` (parsed and checked, nothing
    imported) and the saved attributions. ``repair`` deletes bad blocks (the next
    ``coar worker RUN`` or ``collect`` recomputes them: masks are deterministic, so
    nothing is lost), temporary files of dead writers, stale short blocks and a bad
    consolidated copy. Damaged attributions or configurations are reported, never
    deleted.

    Returns
    -------
    dict with ``run``, ``n_blocks``, ``done_blocks``, ``bad_blocks``, ``problems``
    (one line each), ``repaired`` (whether ``repair`` deleted anything) and
    ``unrepaired`` (the problems left).

    Raises
    ------
    StoreCorruptError
        ``meta.json`` is damaged: nothing else can be judged without it.
    """
    from ..attributions import Attributions
    from ..errors import CoarError
    from .config import RunConfig

    folder = where(run)
    ds = ComponentDataset(folder)
    problems = []
    consolidated = ds.consolidated_problem()
    bad = ds.verify(repair=repair)
    if bad:
        problems.append(
            f"{len(bad)} damaged block(s): {', '.join(str(ds.block_path(b)) for b in bad[:5])}"
            + (" ..." if len(bad) > 5 else "")
        )
    if consolidated is not None:
        problems.append(f"consolidated copy: {consolidated}")
    repairable = len(problems)
    config = folder / CONFIG
    if config.exists():
        try:
            RunConfig.from_text(config.read_text(errors="replace"), where=str(config))
        except CoarError as err:
            problems.append(str(err))
    if (folder / ATTRIBUTIONS).exists():
        try:
            Attributions.load(folder / ATTRIBUTIONS)
        except (CoarError, OSError, ValueError) as err:
            problems.append(f"{folder / ATTRIBUTIONS}: {err}")
    return {
        "run": str(folder),
        "n_blocks": ds.n_blocks,
        "done_blocks": len(ds.done_blocks()),
        "bad_blocks": bad,
        "problems": problems,
        "repaired": bool(repair and repairable),
        "unrepaired": problems[repairable:] if repair else problems,
    }


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """Rows of plain values as a CSV file (nothing written for no rows)."""
    import csv

    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
