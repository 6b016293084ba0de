"""Real model families: discovery in transformers, timm, torchvision and TransformerLens
layouts, the paper's reference component sets, and language-model outputs.

Models are built from small configs with random weights (no download). Libraries that
are not installed (timm, torchvision, transformer_lens) are replaced by stand-in modules
with the same names and shapes; the tests on the real ones skip without them.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coarpy import Components, ablate, apply_ablation, outputs
from coarpy.ablation import Ablator
from coarpy.collect import collect
from coarpy.errors import ComponentError, MaskError
from coarpy.families import hook_point_weight
from coarpy.recipes.specs import gpt2_reference_spec, resnet_reference_spec, vit_reference_spec

sys.path.insert(0, str(Path(__file__).parent))
import _torchvision_standins as tv  # noqa: E402

sys.path.remove(str(Path(__file__).parent))

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

L, D, H, I = 2, 32, 4, 64  # layers, width, heads, MLP width of the small configs


def _gpt2(**kw):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=L, n_embd=D, n_head=H, vocab_size=50, n_positions=32, bos_token_id=0,
        eos_token_id=0, **kw,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        num_hidden_layers=L, hidden_size=D, num_attention_heads=H, num_key_value_heads=H,
        intermediate_size=I, vocab_size=50,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def _bert_classifier():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        num_hidden_layers=L, hidden_size=D, num_attention_heads=H, intermediate_size=I,
        vocab_size=50, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg).eval()


def _vit():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        num_hidden_layers=L, hidden_size=D, num_attention_heads=H, intermediate_size=I,
        image_size=16, patch_size=8, num_labels=3,
    )  # fmt: skip
    return transformers.ViTForImageClassification(cfg).eval()


def _distilbert():
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(n_layers=L, dim=D, n_heads=H, hidden_dim=I, vocab_size=50)
    return transformers.DistilBertForSequenceClassification(cfg).eval()


def _opt():
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(
        num_hidden_layers=L, hidden_size=D, num_attention_heads=H, ffn_dim=I, vocab_size=50,
        word_embed_proj_dim=D,
    )  # fmt: skip
    return transformers.OPTForCausalLM(cfg).eval()


def _gptj():
    torch.manual_seed(0)
    cfg = transformers.GPTJConfig(
        n_layer=L, n_embd=D, n_head=H, n_inner=I, vocab_size=50, rotary_dim=4
    )
    return transformers.GPTJForCausalLM(cfg).eval()


def _gpt_neox():
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(
        num_hidden_layers=L, hidden_size=D, num_attention_heads=H, intermediate_size=I,
        vocab_size=50,
    )  # fmt: skip
    return transformers.GPTNeoXForCausalLM(cfg).eval()


def _t5():
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        num_layers=L, num_decoder_layers=L, d_model=D, num_heads=H, d_kv=D // H, d_ff=I,
        vocab_size=50,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(cfg).eval()


def _tokens(n=3, seq=7, vocab=50, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, seq), generator=g)


def _inputs_for(model):
    if isinstance(model, transformers.ViTForImageClassification):
        return {
            "pixel_values": torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        }
    ids = _tokens()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _random_keep(n, seed, p_ablate=0.3):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) >= p_ablate


# -- discovery across transformers architectures ------------------------------------------

# (builder, heads, neurons): T5 has self-attention in L encoder and L decoder blocks plus
# L cross-attentions, and an MLP in every encoder and decoder block.
ARCHITECTURES = {
    "gpt2": (_gpt2, L * H, L * 4 * D),
    "llama": (_llama, L * H, L * I),
    "bert": (_bert_classifier, L * H, L * I),
    "vit": (_vit, L * H, L * I),
    "distilbert": (_distilbert, L * H, L * I),
    "opt": (_opt, L * H, L * I),
    "gptj": (_gptj, L * H, L * I),
    "gpt_neox": (_gpt_neox, L * H, L * I),
    "t5": (_t5, 3 * L * H, 2 * L * I),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_discovery_counts_every_head_and_neuron(arch):
    build, n_heads, n_neurons = ARCHITECTURES[arch]
    model = build()
    assert len(Components.discover(model, kinds="heads")) == n_heads
    assert len(Components.discover(model, kinds="neurons")) == n_neurons


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "t5"])
def test_hooks_equal_weight_zeroing(arch):
    model = ARCHITECTURES[arch][0]()
    comps = Components.discover(model, kinds=("heads", "neurons"))
    keep = _random_keep(len(comps), seed=len(comps))
    inputs = _inputs_for(model)
    with ablate(model, comps, keep):
        hooked = _logits(model, inputs)
    zeroed = _logits(apply_ablation(model, comps, keep), inputs)
    torch.testing.assert_close(hooked, zeroed, rtol=1e-5, atol=1e-5)
    base = _logits(model, inputs)
    assert (hooked - base).abs().max() > 1e-3 * base.abs().max()  # the hooks did act


def test_gpt2_head_is_the_head_of_the_attention_computation():
    # Zeroing head h's value projection (columns of the (in, out) Conv1D weight and the
    # bias) makes its output zero: the same as ablating head h.
    model = _gpt2()
    comps = Components.discover(model, kinds="heads")
    name = "transformer.h.1.attn:2"
    keep = torch.ones(len(comps), dtype=torch.bool)
    keep[comps.index(name)] = False
    inputs = _inputs_for(model)
    with ablate(model, comps, keep):
        hooked = _logits(model, inputs)
    edited = _gpt2()
    c_attn = edited.transformer.h[1].attn.c_attn
    head_dim = D // H
    cols = slice(2 * D + 2 * head_dim, 2 * D + 3 * head_dim)  # qkv layout: q | k | v
    with torch.no_grad():
        c_attn.weight[:, cols] = 0
        c_attn.bias[cols] = 0
    torch.testing.assert_close(hooked, _logits(edited, inputs), rtol=1e-5, atol=1e-5)


def test_llama_neuron_is_a_gated_mlp_unit():
    # A gated MLP's neuron j is act(gate_j) * up_j: zeroing up_proj's row j removes it.
    model = _llama()
    comps = Components.discover(model, kinds="neurons")
    keep = torch.ones(len(comps), dtype=torch.bool)
    keep[comps.index("model.layers.0.mlp:5")] = False
    inputs = _inputs_for(model)
    with ablate(model, comps, keep):
        hooked = _logits(model, inputs)
    edited = _llama()
    with torch.no_grad():
        edited.model.layers[0].mlp.up_proj.weight[5] = 0
    torch.testing.assert_close(hooked, _logits(edited, inputs), rtol=1e-5, atol=1e-5)


def test_llama_heads_and_gated_mlp_names():
    model = _llama()
    comps = Components.discover(model, kinds=("heads", "neurons"))
    assert comps.names[:2] == ["model.layers.0.self_attn:0", "model.layers.0.self_attn:1"]
    assert comps.names[H] == "model.layers.0.mlp:0"
    assert [g.hook for g in comps.groups[:2]] == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.down_proj",
    ]


# -- GPT-2: the paper's reference components ----------------------------------------------


def test_gpt2_reference_spec_counts_64512_for_gpt2_small():
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    comps = Components.from_spec(model, gpt2_reference_spec(model))
    assert len(comps) == 12 * (768 + 768 + 768 + 3072) == 64_512
    assert {g.kind for g in comps.groups} == {"inputs"}
    assert [g.module for g in comps.groups[:4]] == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ]


def test_gpt2_reference_spec_equals_discovery_by_globs():
    model = _gpt2()
    globs = ["*.attn.c_attn", "*.attn.c_proj", "*.mlp.c_fc", "*.mlp.c_proj"]
    by_globs = Components.discover(model, kinds="inputs", include=globs)
    by_spec = Components.from_spec(model, gpt2_reference_spec(model))
    assert by_spec.names == by_globs.names
    assert len(by_spec) == L * (D + D + D + 4 * D)


@pytest.mark.parametrize("kind", ["inputs", "linear"])
def test_gpt2_conv1d_rows_hooks_equal_weight_zeroing(kind):
    # Conv1D stores weight as (in, out): "inputs" zeroes weight rows, "linear" columns.
    model = _gpt2()
    comps = Components.discover(model, kinds=kind, include=["*.attn.c_attn", "*.mlp.c_proj"])
    keep = _random_keep(len(comps), seed=3)
    inputs = _inputs_for(model)
    with ablate(model, comps, keep):
        hooked = _logits(model, inputs)
    zeroed = _logits(apply_ablation(model, comps, keep), inputs)
    torch.testing.assert_close(hooked, zeroed, rtol=1e-5, atol=1e-5)


def test_gpt2_reference_spec_refuses_other_models():
    with pytest.raises(ComponentError, match=r"GPT-2 blocks .* LlamaForCausalLM has none"):
        gpt2_reference_spec(_llama())


# -- language-model and classifier outputs on transformers models ----------------------------


def test_token_margin_excludes_padding_and_ignored_labels():
    model = _gpt2()
    ids = _tokens(n=2, seq=6)
    short = ids[1, :4]
    padded = ids.clone()
    padded[1, 4:] = 0  # right padding
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    batch = {"input_ids": padded, "attention_mask": mask}
    with torch.no_grad():
        values = outputs.token_margin(model, batch)
        alone = outputs.token_margin(model, {"input_ids": short[None]})
    assert values.shape == (2,) and values.dtype == torch.float32
    torch.testing.assert_close(values[1], alone[0], rtol=1e-5, atol=1e-5)
    # The same margins by hand for row 0 (no padding): mean over its 5 targets.
    with torch.no_grad():
        logits = model(input_ids=ids[:1]).logits[0, :-1]
    target = ids[0, 1:]
    correct = logits.gather(1, target[:, None]).squeeze(1)
    others = logits.scatter(1, target[:, None], float("-inf")).amax(1)
    torch.testing.assert_close(values[0], (correct - others).mean(), rtol=1e-5, atol=1e-5)
    # labels of -100 drop tokens just like padding does.
    labels = padded.masked_fill(mask == 0, -100)
    with torch.no_grad():
        by_labels = outputs.token_margin(model, {"input_ids": padded, "labels": labels})
    torch.testing.assert_close(by_labels, values)


def test_token_margin_ignores_left_padding():
    model = _gpt2()
    ids = _tokens(n=1, seq=5)
    left = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones_like(ids)], 1)
    positions = (mask.cumsum(1) - 1).clamp_min(0)  # the real tokens keep positions 0..4
    with torch.no_grad():
        padded = outputs.token_margin(
            model, {"input_ids": left, "attention_mask": mask, "position_ids": positions}
        )
        alone = outputs.token_margin(model, {"input_ids": ids})
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def test_token_logprob_is_the_log_probability_of_the_answer():
    model = _gpt2()
    ids = _tokens(n=1, seq=6)
    labels = ids.clone()
    labels[:, :4] = -100  # prompt = tokens 0..3, answer = tokens 4..5
    with torch.no_grad():
        value = outputs.token_logprob(model, {"input_ids": ids, "labels": labels})
        logp = model(input_ids=ids).logits.log_softmax(-1)[0]
    expected = logp[3, ids[0, 4]] + logp[4, ids[0, 5]]
    torch.testing.assert_close(value[0], expected, rtol=1e-5, atol=1e-5)


def test_margin_works_for_sequence_classifiers_with_dict_batches():
    model = _bert_classifier()
    ids = _tokens(n=4, seq=6)
    mask = torch.ones_like(ids)
    mask[2, 3:] = 0
    y = torch.tensor([0, 2, 1, 1])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": y}
    with torch.no_grad():
        values = outputs.margin(model, batch)
        logits = model(input_ids=ids, attention_mask=mask).logits
    correct = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    torch.testing.assert_close(values, correct - others)


@pytest.mark.parametrize(
    ("build", "output"),
    [(_gpt2, outputs.token_margin), (_bert_classifier, outputs.margin)],
    ids=["gpt2-token_margin", "bert-margin"],
)
def test_collect_packs_dict_batches_of_ragged_sequences(tmp_path, build, output):
    # Two batches of different lengths are padded into one example set; packing four
    # masks per forward pass gives the outputs of ablating one mask at a time.
    model = build()
    first = {"input_ids": _tokens(n=2, seq=5), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    second = {
        "input_ids": _tokens(n=2, seq=7, seed=2),
        "attention_mask": torch.ones(2, 7, dtype=torch.long),
    }
    second["attention_mask"][1, 5:] = 0
    if output is outputs.margin:
        first["labels"], second["labels"] = torch.tensor([0, 1]), torch.tensor([2, 0])
    data = [first, second]
    comps = Components.discover(model, kinds=("heads", "neurons"))
    kw = dict(output=output, n_masks=8, alpha=0.2, seed=0, block_size=4, progress=False)
    packed = collect(model, comps, data, path=tmp_path / "packed", batch_size=16, **kw)
    single = collect(model, comps, data, path=tmp_path / "single", batch_size=4, **kw)
    torch.testing.assert_close(packed.outputs(), single.outputs(), rtol=1e-4, atol=1e-4)
    with torch.no_grad(), ablate(model, comps, packed.masks()[5]):
        by_hand = torch.cat([output(model, b) for b in data])
    torch.testing.assert_close(packed.outputs()[5], by_hand, rtol=1e-4, atol=1e-4)


# -- ResNet: the paper's 22,720 conv filters ----------------------------------------------


class _Bottleneck(nn.Module):
    """torchvision's Bottleneck: names and shapes only."""

    def __init__(self, cin, width, stride, project):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.relu = nn.ReLU()
        if project:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, 4 * width, 1, stride, bias=False), nn.BatchNorm2d(4 * width)
            )


def _resnet50_standin():
    """torchvision.models.resnet50's module tree (conv1, bn1, layer1..4, fc)."""
    net = nn.Module()
    net.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    net.bn1 = nn.BatchNorm2d(64)
    cin = 64
    for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
        layer = []
        for b in range(blocks):
            layer.append(_Bottleneck(cin, width, 1 if i == 0 or b else 2, project=b == 0))
            cin = 4 * width
        setattr(net, f"layer{i + 1}", nn.Sequential(*layer))
    net.fc = nn.Linear(2048, 1000)
    return net


def test_resnet50_reference_spec_counts_22720_filters():
    with torch.device("meta"):
        net = _resnet50_standin()
    spec = resnet_reference_spec(net)
    comps = Components.from_spec(net, spec)
    assert len(comps) == 64 + 3 * 384 + 4 * 768 + 6 * 1536 + 3 * 3072 == 22_720
    # All convs, shortcut projections included, are 3,840 more: those are left out.
    everything = Components.discover(net, kinds="conv")
    assert len(everything) - len(comps) == 256 + 512 + 1024 + 2048
    assert not any("downsample" in p for p in spec)
    assert comps.names[0] == "conv1:0" and comps.names[64] == "layer1.0.conv1:0"


def test_resnet_reference_spec_refuses_a_model_without_convs():
    with pytest.raises(ComponentError, match="resnet_reference_spec expects a ResNet"):
        resnet_reference_spec(nn.Sequential(nn.Linear(2, 2)))


def test_resnet50_torchvision():
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        net = torchvision.models.resnet50()
    assert len(Components.from_spec(net, resnet_reference_spec(net))) == 22_720


# -- ViT: the paper's 82,944 linear rows ----------------------------------------------------


class _TimmAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class _TimmMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)


class _TimmBlock(nn.Module):
    def __init__(self, dim, num_heads, hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _TimmAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _TimmMlp(dim, hidden)


def _timm_vit_standin(depth=12, dim=768, heads=12, hidden=3072):
    """timm's VisionTransformer module tree (patch_embed.proj, blocks.*, head)."""
    net = nn.Module()
    net.patch_embed = nn.Module()
    net.patch_embed.proj = nn.Conv2d(3, dim, 16, 16)
    net.blocks = nn.Sequential(*[_TimmBlock(dim, heads, hidden) for _ in range(depth)])
    net.norm = nn.LayerNorm(dim)
    net.head = nn.Linear(dim, 1000)
    return net


def test_vit_b16_reference_spec_counts_82944_rows():
    with torch.device("meta"):
        net = _timm_vit_standin()
    spec = vit_reference_spec(net)
    comps = Components.from_spec(net, spec)
    assert len(comps) == 12 * (2304 + 768 + 3072 + 768) == 82_944
    assert list(spec)[:4] == [
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
    ]
    assert set(spec.values()) == {"linear"}
    # timm's Attention (num_heads, proj) and Mlp (fc2) are recognised by discovery too.
    assert len(Components.discover(net, kinds="heads")) == 12 * 12
    assert len(Components.discover(net, kinds="neurons")) == 12 * 3072


def test_vit_reference_spec_on_transformers_vit_hooks_equal_weight_zeroing():
    model = _vit()
    comps = Components.from_spec(model, vit_reference_spec(model))
    assert len(comps) == L * (3 * D + D + I + D)
    keep = _random_keep(len(comps), seed=7, p_ablate=0.1)
    inputs = _inputs_for(model)
    with ablate(model, comps, keep):
        hooked = _logits(model, inputs)
    zeroed = _logits(apply_ablation(model, comps, keep), inputs)
    torch.testing.assert_close(hooked, zeroed, rtol=1e-5, atol=1e-5)


# -- torchvision's ViT: nn.MultiheadAttention's projection rows ------------------------------


def _small_torchvision_vit(seed=0):
    """torchvision's VisionTransformer layout (a stand-in: torchvision is not installed
    here), 2 blocks of width 32 with 4 heads, on 16×16 images in patches of 8."""
    torch.manual_seed(seed)
    return tv.VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
        num_classes=5,
    ).eval()  # fmt: skip


def test_vit_b16_torchvision_layout_reference_spec_counts_82944_rows():
    with torch.device("meta"):
        net = tv.vit_b_16()
    spec = vit_reference_spec(net)
    comps = Components.from_spec(net, spec)
    assert len(comps) == 12 * (2304 + 768 + 3072 + 768) == 82_944
    block = "encoder.layers.encoder_layer_0"
    assert list(spec)[:3] == [f"{block}.self_attention", f"{block}.mlp.0", f"{block}.mlp.3"]
    first = comps.groups[0]
    assert (first.module, first.kind, first.n_units, first.site) == (
        f"{block}.self_attention",
        "linear",
        3072,
        "param",
    )
    assert first.weights == (
        f"{block}.self_attention.in_proj_weight",
        f"{block}.self_attention.out_proj.weight",
    )
    # The reference scripts' order: in_proj rows (q, k, v), then out_proj rows, then the MLP.
    assert comps.names[2304] == f"{block}.self_attention:2304"
    assert comps.names[3072] == f"{block}.mlp.0:0"


def _images(n=3, size=16, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fast_path", [True, False], ids=["inference", "grad"])
def test_multihead_attention_rows_equal_zeroed_weights(fast_path):
    # Zeroing rows of in_proj_weight and out_proj.weight in place (the ablator) gives
    # exactly what a copy of the model with those rows zeroed gives, on torch's fused
    # inference kernel and on its Python path.
    net = _small_torchvision_vit()
    comps = Components.from_spec(net, vit_reference_spec(net))
    assert len(comps) == 2 * (4 * 32 + 64 + 32)
    keep = _random_keep(len(comps), seed=5, p_ablate=0.2)
    x = _images()
    context = torch.inference_mode() if fast_path else torch.enable_grad()
    with context:
        base = net(x)
        with ablate(net, comps, keep):
            ablated = net(x)
        zeroed = apply_ablation(net, comps, keep)(x)
    assert torch.equal(ablated, zeroed)
    assert (ablated - base).abs().max() > 1e-3


def test_multihead_attention_rows_are_the_weights_the_paper_zeroes():
    # Unit u < 3E is row u of in_proj_weight; unit 3E + r is row r of out_proj.weight.
    net = _small_torchvision_vit()
    comps = Components.from_spec(net, vit_reference_spec(net))
    attn = "encoder.layers.encoder_layer_1.self_attention"
    keep = torch.ones(len(comps), dtype=torch.bool)
    for unit in (0, 40, 95, 96 + 7):  # a query, a key, a value and an output row
        keep[comps.index(f"{attn}:{unit}")] = False
    edited = copy.deepcopy(net)
    mha = edited.get_submodule(attn)
    with torch.no_grad():
        mha.in_proj_weight[[0, 40, 95]] = 0
        mha.out_proj.weight[7] = 0
    x = _images()
    with torch.inference_mode(), ablate(net, comps, keep):
        torch.testing.assert_close(net(x), edited(x), rtol=0, atol=0)


def test_multihead_attention_rows_are_restored_bit_for_bit():
    net = _small_torchvision_vit()
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    comps = Components.from_spec(net, vit_reference_spec(net))
    ablator = Ablator(net, comps)
    with ablator, torch.inference_mode():
        for seed in range(3):
            ablator.set(_random_keep(len(comps), seed=seed, p_ablate=0.5))
            net(_images())
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())


def test_multihead_attention_rows_with_separate_key_and_value_widths():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=4, batch_first=True).eval()
    comps = Components.from_spec(mha, {"": "linear"})
    assert len(comps) == 4 * 8
    assert comps.groups[0].weights == (
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "out_proj.weight",
    )
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 5, 6), torch.randn(2, 5, 4)
    keep = _random_keep(len(comps), seed=2, p_ablate=0.3)
    with torch.inference_mode(), ablate(mha, comps, keep):
        hooked = mha(q, k, v, need_weights=False)[0]
    zeroed = apply_ablation(mha, comps, keep)
    with torch.inference_mode():
        assert torch.equal(hooked, zeroed(q, k, v, need_weights=False)[0])


def test_multihead_attention_rows_take_one_mask_for_the_batch():
    net = _small_torchvision_vit()
    comps = Components.from_spec(net, vit_reference_spec(net))
    with (
        pytest.raises(MaskError, match=r"MultiheadAttention: its projection rows .*one mask"),
        ablate(net, comps, torch.ones(3, len(comps), dtype=torch.bool)),
    ):
        pass


def test_multihead_attention_out_proj_alone_is_refused_naming_both_ways():
    net = _small_torchvision_vit()
    attn = "encoder.layers.encoder_layer_0.self_attention"
    with pytest.raises(ComponentError, match=r"kind 'heads'.*kind 'linear' for the rows"):
        Components.from_spec(net, {f"{attn}.out_proj": "linear"})


def test_discovery_still_leaves_multihead_attention_rows_to_the_spec():
    net = _small_torchvision_vit()
    found = Components.discover(net, kinds="linear")
    assert not any("self_attention" in g.module for g in found.groups)


def test_vit_reference_spec_refuses_a_model_without_blocks():
    with pytest.raises(ComponentError, match="found no transformer blocks"):
        vit_reference_spec(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)))


def test_vit_b16_torchvision():
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        net = torchvision.models.vit_b_16()
    assert len(Components.from_spec(net, vit_reference_spec(net))) == 82_944
    torch.manual_seed(0)
    small = torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
        num_classes=5,
    ).eval()  # fmt: skip
    comps = Components.from_spec(small, vit_reference_spec(small))
    keep = _random_keep(len(comps), seed=5, p_ablate=0.2)
    with torch.inference_mode():
        with ablate(small, comps, keep):
            ablated = small(_images())
        assert torch.equal(ablated, apply_ablation(small, comps, keep)(_images()))


def test_vit_b16_timm():
    timm = pytest.importorskip("timm")
    net = timm.create_model("vit_base_patch16_224", pretrained=False)
    assert len(Components.from_spec(net, vit_reference_spec(net))) == 82_944
    assert len(Components.discover(net, kinds="heads")) == 12 * 12


# -- TransformerLens ---------------------------------------------------------------------


class HookPoint(nn.Module):
    """transformer_lens.hook_points.HookPoint: an identity module to hang hooks on."""

    def forward(self, x):
        return x


def _param(*shape):
    return nn.Parameter(torch.randn(*shape) * 0.3)


class Attention(nn.Module):
    """TransformerLens' Attention: einsum weights, hook_z of shape (batch, pos, head, d_head)."""

    def __init__(self, d_model, n_heads, d_head):
        super().__init__()
        self.W_Q, self.W_K, self.W_V = (_param(n_heads, d_model, d_head) for _ in range(3))
        self.b_V = _param(n_heads, d_head)
        self.W_O, self.b_O = _param(n_heads, d_head, d_model), _param(d_model)
        self.hook_pattern, self.hook_z = HookPoint(), HookPoint()

    def forward(self, x):
        q = torch.einsum("bpm,hmd->bphd", x, self.W_Q)
        k = torch.einsum("bpm,hmd->bphd", x, self.W_K)
        v = torch.einsum("bpm,hmd->bphd", x, self.W_V) + self.b_V
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        pattern = self.hook_pattern(scores.masked_fill(~causal, float("-inf")).softmax(-1))
        z = self.hook_z(torch.einsum("bhqk,bkhd->bqhd", pattern, v))
        return torch.einsum("bqhd,hdm->bqm", z, self.W_O) + self.b_O


class MLP(nn.Module):
    """TransformerLens' MLP: W_in, W_out, hook_pre, hook_post of shape (batch, pos, d_mlp)."""

    def __init__(self, d_model, d_mlp):
        super().__init__()
        self.W_in, self.b_in = _param(d_model, d_mlp), _param(d_mlp)
        self.W_out, self.b_out = _param(d_mlp, d_model), _param(d_model)
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x):
        post = self.hook_post(F.gelu(self.hook_pre(x @ self.W_in + self.b_in)))
        return post @ self.W_out + self.b_out


class TransformerBlock(nn.Module):
    def __init__(self, d_model, n_heads, d_head, d_mlp):
        super().__init__()
        self.attn, self.mlp = Attention(d_model, n_heads, d_head), MLP(d_model, d_mlp)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class HookedTransformerStandIn(nn.Module):
    def __init__(self, n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=24, d_vocab=30):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(d_vocab, d_model)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, d_head, d_mlp) for _ in range(n_layers)
        )
        self.W_U = _param(d_model, d_vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return x @ self.W_U


def test_transformer_lens_components_are_named_after_attn_and_mlp_and_hook_their_hooks():
    model = HookedTransformerStandIn()
    comps = Components.discover(model, kinds=("heads", "neurons"))
    assert len(comps) == 2 * (4 + 24)
    assert comps.names[:2] == ["blocks.0.attn:0", "blocks.0.attn:1"]
    assert comps.names[4] == "blocks.0.mlp:0"
    assert [g.hook for g in comps.groups[:2]] == ["blocks.0.attn.hook_z", "blocks.0.mlp.hook_post"]
    assert Components.discover(model, kinds=("heads", "neurons"), exclude="*hook*").names == (
        comps.names
    )
    # The block paths and the hook names give the same components: one spelling.
    by_block = Components.from_spec(model, {"blocks.1.attn": "heads", "blocks.1.mlp": "neurons"})
    by_hook = Components.from_spec(
        model, {"blocks.1.attn.hook_z": "heads", "blocks.1.mlp.hook_post": "neurons"}
    )
    assert by_block.names == by_hook.names == [n for n in comps.names if "blocks.1" in n]


def _tl_check_against_weights(model):
    """Hooks on hook_z/hook_post equal zeroing rows of W_O/W_out (hook_point_weight)."""
    comps = Components.discover(model, kinds=("heads", "neurons"))
    keep = _random_keep(len(comps), seed=11)
    tokens = _tokens(n=2, seq=5, vocab=30)
    with torch.no_grad(), ablate(model, comps, keep):
        hooked = model(tokens)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        for g in comps.groups:
            units = torch.nonzero(~keep[g.offset : g.stop]).flatten()
            hook_point_weight(edited, g.hook)[units] = 0  # W_O[head] or W_out[neuron]
        zeroed = edited(tokens)
    torch.testing.assert_close(hooked, zeroed, rtol=1e-5, atol=1e-5)
    return comps, keep, tokens, hooked


def test_transformer_lens_hooks_equal_zeroing_w_o_and_w_out():
    model = HookedTransformerStandIn()
    assert hook_point_weight(model, "blocks.1.attn.hook_z") is model.blocks[1].attn.W_O
    assert hook_point_weight(model, "blocks.0.mlp.hook_post") is model.blocks[0].mlp.W_out
    comps, keep, tokens, hooked = _tl_check_against_weights(model)
    # Per-row masks: row i of the batch under mask i.
    rows = torch.stack([keep, torch.ones_like(keep)])
    with torch.no_grad(), ablate(model, comps, rows):
        per_row = model(tokens)
    torch.testing.assert_close(per_row[0], hooked[0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(per_row[1], model(tokens)[1], rtol=1e-5, atol=1e-5)


def test_transformer_lens_persistent_edit_equals_hooks_and_mean_mode_is_refused():
    from coarpy.ablation import Ablator, apply_ablation

    model = HookedTransformerStandIn()
    comps, keep, tokens, hooked = _tl_check_against_weights(model)
    edited = apply_ablation(model, comps, keep)
    with torch.no_grad():
        torch.testing.assert_close(edited(tokens), hooked, rtol=1e-5, atol=1e-5)
    means = {g.module: torch.zeros(g.n_features) for g in comps.groups}
    with pytest.raises(ComponentError, match="hook_z heads"):
        Ablator(model, comps, mode="mean", means=means)


def test_hook_point_weight_refuses_other_hooks():
    model = HookedTransformerStandIn()
    with pytest.raises(ComponentError, match="'blocks.0.mlp.hook_pre' is not the hook_z or"):
        hook_point_weight(model, "blocks.0.mlp.hook_pre")


def test_transformer_lens_hooked_transformer_real():
    tl = pytest.importorskip("transformer_lens")
    try:  # TransformerLens 4 removed HookedTransformer (tests/test_tl.py covers bridges)
        cfg_class, model_class = tl.HookedTransformerConfig, tl.HookedTransformer
    except (ImportError, AttributeError):
        pytest.skip("this TransformerLens has no HookedTransformer (removed in 4.0)")
    cfg = cfg_class(
        n_layers=2, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_mlp=24, d_vocab=30,
        act_fn="gelu", seed=0,
    )  # fmt: skip
    model = model_class(cfg).eval()
    comps = Components.discover(model, kinds=("heads", "neurons"))
    assert comps.names[0] == "blocks.0.attn:0" and len(comps) == 2 * (4 + 24)
    _tl_check_against_weights(model)


# -- bad input --------------------------------------------------------------------------


class StrangeAttention(nn.Module):
    """Attention with no head count and no known output projection."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(8, 8)

    def forward(self, x):
        return self.mix(x)


def test_unrecognised_attention_says_which_module_what_is_supported_and_how_to_fix():
    model = nn.Sequential(nn.Linear(8, 8), StrangeAttention())
    with pytest.raises(ComponentError) as err:
        Components.discover(model, kinds="heads")
    message = str(err.value)
    assert "'1' (StrangeAttention)" in message
    assert "num_heads" in message and "o_proj" in message and "hook_z" in message
    assert "from_spec" in message and "exclude=" in message
    # The way out it names works: give the components explicitly.
    assert len(Components.from_spec(model, {"1.mix": "inputs"})) == 8


def test_heads_on_a_module_without_heads_names_the_supported_layouts():
    model = nn.Sequential(StrangeAttention())
    with pytest.raises(
        ComponentError,
        match=r"'0' is a StrangeAttention, which has no 'heads'.*"
        r"nn.MultiheadAttention.*from_spec",
    ):
        Components.from_spec(model, {"0": "heads"})
