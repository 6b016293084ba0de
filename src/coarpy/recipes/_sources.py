"""Where a recipe's data and weights come from, shared by the recipes.

A file is taken from the argument the user passed, else from an environment variable,
else from where the library that ships it would have stored it; nothing is ever
downloaded. When it is not found, the error names what to download, from where, and
where to put it. Synthetic stand-ins of the real shapes serve tests and benchmarks.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import _fs
from ..errors import ArgumentError, DatasetFormatError, DatasetNotFoundError, MissingExtraError


def locate(
    given: str | os.PathLike | None,
    env: str,
    *,
    what: str,
    how: str,
    accept: Callable[[Path], Path | None],
    fallbacks: Sequence[Path] = (),
) -> Path:
    """The first usable path among ``given``, ``$env`` and ``fallbacks``.

    ``accept(path)`` returns the file or folder to read under ``path`` (the path
    itself, or a file inside it), or None when ``path`` does not hold the data.

    Raises
    ------
    DatasetNotFoundError : none holds it; the message says ``how`` to get it and where
        to put it.
    """
    tried = []
    candidates: list[tuple[str, Path]] = []
    if given is not None:
        candidates.append(("the path passed", Path(given)))
    else:
        if os.environ.get(env):
            candidates.append((f"${env}", Path(os.environ[env])))
        candidates += [("the default place", p) for p in fallbacks]
    for origin, path in candidates:
        found = accept(path.expanduser())
        if found is not None:
            return found
        tried.append(f"{origin} {str(path)!r}")
    if tried:
        looked = "; looked at " + ", ".join(tried)
    else:
        looked = f"; no path was given and ${env} is unset"
    raise DatasetNotFoundError(
        f"{what} not found{looked}. {how} Then pass its path to the recipe, or set "
        f"{env}=PATH. Nothing is downloaded automatically."
    )


def first_file(*names: str) -> Callable[[Path], Path | None]:
    """An ``accept`` for :func:`locate`: the path if it is one of ``names`` or a file,
    else the first of ``names`` inside it (searched one folder deep too)."""

    def accept(path: Path) -> Path | None:
        if path.is_file():
            return path
        if not path.is_dir():
            return None
        for name in names:
            for found in (path / name, *sorted(path.glob(f"*/{name}"))):
                if found.exists():
                    return found
        return None

    return accept


def check_count(name: str, value: int | None, *, at_most: int | None = None) -> None:
    """Refuse a count that is not a positive int (None passes)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArgumentError(f"{name} must be a positive int or None, got {value!r}.")
    if at_most is not None and value > at_most:
        raise ArgumentError(
            f"{name} must be at most {at_most:,} (the size of the data set), got {value:,}."
        )


def load_state_dict(model: nn.Module, path: Path, *, what: str) -> nn.Module:
    """Load the weights at ``path`` (a state dict saved with ``torch.save``) into ``model``.

    Read with ``weights_only=True``: a weight file cannot run code.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DatasetFormatError(
            f"{path} is not a readable state dict for {what} ({type(err).__name__}: {err}). "
            "Pass the .pth file of the weights (a state dict saved with torch.save)."
        ) from err
    if not isinstance(state, dict):
        raise DatasetFormatError(
            f"{path} holds a {type(state).__name__}, not a state dict, for {what}. Save "
            "the weights with torch.save(model.state_dict(), path)."
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise DatasetFormatError(
            f"{path} does not fit {what}: {first}. Pass the weights of this architecture."
        ) from err
    return model.eval()


def save_state_dict(model: nn.Module, path: Path) -> None:
    """Save ``model``'s weights at ``path`` atomically (a killed process leaves none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    _fs.atomic_write(path, buffer.getvalue())


def require(module: str, install: str, purpose: str):
    """Import ``module`` or raise MissingExtraError saying what to ``pip install``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{purpose} needs {module}, which is not installed: pip install {install}."
        ) from err


def seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` with the global RNG seeded by ``seed`` and restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def synthetic_images(n: int, size: int, n_classes: int, *, seed: int) -> tuple[Tensor, Tensor]:
    """Random uint8 images (n, 3, size, size) and int64 labels (n,) in [0, n_classes)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    return x, torch.randint(0, n_classes, (n,), generator=gen)
