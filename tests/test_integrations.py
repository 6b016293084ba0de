"""Models as other libraries hand them over: nnsight envoys and accelerate offloading,
with the real packages (each test skips where its package is not installed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from coarpy import Components, ablate, apply_ablation, collect, outputs
from coarpy.errors import ArgumentError
from coarpy.integrations import as_module, check_weights_in_memory


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
    ).eval()


def _x():
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(1))


def _keep(n, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) >= 0.4


# -- nnsight ---------------------------------------------------------------------------


@pytest.fixture
def envoy():
    nnsight = pytest.importorskip("nnsight")
    return nnsight.NNsight(_net())


def test_components_of_an_envoy_are_those_of_its_module(envoy):
    net = envoy._module
    found = Components.discover(envoy, kinds=("linear", "conv"))
    assert found.names == Components.discover(net, kinds=("linear", "conv")).names
    spec = Components.from_spec(envoy, {"2": "linear", "4": "inputs"})
    assert spec.names == Components.from_spec(net, {"2": "linear", "4": "inputs"}).names


def test_ablate_on_an_envoy_hooks_its_module_and_yields_the_envoy(envoy, snapshot):
    net = envoy._module
    comps = Components.discover(envoy, kinds="linear")
    keep = _keep(len(comps))
    with torch.no_grad():
        with ablate(net, comps, keep):
            want = net(_x())
        with ablate(envoy, comps, keep) as model:
            assert model is envoy
            got = envoy(_x())
        edited = apply_ablation(envoy, comps, keep)
        assert isinstance(edited, nn.Module)
        torch.testing.assert_close(edited(_x()), want, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_trace_inside_ablate_runs_the_ablated_model(envoy):
    net = envoy._module
    comps = Components.from_spec(envoy, {"0": "linear"})
    keep = torch.ones(len(comps), dtype=torch.bool)
    keep[:4] = False  # units 0..3 of layer 0 become their biases
    x = _x()
    with torch.no_grad(), ablate(net, comps, keep):
        want = net(x)
        want_0 = net[0](x)
    with ablate(envoy, comps, keep), envoy.trace(x):  # nnsight: access in execution order
        layer_0 = envoy[0].output.save()
        relu_in = envoy[1].input.save()
        out = envoy.output.save()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    # downstream modules see the ablation; the ablated layer's own .output is read
    # inside its forward, before coarpy's mask (as the docstring of ablate says)
    torch.testing.assert_close(relu_in, want_0, rtol=0, atol=0)
    assert not torch.equal(layer_0[:, :4], want_0[:, :4])
    torch.testing.assert_close(layer_0[:, 4:], want_0[:, 4:], rtol=0, atol=0)


def test_collect_accepts_an_envoy(envoy, tmp_path):
    net = envoy._module
    comps = Components.discover(envoy, kinds="linear")
    data = (_x(), torch.tensor([0, 1, 2, 0, 1]))
    args = {"output": outputs.margin, "n_masks": 4, "alpha": 0.3, "progress": False}
    wrapped = collect(envoy, comps, data, path=tmp_path / "envoy", **args)
    plain = collect(net, comps, data, path=tmp_path / "plain", **args)
    assert torch.equal(wrapped.outputs(), plain.outputs())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def test_anything_else_is_refused_with_what_to_pass():
    with pytest.raises(ArgumentError, match=r"Expected a torch.nn.Module.*got builtins.str"):
        as_module("gpt2")
    with pytest.raises(ArgumentError, match=r"torch.nn.Module"):
        Components.discover(object(), kinds="linear")


# -- accelerate ------------------------------------------------------------------------


def test_a_cpu_offloaded_model_is_refused_with_what_to_do():
    accelerate = pytest.importorskip("accelerate")
    net = _net()
    accelerate.cpu_offload(net, execution_device="cpu")
    match = r"'0.weight' is on the meta device: accelerate offloaded it.*remove_hook_from_module"
    with pytest.raises(ArgumentError, match=match):
        Components.discover(net, kinds="linear")
    with pytest.raises(ArgumentError, match=match):
        Components.from_spec(net, {"0": "linear"})
    comps = Components.from_spec(_net(), {"0": "linear"})
    with pytest.raises(ArgumentError, match=match), ablate(net, comps, _keep(len(comps))):
        pass
    with pytest.raises(ArgumentError, match=match):
        apply_ablation(net, comps, _keep(len(comps)))


def test_the_advised_fix_for_an_offloaded_model_works():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.hooks import remove_hook_from_module

    net, reference = _net(), _net()
    accelerate.cpu_offload(net, execution_device="cpu")
    remove_hook_from_module(net, recurse=True)
    comps = Components.discover(net, kinds="linear")
    keep = _keep(len(comps))
    with torch.no_grad(), ablate(net, comps, keep):
        got = net(_x())
    with torch.no_grad(), ablate(reference, comps, keep):
        want = reference(_x())
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_disk_offloaded_dispatch_is_refused(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    net = _net()
    device_map = {"0": "cpu", "1": "cpu", "2": "disk", "3": "cpu", "4": "disk"}
    accelerate.dispatch_model(net, device_map, offload_dir=str(tmp_path))
    with pytest.raises(ArgumentError, match=r"'2.weight' is on the meta device: accelerate"):
        Components.discover(net, kinds="linear")


def test_a_meta_model_is_counted_but_not_ablated():
    with torch.device("meta"):
        net = _net()
    comps = Components.discover(net, kinds="linear")  # shapes only
    assert len(comps) == 8 + 8 + 3
    with pytest.raises(ArgumentError, match=r"built on the meta device and never loaded"):
        check_weights_in_memory(net)
    with pytest.raises(ArgumentError, match=r"never loaded"), ablate(net, comps, _keep(19)):
        pass
