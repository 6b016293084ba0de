"""Small real models for demos, tests, benchmarks and examples.

- ``DigitsCNN`` and ``FashionCNN``: BatchNorm CNNs for scikit-learn's 8x8 digits and
  for Fashion-MNIST, trained by ``train_classifier`` and measured by ``accuracy``.
  ``pretrained_digits_cnn`` and ``pretrained_fashion_cnn`` train one with a fixed
  recipe and cache its weights, so later calls load them.
- ``SentenceProbe``: a sentence encoder, mean pooling and a linear head.
  ``sentiment_probe`` fits the head as a logistic regression on frozen embeddings;
  ``minilm_sentiment`` builds one on all-MiniLM-L6-v2 and the Pang-Lee sentences.

Each CNN has an ``nn.Sequential`` named ``features`` (the conv blocks) and one named
``classifier`` (``Flatten, Linear, ReLU, Linear``), so
``Components.discover(model, kinds=("conv", "neurons"))`` finds every conv channel and
every hidden unit of the classifier.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _batching, datasets

logger = logging.getLogger(__name__)

# Bump a recipe string whenever the architecture or the training settings of its
# pretrained_* function change, so that stale cached weights are never loaded.
DIGITS_RECIPE = "digits-cnn-v2"
FASHION_RECIPE = "fashion-cnn-v2"


# -- architectures ---------------------------------------------------------------------


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]


class DigitsCNN(nn.Module):
    """A three-conv BatchNorm CNN for 8x8 single-channel images.

    ``features``: conv(1 -> w), conv(w -> 2w), max-pool to 4x4, conv(2w -> 2w), each
    conv followed by BatchNorm and ReLU. ``classifier``: flatten, linear to ``hidden``
    units, ReLU, linear to ``n_classes``. Components: ``5 * width`` conv channels and
    ``hidden`` neurons.

    Parameters
    ----------
    n_classes : number of outputs.
    width : channels of the first conv layer (w).
    hidden : hidden units of the classifier.

    Examples
    --------
    >>> from coarpy.components import Components
    >>> net = DigitsCNN(width=4, hidden=8)
    >>> net(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    >>> comps = Components.discover(net, kinds=("conv", "neurons"))
    >>> len(comps), comps.names[-1]
    (28, 'classifier.3:7')
    """

    def __init__(self, n_classes: int = 10, width: int = 16, *, hidden: int = 64):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_block(1, w),
            *_conv_block(w, 2 * w),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            *_conv_block(2 * w, 2 * w),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * w * 4 * 4, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits (batch, n_classes) of images (batch, 1, 8, 8)."""
        return self.classifier(self.features(x))


class FashionCNN(nn.Module):
    """A three-block BatchNorm CNN for 28x28 single-channel images.

    ``features``: three blocks of conv, BatchNorm, ReLU and 2x2 max-pool with
    w, 2w and 4w channels (28 -> 14 -> 7 -> 3). ``classifier``: flatten, linear to
    ``hidden`` units, ReLU, linear to ``n_classes``. Components: ``7 * width`` conv
    channels and ``hidden`` neurons.

    Parameters
    ----------
    n_classes : number of outputs.
    width : channels of the first conv layer (w).
    hidden : hidden units of the classifier.

    Examples
    --------
    >>> FashionCNN(width=4)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(self, n_classes: int = 10, width: int = 16, *, hidden: int = 128):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_block(1, w),
            nn.MaxPool2d(2),  # 28 -> 14
            *_conv_block(w, 2 * w),
            nn.MaxPool2d(2),  # 14 -> 7
            *_conv_block(2 * w, 4 * w),
            nn.MaxPool2d(2),  # 7 -> 3
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * w * 3 * 3, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits (batch, n_classes) of images (batch, 1, 28, 28)."""
        return self.classifier(self.features(x))


# -- training and accuracy ---------------------------------------------------------------


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _check_tensor_pair(data: Any, name: str) -> tuple[Tensor, Tensor]:
    if (
        not isinstance(data, (tuple, list))
        or len(data) != 2
        or not all(isinstance(t, Tensor) for t in data)
    ):
        got = type(data).__name__
        if isinstance(data, (tuple, list)):
            got += f" of {len(data)} items ({', '.join(type(t).__name__ for t in data)})"
        raise TypeError(
            f"{name} must be a pair of tensors (inputs, labels), got {got}. Pass e.g. "
            "coarpy.datasets.digits(split='train')."
        )
    x, y = data
    if x.shape[0] != y.shape[0] or y.ndim != 1 or y.dtype != torch.int64:
        raise ValueError(
            f"{name} must hold inputs (n, ...) and int64 labels (n,); got inputs "
            f"{tuple(x.shape)} and labels {tuple(y.shape)} {y.dtype}. Convert the labels "
            "with .long() and give both the same number of rows."
        )
    return x, y


def train_classifier(
    model: nn.Module,
    train_data: tuple[Tensor, Tensor],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.0,
    lr_schedule: str = "constant",
    progress: bool = False,
) -> nn.Module:
    """Train a classifier with Adam and cross-entropy; deterministic for a given seed.

    Each epoch visits the examples in an order drawn from a ``torch.Generator`` seeded
    with ``seed``; the global RNG is seeded with ``seed`` for the duration of the
    training (for dropout) and restored afterwards. The data is moved to the model's
    device once. A last batch of a single example is skipped, since BatchNorm cannot
    train on it.

    Parameters
    ----------
    model : the classifier, trained in place.
    train_data : ``(inputs, labels)``: tensors (n, ...) and int64 (n,).
    epochs, lr, batch_size, seed : the training recipe.
    weight_decay : Adam's L2 penalty.
    lr_schedule : ``"constant"`` keeps ``lr``; ``"cosine"`` anneals it after every step
        from ``lr`` to 0 over the whole run (``torch.optim.lr_scheduler.CosineAnnealingLR``),
        which makes the final weights, and BatchNorm's running statistics, far less
        dependent on the last few batches.
    progress : show a progress bar with the running loss.

    Returns
    -------
    The same model, in eval mode.
    """
    x, y = _check_tensor_pair(train_data, "train_data")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}.")
    device = _device_of(model)
    x, y = x.to(device), y.to(device)
    order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = len(x) // batch_size + (len(x) % batch_size >= 2)
    scheduler = None
    if lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(epochs * steps_per_epoch, 1)
        )
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    epoch_range: Any = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epoch_range = tqdm(epoch_range, desc="train", unit="epoch")
    with torch.random.fork_rng(devices=rng_devices):
        # Seed only the generators fork_rng restores (torch.manual_seed would also
        # reseed every other GPU's generator and leave it changed).
        torch.default_generator.manual_seed(seed)
        if rng_devices:
            with torch.cuda.device(rng_devices[0]):
                torch.cuda.manual_seed(seed)
        model.train()
        for _ in epoch_range:
            perm = torch.randperm(len(x), generator=order).to(device)
            total, seen = 0.0, 0
            for start in range(0, len(x), batch_size):
                rows = perm[start : start + batch_size]
                if len(rows) < 2:
                    continue
                loss = F.cross_entropy(model(x[rows]), y[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                if progress:  # .item() waits for the device; only pay for it when shown
                    total += loss.item() * len(rows)
                    seen += len(rows)
            if progress:
                epoch_range.set_postfix(loss=f"{total / max(seen, 1):.4f}")
    return model.eval()


@torch.inference_mode()
def accuracy(model: nn.Module, data: Any, *, batch_size: int = 1024) -> float:
    """Share of examples whose highest logit is the label.

    The model runs in the mode it is in (call ``model.eval()`` first for BatchNorm and
    dropout to behave as at test time).

    Parameters
    ----------
    model : a classifier returning logits (batch, classes).
    data : ``(inputs, labels)`` tensors, cut into batches of ``batch_size``, or an
        iterable of batches (tuples or dicts with ``labels``).
    batch_size : rows per forward pass when ``data`` is a pair of tensors.

    Examples
    --------
    >>> net = nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = net.weight.copy_(torch.eye(2)), net.bias.zero_()
    >>> accuracy(net, (torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 3.0]]), torch.tensor([0, 1, 0])))
    0.6666666666666666
    """
    device = _device_of(model)
    correct, total = 0, 0
    for batch in _batching.as_batches(data, batch_size):
        batch = _batching.to_device(batch, device)
        logits = _batching.logits_of(_batching.run_model_input(model, batch))
        predicted = logits.argmax(-1)  # (batch,)
        correct += int((predicted == _batching.labels(batch)).sum())
        total += predicted.shape[0]
    if total == 0:
        raise ValueError("accuracy() got no examples. Pass a non-empty data set.")
    return correct / total


# -- pretrained CNNs -----------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$COARPY_CACHE_DIR``, else ``$XDG_CACHE_HOME/coarpy``, else ``~/.cache/coarpy``."""
    if os.environ.get("COARPY_CACHE_DIR"):
        return Path(os.environ["COARPY_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "coarpy"


# What torch.load and load_state_dict raise on a damaged or mismatched file.
_UNREADABLE = (
    pickle.UnpicklingError, RuntimeError, OSError, EOFError, TypeError, AttributeError,
    KeyError, ValueError,
)  # fmt: skip


def _load_or_train(model: nn.Module, path: Path, train: Any) -> nn.Module:
    """Load ``path`` into ``model`` if it holds matching weights; else train and save."""
    if path.is_file():
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            logger.info("loaded cached weights from %s", path)
            return model.eval()
        except _UNREADABLE as err:
            # load_state_dict may have copied some tensors before failing.
            model.load_state_dict(initial)
            warnings.warn(
                f"Cached weights {path} cannot be loaded ({type(err).__name__}: "
                f"{str(err).strip().splitlines()[0]}); training again and "
                "overwriting them.",
                stacklevel=3,
            )
    train(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write under a temporary name, then rename: a killed process never leaves a
    # half-written file under the final name.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info("trained and cached weights at %s", path)
    return model.eval()


def _cache_path(cache_dir: str | os.PathLike | None, name: str) -> Path:
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / name


def _fresh(model_class: type[nn.Module], seed: int) -> nn.Module:
    """A model initialised from ``seed`` without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return model_class()


def pretrained_digits_cnn(
    cache_dir: str | os.PathLike | None = None, *, seed: int = 0
) -> tuple[DigitsCNN, tuple[Tensor, Tensor]]:
    """A ``DigitsCNN`` trained on the digits train split, and the test split.

    The recipe (98.7-99.1% test accuracy over seeds 0-4, about 2 CPU-seconds): width
    16, hidden 64, 8 epochs of Adam at lr 3e-3 with cosine annealing, batch size 64,
    on ``datasets.digits(split="train")`` (split seed 0). Weights are cached as
    ``<cache_dir>/digits-cnn-v2-seed<seed>.pt``; a later call loads them. Training is
    deterministic for a given seed, torch build and thread count.

    Parameters
    ----------
    cache_dir : folder of the cache; ``default_cache_dir()`` if None.
    seed : seed of the initialisation and of the batch order.

    Returns
    -------
    model : the trained ``DigitsCNN`` on the CPU, in eval mode.
    test : ``datasets.digits(split="test")``: images (450, 1, 8, 8), labels (450,).
    """
    model = _fresh(DigitsCNN, seed)

    def train(m: nn.Module) -> None:
        train_classifier(
            m,
            datasets.digits(split="train"),
            epochs=8,
            lr=3e-3,
            batch_size=64,
            seed=seed,
            lr_schedule="cosine",
        )

    path = _cache_path(cache_dir, f"{DIGITS_RECIPE}-seed{seed}.pt")
    _load_or_train(model, path, train)
    return model, datasets.digits(split="test")


def pretrained_fashion_cnn(
    cache_dir: str | os.PathLike | None = None, *, seed: int = 0, n_train: int = 10_000
) -> tuple[FashionCNN, tuple[Tensor, Tensor]]:
    """A ``FashionCNN`` trained on the first ``n_train`` Fashion-MNIST training images.

    The recipe (87.4-87.9% test accuracy over seeds 0-4 with the default ``n_train``,
    about 30 CPU-seconds): width 16, hidden 128, 4 epochs of Adam at lr 2e-3 with
    cosine annealing, batch size 128. Weights are cached as
    ``<cache_dir>/fashion-cnn-v2-n<n_train>-seed<seed>.pt``; a later call loads them.

    Parameters
    ----------
    cache_dir : folder of the cache; ``default_cache_dir()`` if None.
    seed : seed of the initialisation and of the batch order.
    n_train : number of training images used (from the start of the train file).

    Returns
    -------
    model : the trained ``FashionCNN`` on the CPU, in eval mode.
    test : the 10,000 test images (10000, 1, 28, 28) and labels (10000,).
    """
    if isinstance(n_train, bool) or not isinstance(n_train, int) or not 2 <= n_train <= 60_000:
        raise ValueError(f"n_train must be an int in [2, 60000], got {n_train!r}.")
    model = _fresh(FashionCNN, seed)

    def train(m: nn.Module) -> None:
        data = datasets.fashion_mnist(split="train", limit=n_train)
        train_classifier(
            m, data, epochs=4, lr=2e-3, batch_size=128, seed=seed, lr_schedule="cosine"
        )

    path = _cache_path(cache_dir, f"{FASHION_RECIPE}-n{n_train}-seed{seed}.pt")
    _load_or_train(model, path, train)
    return model, datasets.fashion_mnist(split="test")


# -- sentence probes ------------------------------------------------------------------------


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


def _tokenize(tokenizer: Any, sentences: Sequence[str], device: Any) -> dict[str, Tensor]:
    encoded = tokenizer(list(sentences), padding=True, truncation=True, return_tensors="pt")
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
) -> SentenceProbe:
    """Fit a ``SentenceProbe``'s head by logistic regression on frozen embeddings.

    The embeddings are computed once under ``torch.inference_mode`` (no gradient
    reaches the encoder), standardised per feature, and a multinomial logistic
    regression with penalty ``l2 / 2 * ||W||^2`` on the summed loss (scikit-learn's
    ``C = 1 / l2``) is fitted by L-BFGS from zero weights, in float64, so the result
    is deterministic. The standardisation is folded into the head's weights.

    Parameters
    ----------
    encoder : the sentence encoder (kept as it is; put it in eval mode first).
    tokenizer : its tokenizer.
    sentences : the training sentences.
    labels : int64 (n,) class of each sentence, in 0..n_classes-1.
    l2 : ridge penalty on the head's weights (not on its bias).
    batch_size : sentences per forward pass of the encoder.
    normalize : L2-normalise embeddings (see ``SentenceProbe``).

    Returns
    -------
    The probe, in eval mode, on the encoder's device.
    """
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or len(labels) != len(sentences) or len(sentences) == 0:
        raise ValueError(
            f"Expected one label per sentence, got {len(sentences)} sentences and labels "
            f"of shape {tuple(labels.shape)}."
        )
    n_classes = int(labels.max()) + 1
    probe = SentenceProbe(encoder, max(n_classes, 2), normalize=normalize)
    device = _device_of(encoder)
    probe.head.to(device)
    with torch.inference_mode():
        parts = [
            probe.embed(**_tokenize(tokenizer, sentences[i : i + batch_size], device))
            for i in range(0, len(sentences), batch_size)
        ]
    z = torch.cat(parts).double().cpu()  # (n, hidden); a fresh tensor outside inference
    mean, std = z.mean(0), z.std(0).clamp_min(1e-12)
    z = (z - mean) / std
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
        folded = weight / std  # head(x) = W (x - mean) / std + b
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
        raise ValueError(f"n_train must be an even int in [2, 198], got {n_train!r}.")
    encoder, tokenizer = datasets.minilm(device=device)
    sentences, targets = datasets.pang_lee_sentences()
    train_rows, held_rows = _balanced_split(targets, n_train // 2, seed)
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


def _balanced_split(labels: Tensor, per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """(train rows, other rows), ascending: ``per_class`` rows of each class to train."""
    order = torch.Generator().manual_seed(seed)
    train = []
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().squeeze(1)
        train.append(rows[torch.randperm(len(rows), generator=order)[:per_class]])
    in_train = torch.zeros(len(labels), dtype=torch.bool)
    in_train[torch.cat(train)] = True
    return in_train.nonzero().squeeze(1), (~in_train).nonzero().squeeze(1)
