"""Shared by the reliability campaigns (tests/test_reliability_*.py; not a test module).

``tiny_setup`` is a small seeded MLP whose collection takes a fraction of a second, so
a campaign can kill, corrupt and resume it many times. ``record`` writes a campaign's
figures into its section of ``bench/RESULTS_reliability.md`` when the environment
variable ``COARPY_RECORD_RELIABILITY`` is set (``COARPY_RECORD_RELIABILITY=1 pytest
tests/test_reliability_*.py``); ordinary test runs leave the file alone.
``store_files`` reads a store as bytes for byte-for-byte comparisons.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from coarpy.components import Components

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "RESULTS_reliability.md"
SETTINGS = {"n_masks": 60, "alpha": 0.1, "seed": 7, "block_size": 2}  # 30 blocks


def tiny_setup(n_examples: int = 48, delay: float = 0.0) -> dict:
    """A seeded MLP 8 -> 32 -> 32 -> 4, its 64 hidden units, and seeded examples;
    identical in every process (a run factory for the campaigns). ``delay`` seconds of
    sleep before each forward pass (a hook: the rows stay the same) slow a run down."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    ).eval()
    if delay:
        model.register_forward_pre_hook(lambda module, args: time.sleep(delay))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_examples, 8, generator=gen)
    y = torch.randint(0, 4, (n_examples,), generator=gen)
    comps = Components.from_spec(model, {"0": "linear", "2": "linear"})
    return {"model": model, "data": (x, y), "components": comps}


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store that holds data, as bytes: the blocks, and meta.json without
    the record of when and where it was created."""
    files = {f"blocks/{f.name}": f.read_bytes() for f in sorted((path / "blocks").glob("*.blk"))}
    meta = json.loads((path / "meta.json").read_text())
    meta.pop("created", None)
    files["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    return files


def temp_files(path: Path) -> list[str]:
    """Temporary files anywhere in a run directory."""
    return sorted(str(p.relative_to(path)) for p in path.rglob(".*.tmp"))


def record(section: str, markdown: str) -> None:
    """Replace ``section`` of the results file with ``markdown`` (only when asked to)."""
    if not os.environ.get("COARPY_RECORD_RELIABILITY"):
        return
    start, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else ""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text}\n{block}\n"
    RESULTS.write_text(text)


def in_a_fresh_interpreter(script: str, tmp_path: Path, timeout: float) -> None:
    """Run ``python script tmp_path`` (a campaign's ``__main__``) and fail with its output
    if it fails or outlives ``timeout`` seconds.

    The campaigns fork, and forking the test process itself would copy whatever threads
    and locks earlier tests left in it (Ray's, gRPC's, OpenMP's): a child that inherits
    a held lock waits forever.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    try:
        done = subprocess.run(
            [sys.executable, script, str(tmp_path)], env=env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the campaign did not finish in {timeout} s:\n{err.stdout}\n{err.stderr}")
    assert done.returncode == 0, done.stdout + done.stderr
