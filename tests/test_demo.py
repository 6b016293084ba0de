"""Tests of coarpy/demo/run.py: `coar demo` end to end, with small settings, into a
temporary folder; and the demo's place in the package (out of the top-level API)."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys

import pytest

import coarpy
from coarpy._imports import import_object
from coarpy.cli import main
from coarpy.demo import digits_setup, run_demo


def _rows(path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines()))


def test_run_configs_still_name_the_factory_coarpy_demo_digits_setup():
    assert import_object("coarpy.demo:digits_setup") is digits_setup


def test_demo_models_and_data_are_not_top_level_api():
    assert "models" not in coarpy.__all__ and "datasets" not in coarpy.__all__
    assert importlib.util.find_spec("coarpy.models") is None
    assert importlib.util.find_spec("coarpy.datasets") is None
    code = (
        "import sys, coarpy; "
        "print(sorted(m for m in ('coarpy.demo', 'coarpy.report', 'matplotlib', "
        "'sklearn', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"  # `import coarpy` stays light


@pytest.mark.slow
def test_demo_writes_its_results_and_coar_beats_the_baselines(tmp_path, capsys):
    out = tmp_path / "demo"
    result = run_demo(out, n_masks=1000, eval_masks=40, n_examples=80, progress=False)
    printed = capsys.readouterr().out
    for name in ("store/meta.json", "attributions", "evaluation.json", "evaluation.csv",
                 "top_components.csv", "model"):  # fmt: skip
        assert (out / name).exists(), name
    assert "coar" in printed and "leave_one_out" in printed and "gradient" in printed
    assert result["n_masks"] == 1000 and result["accuracy"] > 0.95

    rows = json.loads((out / "evaluation.json").read_text())
    assert rows["alphas"] == [0.1, 0.2]
    table = {(r["attribution"], float(r["alpha"])): r for r in _rows(out / "evaluation.csv")}
    for alpha in (0.1, 0.2):
        coar = float(table["coar", alpha]["pearson_mean"])
        assert coar > 0.8
        assert coar > float(table["gradient", alpha]["pearson_mean"]) + 0.05
    # Beyond the near-additive regime COAR must beat leave-one-out clearly.
    assert (
        float(table["coar", 0.2]["pearson_mean"])
        > float(table["leave_one_out", 0.2]["pearson_mean"]) + 0.02
    )
    top = list(_rows(out / "top_components.csv"))
    assert len(top) == 8 and all(":" in r["component"] for r in top)


@pytest.mark.slow
def test_demo_rerun_resumes_instead_of_recomputing(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--n-masks", "200", "--eval-masks", "10",
            "--n-examples", "30"]  # fmt: skip
    assert main(args) == 0
    first = sorted(p.stat().st_mtime_ns for p in (out / "store" / "blocks").iterdir())
    capsys.readouterr()
    assert main(args) == 0
    assert "resuming   200 of 200 masks already collected" in capsys.readouterr().out
    again = sorted(p.stat().st_mtime_ns for p in (out / "store" / "blocks").iterdir())
    assert again == first
