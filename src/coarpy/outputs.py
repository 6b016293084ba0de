"""Output functions: the one number per example that COAR attributes.

An output function runs the model on a batch and returns a float tensor of shape
(batch_size,). Classifier batches are ``(inputs, labels)`` tuples or dicts with
``labels``; language-model batches are dicts with ``input_ids`` (and optionally
``attention_mask`` and ``labels``, where -100 marks tokens to ignore).

Custom callables with the same contract work everywhere a built-in does.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch.nn.functional as F
from torch import Tensor, nn

from ._batching import labels, logits_of, run_model_input
from .errors import ArgumentError, DataError


class OutputFn(Protocol):
    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        """One number per example: shape (batch_size,), float32."""


def _class_logits(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    logits = logits_of(run_model_input(model, batch))
    y = labels(batch).to(logits.device)
    if logits.ndim != 2:
        raise ArgumentError(
            f"Expected class logits of shape (batch, classes), got {tuple(logits.shape)}. "
            "For language models use outputs.token_margin."
        )
    return logits.float(), y.long()


def margin(model: nn.Module, batch: Any) -> Tensor:
    """Correct-class margin: logit[y] - max over k != y of logit[k]."""
    logits, y = _class_logits(model, batch)
    return _margin(logits, y)


def _margin(logits: Tensor, y: Tensor) -> Tensor:
    correct = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, y.unsqueeze(-1), float("-inf"))
    return correct - others.amax(-1)


def logit(model: nn.Module, batch: Any) -> Tensor:
    """The correct class's logit."""
    logits, y = _class_logits(model, batch)
    return logits.gather(1, y[:, None]).squeeze(1)


def logprob(model: nn.Module, batch: Any) -> Tensor:
    """Log-probability of the correct class."""
    logits, y = _class_logits(model, batch)
    return logits.log_softmax(1).gather(1, y[:, None]).squeeze(1)


def loss(model: nn.Module, batch: Any) -> Tensor:
    """Cross-entropy of the correct class (the negative of ``logprob``)."""
    logits, y = _class_logits(model, batch)
    return F.cross_entropy(logits, y, reduction="none")


def _next_token(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(logits[:, :-1], targets, valid) aligned so logits at t predict token t+1."""
    if not isinstance(batch, dict) and not hasattr(batch, "keys"):
        raise DataError(
            f"Language-model outputs expect a dict batch with 'input_ids', got "
            f"{type(batch).__name__}. Pass dicts such as a tokenizer returns."
        )
    logits = logits_of(run_model_input(model, batch)).float()
    ids = batch.get("labels", batch["input_ids"]).to(logits.device)
    targets = ids[:, 1:]
    valid = targets != -100
    if "attention_mask" in batch:
        # Both ends must be real tokens: with left padding, the first real token is
        # otherwise "predicted" from a padding position.
        real = batch["attention_mask"].to(logits.device).bool()
        valid &= real[:, 1:] & real[:, :-1]
    empty = (~valid).all(1)
    if empty.any():
        row = int(empty.nonzero()[0])
        raise DataError(
            f"Example {row} of the batch has no real next-token target (all padding or "
            "-100). Drop examples shorter than two real tokens."
        )
    return logits[:, :-1], targets.clamp_min(0), valid


def token_margin(model: nn.Module, batch: Any) -> Tensor:
    """Mean over real tokens of the correct-next-token margin.

    Padding (attention_mask 0) and labels of -100 are excluded from the mean.
    """
    logits, targets, valid = _next_token(model, batch)
    per_token = _margin(logits, targets)  # (batch, seq-1)
    # where, not a product: logits at padding may be inf or NaN, and NaN * 0 is NaN
    return per_token.where(valid, 0.0).sum(1) / valid.sum(1)


def token_logprob(model: nn.Module, batch: Any) -> Tensor:
    """Sum of log-probabilities of the real target tokens.

    With labels of -100 everywhere except an answer's tokens, this is the
    log-probability of the answer continuation given its prompt.
    """
    logits, targets, valid = _next_token(model, batch)
    lp = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return lp.where(valid, 0.0).sum(1)


REGISTRY: dict[str, OutputFn] = {
    "margin": margin,
    "logit": logit,
    "logprob": logprob,
    "loss": loss,
    "token_margin": token_margin,
    "token_logprob": token_logprob,
}


def name_of(fn: OutputFn) -> str:
    """The name a store records for an output function ("margin", or "module:qualname")."""
    for name, registered in REGISTRY.items():
        if fn is registered:
            return name
    module = getattr(fn, "__module__", None) or type(fn).__module__
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}:{qualname}"


def resolve(spec: str | OutputFn) -> OutputFn:
    """An output function from its registered name, ``"package.module:function"``, or itself."""
    if callable(spec):
        return spec
    if spec in REGISTRY:
        return REGISTRY[spec]
    if ":" in spec:
        from ._imports import import_object

        return import_object(spec)
    raise ArgumentError(
        f"Unknown output function {spec!r}. Use one of {', '.join(REGISTRY)} or "
        "'package.module:function'."
    )


def check_values(values: Tensor, batch_n: int, fn: OutputFn) -> Tensor:
    """Validate an output function's result: float, shape (batch_n,)."""
    if not isinstance(values, Tensor) or values.shape != (batch_n,):
        got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ArgumentError(
            f"Output function {name_of(fn)} returned {got}, expected shape ({batch_n},): "
            "one number per example of the batch."
        )
    return values.float()
