"""bench/gpu.sh in its small CPU mode: the prepared GPU check runs end to end.

The full check needs a GPU; this smoke test keeps the script from rotting in between.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # runs a whole benchmark script: not for the fast suite
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_gpu_script_runs_small_on_the_cpu_and_writes_its_table(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--small", "--threads", "1", "--budget", "60"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    sections = {r["section"] for r in rows}
    assert {"collect", "paths", "channels_last", "prefix", "fit"} <= sections
    assert not [r for r in rows if "failed" in str(r.get("note", ""))]
    collect_rows = [r for r in rows if r["section"] == "collect"]
    assert all(r["plain"] > 0 and r["collect"] > 0 and r["reference"] > 0 for r in collect_rows)
    assert "| section | model |" in (tmp_path / "results.md").read_text()
    assert "mode: small" in (tmp_path / "env.txt").read_text()
    assert (tmp_path / "log.txt").exists()
