"""bench/gpu.sh in its small CPU mode: the prepared GPU check runs end to end.

The full check needs a GPU; this smoke test keeps the script from rotting in between.
torchvision cannot be installed beside this torch, so its ImageNet sections run here
on stand-ins of torchvision's ResNet-50 and ViT-B/16 (tests/_torchvision_standins.py),
put on the script's path as a ``torchvision`` package; without it they are skipped.
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
TESTS = Path(__file__).resolve().parent


def _run(tmp_path: Path, *flags: str, pythonpath: str | None = None) -> list[dict]:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--small", "--threads", "1", "--budget", "60",
         *flags],
        env=env, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def _fake_torchvision(tmp_path: Path) -> str:
    """A ``torchvision`` package made of the stand-ins; returns the folder to put on the path."""
    package = tmp_path / "fake" / "torchvision"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "from _torchvision_standins import fake_torchvision as _fake\n"
        "_module = _fake()\n"
        "models, __version__ = _module.models, _module.__version__\n"
    )
    return str(package.parent)


@pytest.mark.slow  # runs a whole benchmark script: not for the fast suite
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_gpu_script_runs_small_on_the_cpu_and_writes_its_table(tmp_path):
    rows = _run(tmp_path, pythonpath=_fake_torchvision(tmp_path))
    sections = {r["section"] for r in rows}
    assert {"collect", "paths", "channels_last", "prefix", "fit"} <= sections
    assert not [r for r in rows if "failed" in str(r.get("note", ""))]
    collect_rows = [r for r in rows if r["section"] == "collect"]
    assert all(r["plain"] > 0 and r["collect"] > 0 and r["reference"] > 0 for r in collect_rows)
    # The paper's ImageNet setups, with their real component sets.
    sizes = {r["model"]: r["N"] for r in collect_rows}
    assert sizes["ResNet-50 (torchvision)"] == 22_720
    assert sizes["ViT-B/16 (torchvision)"] == 82_944
    assert any(str(r.get("model", "")).startswith("setup B") for r in rows if r["section"] == "fit")
    out = tmp_path / "out"
    assert "| section | model |" in (out / "results.md").read_text()
    env = (out / "env.txt").read_text()
    assert "mode: small" in env and "torchvision: 0.0-standin" in env
    assert (out / "log.txt").exists()


@pytest.mark.slow  # runs the benchmark script
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_without_torchvision_the_imagenet_sections_are_skipped_with_a_note(tmp_path):
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchvision is installed here: nothing is skipped")
    rows = _run(tmp_path, "--only", "imagenet")
    skipped = [r for r in rows if "torchvision is not installed" in str(r.get("note", ""))]
    assert [r["section"] for r in skipped] == [
        "collect ResNet-50 (torchvision)",
        "collect ViT-B/16 (torchvision)",
    ]
    assert [r["section"] for r in rows if r not in skipped] == ["fit"]  # setup B's fit still runs


@pytest.mark.slow  # runs the benchmark script
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_stream_section_runs_alone_and_finds_the_same_rows(tmp_path):
    rows = _run(tmp_path, "--only", "stream")
    assert [r["section"] for r in rows] == ["stream"]
    (row,) = rows
    assert row["plain"] > 0 and row["collect"] > 0 and row["ratio"] > 0
    assert "rows identical: True" in row["note"]
