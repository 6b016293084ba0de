"""Run configuration: a TOML file that names a factory for the model and data.

This module owns the one way a configuration is read (:func:`load_config`: a
``RunConfig``, a TOML file, or a run directory, local or on an fsspec URL), the one way
it becomes ``coarpy.collect`` arguments (:func:`collect_settings`), and the copy kept
next to the run (:func:`save_config`).

Nothing is ``exec``'d: the factory is imported by name (``"package.module:function"``)
and called with the ``[factory_args]`` table. It returns a mapping with ``model`` and
``data`` (the fixed examples), and optionally ``output`` (a callable or built-in
name), ``components`` (a ``Components`` or a ``{module: kind}`` spec) and
``heldout`` (other examples, e.g. for editing).

Trust model: a configuration is code. Its ``factory`` names a module that is imported
and a function that is called, with your permissions, so ``factory =
"subprocess:run"`` runs a program: trust a configuration, and a run directory (its
``config.toml``), exactly as you would a pickle from the same source. The commands that
need the model import the factory: ``coar collect``, ``coar worker``, ``coar evaluate``,
``coar edit`` and ``coar fit`` (its default gradient prior; and the launchers, whose
workers run ``coar worker``). The commands that do not need it import nothing a
configuration names: ``coar status``, ``coar report``, ``coar verify`` and ``coar fit
--prior none`` read only the store, the attributions and the results. Loading a
configuration (:func:`load_config`) parses and checks the TOML without importing
anything; only :meth:`RunConfig.build` imports the factory.

Every field is checked when a configuration is made or read (``ConfigError`` naming
the file and the field), before anything is imported, built or written.

Example ``run.toml``::

    factory = "coarpy.demo:digits_setup"
    path = "runs/digits"
    n_masks = 2000
    alpha = 0.05

    [factory_args]
    cache_dir = "runs/cache"
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from .. import _checks, _fs
from .._engine import AUTOCAST
from .._imports import import_object
from ..components import Components
from ..errors import ArgumentError, ConfigError
from ..masks import SAMPLERS
from . import layout


@dataclass(frozen=True)
class RunConfig:
    """Settings of one run; the fields mirror ``coarpy.collect``'s arguments."""

    factory: str
    path: str
    n_masks: int
    alpha: float
    seed: int = 0
    sampler: str = "bernoulli"
    block_size: int = 100
    batch_size: int | None = None
    device: str | None = None
    mode: str = "zero"
    output: str | None = None
    kinds: tuple[str, ...] | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    components: dict[str, str] | None = None
    autocast: str | None = None
    dtype: str = "float32"
    prefix: str | None = None
    compile_model: bool = False
    factory_args: dict[str, Any] = field(default_factory=dict)
    device_budget: int | None = None

    def __post_init__(self) -> None:
        try:
            _check_fields(self)
        except ArgumentError as err:
            raise ConfigError(f"{err} Fix the run configuration.") from None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, where: str = "config") -> RunConfig:
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise ConfigError(
                f"{where}: unknown field(s) {', '.join(unknown)}. Known fields: {', '.join(names)}."
            )
        missing = [
            n
            for n, f in names.items()
            if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and n not in raw
        ]
        if missing:
            raise ConfigError(f"{where}: missing required field(s) {', '.join(missing)}.")
        values = dict(raw)
        for key in ("kinds", "include", "exclude"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        checks = {
            "n_masks": (int,),
            "alpha": (int, float),
            "seed": (int,),
            "block_size": (int,),
            "factory": (str,),
            "path": (str,),
        }
        for key, types in checks.items():
            if key in values and (
                not isinstance(values[key], types) or isinstance(values[key], bool)
            ):
                raise ConfigError(
                    f"{where}: {key} should be {types[0].__name__}, got {values[key]!r}."
                )
        try:
            return cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None

    @classmethod
    def from_text(cls, text: str, *, where: str = "config") -> RunConfig:
        """Parse TOML text (``where`` names its origin in error messages)."""
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{where} is not valid TOML: {err}") from err
        return cls.from_dict(raw, where=where)

    @classmethod
    def load(cls, source: str | os.PathLike) -> RunConfig:
        """Read a TOML file, or the configuration a run directory holds (:func:`load_config`)."""
        return load_config(source)

    def to_toml(self) -> str:
        """The configuration as TOML text (saved next to the run).

        Written by ``tomli-w``, read back by ``tomllib``: ``RunConfig.from_text(cfg.to_toml())
        == cfg``. Fields left at ``None`` and an empty ``factory_args`` are left out.
        """
        raw = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or (isinstance(value, dict) and not value):
                continue
            raw[f.name] = value
        try:
            return tomli_w.dumps(raw)
        except TypeError as err:  # e.g. a None or an object in factory_args
            raise ConfigError(
                f"Cannot write this configuration as TOML: {err}. factory_args may hold "
                "strings, numbers, booleans, lists and tables only."
            ) from err

    def build(self) -> Setup:
        """Import and call the factory (trusted code: see the module's docstring), and
        resolve components and the output function."""
        try:
            factory = import_object(self.factory)
        except ArgumentError as err:
            raise ConfigError(f"factory = {self.factory!r}: {err}") from err
        except Exception as err:  # the module raised while it was imported
            raise ConfigError(
                f"factory = {self.factory!r}: importing it raised {type(err).__name__}: {err}. "
                "Fix the module the configuration names."
            ) from err
        if not callable(factory):
            raise ConfigError(
                f"factory = {self.factory!r} names a {type(factory).__name__}, not a function. "
                "Name a function that returns {'model': ..., 'data': ...}."
            )
        try:
            inspect.signature(factory).bind(**self.factory_args)
        except TypeError as err:
            raise ConfigError(
                f"[factory_args] {sorted(self.factory_args)} do not fit {self.factory}: {err}. "
                "Give the arguments the factory takes."
            ) from None
        except ValueError:
            pass  # no signature to check (a builtin): let the call say
        made = factory(**self.factory_args)
        if not isinstance(made, Mapping) or "model" not in made or "data" not in made:
            keys = f" with keys {list(made)}" if isinstance(made, Mapping) else ""
            raise ConfigError(
                f"Factory {self.factory} must return a mapping with 'model' and 'data', got "
                f"{type(made).__name__}{keys}."
            )
        model = made["model"]
        comps = made.get("components")
        if self.components is not None:
            comps = Components.from_spec(model, self.components)
        elif self.kinds is not None:
            comps = Components.discover(
                model, kinds=self.kinds, include=self.include, exclude=self.exclude
            )
        elif isinstance(comps, Mapping):
            comps = Components.from_spec(model, comps)
        if not isinstance(comps, Components):
            raise ConfigError(
                "No components: set `kinds = [...]` or a [components] table in the config, "
                "or return 'components' from the factory."
            )
        output = self.output or made.get("output") or "margin"
        return Setup(model=model, components=comps, data=made["data"], output=output, extra=made)


@dataclass(frozen=True)
class Setup:
    """What a factory builds: the model, its components, the examples, the output."""

    model: Any
    components: Components
    data: Any
    output: Any
    extra: Mapping[str, Any]


def load_config(source: RunConfig | str | os.PathLike) -> RunConfig:
    """The run configuration ``source`` names: itself, a TOML file, or a run directory.

    A run directory holds its configuration as ``config.toml``; its store is the
    directory itself (the ``path`` the file records is replaced by it, so a run that
    was moved or copied is resumed where it is, never where it was). A URL such as
    ``s3://bucket/run/config.toml`` is read with fsspec. This is the only place a
    configuration is read; nothing it names is imported.

    Raises
    ------
    ConfigError
        There is no configuration there, or it is not valid TOML, or a field is
        unknown, missing or of the wrong type.
    """
    if isinstance(source, RunConfig):
        return source
    where = layout.where(source)
    is_run = where.is_dir()
    file = where / layout.CONFIG if is_run else where
    try:
        raw = file.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        if is_run:
            raise ConfigError(
                f"{source} has no {layout.CONFIG}. Runs started from Python have none: use "
                "the Python API for them, or start the run with `coar collect CONFIG`."
            ) from None
        raise ConfigError(
            f"No run configuration at {file}. Pass a TOML configuration file, a run "
            "directory made by `coar collect CONFIG`, or a coarpy.runs.RunConfig."
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{file} is not valid TOML: it is not UTF-8 text ({err}). Restore the file."
        ) from None
    cfg = RunConfig.from_text(text, where=str(file))
    if is_run and cfg.path != str(where):
        # a run directory's store is the directory itself, wherever it was moved or copied
        cfg = dataclasses.replace(cfg, path=str(where))
    return cfg


def build(run: RunConfig | str | os.PathLike) -> Setup:
    """Rebuild the model, components and data of a run from its configuration."""
    return load_config(run).build()


def collect_settings(cfg: RunConfig, output: Any) -> dict[str, Any]:
    """The ``coarpy.collect`` arguments a configuration fixes; the only such mapping.

    Every field of :class:`RunConfig` that is an argument of ``collect`` is passed
    (a test checks this), so every way of collecting a run computes the same store.
    """
    return {
        "output": output,
        "path": cfg.path,
        "n_masks": cfg.n_masks,
        "alpha": cfg.alpha,
        "seed": cfg.seed,
        "sampler": cfg.sampler,
        "block_size": cfg.block_size,
        "batch_size": cfg.batch_size,
        "device": cfg.device,
        "mode": cfg.mode,
        "autocast": cfg.autocast,
        "dtype": cfg.dtype,
        "prefix": cfg.prefix,
        "compile_model": cfg.compile_model,
        "device_budget": cfg.device_budget,
    }


def save_config(cfg: RunConfig) -> None:
    """Keep the configuration next to the run, as ``RUN/config.toml``.

    Workers finishing together write the same text; each write is atomic, and an
    unchanged file is not rewritten. A worker of a run that has grown since it started
    (a saved configuration equal but for a larger ``n_masks``) leaves the file alone.
    """
    run = layout.where(cfg.path)
    run.mkdir(parents=True, exist_ok=True)
    target = run / layout.CONFIG
    text = cfg.to_toml()
    try:
        saved = target.read_text()
    except FileNotFoundError:
        saved = None
    if saved == text:
        return
    if saved is not None:
        try:
            kept = RunConfig.from_text(saved)
        except ConfigError:
            kept = None
        if kept is not None and kept.n_masks > cfg.n_masks:
            grown = dataclasses.replace(cfg, n_masks=kept.n_masks, path=kept.path)
            if grown == kept:
                return
    _fs.atomic_write(target, text.encode())


def _check_fields(cfg: RunConfig) -> None:
    """Check every field's type and value (ArgumentError naming the field)."""
    factory = _checks.text(cfg.factory, "factory")
    module, sep, attr = factory.partition(":")
    if not (sep and module.strip() and attr.strip()):
        raise ArgumentError(
            f"factory must be 'package.module:function', got {factory!r}, e.g. "
            "'coarpy.demo:digits_setup'."
        )
    _checks.text(cfg.path, "path")
    _checks.positive(cfg.n_masks, "n_masks", fix="Collect at least one mask.")
    _checks.fraction(cfg.alpha)
    _checks.seed(cfg.seed)
    _checks.choice(cfg.sampler, "sampler", SAMPLERS)
    _checks.positive(cfg.block_size, "block_size", fix="Masks per block file, e.g. 100.")
    _checks.batch_size(cfg.batch_size)
    _checks.device(cfg.device)
    if cfg.mode != "zero":
        raise ArgumentError(
            f"mode must be 'zero' in a run configuration, got {cfg.mode!r}: mean ablation "
            "needs means, which a configuration cannot give. Use coarpy.collect(..., "
            "mode='mean', means=...) from Python."
        )
    if cfg.output is not None:
        _checks.text(cfg.output, "output")
    for name in ("kinds", "include", "exclude"):
        value = getattr(cfg, name)
        if value is not None and (
            not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value)
        ):
            raise ArgumentError(f"{name} must be a list of strings, got {value!r}.")
    if cfg.components is not None and not (
        isinstance(cfg.components, Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in cfg.components.items())
    ):
        raise ArgumentError(
            "components must be a table of module = kind strings, e.g. [components] "
            f'"features.0" = "conv"; got {cfg.components!r}.'
        )
    if cfg.autocast is not None and cfg.autocast not in AUTOCAST:
        raise ArgumentError(
            f"autocast must be one of {tuple(AUTOCAST)} (or left out), got {cfg.autocast!r}."
        )
    _checks.choice(cfg.dtype, "dtype", ("float32", "float16"))
    if cfg.prefix is not None:
        _checks.text(cfg.prefix, "prefix")
    _checks.flag(cfg.compile_model, "compile_model")
    _checks.device_budget(cfg.device_budget)
    _checks.mapping(cfg.factory_args, "factory_args")
