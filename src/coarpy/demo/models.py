"""The demo's CNNs: small BatchNorm classifiers for 8x8 digits and 28x28 Fashion-MNIST.

Each is an ``nn.Sequential`` of two children, ``features`` (the conv blocks) and
``classifier`` (``Flatten, Linear, ReLU, Linear``), so
``Components.discover(model, kinds=("conv", "neurons"))`` finds every conv channel and
every hidden unit of the classifier, and a prefix cut at ``"classifier"`` applies.

``layout`` spells the feature blocks: an int ``k`` is a conv block (3x3 conv to
``k * width`` channels, BatchNorm, ReLU) and ``"pool"`` a 2x2 max-pool. One class
serves the demo (``DigitsCNN()``), the test suite and the benchmarks
(``small_digits_cnn()``), so the three never drift apart.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from ..errors import ArgumentError

POOL = "pool"
DIGITS_LAYOUT = (1, 2, POOL, 2)  # 8x8 -> 4x4: 1 + 2 + 2 = 5 widths of conv channels
FASHION_LAYOUT = (1, POOL, 2, POOL, 4, POOL)  # 28 -> 14 -> 7 -> 3
SMALL_DIGITS_LAYOUT = (1, POOL, 2, POOL)  # 8x8 -> 2x2


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]


class BlockCNN(nn.Sequential):
    """Conv blocks on a square single-channel image, then a one-hidden-layer classifier.

    Parameters
    ----------
    image_size : height (= width) of the input images.
    n_classes : number of outputs.
    width : channels per unit of ``layout``.
    hidden : hidden units of the classifier.
    layout : the feature blocks, in order: an int ``k`` is a conv block with
        ``k * width`` output channels (conv 3x3, BatchNorm, ReLU), ``"pool"`` a 2x2
        max-pool (rounding down).

    Raises
    ------
    ArgumentError
        If ``layout`` holds no conv block, an entry that is neither a positive int
        nor ``"pool"``, or pools the image away.
    """

    def __init__(
        self,
        image_size: int,
        n_classes: int = 10,
        width: int = 16,
        *,
        hidden: int = 64,
        layout: Sequence[int | str] = DIGITS_LAYOUT,
    ):
        _check_layout(layout, image_size)
        blocks: list[nn.Module] = []
        channels, side = 1, image_size
        for entry in layout:
            if entry == POOL:
                blocks.append(nn.MaxPool2d(2))
                side //= 2
            else:
                blocks += _conv_block(channels, int(entry) * width)
                channels = int(entry) * width
        classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )
        super().__init__(OrderedDict(features=nn.Sequential(*blocks), classifier=classifier))


def _check_layout(layout: Sequence[int | str], image_size: int) -> None:
    entries = list(layout)
    bad = [
        e for e in entries if e != POOL and (isinstance(e, bool) or not isinstance(e, int) or e < 1)
    ]
    n_pools = entries.count(POOL)
    if bad or len(entries) == n_pools or image_size // 2**n_pools < 1:
        raise ArgumentError(
            f"layout must list positive ints (conv blocks of k * width channels) and "
            f"'pool' entries, with at least one conv block and at most "
            f"{max(image_size.bit_length() - 1, 0)} pools for {image_size}x{image_size} "
            f"images; got {tuple(entries)!r}. Use e.g. (1, 'pool', 2, 'pool')."
        )


class DigitsCNN(BlockCNN):
    """A BatchNorm CNN for 8x8 single-channel images (scikit-learn's digits).

    Default ``features``: conv(1 -> w), conv(w -> 2w), max-pool to 4x4, conv(2w -> 2w),
    each conv followed by BatchNorm and ReLU. ``classifier``: flatten, linear to
    ``hidden`` units, ReLU, linear to ``n_classes``. Components: ``5 * width`` conv
    channels and ``hidden`` neurons.

    Parameters
    ----------
    n_classes : number of outputs.
    width : channels of the first conv layer (w).
    hidden : hidden units of the classifier.
    layout : the feature blocks (see ``BlockCNN``); ``DIGITS_LAYOUT`` by default.

    Examples
    --------
    >>> import torch
    >>> from coarpy.components import Components
    >>> net = DigitsCNN(width=4, hidden=8)
    >>> net(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    >>> comps = Components.discover(net, kinds=("conv", "neurons"))
    >>> len(comps), comps.names[-1]
    (28, 'classifier:7')
    """

    def __init__(
        self,
        n_classes: int = 10,
        width: int = 16,
        *,
        hidden: int = 64,
        layout: Sequence[int | str] = DIGITS_LAYOUT,
    ):
        super().__init__(8, n_classes, width, hidden=hidden, layout=layout)


class FashionCNN(BlockCNN):
    """A three-block BatchNorm CNN for 28x28 single-channel images (Fashion-MNIST).

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
    >>> import torch
    >>> FashionCNN(width=4)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(self, n_classes: int = 10, width: int = 16, *, hidden: int = 128):
        super().__init__(28, n_classes, width, hidden=hidden, layout=FASHION_LAYOUT)


def small_digits_cnn(n_classes: int = 10) -> DigitsCNN:
    """The small digits CNN of the test suite and the benchmarks (56 components).

    ``DigitsCNN(width=8, hidden=32, layout=SMALL_DIGITS_LAYOUT)``: conv 1 -> 8, pool,
    conv 8 -> 16, pool, then 64 -> 32 -> ``n_classes``. Its conv layers are
    ``features.0`` and ``features.4`` and its linear layers ``classifier.1`` and
    ``classifier.3``. Weights are drawn from torch's global generator, as for any
    ``nn.Module``: seed it first for reproducible weights.

    Examples
    --------
    >>> import torch
    >>> from coarpy.components import Components
    >>> net = small_digits_cnn()
    >>> net(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    >>> [(g.module, g.n_units) for g in Components.discover(net, kinds=("conv", "neurons")).groups]
    [('features.0', 8), ('features.4', 16), ('classifier', 32)]
    """
    return DigitsCNN(n_classes, 8, hidden=32, layout=SMALL_DIGITS_LAYOUT)
