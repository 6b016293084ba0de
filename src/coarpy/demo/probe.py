"""Sentence probes: a frozen sentence encoder, mean pooling and a linear head.

``SentenceProbe`` is the model; ``sentiment_probe`` fits its head as a logistic
regression on frozen embeddings; ``minilm_sentiment`` builds one on all-MiniLM-L6-v2
and the Pang-Lee movie-review sentences (both offline, see ``coarpy.demo.data``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._engine import model_device
from ..errors import ArgumentError, DataError
from .data import minilm, pang_lee_sentences

_CONSTANT = 1e-6  # a feature whose std is below this share of the largest is constant


class SentenceProbe(nn.Module):
    """A sentence encoder, masked mean pooling and a linear head.

    ``embed`` averages the encoder's last hidden states over the tokens that
    ``attention_mask`` keeps, then (if ``normalize``) scales each embedding to unit
    length, as sentence-transformers does for all-MiniLM-L6-v2. ``forward`` applies
    ``head`` to the embedding. It takes the tensors of a tokenizer's batch as keyword
    arguments, so a dict batch ``{"input_ids", "attention_mask", "labels"}`` works with
    every coarpy output function.

    Parameters
    ----------
    encoder : a transformers encoder (``BertModel``) returning ``last_hidden_state``.
    n_classes : outputs of the head.
    normalize : L2-normalise embeddings before the head.
    """

    def __init__(self, encoder: nn.Module, n_classes: int = 2, *, normalize: bool = True):
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def embed(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """Sentence embeddings (batch, hidden) of token ids (batch, seq)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        states = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state  # (batch, seq, hidden)
        keep = attention_mask.unsqueeze(-1).to(states.dtype)  # (batch, seq, 1)
        pooled = (states * keep).sum(1) / keep.sum(1).clamp_min(1.0)  # (batch, hidden)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """Logits (batch, n_classes)."""
        return self.head(self.embed(input_ids, attention_mask, token_type_ids))


def _tokenize(
    tokenizer: Any, sentences: Sequence[str], device: Any, max_length: int | None = None
) -> dict[str, Tensor]:
    cut = {} if max_length is None else {"max_length": max_length}
    encoded = tokenizer(list(sentences), padding=True, truncation=True, return_tensors="pt", **cut)
    return {k: encoded[k].to(device) for k in ("input_ids", "attention_mask")}


def sentiment_probe(
    encoder: nn.Module,
    tokenizer: Any,
    sentences: Sequence[str],
    labels: Tensor,
    *,
    l2: float = 1.0,
    batch_size: int = 64,
    normalize: bool = True,
    max_length: int | None = None,
) -> SentenceProbe:
    """Fit a ``SentenceProbe``'s head by logistic regression on frozen embeddings.

    The embeddings are computed once under ``torch.inference_mode`` (no gradient
    reaches the encoder), standardised per feature (features constant up to rounding,
    with a standard deviation below ``1e-6`` of the largest, are left out), and a
    multinomial logistic regression with penalty ``l2 / 2 * ||W||^2`` on the summed
    loss (scikit-learn's ``C = 1 / l2``) is fitted by L-BFGS from zero weights, in
    float64, so the result is deterministic. The standardisation is folded into the head's weights.

    Parameters
    ----------
    encoder : the sentence encoder (kept as it is; put it in eval mode first).
    tokenizer : its tokenizer.
    sentences : the training sentences.
    labels : int64 (n,) class of each sentence, in 0..n_classes-1.
    l2 : ridge penalty on the head's weights (not on its bias).
    batch_size : sentences per forward pass of the encoder.
    normalize : L2-normalise embeddings (see ``SentenceProbe``).
    max_length : cut sentences at this many tokens (None: the tokenizer's limit); fit
        on the lengths the probe will see.

    Returns
    -------
    The probe, in eval mode, on the encoder's device.
    """
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or len(labels) != len(sentences) or len(sentences) == 0:
        raise DataError(
            f"Expected one label per sentence, got {len(sentences)} sentences and labels "
            f"of shape {tuple(labels.shape)}. Pass a non-empty list of sentences and a "
            "1-d tensor of as many class indices."
        )
    n_classes = int(labels.max()) + 1
    probe = SentenceProbe(encoder, max(n_classes, 2), normalize=normalize)
    device = model_device(encoder)
    probe.head.to(device)
    with torch.inference_mode():
        parts = [
            probe.embed(**_tokenize(tokenizer, sentences[i : i + batch_size], device, max_length))
            for i in range(0, len(sentences), batch_size)
        ]
    z = torch.cat(parts).double().cpu()  # (n, hidden); a fresh tensor outside inference
    mean, std = z.mean(0), z.std(0)
    # A feature constant up to rounding (all-MiniLM-L6-v2 has three, with standard
    # deviations of 1e-33 to 1e-8) carries no signal; standardised, its rounding noise
    # would get a weight, and folded back (w / std) a gain of millions that any
    # perturbation of the encoder turns into a huge logit change. Such features get 0.
    varying = std > _CONSTANT * std.max()  # (hidden,)
    std = torch.where(varying, std, torch.ones_like(std))
    z = torch.where(varying, (z - mean) / std, torch.zeros_like(z))
    y = labels.long().cpu()
    weight = torch.zeros(probe.head.out_features, z.shape[1], dtype=torch.float64)
    bias = torch.zeros(probe.head.out_features, dtype=torch.float64)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    solver = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def objective() -> Tensor:
        solver.zero_grad()
        logits = z @ weight.T + bias
        value = F.cross_entropy(logits, y, reduction="sum") + 0.5 * l2 * weight.pow(2).sum()
        value.backward()
        return value

    solver.step(objective)
    with torch.no_grad():
        folded = torch.where(varying, weight / std, torch.zeros_like(weight))  # W (x - m) / std
        probe.head.weight.copy_(folded.to(probe.head.weight))
        probe.head.bias.copy_((bias - folded @ mean).to(probe.head.bias))
    return probe.eval()


def minilm_sentiment(
    device: str | torch.device = "cpu",
    *,
    seed: int = 0,
    n_train: int = 100,
    batch_size: int = 50,
) -> tuple[SentenceProbe, list[dict[str, Tensor]]]:
    """A sentiment classifier on all-MiniLM-L6-v2, and its held-out sentences.

    ``n_train`` of the 200 Pang-Lee sentences (half of them positive), chosen by
    ``seed``, fit a ``sentiment_probe``; the others are returned as tokenised batches
    for evaluation and attribution.

    Parameters
    ----------
    device : where the model and the batches live.
    seed : seed of the train/held-out split.
    n_train : sentences used to fit the head (even, at most 198).
    batch_size : held-out sentences per batch.

    Returns
    -------
    model : the ``SentenceProbe`` in eval mode; ``model(**batch_without_labels)`` gives
        logits (batch, 2), 0 = negative, 1 = positive.
    batches : list of dicts with ``input_ids`` and ``attention_mask`` (batch, seq),
        padded per batch, and int64 ``labels`` (batch,).
    """
    if (
        isinstance(n_train, bool)
        or not isinstance(n_train, int)
        or n_train % 2
        or not 2 <= n_train <= 198
    ):
        raise ArgumentError(
            f"n_train must be an even int in [2, 198], got {n_train!r}. Pass e.g. n_train=100."
        )
    encoder, tokenizer = minilm(device=device)
    sentences, targets = pang_lee_sentences()
    train_rows, held_rows = balanced_split(targets, n_train // 2, seed)
    model = sentiment_probe(
        encoder,
        tokenizer,
        [sentences[i] for i in train_rows.tolist()],
        targets[train_rows],
        batch_size=batch_size,
    )
    batches = []
    for start in range(0, len(held_rows), batch_size):
        rows = held_rows[start : start + batch_size]
        batch = _tokenize(tokenizer, [sentences[i] for i in rows.tolist()], device)
        batch["labels"] = targets[rows].to(device)
        batches.append(batch)
    return model, batches


def balanced_split(labels: Tensor, per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """(chosen rows, other rows), ascending: ``per_class`` rows of each class, by ``seed``."""
    order = torch.Generator().manual_seed(seed)
    train = []
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().squeeze(1)
        train.append(rows[torch.randperm(len(rows), generator=order)[:per_class]])
    in_train = torch.zeros(len(labels), dtype=torch.bool)
    in_train[torch.cat(train)] = True
    return in_train.nonzero().squeeze(1), (~in_train).nonzero().squeeze(1)
