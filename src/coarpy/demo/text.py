"""Text editing tasks on a frozen sentence encoder: the encoder's last layers as a model.

Editing experiments ablate components (attention heads, MLP neurons) of the last
layers of a :class:`~coarpy.demo.probe.SentenceProbe`. Everything before those layers
computes the same thing under every keep-mask, so it runs once per sentence:
``encode`` turns sentences into the hidden states at the input of layer ``start``,
and :class:`EncoderTail` runs layers ``start`` onwards, the probe's pooling and its
head on them. ``tail(**encode(probe, tokenizer, sentences, labels, start=s))`` gives
the probe's own logits, so attributing and editing the tail is attributing and
editing the full model with components in layers ``start`` onwards, for a fraction
of the cost on a CPU.

Also here: ``with_word`` (insert a word into a sentence, for spurious-token and
backdoor tasks) and ``fine_tune`` (train the tail's parameters on cached states).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._engine import model_device
from ..errors import ArgumentError, DataError
from .probe import SentenceProbe


def _layers(probe: SentenceProbe) -> nn.ModuleList:
    layers = getattr(getattr(probe.encoder, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ArgumentError(
            f"probe.encoder ({type(probe.encoder).__name__}) has no .encoder.layer list; "
            "EncoderTail needs a BERT-style encoder such as coarpy.demo.minilm()'s."
        )
    return layers


def _check_start(probe: SentenceProbe, start: int) -> int:
    n = len(_layers(probe))
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < n:
        raise ArgumentError(
            f"start must be the index of an encoder layer, 0 <= start < {n}, got {start!r}. "
            f"Pass e.g. start={n - 1} to edit the last layer only."
        )
    return start


def _additive_mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(batch, seq) 1/0 -> (batch, 1, 1, seq): 0 where kept, the dtype's minimum where padded."""
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


class EncoderTail(nn.Module):
    """Layers ``start`` onwards of a probe's encoder, its pooling and its head.

    The layers and the head are copies: editing or training the tail leaves the probe
    as it was. The tail starts in the probe's mode (eval for a fitted probe). Layer
    ``i`` of the encoder is ``tail.layer[str(i)]``, so component names say which layer
    they belong to (``"layer.5.attention:3"`` is head 3 of layer 5,
    ``"layer.5.output:17"`` neuron 17 of its MLP).

    Parameters
    ----------
    probe : a SentenceProbe on a BERT-style encoder (``probe.encoder.encoder.layer``).
    start : the first layer the tail runs.

    Examples
    --------
    >>> tail = EncoderTail(probe, start=5)  # doctest: +SKIP
    >>> logits = tail(**encode(probe, tokenizer, ["a fine film ."], start=5))  # doctest: +SKIP
    """

    def __init__(self, probe: SentenceProbe, start: int):
        super().__init__()
        start = _check_start(probe, start)
        layers = _layers(probe)
        self.start = start
        self.layer = nn.ModuleDict(
            {str(i): copy.deepcopy(layers[i]) for i in range(start, len(layers))}
        )
        self.head = copy.deepcopy(probe.head)
        self.normalize = probe.normalize
        self.train(probe.training)

    def embed(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        """Sentence embeddings (batch, hidden) from the states at the input of ``start``."""
        mask = _additive_mask(attention_mask, hidden_states.dtype)  # (batch, 1, 1, seq)
        states = hidden_states  # (batch, seq, hidden)
        for layer in self.layer.values():
            states = layer(states, attention_mask=mask)
            if isinstance(states, tuple):  # older transformers return (states, ...)
                states = states[0]
        keep = attention_mask.unsqueeze(-1).to(states.dtype)  # (batch, seq, 1)
        pooled = (states * keep).sum(1) / keep.sum(1).clamp_min(1.0)  # (batch, hidden)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits (batch, n_classes)."""
        return self.head(self.embed(hidden_states, attention_mask))


def encode(
    probe: SentenceProbe,
    tokenizer: Any,
    sentences: Sequence[str],
    labels: Tensor | None = None,
    *,
    start: int,
    max_length: int = 32,
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """One batch for an :class:`EncoderTail`: the hidden states at the input of ``start``.

    The sentences are tokenised together (padded to the longest, cut at ``max_length``
    tokens), embedded and run through layers ``0 .. start - 1`` of the probe's encoder
    once, under ``torch.inference_mode``.

    Parameters
    ----------
    probe, tokenizer : the probe and its encoder's tokenizer.
    sentences : the sentences.
    labels : int64 (n,) classes; included as ``"labels"`` when given.
    start : the tail's first layer.
    max_length : longest token sequence kept (the rest of a sentence is cut).
    batch_size : sentences per forward pass.

    Returns
    -------
    dict with ``hidden_states`` float32 (n, seq, hidden), ``attention_mask`` int64
    (n, seq) and, with labels, ``labels`` int64 (n,); on the probe's device.
    """
    start = _check_start(probe, start)
    if len(sentences) == 0:
        raise DataError("encode() got no sentences; pass at least one.")
    device = model_device(probe)
    tokens = tokenizer(
        list(sentences), padding=True, truncation=True, max_length=max_length,
        return_tensors="pt",
    )  # fmt: skip
    ids = tokens["input_ids"].to(device)  # (n, seq)
    keep = tokens["attention_mask"].to(device)  # (n, seq)
    encoder = probe.encoder
    layers = _layers(probe)
    parts = []
    with torch.inference_mode():
        for i in range(0, len(ids), batch_size):
            states = encoder.embeddings(input_ids=ids[i : i + batch_size])  # (b, seq, hidden)
            mask = _additive_mask(keep[i : i + batch_size], states.dtype)
            for layer in layers[:start]:
                states = layer(states, attention_mask=mask)
                if isinstance(states, tuple):
                    states = states[0]
            parts.append(states)
    batch = {"hidden_states": torch.cat(parts).clone(), "attention_mask": keep}
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.shape != (len(sentences),):
            raise DataError(
                f"Expected one label per sentence ({len(sentences)}), got labels of shape "
                f"{tuple(labels.shape)}."
            )
        batch["labels"] = labels.long().to(device)
    return batch


def with_word(sentence: str, word: str, *, position: int = 0) -> str:
    """``sentence`` with ``word`` inserted before its word number ``position``.

    Words are separated by spaces (the Pang-Lee sentences are tokenised that way);
    a ``position`` past the end appends the word.

    Examples
    --------
    >>> with_word("a fine film .", "marcus")
    'marcus a fine film .'
    >>> with_word("a fine film .", "cf", position=2)
    'a fine cf film .'
    """
    words = sentence.split(" ")
    words.insert(min(position, len(words)), word)
    return " ".join(words)


def fine_tune(
    tail: EncoderTail,
    batch: dict[str, Tensor],
    *,
    epochs: int = 30,
    lr: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
) -> EncoderTail:
    """Train every parameter of ``tail`` on ``batch`` with Adam and cross-entropy.

    The batch is an :func:`encode` batch with labels; its rows are shuffled each epoch
    by a generator seeded with ``seed``. Returns the tail in eval mode. (Dropout is off
    throughout: the tail trains in eval mode, so a run is deterministic.)
    """
    if "labels" not in batch:
        raise DataError("fine_tune needs labels: build the batch with encode(..., labels).")
    gen = torch.Generator().manual_seed(seed)
    tail.eval()
    params = [p for p in tail.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    n = batch["labels"].shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            rows = order[i : i + batch_size].to(batch["labels"].device)
            opt.zero_grad()
            logits = tail(batch["hidden_states"][rows], batch["attention_mask"][rows])
            F.cross_entropy(logits, batch["labels"][rows]).backward()
            opt.step()
    for p in params:
        p.requires_grad_(False)
    return tail.eval()
