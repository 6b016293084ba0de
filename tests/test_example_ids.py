"""Example identity: ids given to collect, or an ``id``/``idx`` field of the data (never
passed to the model), stay with the store and reach the attributions, baselines and
evaluations, and are checked at the door (one per example, distinct)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from coarpy import baselines
from coarpy.attributions import Attributions
from coarpy.collect import collect
from coarpy.components import Components
from coarpy.errors import (
    ArgumentError,
    DataError,
    EvaluationError,
    FitError,
    StoreCorruptError,
    StoreMismatchError,
)
from coarpy.evaluate import evaluate, evaluate_store
from coarpy.evaluation import Evaluation
from coarpy.regression import fit
from coarpy.store import ComponentDataset

N_EXAMPLES = 10
SETTINGS = dict(n_masks=24, alpha=0.25, seed=0, block_size=8, progress=False)


@pytest.fixture
def net():
    torch.manual_seed(0)
    # nn.Sequential.forward(input): a dict batch calls it as net(input=x), so any other
    # field that reached the model (an id) would raise a TypeError.
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


@pytest.fixture
def comps(net):
    return Components.from_spec(net, {"0": "linear"})


@pytest.fixture
def xy():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N_EXAMPLES, 4, generator=g), torch.randint(0, 3, (N_EXAMPLES,), generator=g)


def batches(xy, ids=None, key="idx", size=4):
    """Dict batches ``{"input", "labels"[, key]}`` of ``size`` examples."""
    x, y = xy
    out = []
    for i in range(0, len(x), size):
        batch = {"input": x[i : i + size], "labels": y[i : i + size]}
        if ids is not None:
            part = ids[i : i + size]
            batch[key] = torch.tensor(part) if isinstance(part[0], int) else list(part)
        out.append(batch)
    return out


def test_an_idx_field_is_kept_as_the_ids_and_never_reaches_the_model(tmp_path, net, comps, xy):
    ids = list(range(100, 100 + N_EXAMPLES))
    named = collect(net, comps, batches(xy, ids), path=tmp_path / "a", **SETTINGS)
    plain = collect(net, comps, batches(xy), path=tmp_path / "b", **SETTINGS)
    assert named.example_ids == ids and plain.example_ids is None
    assert torch.equal(named.outputs(), plain.outputs())  # the field changed no row
    assert named.identity == plain.identity  # ids label the examples, they are not data
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["example_ids"] == ids


def test_string_ids_of_per_example_rows_are_kept_in_order(tmp_path, net, comps, xy):
    x, y = xy
    rows = [{"input": x[i], "labels": y[i], "id": f"ex-{i}"} for i in range(N_EXAMPLES)]
    ds = collect(net, comps, rows, path=tmp_path / "run", **SETTINGS)
    assert ds.example_ids == [f"ex-{i}" for i in range(N_EXAMPLES)]


def test_ids_reach_the_attributions_the_evaluation_and_their_files(tmp_path, net, comps, xy):
    ids = [f"s{i}" for i in range(N_EXAMPLES)]
    ds = collect(net, comps, xy, path=tmp_path / "run", example_ids=ids, **SETTINGS)
    attr = fit(ds, method="ridge")
    assert attr.example_ids == ids
    assert Attributions.load(attr.save(tmp_path / "attr")).example_ids == ids
    res = evaluate(attr, net, comps, xy, alphas=(0.25,), n_masks=8, progress=False)
    assert res.example_ids == ids
    assert Evaluation.load(res.save(tmp_path / "ev.json")).example_ids == ids
    heldout = collect(net, comps, xy, path=tmp_path / "held", **{**SETTINGS, "seed": 5})
    assert evaluate_store(attr, heldout).example_ids == ids  # from the attributions
    from coarpy import edit

    made = edit.make(attr, net, comps, xy, targets=[2], references=[0, 5], k=1)
    assert (made.meta["target_ids"], made.meta["reference_ids"]) == (["s2"], ["s0", "s5"])
    saved = json.loads(made.save(tmp_path / "e.json").read_text())
    assert saved["meta"]["target_ids"] == ["s2"]


def test_baselines_carry_the_datas_ids(net, comps, xy):
    ids = list(range(N_EXAMPLES))
    loo = baselines.leave_one_out(net, comps, batches(xy, ids), progress=False)
    assert loo.example_ids == ids


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (list(range(N_EXAMPLES - 1)), "has 9 ids for 10 examples"),
        ([0] * N_EXAMPLES, "must be distinct, but 0 occurs twice"),
        ([1.5] * N_EXAMPLES, r"example_ids\[0\] must be a str or an int"),
        ("abcdefghij", "must be a sequence of one id"),
    ],
)
def test_bad_example_ids_are_refused_before_anything_is_written(
    tmp_path, net, comps, xy, ids, match
):
    with pytest.raises(ArgumentError, match=match):
        collect(net, comps, xy, path=tmp_path / "run", example_ids=ids, **SETTINGS)
    assert not (tmp_path / "run").exists()


def test_duplicate_ids_in_the_data_are_a_data_error(tmp_path, net, comps, xy):
    with pytest.raises(DataError, match="the data's id field must be distinct"):
        collect(net, comps, batches(xy, [7] * N_EXAMPLES), path=tmp_path / "run", **SETTINGS)


def test_example_ids_that_contradict_the_datas_field_are_refused(tmp_path, net, comps, xy):
    data = batches(xy, list(range(N_EXAMPLES)))
    with pytest.raises(ArgumentError, match="differ from the ids in the data's id field"):
        collect(net, comps, data, path=tmp_path / "r", example_ids=list("abcdefghij"), **SETTINGS)


def test_a_resume_adopts_ids_refuses_others_and_overwrite_only_relabels(tmp_path, net, comps, xy):
    path = tmp_path / "run"
    collect(net, comps, xy, path=path, **SETTINGS)
    blocks = {f.name: f.read_bytes() for f in (path / "blocks").iterdir()}
    ids = list(range(N_EXAMPLES))
    assert collect(net, comps, xy, path=path, example_ids=ids, **SETTINGS).example_ids == ids
    assert collect(net, comps, xy, path=path, **SETTINGS).example_ids == ids  # kept
    other = ids[::-1]
    with pytest.raises(StoreMismatchError, match="example_ids: stored"):
        collect(net, comps, xy, path=path, example_ids=other, **SETTINGS)
    ds = collect(net, comps, xy, path=path, example_ids=other, overwrite=True, **SETTINGS)
    assert ds.example_ids == other
    assert {f.name: f.read_bytes() for f in (path / "blocks").iterdir()} == blocks


def test_a_store_whose_ids_were_edited_into_duplicates_is_refused(tmp_path, net, comps, xy):
    path = tmp_path / "run"
    collect(net, comps, xy, path=path, example_ids=list(range(N_EXAMPLES)), **SETTINGS)
    meta = json.loads((path / "meta.json").read_text())
    meta["example_ids"][1] = 0
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreCorruptError, match="example_ids must be distinct"):
        ComponentDataset(path)


def test_evaluating_on_examples_named_otherwise_is_refused(tmp_path, net, comps, xy):
    ds = collect(net, comps, xy, path=tmp_path / "run", example_ids=list(range(10)), **SETTINGS)
    attr = fit(ds, method="ridge")
    swapped = batches(xy, [1, 0, *range(2, N_EXAMPLES)])
    with pytest.raises(EvaluationError, match="name example 0 0, but the data names it 1"):
        evaluate(attr, net, comps, swapped, alphas=(0.25,), n_masks=4, progress=False)
    res = evaluate(
        attr, net, comps, swapped, alphas=(0.25,), n_masks=4, progress=False, check=False
    )
    assert res.example_ids[:2] == [1, 0]


def test_attributions_refuse_ids_that_do_not_fit_their_rows():
    with pytest.raises(FitError, match="Attributions.example_ids has 1 ids for 2 examples"):
        Attributions(weights=torch.zeros(2, 3), bias=torch.zeros(2), names=list("abc"),
                     example_ids=["x"])  # fmt: skip


FACTORY = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g)
    rows = [{"input": x[i], "labels": y[i], "id": f"row-{i}"} for i in range(10)]
    return {"model": model, "data": rows, "components": {"0": "linear"}}
"""


def test_a_run_directory_keeps_the_ids_of_its_factorys_data_in_every_launcher(
    tmp_path, monkeypatch
):
    from coarpy import runs
    from coarpy.runs.ray import BlockActor

    (tmp_path / "idfactory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    want = [f"row-{i}" for i in range(N_EXAMPLES)]
    for name in ("local", "actor"):
        cfg = runs.RunConfig(
            factory="idfactory:build", path=str(tmp_path / name), n_masks=16, alpha=0.25,
            block_size=8,
        )  # fmt: skip
        if name == "local":
            runs.collect_run(cfg, progress=False)
        else:  # what a Ray actor runs, in this process: batches on its device, ids apart
            BlockActor(cfg.to_toml(), "cpu", None).run([0, 1])
        assert ComponentDataset(tmp_path / name).example_ids == want, name
    assert runs.fit_run(tmp_path / "local").example_ids == want
