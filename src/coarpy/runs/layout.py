"""The run directory's layout: the name of every file and folder a run holds, once.

::

    RUN/config.toml        the run configuration (saved by every worker of the run)
    RUN/meta.json, blocks/ the component dataset (``coarpy.store``)
    RUN/learning_curve.json the last stop-rule check (``coarpy.stopping``)
    RUN/attributions/      fitted attributions (``Attributions.save``)
    RUN/evaluation.json    held-out evaluation (and evaluation.csv)
    RUN/workers/*.json     heartbeats of collecting workers (``coarpy.runs.heartbeat``)
    RUN/leases/*.lease     which worker computes which block (``coarpy.runs.leases``)
    RUN/logs/              logs of launched worker processes (``coarpy.runs.local``)
    RUN/edits/             Coar-Edit records (``coarpy.edit``)

A run may live on any fsspec filesystem (``s3://bucket/run``): :func:`where` gives a
``pathlib.Path`` for a local run and a ``coarpy._fs.RemotePath`` for a URL, never a
local folder named after the URL.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import _fs

CONFIG = "config.toml"
ATTRIBUTIONS = "attributions"
EVALUATION = "evaluation"  # evaluation.json and evaluation.csv
WORKERS = "workers"
LEASES = "leases"
LOGS = "logs"
EDITS = "edits"


def where(run: str | os.PathLike | _fs.RemotePath) -> Path | _fs.RemotePath:
    """The run directory ``run`` names: a ``Path``, or a ``RemotePath`` for a URL.

    Examples
    --------
    >>> str(where("runs/digits") / CONFIG)
    'runs/digits/config.toml'
    """
    return _fs.path(run)


def is_local(run: str | os.PathLike | _fs.RemotePath) -> bool:
    """True when ``run`` is a directory on this machine's filesystem (not a URL)."""
    return not _fs.is_remote(where(run))
