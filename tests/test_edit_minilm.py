"""Coar-Edit on a real pretrained transformer: quick runs of the three MiniLM examples.

Each example edits the last layer of all-MiniLM-L6-v2 in a sentiment probe on real
movie-review sentences, offline. The quick settings are tiny (its 12 heads and 52
seeded MLP neurons of 1,536, 8-16 edit sentences, 100 masks, k up to 4), so the tests check
properties that hold by construction or with wide margins, not the numbers of
``examples/RESULTS.md``:

- the oracle's first step measures every single component, so at k = 1 no method's
  edit scores better on the edit split under the objective the oracle maximises;
- the edits change what they should on held-out sentences.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from coarpy.errors import DatasetError, MissingExtraError

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module", autouse=True)
def _needs_minilm():
    from coarpy.demo import minilm, pang_lee_sentences

    try:
        pang_lee_sentences()
        minilm()
    except (DatasetError, MissingExtraError) as err:
        pytest.skip(str(err))


def _run(name: str, out: Path) -> dict:
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module.main(["--quick", "--out", str(out)])


def _at(table: list[dict], k: int) -> dict:
    return next(r for r in table if r["k"] == k)


def test_minilm_spurious_quick(tmp_path):
    results = _run("minilm_spurious", tmp_path)
    curves = results["curves"]
    assert results["n_components"] == 12 + 52  # the heads and --quick's seeded neurons
    # the oracle's objective is the edit split's worst-group accuracy, then the mean
    best = _at(curves["oracle"], 1)
    for method, table in curves.items():
        row = _at(table, 1)
        assert (row["edit_worst"], row["edit_avg"]) <= (best["edit_worst"], best["edit_avg"]), (
            method
        )
    # measured: held-out worst group 0.21 -> 0.57 with the oracle's one component
    before = curves["oracle"][0]["heldout_worst"]
    assert max(r["heldout_worst"] for r in curves["oracle"]) > before + 0.1
    assert (tmp_path / "minilm_spurious" / "results.json").is_file()


def test_minilm_backdoor_quick(tmp_path):
    results = _run("minilm_backdoor", tmp_path)
    curves = results["curves"]
    assert results["before"]["heldout_triggered"] < 0.2  # the trigger works (measured 0.0)

    def value(row: dict, clean_before: float) -> float:  # the objective's first column
        return row["target_acc"] - max(0.0, clean_before - row["edit_clean"])

    clean0 = curves["oracle"][0]["edit_clean"]
    best = value(_at(curves["oracle"], 1), clean0)
    assert all(value(_at(t, 1), clean0) <= best + 1e-12 for t in curves.values())
    # measured: the oracle's 4 components take triggered accuracy 0.0 -> 0.2 (held out)
    # while clean accuracy goes 0.61 -> 0.71
    last = curves["oracle"][-1]
    assert last["heldout_triggered"] > curves["oracle"][0]["heldout_triggered"]
    assert last["heldout_clean"] >= curves["oracle"][0]["heldout_clean"] - 0.1


def test_minilm_fix_errors_quick(tmp_path):
    results = _run("minilm_fix_errors", tmp_path)
    rows = results["per_error"]
    errors = sorted({r["error"] for r in rows})
    assert errors and results["n_components"] == 12 + 52
    for e in errors:
        by = {r["method"]: r for r in rows if r["error"] == e}
        # one component fixes e for some method => the oracle's exact first step finds one
        # (unless fixing it breaks every reference, which never happens here)
        if any(r["k"] == 1 for r in by.values()):
            assert by["oracle"]["k"] == 1, e
    fixed = [r for r in rows if r["method"] == "oracle" and r["k"] is not None]
    assert fixed  # measured: 2 of 3 errors fixed
    assert all(r["reference_acc"] >= 0.8 for r in fixed)  # few references broken


def test_quick_components_keep_the_function():
    # --quick edits the heads and a seeded subset of neurons through a split down
    # projection: the model computes the same outputs, and ablating input j of the
    # split is ablating neuron rows[j] of the original
    import torch

    sys.path.insert(0, str(EXAMPLES))
    try:
        import _text as T
    finally:
        sys.path.remove(str(EXAMPLES))
    from coarpy import edit
    from coarpy.demo.text import EncoderTail

    encoder, tokenizer, sentences, labels = T.load()
    probe = T.fit_probe(encoder, tokenizer, sentences[:40], labels[:40])
    tail = EncoderTail(probe, T.START)
    model, comps = T.components(tail, quick=True, seed=0)
    full = T.components(tail)[1]
    assert len(comps) == 12 + T.QUICK_NEURONS and len(full) == 12 + 1536
    data = T.batch(probe, tokenizer, sentences[100:108], labels[100:108])
    torch.testing.assert_close(T.outputs_of(model, data), T.outputs_of(tail, data))
    rows = model.layer[str(T.START)].output.dense.rows
    split = edit.apply(model, comps, torch.tensor([0, 12, 13]))  # head 0, two neurons
    whole = edit.apply(tail, full, torch.tensor([0, 12 + int(rows[0]), 12 + int(rows[1])]))
    torch.testing.assert_close(T.outputs_of(split, data), T.outputs_of(whole, data))
