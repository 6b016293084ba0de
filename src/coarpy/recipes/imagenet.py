"""Setups B and C: torchvision's ResNet-50 and ViT-B/16 on the ImageNet validation set.

- :func:`imagenet_resnet50`: ResNet-50 with the IMAGENET1K_V1 weights, its 22,720 conv
  filters off the shortcut, on the 50,000 validation images.
- :func:`imagenet_vit_b16`: ViT-B/16 with the IMAGENET1K_V1 weights, the rows of every
  linear layer in its blocks (``nn.MultiheadAttention``'s ``in_proj_weight`` included:
  82,944), on every 10th validation image (5,000).

The images are kept as uint8 pixels, preprocessed as torchvision's IMAGENET1K_V1
transforms do (shorter side resized to 256, bilinear; centre crop 224): 50,000 of them
are 7.5 GB, a quarter of their float32 size. The normalisation by ImageNet's channel
statistics happens in the output function, :func:`imagenet_margin`, on the device.

Nothing is downloaded. The architectures come from torchvision (``coarpy[vision]``);
the weights from a path, an environment variable, or torch hub's cache where torchvision
itself would have saved them; the images from a folder in torchvision's ``ImageFolder``
layout. Any of them missing is an error that says what to fetch and where to put it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import _batching as B
from .. import outputs
from .._engine import progress_bar
from ..components import Components
from ..errors import DataError, DatasetFormatError
from . import _sources
from .paper import settings
from .specs import resnet_reference_spec, vit_reference_spec

DATA_ENV = "COARPY_IMAGENET_VAL"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
RESIZE, CROP = 256, 224  # torchvision's IMAGENET1K_V1 transforms for both models
_EXTENSIONS = (".jpeg", ".jpg", ".png")

# torchvision's IMAGENET1K_V1 weight files, as torch hub caches them.
WEIGHTS = {
    "resnet50": ("COARPY_RESNET50_WEIGHTS", "resnet50-0676ba61.pth"),
    "vit_b_16": ("COARPY_VIT_B16_WEIGHTS", "vit_b_16-c867db91.pth"),
}
_DATA_HOW = (
    "Get the ILSVRC2012 validation images (ILSVRC2012_img_val.tar, 6.3 GB, from "
    "https://image-net.org after registering) and sort them into 1,000 folders named "
    "by WordNet id (DIR/n01440764/ILSVRC2012_val_00000293.JPEG, ...), the layout "
    "torchvision's ImageFolder reads (the devkit's ground truth, or the widely used "
    "valprep.sh script, gives each image's folder)."
)


# -- the output function -----------------------------------------------------------------


def normalize(pixels: Tensor) -> Tensor:
    """Pixels in [0, 255] (uint8 or float; (n, 3, h, w)) to float32 normalised by
    ImageNet's channel mean and standard deviation, on the pixels' device."""
    mean = torch.tensor(MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def imagenet_margin(model: nn.Module, batch: Any) -> Tensor:
    """Correct-class margin of ``model`` on ImageNet-normalised pixels.

    ``batch`` is ``(pixels, labels)``: pixels in [0, 255] of shape (batch, 3, h, w),
    uint8 or float, normalised here (on the device) before the model sees them.

    Examples
    --------
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3, 2))
    >>> pixels = torch.zeros(4, 3, 1, 1, dtype=torch.uint8)
    >>> imagenet_margin(net, (pixels, torch.zeros(4, dtype=torch.long))).shape
    torch.Size([4])
    """
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise DataError(
            f"imagenet_margin expects (pixels, labels) batches, got {type(batch).__name__}. "
            "Pass the data the ImageNet recipes return."
        )
    return outputs.margin(model, (normalize(batch[0]), batch[1]))


# -- the images --------------------------------------------------------------------------


def _class_folders(path: Path) -> list[Path] | None:
    if not path.is_dir():
        return None
    folders = sorted(p for p in path.iterdir() if p.is_dir())
    return folders or None


def _preprocess(file: Path, resize: int, crop: int) -> np.ndarray:
    """One image as torchvision's Resize(resize) + CenterCrop(crop) make it: (3, crop, crop)."""
    from PIL import Image  # scikit-learn's and matplotlib's dependency; lazily

    with Image.open(file) as img:
        img = img.convert("RGB")
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(resize * long / short)
        size = (resize, new_long) if w <= h else (new_long, resize)
        img = img.resize(size, Image.BILINEAR)
        left = int(round((size[0] - crop) / 2.0))
        top = int(round((size[1] - crop) / 2.0))
        img = img.crop((left, top, left + crop, top + crop))
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def imagenet_val(
    data_dir: str | os.PathLike | None = None,
    *,
    every: int = 1,
    n_examples: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """ImageNet validation images as uint8 pixels (n, 3, 224, 224) and labels (n,).

    The images are listed as torchvision's ``ImageFolder`` lists them (class folders
    sorted by WordNet id, which is the label order of torchvision's weights; files
    sorted within each), every ``every``-th of them kept, then the first
    ``n_examples``. Each is resized and centre-cropped as torchvision's IMAGENET1K_V1
    transforms do (with PIL, bilinear).

    Parameters
    ----------
    data_dir : the folder of 1,000 class folders (default ``$COARPY_IMAGENET_VAL``).
    every : keep every ``every``-th image (the ViT setup uses 10).
    n_examples : keep at most this many (after ``every``).
    cache_dir : when given, the decoded pixels are saved there as ``.npy`` and read
        back (memory-mapped) next time: decoding 50,000 JPEGs takes minutes.
    workers : threads decoding images (default: the CPU count).
    progress : show a progress bar (None: on a terminal).

    Raises
    ------
    DatasetNotFoundError : no folder of class folders there.
    DatasetFormatError : not 1,000 class folders, or an image cannot be read.
    """
    _sources.check_count("every", every)
    _sources.check_count("n_examples", n_examples)
    root = _sources.locate(
        data_dir, DATA_ENV, what="The ImageNet validation set", how=_DATA_HOW,
        accept=lambda p: p if _class_folders(p) else None,
    )  # fmt: skip
    classes = _class_folders(root) or []
    if len(classes) != 1000:
        raise DatasetFormatError(
            f"{root} has {len(classes)} class folders, expected 1,000 (one per ImageNet "
            f"class, named by WordNet id). {_DATA_HOW}"
        )
    files, labels = [], []
    for label, folder in enumerate(classes):
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in _EXTENSIONS:
                files.append(file)
                labels.append(label)
    files, labels = files[::every][:n_examples], labels[::every][:n_examples]
    if not files:
        raise DatasetFormatError(f"{root}'s class folders hold no .JPEG/.jpg/.png images.")
    y = torch.tensor(labels, dtype=torch.int64)
    cached = None
    if cache_dir is not None:
        cached = Path(cache_dir) / f"imagenet-val-r{RESIZE}-c{CROP}-every{every}-n{len(files)}.npy"
        if cached.is_file():
            return torch.from_numpy(np.load(cached, mmap_mode="r").copy()), y
    x = np.empty((len(files), 3, CROP, CROP), dtype=np.uint8)
    bar = progress_bar(len(files), progress, desc="decode ImageNet", unit="image")

    def decode(i: int) -> None:
        try:
            x[i] = _preprocess(files[i], RESIZE, CROP)
        except OSError as err:
            raise DatasetFormatError(f"Cannot read image {files[i]}: {err}") from err
        bar.update(1)

    with bar, ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        list(pool.map(decode, range(len(files))))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(cached.name + ".partial.npy")
        np.save(partial, x)
        os.replace(partial, cached)
    return torch.from_numpy(x), y


# -- the models --------------------------------------------------------------------------


def _torchvision_model(
    name: str,
    *,
    weights: str | os.PathLike | None,
    random_weights: bool,
    seed: int,
) -> nn.Module:
    """torchvision's ``name`` (``resnet50`` or ``vit_b_16``), with its IMAGENET1K_V1
    weights read from disk, or randomly initialised."""
    tv = _sources.require("torchvision", "'coarpy[vision]'", f"The {name} recipe")
    build: Callable[..., nn.Module] = getattr(tv.models, name)
    model = _sources.seeded(lambda: build(weights=None), seed)
    if random_weights:
        return model.eval()
    env, filename = WEIGHTS[name]
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    path = _sources.locate(
        weights, env, what=f"torchvision's {name} IMAGENET1K_V1 weights ({filename})",
        how=(f"Download https://download.pytorch.org/models/{filename} and put it in {hub} "
             "(where torchvision looks for it) or anywhere else."),
        accept=_sources.first_file(filename), fallbacks=[hub],
    )  # fmt: skip
    return _sources.load_state_dict(model, path, what=f"torchvision's {name}")


def _examples(
    random_weights: bool,
    n_real: int,
    n_examples: int | None,
    batch_size: int,
    seed: int,
    **read: Any,
) -> list[tuple[Tensor, Tensor]]:
    """The images, random or read, as ``(pixels, labels)`` batches."""
    _sources.check_count("n_examples", n_examples, at_most=n_real)
    _sources.check_count("batch_size", batch_size)
    if random_weights:
        images = _sources.synthetic_images(n_examples or n_real, CROP, 1000, seed=seed)
    else:
        images = imagenet_val(n_examples=n_examples, **read)
    return B.split(images, batch_size)


def imagenet_resnet50(
    *,
    data_dir: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    model: nn.Module | None = None,
    random_weights: bool = False,
    n_examples: int | None = None,
    batch_size: int = 200,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> dict[str, Any]:
    """Setup B: ResNet-50 (IMAGENET1K_V1), 22,720 conv filters, 50,000 validation images.

    Usable from a run configuration as ``factory = "coarpy.recipes:imagenet_resnet50"``.
    The paper's settings: α = 0.05, 100,000 masks, output :func:`imagenet_margin`.

    Parameters
    ----------
    data_dir : the validation images in class folders (default
        ``$COARPY_IMAGENET_VAL``; see :func:`imagenet_val`).
    weights : ``resnet50-0676ba61.pth`` (default ``$COARPY_RESNET50_WEIGHTS``, else
        torch hub's checkpoint folder).
    model : use this ResNet instead of torchvision's (its own weights; e.g. a
        fine-tuned one); the component set is :func:`resnet_reference_spec`'s.
    random_weights : random weights and random images of the real shape (uint8,
        (n, 3, 224, 224)); needs no file. Mind the default of 50,000 images (7.5 GB):
        pass ``n_examples``.
    n_examples : keep the first ``n_examples`` images.
    batch_size : images per forward pass (a run configuration's ``batch_size``, when
        set, takes precedence).
    cache_dir : keep the decoded images there (see :func:`imagenet_val`).
    seed : the seed of the random weights and images.
    workers : threads decoding images.

    Returns
    -------
    ``{"model", "data", "components", "output": imagenet_margin, "alpha", "n_masks",
    "setup"}``; ``data`` is a list of ``(pixels, labels)`` batches, pixels uint8
    (batch, 3, 224, 224).

    Raises
    ------
    MissingExtraError : torchvision is not installed (and no ``model`` was given).
    DatasetNotFoundError : the weights or the images are not there.
    """
    if model is None:
        model = _torchvision_model(
            "resnet50", weights=weights, random_weights=random_weights, seed=seed
        )
    data = _examples(
        random_weights, 50_000, n_examples, batch_size, seed, data_dir=data_dir,
        cache_dir=cache_dir, workers=workers,
    )  # fmt: skip
    return {
        "model": model.eval(),
        "data": data,
        "components": Components.from_spec(model, resnet_reference_spec(model)),
        "output": imagenet_margin,
        **settings("imagenet_resnet50"),
    }


def imagenet_vit_b16(
    *,
    data_dir: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    model: nn.Module | None = None,
    random_weights: bool = False,
    every: int = 10,
    n_examples: int | None = None,
    batch_size: int = 200,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> dict[str, Any]:
    """Setup C: ViT-B/16 (IMAGENET1K_V1), 82,944 linear rows, 5,000 validation images.

    Usable from a run configuration as ``factory = "coarpy.recipes:imagenet_vit_b16"``.
    The paper's settings: α = 0.05, 5,000 masks (fewer than components), output
    :func:`imagenet_margin`. The components are :func:`vit_reference_spec`'s: per
    block, the 3,072 rows of the attention's input and output projections (ablated by
    zeroing rows of ``in_proj_weight`` and ``out_proj.weight`` in place, since
    ``nn.MultiheadAttention`` calls no module a hook could mask), and the rows of the
    MLP's two linear layers (3,072 + 768).

    Parameters
    ----------
    data_dir, batch_size, cache_dir, workers, seed : as for :func:`imagenet_resnet50`.
    weights : ``vit_b_16-c867db91.pth`` (default ``$COARPY_VIT_B16_WEIGHTS``, else torch
        hub's checkpoint folder).
    model : use this vision transformer instead of torchvision's.
    random_weights : random weights and random images of the real shape.
    every : keep every ``every``-th validation image (the paper: 10).
    n_examples : keep the first ``n_examples`` of those.

    Returns
    -------
    As :func:`imagenet_resnet50`.
    """
    _sources.check_count("every", every)
    if model is None:
        model = _torchvision_model(
            "vit_b_16", weights=weights, random_weights=random_weights, seed=seed
        )
    data = _examples(
        random_weights, -(-50_000 // every), n_examples, batch_size, seed, data_dir=data_dir,
        every=every, cache_dir=cache_dir, workers=workers,
    )  # fmt: skip
    return {
        "model": model.eval(),
        "data": data,
        "components": Components.from_spec(model, vit_reference_spec(model)),
        "output": imagenet_margin,
        **settings("imagenet_vit_b16"),
    }
