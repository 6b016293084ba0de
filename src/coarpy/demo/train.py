"""Training the demo's classifiers, measuring them, and caching trained weights.

``train_classifier`` trains any classifier with Adam, deterministically for a seed;
``accuracy`` measures it. ``pretrained_digits_cnn`` and ``pretrained_fashion_cnn``
train a ``DigitsCNN`` or ``FashionCNN`` with a fixed recipe once and cache the
weights, so later calls load them.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _batching, _fs
from .._engine import model_device, progress_bar
from ..errors import ArgumentError, DataError
from .data import digits, fashion_mnist
from .models import DigitsCNN, FashionCNN

logger = logging.getLogger(__name__)

# Bump a recipe string whenever the architecture or the training settings of its
# pretrained_* function change, so that stale cached weights are never loaded.
DIGITS_RECIPE = "digits-cnn-v2"
FASHION_RECIPE = "fashion-cnn-v2"


# -- training and accuracy ---------------------------------------------------------------


def _check_tensor_pair(pair: Any, name: str) -> tuple[Tensor, Tensor]:
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(t, Tensor) for t in pair)
    ):
        got = type(pair).__name__
        if isinstance(pair, (tuple, list)):
            got += f" of {len(pair)} items ({', '.join(type(t).__name__ for t in pair)})"
        raise ArgumentError(
            f"{name} must be a pair of tensors (inputs, labels), got {got}. Pass e.g. "
            "coarpy.demo.digits(split='train')."
        )
    x, y = pair
    if x.shape[0] != y.shape[0] or y.ndim != 1 or y.dtype != torch.int64:
        raise DataError(
            f"{name} must hold inputs (n, ...) and int64 labels (n,); got inputs "
            f"{tuple(x.shape)} and labels {tuple(y.shape)} {y.dtype}. Convert the labels "
            "with .long() and give both the same number of rows."
        )
    return x, y


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArgumentError(f"{name} must be a positive int, got {value!r}. Pass e.g. {name}=8.")


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

    Raises
    ------
    ArgumentError
        If ``train_data`` is not a pair of tensors, ``epochs`` or ``batch_size`` is not
        a positive int, or ``lr_schedule`` is unknown.
    DataError
        If the labels are not int64 (n,), one per input row.
    """
    x, y = _check_tensor_pair(train_data, "train_data")
    _check_positive_int("epochs", epochs)
    _check_positive_int("batch_size", batch_size)
    if lr_schedule not in ("constant", "cosine"):
        raise ArgumentError(
            f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}. Pick one of the two."
        )
    device = model_device(model)
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
    bar = progress_bar(epochs, progress, "train", unit="epoch")
    with bar, torch.random.fork_rng(devices=rng_devices):
        # Seed only the generators fork_rng restores (torch.manual_seed would also
        # reseed every other GPU's generator and leave it changed).
        torch.default_generator.manual_seed(seed)
        if rng_devices:
            with torch.cuda.device(rng_devices[0]):
                torch.cuda.manual_seed(seed)
        model.train()
        for _ in range(epochs):
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
                bar.set_postfix(loss=f"{total / max(seen, 1):.4f}")
            bar.update()
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

    Raises
    ------
    DataError
        If ``data`` yields no example.

    Examples
    --------
    >>> net = nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = net.weight.copy_(torch.eye(2)), net.bias.zero_()
    >>> accuracy(net, (torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 3.0]]), torch.tensor([0, 1, 0])))
    0.6666666666666666
    """
    device = model_device(model)
    correct, total = 0, 0
    for batch in _batching.as_batches(data, batch_size):
        batch = _batching.to_device(batch, device)
        logits = _batching.logits_of(_batching.run_model_input(model, batch))
        predicted = logits.argmax(-1)  # (batch,)
        correct += int((predicted == _batching.labels(batch)).sum())
        total += predicted.shape[0]
    if total == 0:
        raise DataError("accuracy() got no examples. Pass a non-empty data set.")
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
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    _fs.atomic_write(path, buffer.getvalue())  # a killed process leaves no partial file
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
    on ``digits(split="train")`` (split seed 0). Weights are cached as
    ``<cache_dir>/digits-cnn-v2-seed<seed>.pt``; a later call loads them. Training is
    deterministic for a given seed, torch build and thread count.

    Parameters
    ----------
    cache_dir : folder of the cache; ``default_cache_dir()`` if None.
    seed : seed of the initialisation and of the batch order.

    Returns
    -------
    model : the trained ``DigitsCNN`` on the CPU, in eval mode.
    test : ``digits(split="test")``: images (450, 1, 8, 8), labels (450,).
    """
    model = _fresh(DigitsCNN, seed)

    def train(m: nn.Module) -> None:
        train_classifier(
            m,
            digits(split="train"),
            epochs=8,
            lr=3e-3,
            batch_size=64,
            seed=seed,
            lr_schedule="cosine",
        )

    path = _cache_path(cache_dir, f"{DIGITS_RECIPE}-seed{seed}.pt")
    _load_or_train(model, path, train)
    return model, digits(split="test")


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
        raise ArgumentError(
            f"n_train must be an int in [2, 60000], got {n_train!r}. Pass e.g. n_train=10000."
        )
    model = _fresh(FashionCNN, seed)

    def train(m: nn.Module) -> None:
        images = fashion_mnist(split="train", limit=n_train)
        train_classifier(
            m, images, epochs=4, lr=2e-3, batch_size=128, seed=seed, lr_schedule="cosine"
        )

    path = _cache_path(cache_dir, f"{FASHION_RECIPE}-n{n_train}-seed{seed}.pt")
    _load_or_train(model, path, train)
    return model, fashion_mnist(split="test")
