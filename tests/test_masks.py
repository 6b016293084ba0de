"""Keep-masks: row i is a pure function of (seed, stream, i); samplers ablate what
they promise; bit packing round-trips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coarpy.masks import pack, sample_masks, unpack


@settings(max_examples=40, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 60), min_size=1, max_size=5),
    sampler=st.sampled_from(["bernoulli", "exact"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_rows_do_not_depend_on_how_the_range_is_cut(cuts, sampler, seed):
    whole = sample_masks(0, 60, 37, alpha=0.3, seed=seed, sampler=sampler)
    bounds = sorted({0, 60, *cuts})
    pieces = [
        sample_masks(a, b, 37, alpha=0.3, seed=seed, sampler=sampler)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    assert torch.equal(torch.cat(pieces), whole)


def test_single_rows_equal_the_same_rows_of_a_range():
    whole = sample_masks(100, 140, 50, alpha=0.1, seed=3)
    for i in (100, 117, 139):
        assert torch.equal(sample_masks(i, i + 1, 50, alpha=0.1, seed=3)[0], whole[i - 100])


def test_bernoulli_ablates_each_component_with_probability_alpha():
    n_rows, n = 400, 500
    alpha = 0.1
    keep = sample_masks(0, n_rows, n, alpha=alpha, seed=0)
    ablated = (~keep).double()
    # overall frequency: 200,000 independent draws, so 5 standard errors is 0.0034
    sd = math.sqrt(alpha * (1 - alpha) / (n_rows * n))
    assert abs(ablated.mean().item() - alpha) < 5 * sd
    # every component on its own: 400 draws each (5 sd = 0.075)
    per_component = ablated.mean(0)
    assert (per_component - alpha).abs().max() < 5 * math.sqrt(alpha * (1 - alpha) / n_rows)
    # the row counts vary (bernoulli, not exact)
    assert len(set((~keep).sum(1).tolist())) > 5


def test_bernoulli_components_are_uncorrelated():
    keep = sample_masks(0, 2000, 20, alpha=0.3, seed=1).double().numpy()
    corr = np.corrcoef(keep, rowvar=False)
    off_diagonal = corr[~np.eye(20, dtype=bool)]
    assert np.abs(off_diagonal).max() < 5 / math.sqrt(2000)


@given(alpha=st.floats(0.0, 1.0), n=st.integers(1, 300), seed=st.integers(0, 1000))
@settings(max_examples=50, deadline=None)
def test_exact_sampler_ablates_exactly_round_alpha_n(alpha, n, seed):
    keep = sample_masks(0, 5, n, alpha=alpha, seed=seed, sampler="exact")
    assert ((~keep).sum(1) == round(alpha * n)).all()


def test_exact_sampler_spreads_ablations_over_all_components():
    keep = sample_masks(0, 1000, 40, alpha=0.25, seed=0, sampler="exact")
    counts = (~keep).sum(0).double()  # each component: Binomial-like around 250
    assert (counts - 250).abs().max() < 5 * math.sqrt(1000 * 0.25 * 0.75)


def test_alpha_zero_keeps_everything_and_one_ablates_everything():
    for sampler in ("bernoulli", "exact"):
        assert sample_masks(0, 10, 30, alpha=0.0, seed=0, sampler=sampler).all()
        assert not sample_masks(0, 10, 30, alpha=1.0, seed=0, sampler=sampler).any()


def test_streams_and_seeds_give_different_masks():
    base = sample_masks(0, 20, 100, alpha=0.5, seed=0)
    other_stream = sample_masks(0, 20, 100, alpha=0.5, seed=0, stream=1)
    other_seed = sample_masks(0, 20, 100, alpha=0.5, seed=1)
    for other in (other_stream, other_seed):
        assert not torch.equal(base, other)
        # as different as independent masks: about half the entries disagree
        assert 0.4 < (base != other).double().mean().item() < 0.6


def test_masks_are_bool_on_cpu():
    keep = sample_masks(3, 7, 12, alpha=0.2, seed=0)
    assert keep.dtype == torch.bool and keep.shape == (4, 12) and keep.device.type == "cpu"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.5}, r"alpha is the fraction .* \[0, 1\], got 1.5"),
        ({"alpha": -0.1}, r"\[0, 1\], got -0.1"),
        ({"alpha": 0.1, "sampler": "uniform"}, r"sampler must be one of .*'bernoulli'"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_masks(0, 2, 10, seed=0, **kwargs)


def test_a_reversed_or_negative_row_range_is_refused():
    with pytest.raises(ValueError, match=r"0 <= start <= stop, got start=5, stop=3"):
        sample_masks(5, 3, 10, alpha=0.1, seed=0)
    with pytest.raises(ValueError, match=r"got start=-1"):
        sample_masks(-1, 3, 10, alpha=0.1, seed=0)
    assert sample_masks(4, 4, 10, alpha=0.1, seed=0).shape == (0, 10)


def test_zero_components_are_refused():
    with pytest.raises(ValueError, match=r"n_components must be >= 1, got 0"):
        sample_masks(0, 2, 0, alpha=0.1, seed=0)


@settings(max_examples=60, deadline=None)
@given(
    n_rows=st.integers(0, 12),
    n=st.integers(1, 70),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_round_trip(n_rows, n, seed):
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(n_rows, n, generator=gen) < 0.5
    packed = pack(keep)
    assert packed.dtype == np.uint8 and packed.shape == (n_rows, math.ceil(n / 8))
    assert torch.equal(unpack(packed, n), keep)
    assert np.array_equal(pack(keep.numpy()), packed)


def test_pack_uses_little_bit_order():
    keep = torch.tensor([[True, False, False, False, False, False, False, False, False, True]])
    assert pack(keep).tolist() == [[0b00000001, 0b00000010]]
