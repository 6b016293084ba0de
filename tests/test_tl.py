"""TransformerLens 4: components of a ``TransformerBridge``, on the real package.

Bridges are built offline around transformers models made from small configs with
random weights (``build_bridge_from_module``) and from TransformerLens' own native
architecture (``boot_native``). Ablation is checked against zeroing the weights that
hold each head (input rows of the attention's output projection) and neuron (input rows
of the MLP's down projection) by hand, on a second bridge of the same weights.
``HookedTransformer`` (removed in 4.0) is tested in test_families.py.
"""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch

from coarpy import Components, ablate, apply_ablation

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens")
sources = pytest.importorskip("transformer_lens.model_bridge.sources")
logging.getLogger("transformers").setLevel(logging.ERROR)

L, D, H, V = 2, 32, 4, 50  # layers, width, heads, vocabulary


def _gpt2_bridge():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=L, n_embd=D, n_head=H, vocab_size=V, n_positions=16)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    return sources.build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=cfg).eval()


def _llama_bridge():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        num_hidden_layers=L, hidden_size=D, num_attention_heads=H, num_key_value_heads=2,
        intermediate_size=48, vocab_size=V,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(cfg).eval()
    return sources.build_bridge_from_module(hf, "LlamaForCausalLM", hf_config=cfg).eval()


def _native_bridge():
    from transformer_lens import TransformerBridgeConfig

    cfg = TransformerBridgeConfig(
        d_model=16, n_layers=L, n_ctx=8, d_head=4, n_heads=4, d_mlp=24, d_vocab=V,
        act_fn="gelu", seed=0,
    )  # fmt: skip
    return sources.boot_native(cfg).eval()


def _gpt2_compatible_bridge():
    bridge = _gpt2_bridge()
    bridge.enable_compatibility_mode()  # HookedTransformer numerics (folded weights)
    return bridge


BRIDGES = {
    "gpt2": _gpt2_bridge,
    "gpt2-compatibility": _gpt2_compatible_bridge,
    "llama": _llama_bridge,
    "native": _native_bridge,
}


def _tokens():
    return torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(1))


def _random_keep(n, seed):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) >= 0.3


def _zero_by_hand(bridge, comps, keep):
    """Zero each ablated head's and neuron's input rows of the projection, by hand."""
    with torch.no_grad():
        for g in comps.groups:
            block = bridge.get_submodule(g.module)  # blocks.L.attn or blocks.L.mlp
            proj = (block.o if g.kind == "heads" else block.out).original_component
            layer_in = proj.weight.shape[0] if type(proj).__name__ == "Conv1D" else None
            ablated = torch.nonzero(~keep[g.offset : g.stop]).flatten()
            for u in ablated.tolist():
                rows = slice(u * g.unit_size, (u + 1) * g.unit_size)
                if layer_in is not None:  # Conv1D stores (in, out)
                    proj.weight[rows, :] = 0
                else:
                    proj.weight[:, rows] = 0


@pytest.mark.parametrize("arch", BRIDGES)
def test_bridge_heads_and_neurons_are_named_after_attn_and_mlp(arch):
    bridge = BRIDGES[arch]()
    comps = Components.discover(bridge, kinds=("heads", "neurons"))
    kinds = {g.module: g.kind for g in comps.groups}
    assert kinds == {
        f"blocks.{i}.{part}": kind
        for i in range(L)
        for part, kind in (("attn", "heads"), ("mlp", "neurons"))
    }
    assert comps.names[0] == "blocks.0.attn:0"
    assert [comps.index(n) for n in comps.names] == list(range(len(comps)))
    # The symptom: excluding hook modules silently lost every neuron.
    assert Components.discover(bridge, kinds=("heads", "neurons"), exclude="*hook*").names == (
        comps.names
    )


def test_gpt2_bridge_counts_every_head_and_neuron():
    comps = Components.discover(_gpt2_bridge(), kinds=("heads", "neurons"))
    assert len(comps) == L * H + L * 4 * D
    assert comps.groups[0].unit_size == D // H


@pytest.mark.parametrize("arch", BRIDGES)
def test_bridge_ablation_equals_zeroing_the_projection_rows(arch):
    bridge = BRIDGES[arch]()
    comps = Components.discover(bridge, kinds=("heads", "neurons"))
    keep = _random_keep(len(comps), seed=3)
    tokens = _tokens()
    with torch.no_grad(), ablate(bridge, comps, keep):
        hooked = bridge(tokens)
    edited = BRIDGES[arch]()
    _zero_by_hand(edited, comps, keep)
    with torch.no_grad():
        torch.testing.assert_close(hooked, edited(tokens), rtol=1e-5, atol=1e-5)
        plain = bridge(tokens)
        assert not torch.allclose(plain, hooked)  # the ablation did something


def test_bridge_per_row_masks_and_persistent_edit_equal_the_shared_mask():
    bridge = _gpt2_bridge()
    comps = Components.discover(bridge, kinds=("heads", "neurons"))
    keep = _random_keep(len(comps), seed=4)
    tokens = _tokens()
    with torch.no_grad():
        with ablate(bridge, comps, keep):
            shared = bridge(tokens)
        rows = torch.stack([keep, torch.ones_like(keep), keep])
        with ablate(bridge, comps, rows):
            per_row = bridge(tokens)
        edited = apply_ablation(bridge, comps, keep)
        torch.testing.assert_close(per_row[[0, 2]], shared[[0, 2]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(per_row[1], bridge(tokens)[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(edited(tokens), shared, rtol=1e-5, atol=1e-5)


def test_hook_z_and_hook_post_name_the_same_components_as_their_blocks():
    bridge = _gpt2_bridge()
    by_block = Components.from_spec(bridge, {"blocks.1.attn": "heads", "blocks.1.mlp": "neurons"})
    by_hook = Components.from_spec(
        bridge, {"blocks.1.attn.hook_z": "heads", "blocks.1.mlp.hook_post": "neurons"}
    )
    by_long_path = Components.from_spec(bridge, {"blocks.1._original_component.attn": "heads"})
    assert by_block.names == by_hook.names
    assert by_long_path.names == by_block.names[:H]


def test_joint_qkv_layer_that_never_runs_is_reported_not_selected():
    bridge = _gpt2_bridge()
    with pytest.warns(UserWarning, match=r"'blocks.0.attn.qkv'.*split q/k/v copies"):
        comps = Components.discover(bridge, kinds="linear", include="blocks.0.attn.*")
    assert [g.module for g in comps.groups] == [f"blocks.0.attn.{p}" for p in "qkvo"]
    # every selected layer runs: each group's hook fires once per forward pass
    fired = []
    handles = [
        bridge.get_submodule(g.hook).register_forward_hook(lambda *a, m=g.module: fired.append(m))
        for g in comps.groups
    ]
    with torch.no_grad():
        bridge(_tokens())
    for h in handles:
        h.remove()
    assert sorted(fired) == sorted(g.module for g in comps.groups)


def _hooks(model):
    return {
        name: (list(m._forward_hooks.values()), list(m._forward_pre_hooks.values()))
        for name, m in model.named_modules()
    }


def test_bridge_weights_and_hooks_are_as_before_after_ablation(snapshot):
    bridge = _native_bridge()  # the bridge keeps hooks of its own: compare, not count
    comps = Components.discover(bridge, kinds=("heads", "neurons"))
    with torch.no_grad():
        bridge(_tokens())  # the bridge wires its own capture hooks on the first call
    saved, hooks = snapshot(bridge), _hooks(bridge)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), ablate(bridge, comps, _random_keep(len(comps), seed=5)):
            bridge(_tokens())
    assert _hooks(bridge) == hooks
    now = bridge.state_dict()
    assert all(torch.equal(now[k], v) for k, v in saved.items())
    copy.deepcopy(bridge)  # persistent edits copy the bridge: it must deep-copy
