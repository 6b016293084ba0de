"""The text editing helpers (``coarpy.demo.text``) on a tiny random BERT: the tail of the
encoder on cached hidden states is the probe, exactly, and its components are named by layer.
"""

from __future__ import annotations

import pytest
import torch

import coarpy as coar
from coarpy import edit
from coarpy.demo.probe import SentenceProbe
from coarpy.demo.text import EncoderTail, encode, fine_tune, with_word
from coarpy.errors import ArgumentError, DataError

transformers = pytest.importorskip("transformers")

WORDS = ["a", "fine", "dull", "film", "plot", "cast", "marcus", "cf"]


def tokenizer(sentences, *, padding=True, truncation=True, max_length=None, return_tensors="pt"):
    """Word-level ids ([CLS] = 1, [SEP] = 2, words from 3), right-padded with 0."""
    rows = [[1, *(3 + WORDS.index(w) for w in s.split()), 2] for s in sentences]
    if max_length is not None:
        rows = [r[:max_length] for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


@pytest.fixture(scope="module")
def probe():
    config = transformers.BertConfig(
        vocab_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = SentenceProbe(transformers.BertModel(config, add_pooling_layer=False)).eval()
    torch.nn.init.normal_(model.head.weight)
    return model


SENTENCES = ["a fine film", "a dull plot", "marcus a fine cast", "cf dull"]


def test_the_tail_on_cached_states_gives_the_probes_logits(probe):
    tokens = tokenizer(SENTENCES)
    with torch.inference_mode():
        expected = probe(**tokens)
        for start in (0, 1, 2):
            tail = EncoderTail(probe, start)
            assert not tail.training
            got = tail(**encode(probe, tokenizer, SENTENCES, start=start))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_tail_components_are_named_by_encoder_layer(probe):
    tail = EncoderTail(probe, 2)
    comps = coar.Components.discover(tail, kinds=("heads", "neurons"))
    assert len(comps) == 4 + 48
    assert comps.names[0] == "layer.2.attention:0"
    assert comps.names[4] == "layer.2.output:0"
    # an edit of the tail leaves the probe's own layers as they were
    before = probe.encoder.encoder.layer[2].output.dense.weight.clone()
    edited = edit.apply(tail, comps, [4, 5])
    assert torch.equal(edited.layer["2"].output.dense.weight[:, :2], torch.zeros(32, 2))
    assert torch.equal(probe.encoder.encoder.layer[2].output.dense.weight, before)


def test_encode_carries_labels_and_cuts_long_sentences(probe):
    batch = encode(probe, tokenizer, SENTENCES, torch.tensor([1, 0, 1, 0]), start=1, max_length=3)
    assert batch["hidden_states"].shape == (4, 3, 32)
    assert batch["labels"].tolist() == [1, 0, 1, 0]
    with pytest.raises(DataError, match="one label per sentence"):
        encode(probe, tokenizer, SENTENCES, torch.tensor([1, 0]), start=1)
    with pytest.raises(ArgumentError, match="0 <= start < 3"):
        EncoderTail(probe, 3)


def test_fine_tune_fits_the_tail_and_keeps_the_probe(probe):
    before = probe.head.weight.clone()
    batch = encode(probe, tokenizer, SENTENCES, torch.tensor([1, 0, 1, 0]), start=2)
    tail = fine_tune(EncoderTail(probe, 2), batch, epochs=60, lr=1e-2, batch_size=4)
    with torch.inference_mode():
        assert tail(batch["hidden_states"], batch["attention_mask"]).argmax(1).tolist() == [
            1, 0, 1, 0,
        ]  # fmt: skip
    assert torch.equal(probe.head.weight, before)
    assert not any(p.requires_grad for p in tail.parameters())


def test_with_word_inserts_between_words():
    assert with_word("a fine film", "cf") == "cf a fine film"
    assert with_word("a fine film", "cf", position=1) == "a cf fine film"
    assert with_word("a fine film", "cf", position=9) == "a fine film cf"
