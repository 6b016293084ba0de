"""Tests for coarpy.evaluate: held-out correlations, stores, results and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from coarpy.ablation import ablate
from coarpy.attributions import Attributions
from coarpy.baselines import gradient, leave_one_out
from coarpy.collect import collect
from coarpy.components import Components
from coarpy.errors import ComponentError
from coarpy.evaluate import (
    Evaluation,
    EvaluationError,
    average_ranks,
    evaluate,
    evaluate_store,
    heldout_masks,
    heldout_stream,
    pearson,
    spearman,
)
from coarpy.masks import sample_masks
from coarpy.regression import fit
from coarpy.store import ComponentDataset

# -- an exactly additive model -----------------------------------------------------------
# x -> Linear(3, 6) -> Linear(6, 1) with integer weights; its 6 hidden units are the
# components, and f(v) = C + sum_j R_j (B1_j + v_j W1_j . x) exactly.
W1 = [[1, 0, 2], [-1, 3, 0], [2, 2, -1], [0, -2, 1], [3, -1, 0], [1, 1, 1]]
B1 = [1, -2, 0, 3, -1, 2]
R = [2, -1, 1, 3, -2, 1]
C = 4
X = torch.tensor([[1, 2, 0], [0, -1, 3], [2, 2, 2], [-1, 0, 1], [3, 1, -2]], dtype=torch.float32)


def readout(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The model's single output unit, one number per example."""
    return model(batch)[:, 0]


def exact_attributions(x: torch.Tensor, names: list[str]) -> Attributions:
    w1, r = torch.tensor(W1, dtype=torch.float32), torch.tensor(R, dtype=torch.float32)
    bias = torch.full((len(x),), float(C + sum(b * c for b, c in zip(B1, R, strict=True))))
    return Attributions(weights=(x @ w1.T) * r, bias=bias, names=names, meta={})


@pytest.fixture
def additive():
    net = nn.Sequential(nn.Linear(3, 6), nn.Linear(6, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(W1, dtype=torch.float32))
        net[0].bias.copy_(torch.tensor(B1, dtype=torch.float32))
        net[1].weight.copy_(torch.tensor([R], dtype=torch.float32))
        net[1].bias.fill_(C)
    net.eval()
    return net, Components.from_spec(net, {"0": "linear"})


def noisy(attr: Attributions, scale: float, seed: int) -> Attributions:
    noise = torch.randn(attr.weights.shape, generator=torch.Generator().manual_seed(seed))
    return Attributions(
        weights=attr.weights + scale * noise, bias=attr.bias, names=attr.names, meta={}
    )


def true_outputs(model, comps, x, keep: torch.Tensor) -> torch.Tensor:
    """Outputs (n, E) under each mask, one `ablate` at a time (independent of collect)."""
    rows = []
    with torch.no_grad():
        for k in keep:
            with ablate(model, comps, k):
                rows.append(readout(model, x))
    return torch.stack(rows)


# -- correlations ------------------------------------------------------------------------


def test_average_ranks_match_scipy_rankdata_with_ties():
    x = torch.randint(0, 4, (15, 6), generator=torch.Generator().manual_seed(0)).float()
    expected = stats.rankdata(x.numpy(), method="average", axis=0)
    np.testing.assert_array_equal(average_ranks(x).numpy(), expected)


def test_pearson_and_spearman_match_scipy_per_example_with_ties():
    gen = torch.Generator().manual_seed(0)
    true = torch.randint(0, 5, (12, 8), generator=gen).float()  # many ties
    pred = true + torch.randint(-2, 3, (12, 8), generator=gen).float()
    r, rho = pearson(pred, true), spearman(pred, true)
    p, t = pred.double().numpy(), true.double().numpy()
    for e in range(8):
        assert r[e].item() == pytest.approx(stats.pearsonr(p[:, e], t[:, e])[0], abs=1e-12)
        assert rho[e].item() == pytest.approx(stats.spearmanr(p[:, e], t[:, e])[0], abs=1e-12)


def test_correlation_is_nan_where_either_input_is_constant():
    true = torch.tensor([[1.0, 2.0, 5.0], [2.0, 2.0, 5.0], [4.0, 2.0, 5.0]])
    pred = torch.tensor([[1.0, 1.0, 3.0], [3.0, 2.0, 3.0], [4.0, 3.0, 3.0]])
    for r in (pearson(pred, true), spearman(pred, true)):
        assert not math.isnan(r[0]) and math.isnan(r[1]) and math.isnan(r[2])


# -- evaluate against the model ------------------------------------------------------------


def test_exact_attributions_of_an_additive_model_have_correlation_one(additive):
    net, comps = additive
    res = evaluate(
        exact_attributions(X, comps.names), net, comps, X, output=readout,
        alphas=(0.2, 0.5), n_masks=25,
    )  # fmt: skip
    assert res.attribution_names == ("coar",) and res.alphas == (0.2, 0.5) and res.n_masks == 25
    assert res.pearson.shape == res.spearman.shape == (1, 2, len(X))
    torch.testing.assert_close(res.pearson, torch.ones_like(res.pearson), rtol=0, atol=1e-6)
    torch.testing.assert_close(res.spearman, torch.ones_like(res.spearman), rtol=0, atol=1e-6)


def test_evaluate_correlates_predictions_with_outputs_on_the_held_out_masks(additive):
    net, comps = additive
    attr = noisy(exact_attributions(X, comps.names), 3.0, seed=0)
    res = evaluate(attr, net, comps, X, output=readout, alphas=(0.3,), n_masks=40, seed=7)
    keep = sample_masks(0, 40, len(comps), alpha=0.3, seed=7, stream=heldout_stream(0.3))
    true = true_outputs(net, comps, X, keep)
    got = res.per_example("coar", 0.3)
    torch.testing.assert_close(got.pearson, pearson(attr.predict(keep), true))
    torch.testing.assert_close(got.spearman, spearman(attr.predict(keep), true))
    assert torch.isfinite(got.pearson).all() and (got.pearson < 0.999).all()


def test_heldout_masks_differ_from_training_masks_and_between_alphas():
    train = sample_masks(0, 200, 50, alpha=0.1, seed=1)
    held = heldout_masks(200, 50, alpha=0.1, seed=1)
    assert torch.equal(held, sample_masks(0, 200, 50, alpha=0.1, seed=1, stream=100001))
    assert not torch.equal(held, train)
    # With one stream for both alphas, the ablated sets at 0.05 would nest in those at 0.1.
    low = heldout_masks(200, 50, alpha=0.05, seed=1)
    assert not ((~low) <= (~held)).all()


def test_each_alpha_gets_the_same_masks_alone_or_with_others(additive):
    net, comps = additive
    attr = noisy(exact_attributions(X, comps.names), 3.0, seed=1)
    both = evaluate(attr, net, comps, X, output=readout, alphas=(0.1, 0.4), n_masks=20)
    alone = evaluate(attr, net, comps, X, output=readout, alphas=(0.4,), n_masks=20)
    assert torch.equal(both.per_example(alpha=0.4).pearson, alone.per_example().pearson)


def test_several_attributions_are_compared_on_the_same_masks(additive):
    net, comps = additive
    exact = exact_attributions(X, comps.names)
    rough = noisy(exact, 3.0, seed=2)
    res = evaluate({"rough": rough, "exact": exact}, net, comps, X, output=readout, n_masks=30)
    alone = evaluate(rough, net, comps, X, output=readout, n_masks=30)
    assert res.attribution_names == ("rough", "exact")
    assert torch.equal(res.per_example("rough").pearson, alone.per_example("coar").pearson)
    assert (res.per_example("exact").pearson > res.per_example("rough").pearson).all()


def test_examples_with_a_constant_true_output_are_nan_and_counted(additive):
    net, comps = additive
    x = torch.cat([X, torch.zeros(1, 3)])  # x = 0: every hidden unit equals its bias
    attr = noisy(exact_attributions(x, comps.names), 1.0, seed=3)
    res = evaluate(attr, net, comps, x, output=readout, alphas=(0.3,), n_masks=20)
    r = res.per_example().pearson
    assert math.isnan(r[-1]) and torch.isfinite(r[:-1]).all()
    assert res.n_constant == (1,)
    (row,) = res.to_rows()
    assert row["n_defined"] == len(X) and row["n_constant"] == 1
    assert row["pearson_mean"] == pytest.approx(r[:-1].mean().item())
    assert "Left out for a constant true output over the masks: alpha=0.3: 1" in res.summary()


# -- evaluate_store ------------------------------------------------------------------------


def held_out_store(path, net, comps, x, *, alpha, n_masks, seed):
    """A store filled with evaluate's held-out masks and outputs computed by `ablate`."""
    keep = heldout_masks(n_masks, len(comps), alpha=alpha, seed=seed)
    ds = ComponentDataset.create(
        path, components=comps.to_dict()["groups"], n_examples=len(x), n_masks=n_masks,
        alpha=alpha, seed=seed, block_size=10, output="readout",
    )  # fmt: skip
    values = true_outputs(net, comps, x, keep)
    for b in range(ds.n_blocks):
        start, stop = ds.block_rows(b)
        ds.write_block(b, keep[start:stop], values[start:stop])
    return ComponentDataset(path)


def test_evaluating_a_store_equals_evaluating_the_model_on_the_same_masks(additive, tmp_path):
    net, comps = additive
    exact = exact_attributions(X, comps.names)
    named = {"rough": noisy(exact, 3.0, seed=4), "rougher": noisy(exact, 9.0, seed=5)}
    ds = held_out_store(tmp_path / "held", net, comps, X, alpha=0.3, n_masks=30, seed=2)
    from_store = evaluate_store(named, ds)
    from_model = evaluate(named, net, comps, X, output=readout, alphas=(0.3,), n_masks=30, seed=2)
    assert from_store.attribution_names == from_model.attribution_names
    assert from_store.alphas == (0.3,) and from_store.n_masks == 30
    torch.testing.assert_close(from_store.pearson, from_model.pearson)
    torch.testing.assert_close(from_store.spearman, from_model.spearman)


def test_evaluate_store_warns_when_the_store_holds_the_training_masks(cnn, digits_batch, tmp_path):
    comps = Components.discover(cnn, kinds=("conv",))
    data = (digits_batch[0][:10], digits_batch[1][:10])
    ds = collect(cnn, comps, data, path=tmp_path / "train", n_masks=60, alpha=0.1, progress=False)
    attr = fit(ds, progress=False)
    with pytest.warns(UserWarning, match="same masks the attributions were fitted on"):
        evaluate_store(attr, ds)
    held = collect(
        cnn, comps, data, path=tmp_path / "held", n_masks=20, alpha=0.1, seed=5, progress=False
    )
    assert evaluate_store(attr, held).n_masks == 20


# -- the result ----------------------------------------------------------------------------


def test_evaluation_saves_as_json_and_loads_back_equal(additive, tmp_path):
    net, comps = additive
    x = torch.cat([X, torch.zeros(1, 3)])
    exact = exact_attributions(x, comps.names)
    res = evaluate(
        {"exact": exact, "rough": noisy(exact, 3.0, seed=6)}, net, comps, x, output=readout,
        alphas=(0.2, 0.4), n_masks=15,
    )  # fmt: skip
    path = res.save(tmp_path / "eval.json")
    doc = json.loads(path.read_text())  # strict JSON: NaN is written as null
    assert doc["pearson"][len(x) - 1] is None and len(doc["summary"]) == 4
    back = Evaluation.load(path)
    assert (back.attribution_names, back.alphas, back.n_masks) == (
        res.attribution_names, res.alphas, res.n_masks
    )  # fmt: skip
    assert back.n_constant == res.n_constant and back.meta == res.meta
    torch.testing.assert_close(back.pearson, res.pearson, equal_nan=True)
    torch.testing.assert_close(back.spearman, res.spearman, equal_nan=True)


def test_an_evaluation_saved_as_version_1_loads_with_its_names(additive, tmp_path):
    # Version 1 called the names of the attributions "methods"; "method" now means only
    # how attributions were made (attr.meta["method"]).
    net, comps = additive
    res = evaluate(exact_attributions(X, comps.names), net, comps, X, output=readout, n_masks=5)
    path = res.save(tmp_path / "eval.json")
    doc = json.loads(path.read_text())
    doc["methods"], doc["version"] = doc.pop("attribution_names"), 1
    del doc["sha256"]  # version 1 recorded no checksum
    path.write_text(json.dumps(doc))
    back = Evaluation.load(path)
    assert back.attribution_names == ("coar",)
    torch.testing.assert_close(back.pearson, res.pearson, equal_nan=True)


def test_rows_and_summary_report_quartiles_per_attribution_and_alpha(additive):
    net, comps = additive
    exact = exact_attributions(X, comps.names)
    res = evaluate(
        {"exact": exact, "rough": noisy(exact, 3.0, seed=7)}, net, comps, X, output=readout,
        alphas=(0.2, 0.4), n_masks=15,
    )  # fmt: skip
    rows = res.to_rows()
    assert [(r["attribution"], r["alpha"]) for r in rows] == [
        ("exact", 0.2), ("exact", 0.4), ("rough", 0.2), ("rough", 0.4)
    ]  # fmt: skip
    r = res.per_example("rough", 0.4).spearman.numpy()
    last = rows[-1]
    assert last["spearman_mean"] == pytest.approx(r.mean())
    assert last["spearman_median"] == pytest.approx(np.median(r))
    assert last["spearman_q25"] == pytest.approx(np.quantile(r, 0.25))
    assert last["spearman_q75"] == pytest.approx(np.quantile(r, 0.75))
    lines = res.summary().splitlines()
    assert lines[2].split()[:4] == ["attribution", "alpha", "n", "p_mean"]
    assert lines[6].split()[:5] == ["rough", "0.4", "5", f"{last['pearson_mean']:.3f}",
                                    f"{last['pearson_median']:.3f}"]  # fmt: skip


def test_per_example_names_the_attributions_and_alphas_it_has(additive):
    net, comps = additive
    res = evaluate(
        exact_attributions(X, comps.names), net, comps, X, output=readout,
        alphas=(0.2, 0.4), n_masks=5,
    )  # fmt: skip
    with pytest.raises(EvaluationError, match=r"No attributions named 'loo'.*\['coar'\]"):
        res.per_example("loo", 0.2)
    with pytest.raises(EvaluationError, match=r"No alpha 0.3.*\[0.2, 0.4\]"):
        res.per_example("coar", 0.3)
    with pytest.raises(EvaluationError, match="several alphas"):
        res.per_example("coar")


# -- bad input -------------------------------------------------------------------------------


def test_attributions_for_other_components_are_refused(additive):
    net, comps = additive
    names = list(comps.names)
    names[2] = "other:2"
    attr = Attributions(weights=torch.zeros(len(X), 6), bias=torch.zeros(len(X)), names=names)
    with pytest.raises(ComponentError, match="component 2 is 'other:2' there and '0:2'"):
        evaluate(attr, net, comps, X, output=readout)
    short = Attributions(weights=torch.zeros(len(X), 5), bias=torch.zeros(len(X)), names=names[:5])
    with pytest.raises(ComponentError, match="5 components, these components has 6"):
        evaluate({"short": short}, net, comps, X, output=readout)


def test_attributions_for_another_number_of_examples_are_refused(additive):
    net, comps = additive
    attr = exact_attributions(X[:3], comps.names)
    with pytest.raises(EvaluationError, match="cover 3 examples, but data has 5"):
        evaluate(attr, net, comps, X, output=readout)


@pytest.mark.parametrize("alphas", [(0.0,), (1.0,), (-0.1,), (0.1, 1.5), ()])
def test_alphas_outside_zero_one_are_refused(additive, alphas):
    net, comps = additive
    with pytest.raises(EvaluationError, match="alpha"):
        evaluate(exact_attributions(X, comps.names), net, comps, X, output=readout, alphas=alphas)


def test_a_bare_float_alpha_is_refused_with_the_fix(additive):
    net, comps = additive
    with pytest.raises(EvaluationError, match=r"alphas=\(0.05,\)"):
        evaluate(exact_attributions(X, comps.names), net, comps, X, output=readout, alphas=0.05)


@pytest.mark.parametrize("n_masks", [2, 0, -5, 2.5])
def test_fewer_than_three_masks_are_refused(additive, n_masks):
    net, comps = additive
    with pytest.raises(EvaluationError, match="n_masks must be an integer >= 3"):
        evaluate(exact_attributions(X, comps.names), net, comps, X, output=readout, n_masks=n_masks)


def test_an_unknown_sampler_is_refused(additive):
    net, comps = additive
    with pytest.raises(EvaluationError, match="sampler must be one of"):
        evaluate(exact_attributions(X, comps.names), net, comps, X, output=readout, sampler="x")


def test_evaluate_runs_in_eval_mode_and_restores_training_mode(mlp):
    comps = Components.discover(mlp, kinds=("linear",), exclude="4")
    mlp[2][1] = nn.Dropout(0.5)  # would make outputs random in training mode
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    attr = Attributions(weights=torch.ones(4, len(comps)), bias=torch.zeros(4), names=comps.names)
    res = evaluate(attr, mlp, comps, x, output=readout, n_masks=10)
    mlp.train()
    with pytest.warns(UserWarning, match="training mode"):
        again = evaluate(attr, mlp, comps, x, output=readout, n_masks=10)
    assert mlp.training
    assert torch.equal(again.pearson, res.pearson)


def test_a_store_with_fewer_than_three_rows_is_refused(additive, tmp_path):
    net, comps = additive
    ds = held_out_store(tmp_path / "tiny", net, comps, X, alpha=0.3, n_masks=2, seed=1)
    with pytest.raises(EvaluationError, match="2 finished mask rows"):
        evaluate_store(exact_attributions(X, comps.names), ds)


def test_attributions_must_be_named_attributions(additive):
    net, comps = additive
    with pytest.raises(EvaluationError, match="empty mapping"):
        evaluate({}, net, comps, X, output=readout)
    with pytest.raises(EvaluationError, match=r"attributions\['w'\] is a Tensor"):
        evaluate({"w": torch.zeros(5, 6)}, net, comps, X, output=readout)
    with pytest.raises(EvaluationError, match="names of the attributions must be non-empty"):
        evaluate({"": exact_attributions(X, comps.names)}, net, comps, X, output=readout)


# -- real data: COAR against the baselines ---------------------------------------------------


def test_coar_predicts_held_out_ablations_better_than_the_baselines(trained_cnn, digits, tmp_path):
    """Digits CNN with BatchNorm, 56 components, 100 test examples, alpha = 0.2.

    Measured (1500 training masks, ridge fit, 200 held-out masks): mean Pearson COAR
    0.912, leave-one-out 0.840, gradient 0.639. At alpha = 0.05 this small model is
    nearly additive (COAR 0.960, leave-one-out 0.951), too close for a robust test.
    """
    _, _, x, y = digits
    data = (x[:100], y[:100])
    comps = Components.discover(trained_cnn, kinds=("conv", "linear"), exclude="classifier.3")
    assert len(comps) == 56
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loaded 2-core box runs these small passes faster on one
    try:
        ds = collect(
            trained_cnn, comps, data, path=tmp_path / "train", n_masks=1500, alpha=0.2,
            seed=0, batch_size=2000, progress=False,
        )  # fmt: skip
        named = {
            "coar": fit(ds, progress=False),
            "loo": leave_one_out(trained_cnn, comps, data, batch_size=2000, progress=False),
            "grad": gradient(trained_cnn, comps, data),
        }
        res = evaluate(
            named, trained_cnn, comps, data, alphas=(0.2,), n_masks=200, batch_size=2000,
            progress=False,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    mean = {row["attribution"]: row["pearson_mean"] for row in res.to_rows()}
    assert mean["coar"] > mean["loo"] + 0.03, res.summary()
    assert mean["coar"] > mean["grad"] + 0.15, res.summary()
    assert mean["coar"] > 0.85, res.summary()


# -- attributions are checked against the model and settings (issue #16) -----------------


def _fitted(net, comps, tmp_path, **settings):
    """Attributions fitted on a small store of the additive model (their meta records it)."""
    ds = collect(net, comps, X, output=readout, path=tmp_path / "train", n_masks=40,
                 alpha=0.3, block_size=20, progress=False, **settings)  # fmt: skip
    return fit(ds, progress=False)


def logit_of_first(model, batch):
    return model(batch)[:, 0] * 2.0


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("weights", r"fitted on a model with other weights .* fingerprint"),
        ("structure", r"the model's structure .* differ"),
        ("output", r"the output function: recorded '.*readout', here '.*logit_of_first'"),
        ("autocast", r"autocast: recorded None, here 'bf16'"),
        ("data", r"the examples differ"),
    ],
)
def test_evaluate_refuses_another_model_or_settings_unless_check_is_false(
    additive, tmp_path, change, match
):
    net, comps = additive
    attr = _fitted(net, comps, tmp_path)
    kwargs = {"output": readout, "n_masks": 5}
    x = X
    if change == "weights":
        with torch.no_grad():
            net[1].bias.add_(1.0)
    elif change == "structure":
        net = nn.Sequential(net[0], nn.Identity(), net[1]).eval()
        comps = Components.from_spec(net, {"0": "linear"})
    elif change == "output":
        kwargs["output"] = logit_of_first
    elif change == "autocast":
        kwargs["autocast"] = "bf16"
    else:
        x = X + 1.0
    with pytest.raises(EvaluationError, match=match):
        evaluate(attr, net, comps, x, **kwargs)
    assert "check=False" in str(
        pytest.raises(EvaluationError, evaluate, attr, net, comps, x, **kwargs).value
    )
    assert evaluate(attr, net, comps, x, check=False, **kwargs).n_masks == 5


def test_evaluate_store_refuses_a_store_collected_under_other_settings(additive, tmp_path):
    net, comps = additive
    attr = _fitted(net, comps, tmp_path)
    other = collect(net, comps, X, output=logit_of_first, path=tmp_path / "held", n_masks=10,
                    alpha=0.3, seed=5, block_size=10, progress=False)  # fmt: skip
    with pytest.raises(EvaluationError, match=r"the output function: recorded"):
        evaluate_store(attr, other)
    assert evaluate_store(attr, other, check=False).n_masks == 10


def test_every_attribution_is_averaged_over_the_same_examples(additive):
    net, comps = additive
    exact = exact_attributions(X, comps.names)
    flat = exact.weights.clone()
    flat[1] = 0.0  # predicts a constant for example 1: no correlation there
    flat_attr = Attributions(weights=flat, bias=exact.bias, names=exact.names, meta={})
    res = evaluate({"exact": exact, "flat": flat_attr}, net, comps, X, output=readout,
                   alphas=(0.3,), n_masks=20)  # fmt: skip
    assert math.isnan(res.per_example("flat").pearson[1])
    assert not math.isnan(res.per_example("exact").pearson[1])
    rows = {r["attribution"]: r for r in res.to_rows()}
    assert rows["exact"]["n_defined"] == rows["flat"]["n_defined"] == len(X) - 1
    assert (rows["exact"]["n_flat"], rows["flat"]["n_flat"]) == (0, 1)
    common = res.common()
    assert common.tolist() == [True, False, True, True, True]
    want = res.per_example("exact").pearson[common].mean().item()
    assert rows["exact"]["pearson_mean"] == pytest.approx(want)
    assert (
        "where an attribution predicts a constant output: 'flat' at alpha=0.3: 1" in res.summary()
    )
