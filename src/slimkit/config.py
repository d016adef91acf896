"""Base of all configs: frozen dataclasses validated at construction, round trip to dict/YAML.

A config subclass declares its fields with types; ``__post_init__`` of the base checks the
types of every field (str-Enums accept their string values) and then calls ``validate()``
where the subclass checks ranges. Any problem raises ``ConfigError`` (a ``ValueError``)
naming the field, the value and what is allowed. What depends on the model (a group size
dividing each selected layer's input size, ...) a stage config checks in ``check(model,
names)``, which the pipeline calls before any work.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import yaml

from slimkit.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from torch import nn

C = TypeVar("C", bound="Config")


class Granularity(str, enum.Enum):
    PER_TENSOR, PER_CHANNEL, PER_GROUP = "per_tensor", "per_channel", "per_group"


class Scope(str, enum.Enum):
    LAYER, GLOBAL = "layer", "global"


@dataclasses.dataclass(frozen=True)
class Config:
    """Base config. Subclasses are ``@dataclass(frozen=True)`` and may override ``validate``."""

    kind: ClassVar[str] = ""  # recipe stage kind: quantize, prune, ...
    method: ClassVar[str] = ""  # method name inside the kind: rtn, magnitude, ...
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            coerced = _coerce(self._where(f.name), value, hints[f.name])
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        self.validate()

    def validate(self) -> None:
        """Range checks of the subclass; raise via ``self.fail``."""

    def _where(self, name: str) -> str:
        return f"{self.kind}.{self.method}.{name}" if self.kind else name

    def fail(self, name: str, allowed: str) -> typing.NoReturn:
        value = _plain(getattr(self, name))
        raise ConfigError(f"{self._where(name)}: got {value!r}; allowed: {allowed}")

    # -- dict / YAML round trip ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], where: str = "") -> C:
        if not isinstance(data, dict):
            raise ConfigError(
                f"{where or cls.__name__}: expected a mapping of options, got {data!r}"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                prefix = f"{where}: " if where else ""
                raise ConfigError(
                    f"{prefix}unknown key {key!r}{did_you_mean(str(key), names)}; "
                    f"allowed: {', '.join(names)}"
                )
        return cls(**data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls: type[C], text: str) -> C:
        return cls.from_dict(yaml.safe_load(text) or {})


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _coerce(where: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the type ``hint``; return it (converted for enums/tuples)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(hint):
            try:
                return _coerce(where, value, arm)
            except ConfigError as e:
                errors.append(e)
        raise errors[-1]
    if hint is type(None):
        if value is None:
            return value
        raise ConfigError(f"{where}: got {value!r}; allowed: null")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: got {value!r}; allowed: a list")
        (arm, *_rest) = typing.get_args(hint)
        return tuple(_coerce(f"{where}[{i}]", v, arm) for i, v in enumerate(value))
    if origin is typing.Literal:
        allowed = list(typing.get_args(hint))
        if value in allowed:
            return value
        raise ConfigError(
            f"{where}: got {value!r}{did_you_mean(str(value), allowed)}; "
            f"allowed: {', '.join(map(str, allowed))}"
        )
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if isinstance(value, hint):
            return value
        allowed = [m.value for m in hint]
        if value in allowed:
            return hint(value)
        raise ConfigError(
            f"{where}: got {value!r}{did_you_mean(str(value), allowed)}; "
            f"allowed: {', '.join(map(str, allowed))}"
        )
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: got {value!r}; allowed: a number")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: got {value!r}; allowed: an integer")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: got {value!r}; allowed: true or false")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: got {value!r}; allowed: a string")
    return value


@dataclasses.dataclass(frozen=True)
class StageConfig(Config):
    """Options every recipe stage takes: which modules it touches."""

    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()

    def validate(self) -> None:
        from slimkit.select import check_patterns

        if not self.targets:
            self.fail("targets", "a non-empty list of module-name patterns")
        check_patterns(self._where("targets"), self.targets)
        check_patterns(self._where("ignore"), self.ignore)

    def check(self, model: nn.Module, names: Sequence[str]) -> None:
        """Check the options against the layers ``names`` of ``model`` the stage selects,
        before any work (``pipeline.precheck``; handlers may call it again): raise
        ConfigError naming the key, the value and the layers that do not fit it. The base
        has nothing to check."""
