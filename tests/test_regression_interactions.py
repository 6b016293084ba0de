"""Tests of coarpy/regression/interactions.py: pairwise terms over the top components."""

from __future__ import annotations

import itertools

import pytest
import torch

from coarpy.errors import FitError
from coarpy.regression import fit
from coarpy.regression.interactions import PairwiseInteractions


def factorial(n_components: int, repeat: int = 2) -> torch.Tensor:
    """Every keep-mask over ``n_components`` (a full factorial), ``repeat`` times: (n, N)."""
    rows = list(itertools.product([0, 1], repeat=n_components)) * repeat
    return torch.tensor(rows).bool()


def test_a_known_interaction_is_recovered_exactly():
    V = factorial(4)  # (32, 4): the centred products are orthogonal to every linear term
    a = 1.0 - V.double()
    w = torch.tensor([[4.0, -3.0, 2.0, 0.1], [0.2, 5.0, -4.0, 3.0]], dtype=torch.float64)
    Y = 1.0 + V.double() @ w.T  # (32, 2)
    Y[:, 0] += 2.5 * a[:, 0] * a[:, 1]  # example 0: components 0 and 1 interact
    Y[:, 1] -= 1.5 * a[:, 2] * a[:, 3]  # example 1: components 2 and 3
    linear = fit((V, Y), method="ols", progress=False)
    pw = PairwiseInteractions(linear, top=3).fit((V, Y))
    # example 0's top 3 are components 0, 1, 2: pairs (0,1), (0,2), (1,2)
    assert pw.pairs_[0].tolist() == [[0, 1], [0, 2], [1, 2]]
    torch.testing.assert_close(pw.weights_[0], torch.tensor([2.5, 0.0, 0.0]).double())
    assert pw.pairs_[1].tolist() == [[1, 2], [1, 3], [2, 3]]
    torch.testing.assert_close(pw.weights_[1], torch.tensor([0.0, 0.0, -1.5]).double())
    torch.testing.assert_close(pw.predict(V), Y)
    Vh = factorial(4, repeat=1).flip(0)  # other rows, the same model
    a_h = 1.0 - Vh.double()
    want = 1.0 + Vh.double() @ w.T
    want[:, 0] += 2.5 * a_h[:, 0] * a_h[:, 1]
    want[:, 1] -= 1.5 * a_h[:, 2] * a_h[:, 3]
    torch.testing.assert_close(pw.predict(Vh), want)


def test_a_linear_model_gets_no_pair_terms():
    V = factorial(4)
    Y = (2.0 + V.double() @ torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64))[:, None]
    linear = fit((V, Y), method="ols", progress=False)
    pw = PairwiseInteractions(linear, top=4).fit((V, Y))
    assert torch.equal(pw.weights_, torch.zeros_like(pw.weights_))
    assert torch.isinf(pw.l2_).all()
    torch.testing.assert_close(pw.predict(V), Y)


def test_bad_inputs_raise_with_the_fix():
    V = factorial(3)
    Y = V.double().sum(1, keepdim=True)
    linear = fit((V, Y), method="ols", progress=False)
    with pytest.raises(FitError, match=r"top must be an int in \[2, 3\], got 5"):
        PairwiseInteractions(linear, top=5).fit((V, Y))
    with pytest.raises(FitError, match="Fit the linear model on the same rows"):
        PairwiseInteractions(linear, top=2).fit((V, torch.cat([Y, Y], 1)))
