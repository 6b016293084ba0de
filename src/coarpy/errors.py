"""The exceptions coarpy raises: one base class, one subclass per kind of mistake.

Every message says what was expected, what was got, and how to fix it.
"""

from __future__ import annotations


class CoarError(Exception):
    """Base class of every error coarpy raises on purpose."""


class ArgumentError(CoarError, ValueError, TypeError):
    """An argument has a wrong type or value (a negative batch size, an unknown name)."""


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


class DataError(CoarError, ValueError):
    """The examples or batches given cannot be used (empty, wrong shape, wrong type)."""


class EvaluationError(CoarError, ValueError):
    """Evaluation was asked for with inconsistent inputs."""


class ConfigError(CoarError, ValueError):
    """A run configuration file is missing a field or has a wrong value."""


class LaunchError(CoarError, RuntimeError):
    """Workers failed more often than allowed, or a launcher cannot run here."""


class SplitError(CoarError, ValueError):
    """A model cannot be cut where asked, or the cut does not reproduce the model."""


class ReportError(CoarError, ValueError):
    """A plot or report was asked for with inputs that do not fit together."""


class DatasetError(CoarError):
    """A bundled or recipe dataset cannot be loaded."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The data, or the package that ships it, is not installed."""


class DatasetFormatError(DatasetError, ValueError):
    """A data file is not in the format it should be."""


class StorageError(CoarError, OSError):
    """Writing a file of a run failed (disk full, quota, read-only filesystem); nothing
    partial was left behind."""
