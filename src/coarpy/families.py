"""Model families: recognising the attention, MLP and recurrent blocks of known libraries.

Discovery asks of every module: is it an attention block, and where are its heads
masked? Is it an MLP block or a recurrent layer, and where are its neurons masked? The
answers come from the names and classes that Hugging Face transformers, timm,
torchvision, torch and TransformerLens use, kept here in tables so that supporting one
more library means adding a name, not a code path:

- heads: a module whose class name contains ``"Attention"``, with a head count
  (``HEAD_COUNT_ATTRS``) and an output projection (``ATTENTION_OUTPUT_PATHS``); the
  heads are slices of the projection's input. torch's ``nn.MultiheadAttention`` and
  TransformerLens' ``HookedTransformer`` (``hook_z``) are special cases.
- neurons: the input features of an MLP block's down projection
  (``MLP_DOWN_PATHS``), the block being recognised by class name (``MLP_CLASS_MARKS``),
  by layout (``nn.Sequential`` of Linear, activation, Linear; ``fc1``/``fc2`` in the
  layer itself as in OPT and BART) or as TransformerLens' ``hook_post``; and the hidden
  units of torch's recurrent layers (``nn.RNN``/``LSTM``/``GRU`` and their cells).
- TransformerLens 4 wraps every layer of a bridged model (``TransformerBridge``) in a
  component whose ``original_component`` is the layer (``LinearBridge``): the wrapped
  layer is where the mask goes (:func:`wrapped_linear`).
- linear rows of torch's ``nn.MultiheadAttention`` (torchvision's ``vit_b_16``): it
  computes attention from its parameters directly, so no hook reaches its projections;
  the rows of ``in_proj_weight`` and ``out_proj.weight`` are zeroed in place instead
  (:func:`multihead_linear_site`).
- transformer blocks (:func:`transformer_blocks`): the items of a ``ModuleList`` or
  ``nn.Sequential`` that hold an attention module.

The paper's own component sets (GPT-2, ResNet, ViT) are spelled out in
``coarpy.recipes.specs``, on top of these.

No library is imported: modules are recognised by class name and attributes, so this
works whether or not (and whichever version of) the library is installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .errors import ComponentError

HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
# Output projections, relative to the attention module. GPT-2 c_proj; BERT/ViT (4.x)
# output.dense; Llama, ViT (5.x) o_proj; OPT, BART, CLIP, GPT-J out_proj; DistilBERT
# out_lin; timm proj; GPT-NeoX, Phi dense; T5 and TransformerLens 4 bridges o.
ATTENTION_OUTPUT_PATHS = (
    "output.dense", "o_proj", "c_proj", "out_proj", "out_lin", "proj", "dense", "o",
)  # fmt: skip
MLP_CLASS_MARKS = (
    "MLP", "Mlp", "FeedForward", "FFN", "Ffn", "DenseActDense", "DenseGatedActDense",
)  # fmt: skip
# Down projections, relative to the MLP block. GPT-2 c_proj; Llama down_proj; ViT,
# CLIP, Phi, timm fc2; DistilBERT lin2; GPT-J fc_out; torch linear2; GPT-NeoX, Bloom,
# Falcon dense_4h_to_h; T5 wo; Meta's reference Llama FeedForward w2; TransformerLens 4
# bridges (MLPBridge, GatedMLPBridge) out.
MLP_DOWN_PATHS = (
    "c_proj", "down_proj", "fc2", "lin2", "fc_out", "linear2", "dense_4h_to_h", "wo", "w2",
    "out",
)  # fmt: skip
ACTIVATIONS = (
    nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Mish,
    nn.Softplus, nn.Hardswish, nn.ReLU6,
)  # fmt: skip
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
RECURRENT = (nn.RNNBase, nn.RNNCellBase)

# What each kind accepts, for error messages.
SUPPORTED = {
    "conv": "nn.Conv1d/2d/3d",
    "linear": (
        "nn.Linear or transformers' Conv1D (or a TransformerLens 4 LinearBridge), or an "
        "nn.MultiheadAttention (the rows of its input and output projections)"
    ),
    "inputs": "nn.Linear or transformers' Conv1D (or a TransformerLens 4 LinearBridge)",
    "heads": (
        "nn.MultiheadAttention; TransformerLens attention (HookedTransformer or a 4.x "
        "TransformerBridge) or its hook_z; or an attention module with a head count "
        f"attribute ({'/'.join(HEAD_COUNT_ATTRS)}) and an output projection "
        f"({'/'.join(ATTENTION_OUTPUT_PATHS)})"
    ),
    "neurons": (
        "an MLP block (GPT2MLP, LlamaMLP, BertOutput, timm Mlp, T5DenseActDense, an "
        "OPT/BART layer with fc1/fc2, nn.TransformerEncoderLayer, an nn.Sequential of "
        "Linear-activation-Linear), TransformerLens MLP or its hook_post, a down "
        "projection (nn.Linear), or a recurrent layer (nn.RNN/LSTM/GRU without "
        "proj_size, nn.RNNCell/LSTMCell/GRUCell)"
    ),
}


@dataclass(frozen=True)
class Site:
    """Where the heads or neurons of one block are masked.

    Attributes
    ----------
    module : path of the block the component names use: the attention module for
        heads, the MLP block or recurrent layer for neurons (``"h.0.attn"`` gives
        ``"h.0.attn:3"``).
    hook : path of the module whose input or output is masked (or whose weights are
        edited, for ``site="param"``).
    site : ``"input"``, ``"output"`` or ``"param"`` (see ``components.Group``).
    n_units : number of heads or neurons.
    unit_size : features per unit along ``dim`` (the head dimension for heads).
    dim : the dimension that holds the units: -1, or -2 for TransformerLens'
        ``hook_z`` of shape (batch, pos, head, d_head), whose trailing d_head features
        all belong to the head.
    """

    module: str
    hook: str
    site: str
    n_units: int
    unit_size: int = 1
    dim: int = -1


# -- linear layers ---------------------------------------------------------------------


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2): a linear layer storing weight (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_shape(module: nn.Module | None) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear layer, or None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if module is not None and is_hf_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def wrapped_linear(module: nn.Module | None) -> tuple[str, nn.Module] | None:
    """``(relative path, layer)`` of the linear layer ``module`` is or wraps, or None.

    A linear layer is itself (``""``). A TransformerLens 4 ``LinearBridge`` wraps its
    layer as the child ``original_component``; the bridge's own forward calls it, so a
    hook on the wrapped layer sees every call.
    """
    if module is None:
        return None
    if linear_shape(module) is not None:
        return "", module
    inner = getattr(module, "original_component", None)
    if isinstance(inner, nn.Module) and linear_shape(inner) is not None:
        for name, child in module.named_children():
            if child is inner:
                return name, inner
    return None


def idle_reason(model: nn.Module, path: str) -> str | None:
    """Why the linear layer at ``path`` never runs in the model's forward pass, or None.

    TransformerLens 4's joint-QKV attention bridges (GPT-2's ``c_attn``) keep the joint
    layer as ``qkv`` for weight access but run split ``q``/``k``/``v`` copies of it, so
    a mask on ``qkv`` would change nothing.
    """
    parts = path.split(".")
    if "qkv" not in parts:
        return None
    attn_path = ".".join(parts[: parts.index("qkv")])
    attn = _submodule(model, attn_path)
    split = all(isinstance(getattr(attn, n, None), nn.Module) for n in ("q", "k", "v"))
    if attn is not None and "JointQKV" in type(attn).__name__ and split:
        return (
            f"TransformerLens runs split q/k/v copies of the joint qkv layer of "
            f"{attn_path!r}, never the joint layer itself; select "
            f"{_join(attn_path, 'q')!r}, {_join(attn_path, 'k')!r} and "
            f"{_join(attn_path, 'v')!r} instead"
        )
    return None


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path) if path else module
    except AttributeError:
        return None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _parent(model: nn.Module, path: str) -> nn.Module | None:
    return _submodule(model, path.rpartition(".")[0]) if path else None


def _redirect_hook(model: nn.Module, path: str, module: nn.Module, hook: str):
    """``(block path, block)`` when ``module`` is the block's TransformerLens ``hook``
    (``hook_z`` of an attention, ``hook_post`` of an MLP), else ``(path, module)``.

    HookedTransformer registers the hook as a child; a 4.x bridge makes it an alias of
    a hook inside the block (``attn.hook_z`` is ``attn.o.hook_in``). Either way the
    hook names the same units as its block.
    """
    if is_hook_point(module) and path.rpartition(".")[2] == hook:
        parent = _parent(model, path)
        if parent is not None:
            return path.rpartition(".")[0], parent
    return path, module


# -- TransformerLens ---------------------------------------------------------------------


def is_hook_point(module: nn.Module | None) -> bool:
    """True for TransformerLens' ``HookPoint``: an identity module made to be hooked."""
    return module is not None and type(module).__name__ == "HookPoint"


def _tl_unit_weight(block: nn.Module | None, hook: str, weight: str, ndim: int) -> Tensor | None:
    """The weight holding the units of a HookedTransformer block's ``hook``, or None.

    Only a hook registered as the block's own child counts: in a 4.x bridge the same
    name is an alias of a hook on a flat (batch, pos, d_model) tensor, whose heads are
    reached through the output projection instead.
    """
    if block is None or not is_hook_point(block._modules.get(hook)):
        return None
    found = getattr(block, weight, None)
    return found if isinstance(found, Tensor) and found.ndim == ndim else None


_TL_UNIT_WEIGHTS = {"hook_z": ("W_O", 3), "hook_post": ("W_out", 2)}


def hook_point_weight(model: nn.Module, hook: str) -> Tensor:
    """The weight whose rows are the units of a TransformerLens ``hook_z``/``hook_post``.

    Zeroing ``W_O[h]`` (shape (n_heads, d_head, d_model)) removes head ``h`` exactly as
    zeroing ``hook_z[..., h, :]`` does; zeroing ``W_out[n]`` (shape (d_mlp, d_model))
    removes neuron ``n`` as zeroing ``hook_post[..., n]`` does, so a persistent edit
    of these groups zeroes those rows.

    Raises
    ------
    ComponentError : ``hook`` is not a hook_z or hook_post of a TransformerLens block.
    """
    name = hook.rpartition(".")[2]
    found = None
    if name in _TL_UNIT_WEIGHTS:
        found = _tl_unit_weight(_parent(model, hook), name, *_TL_UNIT_WEIGHTS[name])
    if found is None:
        raise ComponentError(
            f"{hook!r} is not the hook_z or hook_post of a TransformerLens block (a block "
            "with W_O of shape (n_heads, d_head, d_model) or W_out of shape (d_mlp, "
            "d_model)); no weight holds its units."
        )
    return found


# -- attention -------------------------------------------------------------------------


def looks_like_attention(module: nn.Module) -> bool:
    """Whether discovery should expect heads in ``module`` (by its class name)."""
    return isinstance(module, nn.MultiheadAttention) or "Attention" in type(module).__name__


def head_count(module: nn.Module) -> int | None:
    """The number of heads an attention module declares, or None."""
    holders = [module, *module.children(), getattr(module, "config", None)]
    for holder in holders:
        for attr in HEAD_COUNT_ATTRS:
            value = getattr(holder, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def attention_site(model: nn.Module, path: str, module: nn.Module) -> Site | None:
    """Where the heads of the attention module at ``path`` are masked, or None."""
    path, module = _redirect_hook(model, path, module, "hook_z")
    if isinstance(module, nn.MultiheadAttention):
        return Site(path, path, "param", module.num_heads, module.head_dim)
    w_o = _tl_unit_weight(module, "hook_z", "W_O", 3)
    if w_o is not None:  # W_O: (n_heads, d_head, d_model); hook_z: (batch, pos, head, d_head)
        return Site(path, _join(path, "hook_z"), "output", w_o.shape[0], 1, -2)
    n_heads = head_count(module)
    if n_heads is None:
        return None
    for rel in ATTENTION_OUTPUT_PATHS:
        found = wrapped_linear(_submodule(module, rel))
        if found is None:
            continue
        width = linear_shape(found[1])[0]
        if width % n_heads == 0:
            return Site(path, _join(path, rel, found[0]), "input", n_heads, width // n_heads)
    return None


# -- MLP -------------------------------------------------------------------------------


def _down_projection(module: nn.Module) -> str | None:
    """Relative path of an MLP block's down projection, or None if not an MLP block."""
    if isinstance(module, nn.Sequential):
        layers = list(module)
        linear_at = [i for i, m in enumerate(layers) if linear_shape(m) is not None]
        has_act = any(isinstance(m, ACTIVATIONS) for m in layers)
        if len(linear_at) >= 2 and has_act:
            return str(linear_at[-1])
        return None
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return "linear2"
    name = type(module).__name__
    if any(mark in name for mark in MLP_CLASS_MARKS):
        for rel in MLP_DOWN_PATHS:
            if wrapped_linear(_submodule(module, rel)) is not None:
                return rel
    # BERT/ViT (4.x) style: BertOutput(dense) follows BertIntermediate(dense + act).
    is_output = name.endswith("Output") and not name.endswith("SelfOutput")
    if is_output and linear_shape(getattr(module, "dense", None)) is not None:
        return "dense"
    # OPT, BART, Whisper, Marian: fc1 and fc2 live in the layer itself.
    fc1 = linear_shape(getattr(module, "fc1", None))
    fc2 = linear_shape(getattr(module, "fc2", None))
    if fc1 is not None and fc2 is not None and fc1[1] == fc2[0]:
        return "fc2"
    return None


def mlp_site(model: nn.Module, path: str, module: nn.Module) -> Site | None:
    """Where the neurons of the MLP block at ``path`` are masked, or None.

    A neuron is an input feature of the block's down projection (the activation that
    projection reads), so ablating it matches zeroing that projection's input row.
    """
    path, module = _redirect_hook(model, path, module, "hook_post")
    w_out = _tl_unit_weight(module, "hook_post", "W_out", 2)
    if w_out is not None:  # W_out: (d_mlp, d_model); hook_post: (batch, pos, d_mlp)
        return Site(path, _join(path, "hook_post"), "output", w_out.shape[0])
    rel = _down_projection(module)
    if rel is None:
        return None
    inner, layer = wrapped_linear(_submodule(module, rel))
    return Site(path, _join(path, rel, inner), "input", linear_shape(layer)[0])


# -- recurrent layers ------------------------------------------------------------------


def recurrent_site(path: str, module: nn.Module) -> Site | None:
    """Where the hidden units of a torch recurrent layer are ablated, or None.

    Unit ``u`` of an ``nn.RNN``/``LSTM``/``GRU`` is hidden unit ``u % hidden_size`` of
    layer ``u // (directions * hidden_size)`` in direction ``(u // hidden_size) %
    directions`` (torch's ``weight_hh_l{layer}[_reverse]`` order). Zeroing its rows in
    every gate of ``weight_ih``, ``weight_hh`` and both biases makes every gate's
    pre-activation 0, so its cell and hidden state stay exactly 0 from a zero initial
    state (LSTM: c = 0.5·c_prev + 0.5·tanh(0); GRU: h = 0.5·h_prev + 0.5·tanh(0)). No
    hook reaches inside the fused kernel, so these rows are zeroed in place and
    restored (``site="param"``).
    """
    if isinstance(module, nn.RNNBase) and not getattr(module, "proj_size", 0):
        directions = 2 if module.bidirectional else 1
        return Site(path, path, "param", module.num_layers * directions * module.hidden_size)
    if isinstance(module, nn.RNNCellBase):
        return Site(path, path, "param", module.hidden_size)
    return None


def unusable_reason(module: nn.Module, kind: str) -> str | None:
    """Why ``module`` looks like it has components of ``kind`` that coarpy cannot ablate.

    Discovery warns with this reason instead of skipping such a module silently.
    """
    conv = isinstance(module, nn.modules.conv._ConvNd)
    if kind == "conv" and conv and not isinstance(module, CONVS):
        return f"kind 'conv' takes the output channels of {SUPPORTED['conv']}"
    if kind == "neurons" and isinstance(module, nn.RNNBase) and module.proj_size:
        return (
            "its hidden state is projected (proj_size > 0), so zeroing a unit's gate rows "
            "does not zero a hidden-state feature"
        )
    return None


# -- nn.MultiheadAttention's projections ----------------------------------------------------


def multihead_linear_site(path: str, module: nn.Module) -> Site | None:
    """The rows of an ``nn.MultiheadAttention``'s projections as ``"linear"`` units, or None.

    ``nn.MultiheadAttention`` (torchvision's ``vit_b_16`` uses it) passes its weights
    to ``F.multi_head_attention_forward`` (or torch's fused kernel) instead of calling
    its ``out_proj`` as a module, so no hook can mask these units. Their weight rows
    are zeroed in place and restored (``site="param"``), which is exactly the paper's
    ablation of a linear row: the unit's output becomes its bias. Units, with ``E =
    embed_dim``:

    - ``0 .. 3E-1``: the rows of the input projection, queries, keys then values
      (``in_proj_weight``, or ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``
      when keys or values have another width);
    - ``3E .. 4E-1``: the rows of the output projection (``out_proj.weight``).

    ViT-B/16 has 4 × 768 = 3,072 such units per block.
    """
    if not isinstance(module, nn.MultiheadAttention):
        return None
    return Site(path, path, "param", 4 * module.embed_dim)


def multihead_projection_rows(module: nn.MultiheadAttention) -> list[Tensor]:
    """The weights whose rows are the units of :func:`multihead_linear_site`, in order."""
    if module.in_proj_weight is not None:  # one packed weight unless kdim/vdim differ
        inputs = [module.in_proj_weight]
    else:
        inputs = [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]
    return [*inputs, module.out_proj.weight]


# -- transformer blocks ------------------------------------------------------------------


def _is_sequence(module: nn.Module | None) -> bool:
    return isinstance(module, (nn.ModuleList, nn.Sequential))


def transformer_blocks(model: nn.Module) -> list[str]:
    """Paths of the transformer blocks: the innermost items of a ``ModuleList`` or
    ``nn.Sequential`` that hold a recognised attention module.

    Examples
    --------
    >>> layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    >>> transformer_blocks(nn.Sequential(layer, nn.Linear(8, 2)))
    ['0']
    """
    attention = [
        path
        for path, module in model.named_modules()
        if looks_like_attention(module) and attention_site(model, path, module) is not None
    ]
    items = [
        path
        for path, _ in model.named_modules()
        if path and _is_sequence(_parent(model, path))
        and any(a.startswith(path + ".") for a in attention)
    ]  # fmt: skip
    return [p for p in items if not any(q.startswith(p + ".") for q in items)]
