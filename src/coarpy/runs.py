"""The run directory: one place for a run's configuration, store and results.

Layout::

    RUN/config.toml        the run configuration (copied by ``collect_run``)
    RUN/meta.json, blocks/ the component dataset (``coarpy.store``)
    RUN/attributions/      fitted attributions (``Attributions.save``)
    RUN/evaluation.json    held-out evaluation (and .csv)

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


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=1, default=str))
