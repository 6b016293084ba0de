"""The exceptions coarpy raises: one base class, one subclass per kind of mistake.

Every message says what was expected, what was got, and how to fix it.
"""

from __future__ import annotations


class CoarError(Exception):
    """Base class of every error coarpy raises on purpose."""


class ComponentError(CoarError, ValueError):
    """A component specification does not match the model."""


class MaskError(CoarError, ValueError):
    """A keep-mask has the wrong shape, dtype or device."""


class StoreMismatchError(CoarError):
    """An existing store was built with other settings than the ones given."""


class StoreCorruptError(CoarError):
    """A file of a store is truncated, altered or not a coarpy file."""


class CollectError(CoarError):
    """Collection failed inside a block (the message names the block)."""


class FitError(CoarError, ValueError):
    """The data cannot support the requested fit."""


class EditError(CoarError, ValueError):
    """An edit was asked for with inconsistent inputs."""


class MissingExtraError(CoarError, ImportError):
    """An optional dependency (an extra such as ``coarpy[report]``) is not installed."""
