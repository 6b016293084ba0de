"""The paper's component sets, spelled out by module name.

Each function takes a model and returns the ``{module_path: kind}`` spec of the
components the paper ablates in that architecture, for ``Components.from_spec``:

- :func:`resnet_reference_spec`: every conv filter off the shortcut (CIFAR-10
  MiniResNet: 2,304; torchvision's ResNet-50: 22,720);
- :func:`vit_reference_spec`: the rows of every linear layer in the transformer blocks,
  the query/key/value rows of ``nn.MultiheadAttention`` included (ViT-B/16: 82,944);
- :func:`gpt2_reference_spec`: the input rows of every Conv1D of GPT-2 (GPT-2 small:
  64,512).

The architectures are recognised by module names and classes
(:mod:`coarpy.families`), so no library needs to be installed to read a spec.
"""

from __future__ import annotations

from torch import nn

from .. import families
from ..errors import ComponentError

_GPT2_REFERENCE = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def gpt2_reference_spec(model: nn.Module) -> dict[str, str]:
    """The paper's GPT-2 components: the input rows of every block's four Conv1D layers.

    Every transformer block contributes the weight rows of ``attn.c_attn``,
    ``attn.c_proj``, ``mlp.c_fc`` and ``mlp.c_proj`` (transformers' ``Conv1D`` stores
    weight as (in, out), so a row is an input feature: kind ``"inputs"``). GPT-2 small
    has 12 × (768 + 768 + 768 + 3072) = 64,512 components.

    Parameters
    ----------
    model : a transformers GPT-2 model (``GPT2LMHeadModel``, ``GPT2Model``, ...).

    Returns
    -------
    dict : ``{module_path: "inputs"}`` for ``Components.from_spec``.

    Raises
    ------
    ComponentError : the model has no GPT-2 blocks under these names.

    Examples
    --------
    >>> import transformers
    >>> cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32)
    >>> model = transformers.GPT2LMHeadModel(cfg)
    >>> from coarpy import Components
    >>> comps = Components.from_spec(model, gpt2_reference_spec(model))
    >>> len(comps) == 2 * (16 + 16 + 16 + 4 * 16)
    True
    >>> comps.names[16]
    'transformer.h.0.attn.c_proj:0'
    """
    spec = {
        path: "inputs"
        for path, module in model.named_modules()
        if ".".join(path.split(".")[-2:]) in _GPT2_REFERENCE
        and families.linear_shape(module) is not None
    }
    blocks = {path.rsplit(".", 2)[0] for path in spec}
    incomplete = sorted(
        b for b in blocks if not all(_join(b, rel) in spec for rel in _GPT2_REFERENCE)
    )
    if not spec or incomplete:
        where = f" (block {incomplete[0]!r} lacks some)" if incomplete else ""
        raise ComponentError(
            f"gpt2_reference_spec expects GPT-2 blocks with linear layers "
            f"{', '.join(_GPT2_REFERENCE)}, as in transformers' GPT2Model, but "
            f"{type(model).__name__} has none{where}. For another architecture write the "
            "spec yourself, e.g. Components.discover(model, kinds='inputs', "
            "include=['*.attn.c_attn', ...])."
        )
    return spec


def resnet_reference_spec(model: nn.Module) -> dict[str, str]:
    """The paper's ResNet components: the filters of every conv layer off the shortcut.

    Every ``nn.Conv2d`` counts (output channels, kind ``"conv"``), including the stem,
    except the 1×1 projections of the shortcut branches (torchvision's and timm's
    ``downsample`` modules). For torchvision's ResNet-50 that is 22,720 filters::

        stem conv1                                               64
        layer1: 3 blocks × (64 + 64 + 256)                     1,152
        layer2: 4 blocks × (128 + 128 + 512)                   3,072
        layer3: 6 blocks × (256 + 256 + 1024)                  9,216
        layer4: 3 blocks × (512 + 512 + 2048)                  9,216
                                                              22,720

    The four ``downsample`` convs (256 + 512 + 1024 + 2048 = 3,840 more) are left out.
    The CIFAR-10 MiniResNet (:class:`coarpy.recipes.MiniResNet`) has no shortcut convs:
    its 9 convs × 256 filters give 2,304.

    Parameters
    ----------
    model : a torchvision or timm ResNet (any depth), or a MiniResNet.

    Returns
    -------
    dict : ``{module_path: "conv"}`` for ``Components.from_spec``.

    Raises
    ------
    ComponentError : the model has no such conv layers.
    """
    spec = {
        path: "conv"
        for path, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and "downsample" not in path.split(".")
    }
    if not spec:
        raise ComponentError(
            f"resnet_reference_spec expects a ResNet with nn.Conv2d layers, but "
            f"{type(model).__name__} has none outside 'downsample' modules. Pick conv "
            "layers with Components.discover(model, kinds='conv', exclude=[...])."
        )
    return spec


def vit_reference_spec(model: nn.Module) -> dict[str, str]:
    """The paper's ViT components: the weight rows of every linear layer in the blocks.

    Inside every transformer block, each linear layer contributes its output rows
    (kind ``"linear"``): the query/key/value projection, the attention's output
    projection and the MLP's two layers. ViT-B/16 has 12 blocks × (2,304 qkv + 768
    output + 3,072 fc1 + 768 fc2) = 12 × 6,912 = 82,944 components. The patch
    embedding and the classification head are not components.

    Works on torchvision's ``vit_b_16``, timm's ``VisionTransformer`` (``blocks.*.attn.qkv``,
    ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``) and transformers' ViT. torchvision computes
    attention with ``nn.MultiheadAttention``, whose projections are parameters rather
    than modules: its entry is the attention module itself
    (``"encoder.layers.encoder_layer_0.self_attention": "linear"``), whose 3,072 units
    are the rows of ``in_proj_weight`` (queries, keys, values) and then of
    ``out_proj.weight`` (see ``coarpy.families.multihead_linear_site``), in the order of
    the paper's reference scripts.

    Parameters
    ----------
    model : a vision transformer (or any transformer whose blocks hold linear layers).

    Returns
    -------
    dict : ``{module_path: "linear"}`` for ``Components.from_spec``.

    Raises
    ------
    ComponentError : no transformer blocks were found.

    Examples
    --------
    >>> layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    >>> vit_reference_spec(nn.Sequential(layer))
    {'0.self_attn': 'linear', '0.linear1': 'linear', '0.linear2': 'linear'}
    """
    blocks = families.transformer_blocks(model)
    if not blocks:
        raise ComponentError(
            f"vit_reference_spec found no transformer blocks in {type(model).__name__}: "
            "no item of a ModuleList/Sequential holds a recognised attention module "
            f"({families.SUPPORTED['heads']}). Pick the linear layers with "
            "Components.discover(model, kinds='linear', include=[...])."
        )
    spec: dict[str, str] = {}
    for block in blocks:
        inside_attention: list[str] = []  # nn.MultiheadAttention paths: their children are theirs
        for rel, module in model.get_submodule(block).named_modules():
            path = _join(block, rel)
            if any(path.startswith(a + ".") for a in inside_attention):
                continue
            if isinstance(module, nn.MultiheadAttention):
                inside_attention.append(path)
                spec[path] = "linear"
            elif families.linear_shape(module) is not None:
                spec[path] = "linear"
    return spec
