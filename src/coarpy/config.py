"""Run configuration: a TOML file that names a factory for the model and data.

Nothing is ``exec``'d: the factory is imported by name (``"package.module:function"``)
and called with the ``[factory_args]`` table. It returns a mapping with ``model`` and
``data`` (the fixed examples), and optionally ``output`` (a callable or built-in
name), ``components`` (a ``Components`` or a ``{module: kind}`` spec) and
``heldout`` (other examples, e.g. for editing).

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
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ._imports import import_object
from .components import Components
from .errors import ConfigError


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
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """Read a TOML run configuration."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"No configuration file at {path}.") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path} is not valid TOML: {err}") from err
        return cls.from_dict(raw, where=str(path))

    def to_toml(self) -> str:
        """The configuration as TOML text (saved next to the run)."""
        lines, tables = [], []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, dict):
                if value:
                    tables.append((f.name, value))
                continue
            lines.append(f"{f.name} = {_toml_value(value)}")
        for name, table in tables:
            lines.append(f"\n[{name}]")
            lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items())
        return "\n".join(lines) + "\n"

    def build(self) -> Setup:
        """Call the factory and resolve components and the output function."""
        factory = import_object(self.factory)
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


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else f'"{key}"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"Cannot write {type(value).__name__} {value!r} to TOML.")
