"""Tests of coarpy/learning_curve.py: refits on the first rows, scored on held-out masks.

The real data: a store of 200 masks (alpha 0.1) over the 56 conv channels and hidden
units of the digits CNN, on 16 held-out digits.
"""

from __future__ import annotations

import pytest
import torch

from coarpy.collect import collect
from coarpy.components import Components
from coarpy.errors import EvaluationError
from coarpy.evaluate import pearson
from coarpy.learning_curve import (
    MIN_STORE_ROWS,
    LearningCurve,
    learning_curve,
    store_learning_curve,
)
from coarpy.regression import fit

SPEC = {"features.0": "conv", "features.4": "conv", "classifier.1": "linear"}


@pytest.fixture(scope="module")
def store(trained_cnn, digits, tmp_path_factory):
    comps = Components.from_spec(trained_cnn, SPEC)
    _, _, x, y = digits
    return collect(
        trained_cnn, comps, (x[:16], y[:16]), path=tmp_path_factory.mktemp("lc") / "run",
        output="margin", n_masks=200, alpha=0.1, seed=0, block_size=50, progress=False,
    )  # fmt: skip


def test_learning_curve_equals_separate_fits_on_the_first_rows():
    g = torch.Generator().manual_seed(0)
    V = torch.rand(400, 12, generator=g) > 0.2  # (n, N) keep-masks
    w = torch.randn(12, 3, generator=g)
    Y = V.float() @ w + 0.5 * torch.randn(400, 3, generator=g)  # (n, E) noisy linear outputs
    train, keep, true = (V[:300], Y[:300]), V[300:], Y[300:]
    curve = learning_curve(train, keep, true, sizes=(200, 30), method="ols")
    assert curve.sizes == (30, 200) and curve.n_heldout == 100
    for i, n in enumerate(curve.sizes):
        attr = fit((V[:n], Y[:n]), method="ols", progress=False)
        torch.testing.assert_close(curve.pearson[i], pearson(attr.predict(keep), true))
    assert bool((curve.pearson[1] > curve.pearson[0]).all())  # more masks, better fit
    assert curve.heldout == "100 held-out masks"


def test_the_curve_keeps_its_largest_fit_and_the_held_out_masks():
    g = torch.Generator().manual_seed(1)
    V = torch.rand(120, 6, generator=g) > 0.3  # (n, N)
    Y = V.float() @ torch.randn(6, 2, generator=g)  # (n, E)
    curve = learning_curve((V[:100], Y[:100]), V[100:], Y[100:], sizes=(20, 80), method="ols")
    again = fit((V[:80], Y[:80]), method="ols", progress=False)
    assert torch.equal(curve.final.weights, again.weights)
    assert torch.equal(curve.keep, V[100:]) and torch.equal(curve.true, Y[100:].double())


def test_learning_curve_refuses_more_rows_than_the_store_has(store):
    keep, true = store.masks()[:20], store.outputs()[:20]
    with pytest.raises(EvaluationError, match="between 2 and the 200 training rows"):
        learning_curve(store, keep, true, sizes=(50, 201))


def test_learning_curve_refuses_held_out_masks_over_other_components(store):
    keep, true = store.masks()[:20], store.outputs()[:20]
    with pytest.raises(EvaluationError, match=r"keep must have shape \(n_masks, 56\)"):
        learning_curve(store, keep[:, :10], true)
    with pytest.raises(EvaluationError, match="must be a ComponentDataset or a tuple"):
        learning_curve([keep, true], keep, true)


def test_store_curve_holds_out_the_stores_last_rows_from_every_fit(store):
    curve = store_learning_curve(store, sizes=(40, 160))
    assert isinstance(curve, LearningCurve)
    assert curve.n_heldout == 40  # 200 // 5
    assert curve.heldout == "the store's last 40 rows, held out from every refit"
    V, Y = store.masks(), store.outputs()
    same = learning_curve((V[:160], Y[:160]), V[160:], Y[160:], sizes=(40, 160))
    torch.testing.assert_close(curve.pearson, same.pearson, equal_nan=True)
    assert curve.mean_pearson[1] > curve.mean_pearson[0]


def test_store_curve_on_a_held_out_store_fits_on_every_row(store):
    V, Y = store.masks(), store.outputs()
    curve = store_learning_curve(store, heldout=(V[:30], Y[:30]), sizes=(200,))
    assert curve.sizes == (200,) and curve.n_heldout == 30
    assert curve.heldout == "30 held-out masks"


def test_store_curve_needs_enough_rows_to_hold_some_out(tmp_path, trained_cnn, digits):
    comps = Components.from_spec(trained_cnn, {"features.0": "conv"})
    _, _, x, y = digits
    small = collect(
        trained_cnn, comps, (x[:4], y[:4]), path=tmp_path / "small", output="margin",
        n_masks=MIN_STORE_ROWS - 1, alpha=0.1, progress=False,
    )  # fmt: skip
    with pytest.raises(EvaluationError, match=f"has {MIN_STORE_ROWS - 1} finished rows"):
        store_learning_curve(small)
