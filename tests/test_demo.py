"""`coar demo` end to end, with small settings, into a temporary folder."""

from __future__ import annotations

import csv
import json

import pytest

from coarpy.cli import main
from coarpy.demo import run_demo


def _rows(path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines()))


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
