"""Examples that do not fit the device budget: kept on the host, moved a segment at a
time (coarpy._engine.ExampleSet), with the same rows as when they stay on the device;
and the data checks at the door (shuffled loaders, weights not in memory).

The model here reads uint8 images and normalises them itself, as a model (or output
function) must: coarpy moves the examples in the dtype they come in. One example is
64 bytes of pixels and an 8-byte label, so 72 bytes; a batch of 8 is 576 bytes and a
budget of 1152 bytes holds two batches: 40 examples then stream in segments of 16, 16
and 8.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from coarpy import edit
from coarpy._engine import ExampleSet, resolve_budget
from coarpy.baselines import expected_gradient, gradient, leave_one_out
from coarpy.collect import collect
from coarpy.components import Components
from coarpy.errors import ArgumentError, DataError
from coarpy.evaluate import evaluate
from coarpy.store import ComponentDataset

sys.path.insert(0, str(Path(__file__).parent))
from _reliability import store_files  # noqa: E402

sys.path.pop(0)

N_EXAMPLES, BATCH, ROW_BYTES = 40, 8, 64 + 8
BUDGET = 2 * BATCH * ROW_BYTES  # two batches: streamed in segments of 16 examples
SETTINGS = {"n_masks": 12, "alpha": 0.2, "seed": 3, "block_size": 4, "batch_size": BATCH}


class Scale(nn.Module):
    """uint8 pixels to floats in [0, 1]: the normalisation lives in the model."""

    def forward(self, x):
        return x.float() / 255.0


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(
        Scale(),
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 8 * 8, 4),
    ).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (N_EXAMPLES, 1, 8, 8), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 4, (N_EXAMPLES,), generator=gen)
    comps = Components.from_spec(model, {"1": "conv", "3": "conv"})
    return model, comps, (x, y)


def _collect(path, budget, **given):
    model, comps, data = _setup()
    args = {**SETTINGS, "progress": False, **given}
    return collect(model, comps, data, path=path, device_budget=budget, **args)


def test_examples_over_the_budget_stay_on_the_host_as_uint8_in_segments():
    _, _, data = _setup()
    examples = ExampleSet(data, torch.device("cpu"), BATCH, device_budget=BUDGET)
    assert examples.streamed and examples.segment_rows == 16
    assert examples.whole[0].dtype == torch.uint8  # not widened before the model
    segments = [(first, [b[0].shape[0] for b in batches]) for first, batches in examples.segments()]
    assert segments == [(0, [8, 8]), (16, [8, 8]), (32, [8])]
    assert all(b[0].dtype == torch.uint8 for b in examples.device_batches())
    resident = ExampleSet(data, torch.device("cpu"), BATCH)
    assert not resident.streamed and resident.fingerprint() == examples.fingerprint()


def test_the_default_budget_is_half_the_free_cuda_memory_and_no_limit_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3000, 8000))
    assert resolve_budget(None, torch.device("cuda")) == 1500
    assert resolve_budget(4096, torch.device("cuda")) == 4096
    assert resolve_budget(None, torch.device("cpu")) is None


def test_a_streamed_collection_writes_the_same_store_bytes(tmp_path):
    _collect(tmp_path / "resident", None)
    _collect(tmp_path / "streamed", BUDGET)
    assert store_files(tmp_path / "streamed") == store_files(tmp_path / "resident")


def test_a_run_resumes_under_another_budget(tmp_path):
    _collect(tmp_path / "whole", None)
    _collect(tmp_path / "mixed", None, n_masks=4)
    ds = _collect(tmp_path / "mixed", BUDGET)  # same identity: a resume, not a mismatch
    assert (
        ds.meta["data_fingerprint"] == ComponentDataset(tmp_path / "whole").meta["data_fingerprint"]
    )
    assert store_files(tmp_path / "mixed") == store_files(tmp_path / "whole")


def test_a_streamed_prefix_cache_gives_the_same_rows(tmp_path):
    _collect(tmp_path / "resident", None, prefix="1")
    # the cache (the scaled images: 64 floats and the label, 264 bytes an example) is
    # larger than the uint8 images: a budget of one batch of it streams both
    _collect(tmp_path / "streamed", BATCH * (64 * 4 + 8), prefix="1")
    want = ComponentDataset(tmp_path / "resident").outputs()
    assert torch.equal(ComponentDataset(tmp_path / "streamed").outputs(), want)


def test_streamed_evaluation_and_baselines_equal_the_resident_ones():
    model, comps, data = _setup()
    common = {"batch_size": BATCH, "progress": False}
    loo = leave_one_out(model, comps, data, **common)
    loo_streamed = leave_one_out(model, comps, data, device_budget=BUDGET, **common)
    assert torch.equal(loo_streamed.weights, loo.weights)
    assert torch.equal(loo_streamed.bias, loo.bias)
    assert loo_streamed.meta == loo.meta
    grad = gradient(model, comps, data, **common)
    grad_streamed = gradient(model, comps, data, device_budget=BUDGET, **common)
    assert torch.equal(grad_streamed.weights, grad.weights)
    assert torch.equal(grad_streamed.bias, grad.bias)
    eg = expected_gradient(model, comps, data, n_states=3, **common)
    eg_streamed = expected_gradient(model, comps, data, n_states=3, device_budget=BUDGET, **common)
    assert torch.equal(eg_streamed.weights, eg.weights) and torch.equal(eg_streamed.bias, eg.bias)
    args = {"alphas": (0.1, 0.3), "n_masks": 6, **common}
    res = evaluate(loo, model, comps, data, **args)
    res_streamed = evaluate(loo, model, comps, data, device_budget=BUDGET, **args)
    assert torch.equal(res_streamed.pearson, res.pearson)
    assert torch.equal(res_streamed.spearman, res.spearman)


def test_a_streamed_edit_sweep_equals_the_resident_one():
    model, comps, data = _setup()
    args = {"targets": [0, 5, 17], "references": [30, 39], "order": [3, 0, 7], "ks": (0, 1, 3),
            "batch_size": BATCH}  # fmt: skip
    table = edit.sweep(None, model, comps, data, progress=False, **args)
    streamed = edit.sweep(None, model, comps, data, progress=False, device_budget=BUDGET, **args)
    assert streamed == table


def test_a_budget_below_one_batch_is_refused_with_the_size_needed(tmp_path):
    with pytest.raises(ArgumentError, match=r"device_budget=500 bytes cannot hold one batch: 8 "
                       r"examples of 72 bytes each \(int64, uint8\) take 576 bytes\. Give "
                       r"device_budget >= 576, or a smaller batch_size"):  # fmt: skip
        _collect(tmp_path / "run", 500)
    assert not (tmp_path / "run").exists()
    _collect(tmp_path / "run", 576)  # exactly one batch: accepted


@pytest.mark.parametrize("bad", [0, -5, 2.5, "8GB", True])
def test_a_budget_that_is_not_a_byte_count_is_refused(tmp_path, bad):
    with pytest.raises(ArgumentError, match=r"device_budget must"):
        _collect(tmp_path / "run", bad)
    assert not (tmp_path / "run").exists()


def test_a_shuffled_loader_is_refused_at_the_first_collect(tmp_path):
    model, comps, (x, y) = _setup()
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    with pytest.raises(DataError, match=r"shuffles its examples .* shuffle=False"):
        collect(model, comps, loader, path=tmp_path / "run", **SETTINGS, progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(DataError, match=r"shuffles its examples"):
        leave_one_out(model, comps, loader, progress=False)
    ordered = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    collect(model, comps, ordered, path=tmp_path / "run", **SETTINGS, progress=False)


def _on_meta():
    model, comps, data = _setup()
    return model.to("meta"), comps, data


ENTRY_POINTS = {
    "collect": lambda m, c, d, w: collect(m, c, d, path=w, **SETTINGS, progress=False),
    "evaluate": lambda m, c, d, w: evaluate(
        leave_one_out(*_setup(), progress=False), m, c, d, n_masks=3, progress=False
    ),
    "leave_one_out": lambda m, c, d, w: leave_one_out(m, c, d, progress=False),
    "gradient": lambda m, c, d, w: gradient(m, c, d, progress=False),
    "edit.sweep": lambda m, c, d, w: edit.sweep(
        None, m, c, d, targets=[0], order=[0], ks=(0, 1), progress=False
    ),
    "edit.measure": lambda m, c, d, w: edit.measure(m, d, targets=[0], progress=False),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_a_model_on_the_meta_device_is_refused_at_every_entry_point(tmp_path, entry):
    model, comps, data = _on_meta()
    with pytest.raises(ArgumentError, match=r"is on the meta device: the model was built"):
        ENTRY_POINTS[entry](model, comps, data, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("entry", ["collect", "evaluate", "gradient", "edit.sweep"])
def test_an_offloaded_model_is_refused_with_what_to_do(tmp_path, entry):
    accelerate = pytest.importorskip("accelerate")
    model, comps, data = _setup()
    accelerate.cpu_offload(model, execution_device="cpu")
    with pytest.raises(ArgumentError, match=r"accelerate offloaded it.*remove_hook_from_module"):
        ENTRY_POINTS[entry](model, comps, data, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_streamed_examples_are_pinned_and_give_the_same_rows(tmp_path):
    model, comps, data = _setup()
    examples = ExampleSet(data, torch.device("cuda"), BATCH, device_budget=BUDGET)
    assert examples.streamed and examples.whole[0].is_pinned()
    assert examples.whole[0].dtype == torch.uint8
    _collect(tmp_path / "resident", None, device="cuda")
    _collect(tmp_path / "streamed", BUDGET, device="cuda")
    a = ComponentDataset(tmp_path / "resident").outputs()
    b = ComponentDataset(tmp_path / "streamed").outputs()
    torch.testing.assert_close(b, a)  # the same kernels on the same batches
