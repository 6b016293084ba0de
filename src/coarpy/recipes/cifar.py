"""Setup A: a MiniResNet on CIFAR-10, its 2,304 conv filters, on the 10,000 test images.

The paper's CIFAR-10 model is a "ResNet" of 9 convolutions of 256 filters each
(:class:`MiniResNet`): a 3×3 stem conv, then four basic residual blocks of two 3×3
convs each, all at width 256 and full 32×32 resolution (no strides, so every shortcut
is the identity and no 1×1 projection exists), average pooling to 4×4 and one linear
layer. Its components are the 9 × 256 = 2,304 conv filters.

No trained weights of it are published in a form that loads without running code, so
:func:`train_mini_resnet` trains one on the CIFAR-10 training set; the recipe
:func:`cifar10_resnet` loads the cached weights, or trains them when asked
(``train=True``).

CIFAR-10 is read from the files of its official archives (the Python version
``cifar-10-batches-py``, as torchvision downloads it, or the binary version
``cifar-10-batches-bin``); nothing is downloaded.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _batching as B
from ..components import Components
from ..demo.train import default_cache_dir, train_classifier
from ..errors import ArgumentError, DatasetFormatError, DatasetNotFoundError
from . import _sources
from .paper import settings
from .specs import resnet_reference_spec

DATA_ENV = "COARPY_CIFAR10"
WEIGHTS_ENV = "COARPY_CIFAR10_WEIGHTS"
RECIPE = "cifar10-miniresnet-v1"  # bump when the architecture or training changes
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
_HOW = (
    "Download the CIFAR-10 python (or binary) version from "
    "https://www.cs.toronto.edu/~kriz/cifar.html (cifar-10-python.tar.gz, 163 MB) and "
    "extract it into a folder DIR, giving DIR/cifar-10-batches-py/test_batch."
)


class _BasicBlock(nn.Module):
    """Two 3×3 convs with BatchNorm and an identity shortcut (no stride, one width)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


class MiniResNet(nn.Module):
    """The paper's CIFAR-10 ResNet: 1 + 2 × ``n_blocks`` convs of ``width`` filters.

    With the defaults, 9 convs × 256 filters = 2,304 components (module names
    ``conv1`` and ``layer.{0..3}.conv{1,2}``). Inputs are normalised images (batch, 3,
    32, 32); the 32×32 map is average-pooled to 4×4 before the linear classifier.

    Examples
    --------
    >>> net = MiniResNet(width=8, n_blocks=2)
    >>> net(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> len(Components.from_spec(net, resnet_reference_spec(net)))
    40
    """

    def __init__(self, width: int = 256, n_blocks: int = 4, n_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer = nn.Sequential(*[_BasicBlock(width) for _ in range(n_blocks)])
        self.pool = nn.AvgPool2d(8)  # 32x32 -> 4x4
        self.linear = nn.Linear(width * 16, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer(F.relu(self.bn1(self.conv1(x))))
        return self.linear(self.pool(out).flatten(1))


# -- data --------------------------------------------------------------------------------

_PY_FILES = {"test": ["test_batch"], "train": [f"data_batch_{i}" for i in range(1, 6)]}
_BIN_FILES = {"test": ["test_batch.bin"], "train": [f"data_batch_{i}.bin" for i in range(1, 6)]}
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds dicts, lists, bytes and numpy arrays, and nothing else:
    CIFAR-10's Python files are pickles, and a pickle may otherwise run any code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 file")


def _read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        raw = _ArrayUnpickler(f, encoding="bytes").load()
    data, labels = raw[b"data"], raw[b"labels"]
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels)


def _read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 3073:
        raise DatasetFormatError(
            f"{path} has {raw.size} bytes, not a multiple of 3,073 (one label byte and a "
            "32×32×3 image per record). Use the files of the official CIFAR-10 archive."
        )
    records = raw.reshape(-1, 3073)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0]


def _batch_files(folder: Path, split: str) -> tuple[list[Path], bool] | None:
    """The split's files in ``folder`` (or its ``cifar-10-batches-*`` subfolder)."""
    for where in (folder, folder / "cifar-10-batches-py", folder / "cifar-10-batches-bin"):
        for names, binary in ((_PY_FILES[split], False), (_BIN_FILES[split], True)):
            files = [where / n for n in names]
            if all(f.is_file() for f in files):
                return files, binary
    return None


def cifar10(
    split: str = "test", data_dir: str | os.PathLike | None = None
) -> tuple[Tensor, Tensor]:
    """CIFAR-10 images as uint8 (n, 3, 32, 32) and int64 labels (n,), read from disk.

    Parameters
    ----------
    split : ``"test"`` (10,000 images) or ``"train"`` (50,000).
    data_dir : the folder of the extracted archive (holding ``cifar-10-batches-py`` or
        ``cifar-10-batches-bin``, or their files); default ``$COARPY_CIFAR10``.

    Raises
    ------
    DatasetNotFoundError : the files are not there (the message says where to get them).
    DatasetFormatError : a file is not a CIFAR-10 batch.
    """
    if split not in _PY_FILES:
        raise ArgumentError(f"split must be 'test' or 'train', got {split!r}.")
    found: dict[Path, tuple[list[Path], bool]] = {}

    def accept(path: Path) -> Path | None:
        files = _batch_files(path, split) if path.is_dir() else None
        if files is not None:
            found[path] = files
            return path
        return None

    folder = _sources.locate(
        data_dir, DATA_ENV, what=f"The CIFAR-10 {split} set", how=_HOW, accept=accept
    )
    files, binary = found[folder]
    read = _read_binary_batch if binary else _read_python_batch
    try:
        parts = [read(f) for f in files]
    except (pickle.UnpicklingError, KeyError, EOFError, ValueError, TypeError) as err:
        raise DatasetFormatError(
            f"{files[0].parent} does not hold CIFAR-10 batch files ({type(err).__name__}: "
            f"{err}). {_HOW}"
        ) from err
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]).astype(np.int64))
    return x, y


def normalize(images: Tensor) -> Tensor:
    """uint8 CIFAR images (n, 3, 32, 32) to float32, normalised by CIFAR-10's channel
    mean and standard deviation (the MiniResNet's input)."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


# -- training ----------------------------------------------------------------------------


def train_mini_resnet(
    data_dir: str | os.PathLike | None = None,
    *,
    epochs: int = 24,
    lr: float = 2e-3,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
    train_data: tuple[Tensor, Tensor] | None = None,
    width: int = 256,
    n_blocks: int = 4,
) -> MiniResNet:
    """Train a :class:`MiniResNet` on CIFAR-10's 50,000 training images.

    Adam with cosine annealing (``coarpy.demo.train_classifier``), weight decay 5e-4,
    on the training images and their mirror images (a fixed augmentation: 100,000
    images, 1.2 GB in float32, held on the device). Deterministic for a seed. A run of
    24 epochs costs about 24 × 100,000 × 3 × 9.7 GFLOPs ≈ 70 PFLOPs: tens of minutes
    on one modern GPU, days on a CPU. The recipe was not tuned, nor its accuracy
    measured, in coarpy's own tests (they train on a few synthetic images only).

    Parameters
    ----------
    data_dir : the CIFAR-10 folder (see :func:`cifar10`).
    epochs, lr, batch_size, seed : the training recipe.
    device : where to train (default: CUDA when available).
    progress : show a progress bar.
    train_data : ``(uint8 images, labels)`` to train on instead of the training set.
    width, n_blocks : the architecture (the paper's: 256 and 4).

    Returns
    -------
    The trained model, on ``device``, in eval mode.
    """
    x, y = train_data if train_data is not None else cifar10("train", data_dir)
    x = normalize(x)
    x, y = torch.cat([x, x.flip(-1)]), torch.cat([y, y])
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _sources.seeded(lambda: MiniResNet(width, n_blocks), seed).to(device)
    return train_classifier(
        model, (x, y), epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
        weight_decay=5e-4, lr_schedule="cosine", progress=progress,
    )  # fmt: skip


# -- the recipe --------------------------------------------------------------------------


def default_weights_path(seed: int = 0) -> Path:
    """Where :func:`cifar10_resnet` keeps the MiniResNet it trains, per seed."""
    return default_cache_dir() / f"{RECIPE}-seed{seed}.pt"


def cifar10_resnet(
    *,
    data_dir: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    train: bool = False,
    random_weights: bool = False,
    n_examples: int | None = None,
    batch_size: int = 500,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """Setup A: the CIFAR-10 MiniResNet, its 2,304 conv filters, the 10,000 test images.

    Usable from a run configuration as ``factory = "coarpy.recipes:cifar10_resnet"``.
    The paper's settings: α = 0.05, 50,000 masks, output ``margin``.

    Parameters
    ----------
    data_dir : the CIFAR-10 folder (default ``$COARPY_CIFAR10``; see :func:`cifar10`).
    weights : the trained MiniResNet's state dict (default ``$COARPY_CIFAR10_WEIGHTS``,
        else :func:`default_weights_path`).
    train : when the weights file does not exist, train the model
        (:func:`train_mini_resnet`) and save it there, instead of raising.
    random_weights : a randomly initialised MiniResNet and random images of the real
        shape (for tests and benchmarks); needs no file.
    n_examples : keep the first ``n_examples`` test images (default: all 10,000).
    batch_size : images per forward pass (a run configuration's ``batch_size``, when
        set, takes precedence).
    seed : the seed of the initialisation (and of training, and of the random images).
    device : where to train (``train=True`` only).

    Returns
    -------
    ``{"model", "data", "components", "output": "margin", "alpha", "n_masks",
    "setup"}``; ``data`` is a list of ``(images, labels)`` batches, images float32
    (batch, 3, 32, 32), normalised.

    Raises
    ------
    DatasetNotFoundError : CIFAR-10 or the weights are not where they should be (the
        message says what to download, or how to train, and where to put it).
    """
    _sources.check_count("n_examples", n_examples, at_most=10_000)
    _sources.check_count("batch_size", batch_size)
    if random_weights:
        model = _sources.seeded(MiniResNet, seed).eval()
        x, y = _sources.synthetic_images(n_examples or 10_000, 32, 10, seed=seed)
    else:
        x, y = cifar10("test", data_dir)
        x, y = x[:n_examples], y[:n_examples]
        model = _trained(weights, train=train, data_dir=data_dir, seed=seed, device=device)
    comps = Components.from_spec(model, resnet_reference_spec(model))
    return {
        "model": model,
        "data": B.split((normalize(x), y), batch_size),
        "components": comps,
        "output": "margin",
        **settings("cifar10_resnet"),
    }


def _trained(weights, *, train: bool, data_dir, seed: int, device) -> MiniResNet:
    model = _sources.seeded(MiniResNet, seed)
    default = default_weights_path(seed)
    path = Path(weights or os.environ.get(WEIGHTS_ENV) or default).expanduser()
    if path.is_file():
        return _sources.load_state_dict(model, path, what="the MiniResNet")
    if not train:
        raise DatasetNotFoundError(
            f"No trained MiniResNet at {path}. Train one (tens of GPU-minutes) with "
            f"cifar10_resnet(train=True, data_dir=...) or `factory_args.train = true` in the "
            "run configuration, which saves it there; or pass weights=PATH (or set "
            f"{WEIGHTS_ENV}=PATH) to a state dict of coarpy.recipes.MiniResNet."
        )
    trained = train_mini_resnet(data_dir, seed=seed, device=device).cpu()
    _sources.save_state_dict(trained, path)
    return trained.eval()
