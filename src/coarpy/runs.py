"""The run directory: one place for a run's configuration, store and results.

Layout::

    RUN/config.toml        the run configuration (copied by ``collect_run``)
    RUN/meta.json, blocks/ the component dataset (``coarpy.store``)
    RUN/attributions/      fitted attributions (``Attributions.save``)
    RUN/evaluation.json    held-out evaluation (and .csv)

The command line works on run directories; these functions are what it calls.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, Setup
from .store import ComponentDataset

CONFIG = "config.toml"
ATTRIBUTIONS = "attributions"
EVALUATION = "evaluation"


def load_config(run: str | Path) -> RunConfig:
    """The configuration a run was collected with."""
    path = Path(run) / CONFIG
    if not path.exists():
        raise ConfigError(
            f"{run} has no {CONFIG}. Runs started from Python have none: use the Python API "
            "for them, or start the run with `coar collect CONFIG`."
        )
    return RunConfig.load(path)


def collect_run(
    config: RunConfig | str | Path,
    *,
    shard: tuple[int, int] | str | None = None,
    progress: bool | None = None,
) -> ComponentDataset:
    """Build the setup named by ``config`` and collect (or resume) its store."""
    from .collect import collect

    cfg = config if isinstance(config, RunConfig) else RunConfig.load(config)
    setup = cfg.build()
    run = Path(cfg.path)
    ds = collect(
        setup.model,
        setup.components,
        setup.data,
        output=setup.output,
        path=run,
        n_masks=cfg.n_masks,
        alpha=cfg.alpha,
        seed=cfg.seed,
        sampler=cfg.sampler,
        block_size=cfg.block_size,
        batch_size=cfg.batch_size,
        device=cfg.device,
        mode=cfg.mode,
        shard=shard,
        autocast=cfg.autocast,
        dtype=cfg.dtype,
        progress=progress,
    )
    config_path = run / CONFIG
    text = cfg.to_toml()
    if not config_path.exists() or config_path.read_text() != text:
        config_path.write_text(text)
    return ds


def build(run: str | Path) -> Setup:
    """Rebuild the model, components and data of a run from its configuration."""
    return load_config(run).build()


def status(run: str | Path) -> dict[str, Any]:
    """Progress, speed, ETA and settings of a run, as plain data."""
    ds = ComponentDataset(run)
    prog = ds.progress()
    rate = None
    eta = None
    first, last = prog["first_block_time"], prog["last_block_time"]
    if prog["done_blocks"] >= 2 and last > first:
        # The first block's own compute time is not inside (first, last].
        rows_after_first = prog["done_rows"] - ds.block_size
        rate = rows_after_first / (last - first)
        remaining = prog["n_masks"] - prog["done_rows"]
        eta = remaining / rate if rate > 0 else None
    recent = last is not None and time.time() - last < 300
    meta = ds.meta
    settings = {
        k: meta[k]
        for k in (
            "n_components",
            "n_examples",
            "alpha",
            "sampler",
            "seed",
            "block_size",
            "output",
            "mode",
            "dtype",
        )  # fmt: skip
    }
    return {
        "run": str(Path(run)),
        **{k: prog[k] for k in ("done_rows", "n_masks", "done_blocks", "n_blocks", "fraction")},
        "masks_per_s": rate,
        "eta_s": eta,
        "active_recently": recent,
        "last_block_time": last,
        "fitted": (Path(run) / ATTRIBUTIONS).exists(),
        "evaluated": (Path(run) / f"{EVALUATION}.json").exists(),
        "settings": settings,
    }


def format_status(info: dict[str, Any]) -> str:
    """A few human-readable lines for ``coar status``."""
    pct = 100 * info["fraction"]
    lines = [
        f"run        {info['run']}",
        f"masks      {info['done_rows']} / {info['n_masks']} ({pct:.1f}%), "
        f"blocks {info['done_blocks']} / {info['n_blocks']}",
    ]
    if info["masks_per_s"]:
        eta = info["eta_s"]
        eta_text = "done" if not eta else time.strftime("%H:%M:%S", time.gmtime(eta))
        lines.append(f"speed      {info['masks_per_s']:.2f} masks/s, ETA {eta_text}")
    yes = {True: "yes", False: "no"}
    active = "yes (a block in the last 5 min)" if info["active_recently"] else "no"
    lines.append(f"active     {active}")
    lines.append(f"fitted     {yes[info['fitted']]}; evaluated {yes[info['evaluated']]}")
    s = info["settings"]
    lines.append(
        f"settings   {s['n_components']} components, {s['n_examples']} examples, "
        f"alpha={s['alpha']} ({s['sampler']}), seed={s['seed']}, output={s['output']}, "
        f"mode={s['mode']}, block_size={s['block_size']}, dtype={s['dtype']}"
    )
    return "\n".join(lines)


def fit_run(run: str | Path, *, method: str = "ridge", progress: bool = True):
    """Fit attributions to a run's store and save them in ``RUN/attributions``."""
    from .regression import fit

    attr = fit(ComponentDataset(run), method=method, progress=progress)
    attr.save(Path(run) / ATTRIBUTIONS)
    return attr


def evaluate_run(
    run: str | Path,
    *,
    alphas: tuple[float, ...] | None = None,
    n_masks: int = 100,
    seed: int = 1,
    baselines: tuple[str, ...] = ("leave_one_out", "gradient"),
    progress: bool | None = None,
):
    """Evaluate a run's attributions (and baselines) on fresh masks; save the table.

    Writes ``RUN/evaluation.json`` and ``RUN/evaluation.csv``. ``alphas`` defaults to
    the run's alpha; baselines are computed on the same model and examples.
    """
    from . import baselines as _baselines
    from .attributions import Attributions
    from .evaluate import evaluate

    run = Path(run)
    ds = ComponentDataset(run)
    if not (run / ATTRIBUTIONS).exists():
        raise ConfigError(f"{run} has no fitted attributions yet. Run `coar fit {run}` first.")
    cfg = load_config(run)
    setup = cfg.build()
    methods = {"coar": Attributions.load(run / ATTRIBUTIONS)}
    known = {"leave_one_out": _baselines.leave_one_out, "gradient": _baselines.gradient}
    for name in baselines:
        if name not in known:
            raise ConfigError(f"Unknown baseline {name!r}. Choose from {', '.join(known)}.")
        methods[name] = known[name](
            setup.model, setup.components, setup.data, output=setup.output,
            batch_size=cfg.batch_size, device=cfg.device, mode=cfg.mode,
        )  # fmt: skip
    result = evaluate(
        methods, setup.model, setup.components, setup.data, output=setup.output,
        alphas=tuple(alphas) if alphas else (ds.alpha,), n_masks=n_masks, seed=seed,
        batch_size=cfg.batch_size, device=cfg.device, mode=cfg.mode, progress=progress,
    )  # fmt: skip
    result.save(run / f"{EVALUATION}.json")
    write_csv(run / f"{EVALUATION}.csv", result.to_rows())
    return result


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows of plain values as a CSV file (nothing written for no rows)."""
    import csv

    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
