"""The run directory: one place for a run's configuration, store and results.

Layout::

    RUN/config.toml        the run configuration (copied by ``collect_run``)
    RUN/meta.json, blocks/ the component dataset (``coarpy.store``)
    RUN/attributions/      fitted attributions (``Attributions.save``)
    RUN/evaluation.json    held-out evaluation (and .csv)
    RUN/workers/*.json     heartbeats of collecting workers, one file per process:
                           {"host", "pid", "shard": [k, K] or null, "time": unix seconds}

The command line works on run directories; these functions are what it calls.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, Setup
from .store import ComponentDataset

CONFIG = "config.toml"
ATTRIBUTIONS = "attributions"
EVALUATION = "evaluation"
WORKERS = "workers"
RECENT_S = 300  # a block or heartbeat this recent counts as "active"
_RATE_WINDOW_S = 600  # speed is measured over the last 10 minutes of finished blocks


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
        prefix=cfg.prefix,
        compile_model=cfg.compile_model,
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
    now = time.time()
    last = prog["last_block_time"]
    rate = _rate(ds)
    eta = None
    if rate:
        eta = (prog["n_masks"] - prog["done_rows"]) / rate
    recent = last is not None and now - last < RECENT_S
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
        "workers_recent": _recent_workers(Path(run), now),
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
    workers = info.get("workers_recent")
    if workers is not None:
        seen = ", ".join(
            f"{w['host']}:{w['pid']}"
            + (f" (shard {w['shard'][0]}/{w['shard'][1]})" if w["shard"] else "")
            for w in workers
        )
        lines.append(
            f"workers    {len(workers)} seen in the last 5 min" + (f": {seen}" if seen else "")
        )
    lines.append(f"fitted     {yes[info['fitted']]}; evaluated {yes[info['evaluated']]}")
    s = info["settings"]
    lines.append(
        f"settings   {s['n_components']} components, {s['n_examples']} examples, "
        f"alpha={s['alpha']} ({s['sampler']}), seed={s['seed']}, output={s['output']}, "
        f"mode={s['mode']}, block_size={s['block_size']}, dtype={s['dtype']}"
    )
    return "\n".join(lines)


def _rate(ds: ComponentDataset) -> float | None:
    """Masks per second over the last ``_RATE_WINDOW_S`` of finished blocks, or None.

    Only recent blocks count, so a run resumed after a pause reports its speed now,
    not an average over the pause. The earliest block of the window is left out: its
    compute time lies before the window starts.
    """
    done = sorted(
        (ds.block_path(b).stat().st_mtime, b) for b in ds.done_blocks()
    )  # (mtime, block) by time
    if len(done) < 2:
        return None
    last = done[-1][0]
    window = [(t, b) for t, b in done if t >= last - _RATE_WINDOW_S]
    if len(window) < 2:
        window = done[-2:]
    start = window[0][0]
    if last <= start:
        return None
    rows = sum(ds.block_rows(b)[1] - ds.block_rows(b)[0] for _, b in window[1:])
    return rows / (last - start)


def _recent_workers(run: Path, now: float) -> list[dict[str, Any]] | None:
    """Heartbeats in RUN/workers/ younger than RECENT_S; None if no worker wrote one."""
    folder = run / WORKERS
    if not folder.is_dir():
        return None
    seen = []
    for path in sorted(folder.glob("*.json")):
        try:
            beat = json.loads(path.read_text())
            when = float(beat["time"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced right now, or not a heartbeat: not evidence of a worker
        if now - when < RECENT_S:
            shard = beat.get("shard")
            seen.append(
                {
                    "host": str(beat.get("host", "?")),
                    "pid": beat.get("pid"),
                    "shard": list(shard) if shard else None,
                    "seconds_ago": round(now - when, 1),
                }
            )
    return seen


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
