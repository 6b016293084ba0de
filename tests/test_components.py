"""Finding and naming components: counts on real models, name round trips, bad specs."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from coarpy.components import Components
from coarpy.errors import ComponentError


def test_discover_finds_every_conv_channel_of_the_cnn(cnn):
    comps = Components.discover(cnn, kinds=("conv",))
    assert len(comps) == 8 + 16
    assert [(g.module, g.n_units, g.offset) for g in comps.groups] == [
        ("features.0", 8, 0),
        ("features.4", 16, 8),
    ]
    assert comps.names[0] == "features.0:0"
    assert comps.names[8] == "features.4:0"
    assert comps.names[-1] == "features.4:15"


@pytest.mark.parametrize("kinds", [("conv",), ("conv", "linear")])
def test_names_round_trip_on_the_cnn(cnn, kinds):
    comps = Components.discover(cnn, kinds=kinds)
    assert len(set(comps.names)) == len(comps)
    assert [comps.index(name) for name in comps.names] == list(range(len(comps)))


def test_linear_units_follow_the_convs_in_model_order(cnn):
    comps = Components.discover(cnn, kinds=("linear", "conv"))
    assert [(g.module, g.kind, g.n_units) for g in comps.groups] == [
        ("features.0", "conv", 8),
        ("features.4", "conv", 16),
        ("classifier.1", "linear", 32),
        ("classifier.3", "linear", 10),
    ]
    assert comps.kinds == ["conv"] * 24 + ["linear"] * 42


def test_locate_inverts_the_flat_index(cnn):
    comps = Components.discover(cnn, kinds=("conv", "linear"))
    flat = torch.arange(len(comps))
    groups, units = comps.locate(flat)
    rebuilt = [
        f"{comps.groups[g].module}:{u}"
        for g, u in zip(groups.tolist(), units.tolist(), strict=True)
    ]
    assert rebuilt == comps.names


def test_from_spec_orders_groups_by_the_model_not_the_spec(cnn):
    comps = Components.from_spec(cnn, {"classifier.3": "linear", "features.0": "conv"})
    assert [g.module for g in comps.groups] == ["features.0", "classifier.3"]
    assert comps.to_dict() == {
        "groups": [["features.0", "conv", 8], ["classifier.3", "linear", 10]]
    }


def test_minilm_has_72_heads_and_6_by_1536_neurons(minilm):
    comps = Components.discover(minilm, kinds=("heads", "neurons"))
    heads = [g for g in comps.groups if g.kind == "heads"]
    neurons = [g for g in comps.groups if g.kind == "neurons"]
    assert sum(g.n_units for g in heads) == 72 and len(heads) == 6
    assert sum(g.n_units for g in neurons) == 6 * 1536 and len(neurons) == 6
    assert len(comps) == 72 + 6 * 1536
    assert heads[0].module == "encoder.layer.0.attention"
    assert heads[0].hook == "encoder.layer.0.attention.output.dense"
    assert heads[0].unit_size == 32
    assert neurons[0].module == "encoder.layer.0.output"  # BertOutput: the MLP's second half
    assert neurons[0].hook == "encoder.layer.0.output.dense"
    assert comps.names[12] == "encoder.layer.0.output:0"
    assert [comps.index(n) for n in comps.names] == list(range(len(comps)))


def test_include_and_exclude_globs_select_layers(minilm):
    first = Components.discover(minilm, kinds=("heads", "neurons"), include="encoder.layer.0.*")
    assert [g.module for g in first.groups] == [
        "encoder.layer.0.attention",
        "encoder.layer.0.output",
    ]
    rest = Components.discover(
        minilm, kinds=("heads",), exclude=["encoder.layer.0.*", "encoder.layer.5.*"]
    )
    assert [g.module for g in rest.groups] == [f"encoder.layer.{i}.attention" for i in range(1, 5)]
    assert len(rest) == 4 * 12


def test_include_matching_nothing_is_an_error(cnn):
    with pytest.raises(ComponentError, match=r"No components of kinds \('conv',\).*include="):
        Components.discover(cnn, kinds=("conv",), include="decoder.*")


def test_mlp_kinds_linear_neurons_inputs(mlp):
    comps = Components.from_spec(mlp, {"0": "linear", "2": "neurons", "4": "inputs"})
    assert [(g.module, g.kind, g.n_units, g.site) for g in comps.groups] == [
        ("0", "linear", 16, "output"),
        ("2", "neurons", 32, "input"),
        ("4", "inputs", 16, "input"),
    ]
    assert comps.groups[1].hook == "2.2"
    assert Components.discover(mlp, kinds=("neurons",)).groups[0].module == "2"


def test_multihead_attention_heads_are_a_param_site(attention_net):
    comps = Components.discover(attention_net, kinds=("heads",))
    (g,) = comps.groups
    assert (g.module, g.n_units, g.unit_size, g.site) == ("attn", 4, 4, "param")
    # its out_proj is never called as a module, so discovery must not offer it
    linear = Components.discover(attention_net, kinds=("linear",))
    assert [g.module for g in linear.groups] == ["readout"]


def test_multihead_attention_submodule_is_refused_with_the_fix(attention_net):
    with pytest.raises(ComponentError, match=r"nn.MultiheadAttention.*\{'attn': 'heads'\}"):
        Components.from_spec(attention_net, {"attn.out_proj": "linear"})


def test_unknown_module_suggests_a_close_match(cnn):
    with pytest.raises(ComponentError, match=r"no module 'feature.0'.*Did you mean 'features.0'"):
        Components.from_spec(cnn, {"feature.0": "conv"})


def test_unsupported_kind_for_a_module_names_what_it_expects(cnn):
    with pytest.raises(ComponentError, match=r"'classifier.1' is a Linear.*'conv'.*Conv1d/2d/3d"):
        Components.from_spec(cnn, {"classifier.1": "conv"})


def test_unknown_kind_lists_the_kinds(cnn):
    with pytest.raises(ComponentError, match=r"Unknown component kind 'filters'.*conv, linear"):
        Components.discover(cnn, kinds=("filters",))
    with pytest.raises(ComponentError, match=r"Unknown component kind 'filters'"):
        Components.from_spec(cnn, {"features.0": "filters"})


def test_empty_selection_is_an_error(cnn):
    with pytest.raises(ComponentError, match="empty spec"):
        Components.from_spec(cnn, {})
    with pytest.raises(ComponentError, match="selection is empty"):
        Components([])


def test_the_same_module_site_twice_is_refused(mlp):
    # "neurons" of the block and "inputs" of its down projection mask the same input
    with pytest.raises(
        ComponentError,
        match=r"Groups '2' \(neurons\) and '2.2' \(inputs\) both ablate '2.2.weight'",
    ):
        Components.from_spec(mlp, {"2": "neurons", "2.2": "inputs"})


def test_index_of_an_unknown_name_shows_the_name_format(cnn):
    comps = Components.discover(cnn)
    for bad in ("features.0:8", "features.0", "features.9:0", "features.0:x"):
        with pytest.raises(ComponentError, match=r"No component named .*'features.0:0'"):
            comps.index(bad)


def test_unreadable_attention_module_is_an_error_not_silence():
    class MyAttention(nn.Module):  # an "attention" with no head count
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(4, 12)

    net = nn.Sequential(MyAttention())
    with pytest.raises(ComponentError, match=r"'0' \(MyAttention\) looks like attention"):
        Components.discover(net, kinds=("heads",))


# -- one name per component, one group per weight (issue 16) -------------------------


class _Block(nn.Module):
    """Attention with a head count and an output projection, as timm writes it."""

    def __init__(self):
        super().__init__()
        self.num_heads = 2
        self.proj = nn.Linear(8, 8)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _Block()
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))


def test_neurons_given_by_block_or_down_projection_have_one_name(mlp):
    by_block = Components.from_spec(mlp, {"2": "neurons"})
    by_projection = Components.from_spec(mlp, {"2.2": "neurons"})
    assert by_block.names == by_projection.names
    assert by_block.names[0] == "2:0" and by_block.groups[0].hook == "2.2"
    # an MLP that is the whole model names its neurons after its down projection
    whole = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    assert Components.discover(whole, kinds="neurons").names[0] == "2:0"


@pytest.mark.parametrize(
    "spec, first, second, weight",
    [
        ({"mlp": "neurons", "mlp.2": "linear"}, "'mlp' (neurons)", "'mlp.2' (linear)", "mlp.2"),
        (
            {"attn": "heads", "attn.proj": "linear"},
            "'attn' (heads)",
            "'attn.proj' (linear)",
            "attn.proj",
        ),
    ],
)
def test_two_groups_on_one_weight_are_refused_naming_both(spec, first, second, weight):
    with pytest.raises(ComponentError) as err:
        Components.from_spec(_Net(), spec)
    message = str(err.value)
    assert f"Groups {first} and {second} both ablate '{weight}.weight'" in message
    assert "exclude=" in message


def test_discover_refuses_kinds_that_overlap_and_says_how_to_exclude(mlp):
    with pytest.raises(ComponentError, match=r"'2' \(neurons\).*'2.2' \(linear\).*exclude="):
        Components.discover(mlp, kinds=("linear", "neurons"))
    comps = Components.discover(mlp, kinds=("linear", "neurons"), exclude=["2.2", "4"])
    assert [(g.module, g.kind) for g in comps.groups] == [
        ("0", "linear"),
        ("2", "neurons"),
        ("2.0", "linear"),
    ]


def test_the_same_group_twice_and_gaps_are_refused(mlp):
    (g,) = Components.from_spec(mlp, {"0": "linear"}).groups
    with pytest.raises(ComponentError, match=r"Two groups are named '0' \(linear and linear\)"):
        Components([g, g])
    other = dataclasses.replace(g, module="first", offset=0)
    with pytest.raises(ComponentError, match=r"'first' \(linear\) and '0' \(linear\) both"):
        Components([other, dataclasses.replace(g, offset=16)])
    with pytest.raises(ComponentError, match=r"starts at flat index 3, expected 0"):
        Components([dataclasses.replace(g, offset=3)])


def test_tied_weights_in_two_groups_are_refused():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    net[2].weight = net[0].weight
    with pytest.raises(ComponentError, match=r"'0' \(linear\) and '2' \(linear\) both ablate"):
        Components.from_spec(net, {"0": "linear", "2": "linear"})


def test_groups_record_the_weights_they_ablate(mlp, attention_net):
    comps = Components.from_spec(mlp, {"0": "linear", "2": "neurons", "4": "inputs"})
    assert [g.weights for g in comps.groups] == [("0.weight",), ("2.2.weight",), ("4.weight",)]
    (heads,) = Components.discover(attention_net, kinds="heads").groups
    assert heads.weights == ("attn.out_proj.weight",)


def test_a_module_discover_cannot_use_is_named_in_a_warning():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ConvTranspose2d(2, 2, 3))
    with pytest.warns(UserWarning, match=r"'1' \(ConvTranspose2d\): kind 'conv' takes"):
        comps = Components.discover(net, kinds="conv")
    assert [g.module for g in comps.groups] == ["0"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Components.discover(net, kinds="conv", exclude="1")  # excluded: nothing to say


def test_the_flat_order_does_not_depend_on_how_a_group_is_spelled(mlp):
    by_projection = Components.from_spec(mlp, {"2.0": "linear", "2.2": "neurons"})
    by_block = Components.from_spec(mlp, {"2": "neurons", "2.0": "linear"})
    found = Components.discover(mlp, kinds=("linear", "neurons"), include=["2", "2.0"])
    assert by_projection.names == by_block.names == found.names
    assert by_block.names[0] == "2:0"
