"""Tests of coarpy.stopping: the learning curve of a growing store and the stop rule."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import coarpy as coar
from coarpy.components import Components
from coarpy.errors import ArgumentError
from coarpy.stopping import CURVE, StopRule, read_curve


def first(model, batch):
    return model(batch)[:, 0]


def linear(n_inputs: int, n_examples: int = 8, seed: int = 0):
    """A model whose output is exactly linear in its input units (the components):
    output_e = b + sum_j w_j x_ej v_j, so least squares recovers it from N + 1 masks."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Linear(n_inputs, 1).eval()
    with torch.no_grad():
        net.weight.copy_(torch.randn(1, n_inputs, generator=g))
        net.bias.fill_(0.5)
    comps = Components.from_spec(net, {"": "inputs"})
    x = torch.randn(n_examples, n_inputs, generator=g)  # (E, N)
    return net, comps, x


def run(path, n_inputs, *, n_masks, until, seed=0):
    net, comps, x = linear(n_inputs, seed=seed)
    return coar.collect(
        net, comps, x, output=first, path=path, n_masks=n_masks, alpha=0.2, block_size=10,
        until=until, progress=False,
    )  # fmt: skip


def test_checks_start_at_min_masks_and_come_at_each_doubling():
    rule = StopRule(min_masks=40)
    assert [rule.next_check(n) for n in (0, 39, 40, 79, 80, 200)] == [40, 40, 80, 80, 160, 320]


def test_a_flat_curve_stops_at_the_first_check(tmp_path):
    # 5 components, exactly linear: fitted perfectly on half the rows, so doubling gains 0.
    ds = run(tmp_path / "s", 5, n_masks=300, until=StopRule(r_gain=0.005, min_masks=40))
    assert len(ds) == 40 and ds.n_masks == 300
    curve = read_curve(ds.path)
    assert curve["stop"] and curve["n_masks"] == 40
    assert abs(curve["gain"]) < 0.005 and curve["points"][-1]["pearson_mean"] > 0.999
    assert curve["history"] == [
        {"n_masks": 40, "gain": curve["gain"], "gain_se": curve["gain_se"], "stop": True}
    ]


def test_a_rising_curve_continues_to_n_masks(tmp_path):
    # 100 components and at most ~130 training rows: every doubling still gains a lot.
    ds = run(tmp_path / "s", 100, n_masks=160, until=StopRule(r_gain=0.005, min_masks=40))
    assert len(ds) == 160
    curve = read_curve(ds.path)
    assert not curve["stop"] and curve["n_masks"] == 160
    assert [h["n_masks"] for h in curve["history"]] == [40, 80, 160]
    assert all(h["gain"] > 0.05 and not h["stop"] for h in curve["history"])
    means = [p["pearson_mean"] for p in curve["points"]]
    assert means == sorted(means)  # rises with the masks
    assert all(p["pearson_se"] > 0 for p in curve["points"])


def test_a_resumed_collect_extends_the_same_store(tmp_path):
    rule = StopRule(r_gain=0.005, min_masks=40)
    first_ds = run(tmp_path / "s", 5, n_masks=300, until=rule)
    masks, outputs = first_ds.masks(), first_ds.outputs()
    again = run(tmp_path / "s", 5, n_masks=300, until=rule)  # to the next check, 80
    assert len(again) == 80 and read_curve(again.path)["n_masks"] == 80
    assert [h["n_masks"] for h in read_curve(again.path)["history"]] == [40, 80]
    assert torch.equal(again.masks()[:40], masks) and torch.equal(again.outputs()[:40], outputs)
    whole = run(tmp_path / "s", 5, n_masks=300, until=None)  # without a rule: to n_masks
    assert len(whole) == 300


def test_the_curve_is_scored_on_rows_never_fitted(tmp_path):
    ds = run(tmp_path / "s", 20, n_masks=100, until=None)
    found = StopRule(min_masks=40, val_fraction=0.25).check(ds)
    from coarpy.regression._stats import validation_rows

    n_val = int(validation_rows(torch.arange(100), seed=0, val_fraction=0.25).sum())
    assert found["n_heldout"] == n_val
    assert found["points"][-1]["n_masks"] == 100 - n_val
    assert json.loads((ds.path / CURVE).read_text()) == found


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r_gain": -0.1}, "r_gain must be a number >= 0"),
        ({"min_masks": 5}, "min_masks must be an int >= 20"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \(0, 1\)"),
        ({"method": "trees"}, "method must be one of"),
    ],
)
def test_a_bad_rule_is_refused(kwargs, match):
    with pytest.raises(ArgumentError, match=match):
        StopRule(**kwargs)


def test_until_with_a_shard_is_refused(tmp_path):
    net, comps, x = linear(5)
    with pytest.raises(ArgumentError, match="needs one process; got shard="):
        coar.collect(net, comps, x, output=first, path=tmp_path / "s", n_masks=50, alpha=0.2,
                     shard=(0, 2), until=StopRule(min_masks=40), progress=False)  # fmt: skip
    assert not (tmp_path / "s").exists()
