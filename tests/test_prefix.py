"""coarpy.prefix and collect(prefix=...): caching what no mask changes.

The store must be the same with the cache as without it; a cut that would lose a
component, or that does not reproduce the model, must be refused before any row is
written.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import Tensor, nn

import coarpy as coar
from coarpy import outputs
from coarpy.collect import collect
from coarpy.errors import SplitError
from coarpy.prefix import Split, split_sequential


@pytest.fixture
def examples(digits):
    _, _, x, y = digits
    return x[:96], y[:96]


@pytest.fixture
def head_comps(trained_cnn):
    """The classifier's units only: everything in ``features`` is the same under every mask."""
    return coar.Components.from_spec(
        trained_cnn, {"classifier.1": "linear", "classifier.3": "linear"}
    )


def _run(model, comps, data, path, **kwargs):
    settings = {"n_masks": 12, "alpha": 0.2, "seed": 3, "block_size": 4, "progress": False}
    return collect(model, comps, data, path=path, **{**settings, **kwargs})


def test_a_nested_sequential_cut_composes_to_the_model_exactly(trained_cnn, examples):
    x = examples[0]
    for path in ("classifier", "classifier.1", "features.4", "features.1"):
        cut = split_sequential(trained_cnn, path)
        with torch.no_grad():
            assert torch.equal(cut.suffix(cut.prefix(x)), trained_cnn(x)), path


def test_the_store_with_the_cache_equals_the_store_without(
    tmp_path, trained_cnn, head_comps, examples
):
    plain = _run(trained_cnn, head_comps, examples, tmp_path / "plain")
    cached = _run(trained_cnn, head_comps, examples, tmp_path / "cached", prefix="classifier")
    assert torch.equal(cached.masks(), plain.masks())
    assert torch.equal(cached.outputs(), plain.outputs())
    assert plain.outputs().std(0).max() > 0.1  # the masks matter


def test_packed_masks_with_the_cache_equal_the_store_without(
    tmp_path, trained_cnn, head_comps, examples
):
    # 4 masks share each forward pass (batch 384 = 4 x 96 examples): per-row masks.
    plain = _run(trained_cnn, head_comps, examples, tmp_path / "plain")
    packed = _run(
        trained_cnn, head_comps, examples, tmp_path / "packed", prefix="classifier.1",
        batch_size=384,
    )  # fmt: skip
    torch.testing.assert_close(packed.outputs(), plain.outputs())


def test_a_store_started_without_the_cache_resumes_with_it(
    tmp_path, trained_cnn, head_comps, examples
):
    plain = _run(trained_cnn, head_comps, examples, tmp_path / "plain")
    _run(trained_cnn, head_comps, examples, tmp_path / "mixed", n_masks=4)
    mixed = _run(trained_cnn, head_comps, examples, tmp_path / "mixed", prefix="classifier")
    assert len(mixed) == 12
    assert torch.equal(mixed.outputs(), plain.outputs())


class _Residual(nn.Module):
    """Not a Sequential: a stem, then a residual MLP block and a readout."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(5, 8)
        self.block = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.out = nn.Linear(8, 3)

    def features(self, x: Tensor) -> Tensor:
        return torch.tanh(self.stem(x))

    def rest(self, h: Tensor) -> Tensor:
        return self.out(h + self.block(h))

    def forward(self, x: Tensor) -> Tensor:
        return self.rest(self.features(x))


def test_a_user_split_of_a_general_model_gives_the_same_store(tmp_path):
    net = _Residual().eval()
    comps = coar.Components.discover(net, kinds=("neurons",))  # block.2's 16 inputs
    gen = torch.Generator().manual_seed(1)
    data = (torch.randn(40, 5, generator=gen), torch.randint(0, 3, (40,), generator=gen))
    plain = _run(net, comps, data, tmp_path / "plain")
    cut = Split(net.features, net.rest, where="net.features")
    cached = _run(net, comps, data, tmp_path / "cached", prefix=cut)
    assert torch.equal(cached.outputs(), plain.outputs())


class _TinyLM(nn.Module):
    """Embedding, a hidden layer, and a readout; called with input_ids/attention_mask."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 11)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.embed(input_ids) * attention_mask[..., None]
        return self.head(h + self.mlp(h))


def test_a_user_split_works_on_dict_batches_with_token_outputs(tmp_path):
    lm = _TinyLM().eval()
    comps = coar.Components.discover(lm, kinds=("neurons",))
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 11, (12, 6), generator=gen)
    mask = torch.ones(12, 6, dtype=torch.long)
    mask[::3, 4:] = 0  # some padding, which token_margin must keep ignoring
    data = [{"input_ids": ids[:6], "attention_mask": mask[:6]},
            {"input_ids": ids[6:], "attention_mask": mask[6:]}]  # fmt: skip

    def features(input_ids, attention_mask):
        return lm.embed(input_ids) * attention_mask[..., None]

    def rest(h):
        return lm.head(h + lm.mlp(h))

    kwargs = {"output": outputs.token_margin}
    plain = _run(lm, comps, data, tmp_path / "plain", **kwargs)
    cached = _run(lm, comps, data, tmp_path / "cached", prefix=Split(features, rest), **kwargs)
    assert torch.equal(cached.outputs(), plain.outputs())


def test_a_cut_after_a_component_is_refused_before_any_row(tmp_path, trained_cnn, examples):
    comps = coar.Components.from_spec(trained_cnn, {"features.4": "conv", "classifier.1": "linear"})
    with pytest.raises(SplitError, match="'features.4' runs before it"):
        _run(trained_cnn, comps, examples, tmp_path / "run", prefix="classifier")
    assert not list((tmp_path / "run" / "blocks").glob("*.blk"))


def test_a_user_split_that_loses_a_component_fails_the_probe(tmp_path):
    net = _Residual().eval()
    comps = coar.Components.from_spec(net, {"stem": "linear", "block.2": "inputs"})
    data = (torch.randn(20, 5), torch.randint(0, 3, (20,)))
    cut = Split(net.features, net.rest)  # stem runs in the prefix: its ablation is lost
    with pytest.raises(SplitError, match="under a probe mask"):
        _run(net, comps, data, tmp_path / "run", prefix=cut)


def test_a_split_that_is_not_the_model_is_refused(tmp_path):
    net = _Residual().eval()
    comps = coar.Components.discover(net, kinds=("neurons",))
    data = (torch.randn(20, 5), torch.randint(0, 3, (20,)))
    wrong = Split(net.stem, net.rest)  # forgets the tanh
    with pytest.raises(SplitError, match="with nothing ablated"):
        _run(net, comps, data, tmp_path / "run", prefix=wrong)


def test_a_cut_inside_a_module_that_is_not_sequential_is_refused(trained_cnn):
    net = _Residual()
    with pytest.raises(SplitError, match="is a _Residual, not an nn.Sequential"):
        split_sequential(net, "block")
    with pytest.raises(SplitError, match="has no child 'classifer'"):
        split_sequential(trained_cnn, "classifer")
    with pytest.raises(SplitError, match="leaves nothing before it"):
        split_sequential(trained_cnn, "features.0")


def test_a_sequential_subclass_with_its_own_forward_is_refused():
    class Scaled(nn.Sequential):
        def forward(self, x):
            return 2 * super().forward(x)

    net = Scaled(OrderedDict(a=nn.Linear(2, 2), b=nn.Linear(2, 2)))
    with pytest.raises(SplitError, match="not an nn.Sequential"):
        split_sequential(net, "b")


def test_prefix_of_the_wrong_type_is_refused(tmp_path, trained_cnn, head_comps, examples):
    with pytest.raises(SplitError, match="module path \\(str\\) or a coarpy.prefix.Split"):
        _run(trained_cnn, head_comps, examples, tmp_path / "run", prefix=(len, len))
