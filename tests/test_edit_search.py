"""Coar-Edit beyond top-k: paired scores, objectives, predicted selection, refinement, oracle.

Everything runs on hand-built models whose output is exactly the sum of their
components' contributions, so leave-one-out attributions are exact, the linear
prediction of any edit is exact, and the best edit is known by trying them all.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import coarpy as coar
from coarpy import baselines, edit
from coarpy.errors import EditError


def first(model, batch):
    """Output function of the additive models: the single output."""
    return model(batch)[:, 0]


def _attr(weights, bias=None) -> coar.Attributions:
    w = torch.as_tensor(weights, dtype=torch.float32)
    b = torch.zeros(w.shape[0]) if bias is None else torch.as_tensor(bias, dtype=torch.float32)
    return coar.Attributions(weights=w, bias=b, names=[f"0:{j}" for j in range(w.shape[1])])


# -- paired scores ------------------------------------------------------------------------------


def _paired_case() -> coar.Attributions:
    """4 clean inputs (rows 0-3), then the same inputs triggered (rows 4-7); 2 components.

    Component 0's weight differs a lot from input to input, and the trigger lowers it by
    exactly 1 on every input. Component 1 is 0 on clean inputs and -1 or -2 triggered.
    """
    clean = [[5.0, 0.0], [-5.0, 0.0], [3.0, 0.0], [-3.0, 0.0]]
    triggered = [[4.0, -1.0], [-6.0, -2.0], [2.0, -1.0], [-4.0, -2.0]]
    return _attr(clean + triggered)


def test_paired_scores_are_the_paired_t_of_the_differences():
    attr = _paired_case()
    targets, references = [4, 5, 6, 7], [0, 1, 2, 3]
    paired = edit.scores(attr, targets, references, statistic="paired")
    # component 0: d = (-1, -1, -1, -1), no spread: the limit -inf
    # component 1: d = (-1, -2, -1, -2): mean -1.5, sample sd sqrt(1/3), t = -1.5 / (sd / 2)
    assert paired[0] == -math.inf
    assert paired[1].item() == pytest.approx(-3.0 * math.sqrt(3.0), rel=1e-12)
    # Welch's t sees component 0's spread across inputs and misses it:
    # (-1 - 0) / sqrt(17 / 4 + 17 / 4) and (-1.5 - 0) / sqrt(0.25 / 4 + 0)
    welch = edit.scores(attr, targets, references)
    assert welch.tolist() == pytest.approx([-1.0 / math.sqrt(8.5), -6.0], rel=1e-12)
    assert edit.select(welch, 1).tolist() == [1]
    assert edit.select(paired, 1).tolist() == [0]


def test_paired_scores_pair_by_position():
    attr = _paired_case()
    shuffled = edit.scores(attr, [4, 5, 6, 7], [1, 0, 3, 2], statistic="paired")
    # component 0 now pairs 4 with -5, ...: d = (9, -11, 5, -7), mean -1, sd sqrt(272/3)
    assert shuffled[0].item() == pytest.approx(-1.0 / (math.sqrt(272.0 / 3.0) / 2.0), rel=1e-12)
    mask = torch.zeros(8, dtype=torch.bool)
    mask[4:] = True  # bool masks pair in ascending index order
    assert torch.equal(
        edit.scores(attr, mask, ~mask, statistic="paired"),
        edit.scores(attr, [4, 5, 6, 7], [0, 1, 2, 3], statistic="paired"),
    )


def test_paired_scores_refuse_sets_that_do_not_pair():
    attr = _paired_case()
    with pytest.raises(EditError, match="4 targets and 3 references"):
        edit.scores(attr, [4, 5, 6, 7], [0, 1, 2], statistic="paired")
    with pytest.raises(EditError, match="needs references"):
        edit.scores(attr, [4, 5, 6, 7], statistic="paired")
    with pytest.raises(EditError, match="at least two pairs"):
        edit.scores(attr, [4], [0], statistic="paired")
    with pytest.raises(EditError, match="statistic must be 'welch'"):
        edit.scores(attr, [4], [0], statistic="student")


# -- objectives -----------------------------------------------------------------------------------


def test_objective_counts_target_gain_and_reference_damage():
    base = torch.tensor([-1.0, -2.0, 1.0, 2.0, 3.0, 4.0])  # 2 targets, 4 references
    outputs = torch.tensor(
        [
            [1.0, -1.0, 1.0, 2.0, 3.0, 4.0],  # one target fixed, nothing broken
            [1.0, 2.0, -1.0, 2.0, 3.0, 4.0],  # both fixed, one reference of 4 broken
            [1.0, 2.0, -1.0, -2.0, 3.0, 4.0],  # both fixed, two broken
        ]
    )
    obj = edit.Objective([0, 1], [2, 3, 4, 5])
    values = obj(outputs, base)
    assert values.dtype == torch.float64 and values.shape == (3, 2)
    assert values[:, 0].tolist() == [0.5, 0.75, 0.5]
    # ties: the targets' and references' shortfall below zero
    assert values[:, 1].tolist() == [-0.5, -0.25, -0.75]
    tolerant = edit.Objective([0, 1], [2, 3, 4, 5], tolerance=0.25)
    assert tolerant(outputs, base)[:, 0].tolist() == [0.5, 1.0, 0.75]
    strict = edit.Objective([0, 1], [2, 3, 4, 5], penalty=math.inf)
    assert strict(outputs, base)[:, 0].tolist() == [0.5, -math.inf, -math.inf]
    out = edit.Objective([0, 1], [2, 3, 4, 5], quantity="output", penalty=2.0)
    # mean target output minus 2 x mean reference drop
    assert out(outputs, base)[:, 0].tolist() == [0.0, 1.5 - 2.0 * 0.5, 1.5 - 2.0 * 1.5]
    lower = edit.Objective([0, 1], [2, 3, 4, 5], direction="lower")
    assert lower(outputs, base)[:, 0].tolist() == [0.5, 0.0 - 0.25, 0.0 - 0.5]


def test_bad_objectives_are_refused():
    with pytest.raises(EditError, match="quantity must be"):
        edit.Objective([0], [1], quantity="loss")
    with pytest.raises(EditError, match="penalty must be a number >= 0"):
        edit.Objective([0], [1], penalty=-1.0)
    with pytest.raises(EditError, match="tolerance must be finite"):
        edit.Objective([0], [1], tolerance=math.inf)
    with pytest.raises(EditError, match="direction must be"):
        edit.Objective([0], [1], direction="up")
    attr = _attr([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(EditError, match="share 1 example"):
        edit.select_predicted(attr, edit.Objective([0], [0, 1]), 1)
    with pytest.raises(EditError, match="returned shape"):
        edit.select_predicted(attr, lambda outputs, base: outputs.sum(), 1)
    with pytest.raises(EditError, match=r"shape \(2,\)"):
        edit.select_predicted(attr, edit.Objective([0], [1]), 1, outputs=torch.zeros(3))


# -- a model whose best edit is known -------------------------------------------------------------


def _sum_model(x: torch.Tensor) -> tuple[nn.Module, coar.Components]:
    """out = x.sum(1): component j is input j, and ablating it takes x[:, j] away."""
    net = nn.Sequential(nn.Linear(x.shape[1], 1, bias=False)).eval()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    return net, coar.Components.from_spec(net, {"0": "inputs"})


# Two targets (wrong, output < 0) and four references (right, output > 0). Ablating a
# component adds minus its column. Component 0 lifts the targets most (+3) but breaks
# every reference (-2); components 1 and 2 lift the targets by 2 and 1.5 and leave the
# references alone; 3 is noise; 4 is the rest of each output.
X = torch.tensor(
    [
        [-3.0, -2.2, -1.4, 0.1, 4.0],  # target: -2.5
        [-3.0, -1.8, -1.6, -0.1, 4.0],  # target: -2.5
        [2.0, 0.1, 0.0, 0.2, -1.3],  # reference: 1.0
        [2.0, -0.1, 0.0, -0.2, -0.7],  # reference: 1.0
        [2.0, 0.0, 0.1, 0.1, -1.2],  # reference: 1.0
        [2.0, 0.0, -0.1, -0.1, -0.8],  # reference: 1.0
    ]
)
TARGETS, REFERENCES = [0, 1], [2, 3, 4, 5]


def _measured_value(net, comps, objective, ablated) -> tuple[float, float]:
    keep = torch.ones(len(comps), dtype=torch.bool)
    keep[list(ablated)] = False
    with torch.inference_mode():
        base = first(net, X)
        with coar.ablate(net, comps, keep):
            out = first(net, X)
    return tuple(objective(out[None], base)[0].tolist())


def _best_by_trying_all(net, comps, objective, k) -> set[int]:
    values = {
        s: _measured_value(net, comps, objective, s) for s in itertools.combinations(range(5), k)
    }
    best = max(values.values())
    winners = [set(s) for s, v in values.items() if v == best]
    assert len(winners) == 1  # the case is built to have one best edit
    return winners[0]


@pytest.fixture(scope="module")
def known():
    net, comps = _sum_model(X)
    loo = baselines.leave_one_out(net, comps, X, output=first, progress=False)
    torch.testing.assert_close(loo.weights, X)  # exact: the model is additive
    return net, comps, loo


def test_select_predicted_finds_the_best_edit_where_top_k_breaks_the_references(known):
    net, comps, loo = known
    obj = edit.Objective(TARGETS, REFERENCES)
    assert _best_by_trying_all(net, comps, obj, 2) == {1, 2}
    # Welch's top 2 take component 0, which fixes the targets and breaks every reference
    top = edit.select(edit.scores(loo, TARGETS, REFERENCES), 2).tolist()
    assert 0 in top
    assert _measured_value(net, comps, obj, top)[0] == 1.0 - 1.0
    chosen = edit.select_predicted(loo, obj, 2)
    assert chosen.tolist() == [1, 2]
    assert _measured_value(net, comps, obj, chosen.tolist())[0] == 1.0  # both fixed, none broken
    # the same from measured outputs, and with any attributions predicting them exactly
    with torch.inference_mode():
        measured = first(net, X)
    assert edit.select_predicted(loo, obj, 2, outputs=measured).tolist() == [1, 2]
    exact = _attr(X, bias=torch.zeros(6))
    assert edit.select_predicted(exact, obj, 2).tolist() == [1, 2]


def test_select_predicted_pays_for_reference_damage_beyond_the_tolerance(known):
    _, _, loo = known
    # mean output: component 0 gains 3 on the targets for 2 on the references
    # (component 1 gains 2 for nothing)
    cheap = edit.Objective(TARGETS, REFERENCES, quantity="output", penalty=0.25)
    dear = edit.Objective(TARGETS, REFERENCES, quantity="output", penalty=1.0)
    assert edit.select_predicted(loo, cheap, 1).tolist() == [0]  # 3 - 0.25 * 2 > 2
    assert edit.select_predicted(loo, dear, 1).tolist() == [1]  # 3 - 1 * 2 < 2
    free = edit.Objective(TARGETS, REFERENCES, quantity="output", penalty=1.0, tolerance=2.0)
    assert edit.select_predicted(loo, free, 1).tolist() == [0]  # the damage is within it
    assert edit.select_predicted(loo, dear, 0).tolist() == []


def test_the_oracle_finds_the_best_edit_by_running_the_model(known):
    net, comps, loo = known
    obj = edit.Objective(TARGETS, REFERENCES)
    found = edit.oracle(net, comps, X, objective=obj, k=2, output=first)
    assert isinstance(found, edit.Search) and found.method == "oracle"
    assert set(found.order.tolist()) == _best_by_trying_all(net, comps, obj, 2)
    assert found.n_evaluations == 1 + 5 + 4  # unedited, then every remaining component
    assert found.values.shape == (3, 2)
    assert found.values[0].tolist() == list(_measured_value(net, comps, obj, []))
    assert found.values[2].tolist() == list(_measured_value(net, comps, obj, found.order.tolist()))
    # leave-one-out measured the first step already; a budget limits the later steps
    quick = edit.oracle(net, comps, X, objective=obj, k=2, output=first, leave_one_out=loo)
    assert torch.equal(quick.order, found.order) and quick.n_evaluations == 1 + 4
    tight = edit.oracle(net, comps, X, objective=obj, k=3, output=first, budget=1 + 5 + 2 * 2)
    assert tight.n_evaluations == 1 + 5 + 2 * 2  # two candidates per later step
    assert torch.equal(tight.order[:2], found.order)


def test_the_oracle_refuses_a_budget_too_small_and_other_attributions(known):
    net, comps, loo = known
    obj = edit.Objective(TARGETS, REFERENCES)
    with pytest.raises(EditError, match="needs at least 8"):
        edit.oracle(net, comps, X, objective=obj, k=3, output=first, budget=7)
    with pytest.raises(EditError, match="leave_one_out must be attributions"):
        edit.oracle(net, comps, X, objective=obj, k=1, output=first, leave_one_out=_attr(X))
    with pytest.raises(EditError, match="but the search uses 'margin'"):
        edit.oracle(net, comps, X, objective=obj, k=1, leave_one_out=loo, output="margin")


def test_refine_checks_the_predicted_candidates_on_the_model(known):
    net, comps, loo = known
    obj = edit.Objective(TARGETS, REFERENCES)
    # misleading attributions: they claim component 3 lifts the targets by 5
    wrong = X.clone()
    wrong[:2, 3] = -5.0
    misled = _attr(wrong)
    assert edit.select_predicted(misled, obj, 1, outputs=first(net, X).detach()).tolist() == [3]
    one = edit.refine(misled, net, comps, X, objective=obj, k=2, candidates=1, output=first)
    assert one.order.tolist()[0] == 3 and one.n_evaluations == 1 + 2
    # measuring the two best predicted candidates per step catches the mistake
    two = edit.refine(misled, net, comps, X, objective=obj, k=2, candidates=2, output=first)
    assert two.method == "refine" and two.n_evaluations == 1 + 2 * 2
    assert set(two.order.tolist()) == {1, 2}
    assert two.values[-1, 0].item() == 1.0
    # with exact attributions the model only confirms the prediction
    exact = edit.refine(loo, net, comps, X, objective=obj, k=2, candidates=1, output=first)
    assert exact.order.tolist() == edit.select_predicted(loo, obj, 2).tolist()


def test_sweep_runs_any_order_and_needs_one(known):
    net, comps, loo = known
    order = torch.tensor([1, 2, 0])
    table = edit.sweep(
        None, net, comps, X, targets=TARGETS, references=REFERENCES, order=order, ks=(0, 1, 2, 3),
        output=first,
    )  # fmt: skip
    for row in table:
        edited = edit.apply(net, comps, order[: row["k"]])
        plain = edit.measure(edited, X, targets=TARGETS, references=REFERENCES, output=first)
        assert {c: v for c, v in row.items() if c != "k"} == pytest.approx(plain)
    assert [r["target_acc"] for r in table] == [0.0, 0.0, 1.0, 1.0]
    assert [r["reference_acc"] for r in table] == [1.0, 1.0, 1.0, 0.0]
    with pytest.raises(EditError, match="or an order="):
        edit.sweep(None, net, comps, X, targets=TARGETS, output=first)
    with pytest.raises(EditError, match="order lists 3 components but ks goes up to 4"):
        edit.sweep(loo, net, comps, X, targets=TARGETS, order=order, ks=(0, 4), output=first)


def test_make_and_sweep_take_the_paired_statistic():
    x = torch.tensor(
        [[1.0, 2.0, 0.0], [3.0, -2.0, 0.0], [1.5, 1.0, -1.0], [3.5, -2.5, -1.0]]
    )  # rows 2, 3 are rows 0, 1 with component 2 switched on (-1)
    net, comps = _sum_model(x)
    loo = baselines.leave_one_out(net, comps, x, output=first, progress=False)
    made = edit.make(loo, net, comps, targets=[2, 3], references=[0, 1], k=1, statistic="paired")
    assert made.names == ("0:2",) and made.meta["statistic"] == "paired"
    assert made.scores[0] == -math.inf  # d = (-1, -1) for component 2
    welch = edit.make(loo, net, comps, targets=[2, 3], references=[0, 1], k=1)
    assert welch.meta["statistic"] == "welch"
    table = edit.sweep(
        loo, net, comps, x, targets=[2, 3], references=[0, 1], ks=(1,), statistic="paired",
        output=first,
    )  # fmt: skip
    assert table[0]["target_output"] == pytest.approx((x[2:].sum(1) + 1.0).mean().item())
