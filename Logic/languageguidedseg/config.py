"""Configuration dataclasses read from plain dictionaries (``model.json``, YAML), strictly.

Every configuration dataclass of the engine and of ``Training/`` derives from :class:`Config`, so there is one
``from_dict``: an unknown key is an error that names the key and the known ones, a value of the wrong type is an
error that names its key, nested sections become their own dataclasses and lists become tuples where a field is a
tuple. ``to_dict`` is the way back (JSON-ready: tuples as lists).
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from typing import Any, Mapping, TypeVar, Union

from .errors import LgsegError

C = TypeVar("C", bound="Config")
T = TypeVar("T")
_UNIONS = (Union, getattr(types, "UnionType", Union))  # ``X | None`` is a types.UnionType from Python 3.10


class Config:
    """Mixin for configuration dataclasses: strict :meth:`from_dict` and JSON-ready :meth:`to_dict`."""

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any], where: str = "") -> C:
        """Build from a mapping; ``where`` names the section in error messages (e.g. ``"network"``)."""
        return from_dict(cls, values, where)

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary of builtin types: nested configs as dictionaries, tuples as lists."""
        return _plain(dataclasses.asdict(self))  # type: ignore[call-overload]


def from_dict(cls: type[T], values: Mapping[str, Any], where: str = "") -> T:
    """The dataclass ``cls`` from ``values``; unknown keys, missing required keys and wrong types are errors."""
    section = where or cls.__name__
    if not isinstance(values, Mapping):
        raise LgsegError(f"{section} must be a mapping of keys to values, not {type(values).__name__}")
    fields = [f for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    known = [f.name for f in fields]
    unknown = [key for key in values if key not in known]
    if unknown:
        raise LgsegError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)} in "
                         f"{section}; known keys: {', '.join(known)}")
    required = [f.name for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise LgsegError(f"{section} needs the key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    kwargs = {}
    for f in fields:
        if f.name in values:
            kwargs[f.name] = _convert(values[f.name], _field_type(cls, f), f"{where}.{f.name}" if where else f.name)
    return cls(**kwargs)


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    """The field's type; a type imported only for type checkers (to keep an import lazy) is taken from the
    field's default factory."""
    if not isinstance(f.type, str):
        return f.type
    namespace = dict(vars(sys.modules[cls.__module__]))
    try:
        return eval(f.type, namespace)  # noqa: S307 - annotations of our own dataclasses
    except NameError:
        if f.default_factory is not dataclasses.MISSING:
            return type(f.default_factory())
        raise


def _convert(value: Any, kind: Any, key: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in _UNIONS:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _convert(value, options[0], key) if len(options) == 1 else value
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        return from_dict(kind, value if value is not None else {}, key)
    if origin is tuple or kind is tuple:
        if not isinstance(value, (list, tuple)):
            raise LgsegError(f"{key} must be a list, not {value!r}")
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            raise LgsegError(f"{key} needs {len(args)} values, got {len(value)}")
        kinds = args if args and args[-1] is not Ellipsis else [args[0] if args else Any] * len(value)
        return tuple(_convert(v, k, f"{key}[{i}]") for i, (v, k) in enumerate(zip(value, kinds)))
    if origin is list or kind is list:
        if not isinstance(value, (list, tuple)):
            raise LgsegError(f"{key} must be a list, not {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or kind is dict:
        if not isinstance(value, Mapping):
            raise LgsegError(f"{key} must be a mapping, not {value!r}")
        return dict(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LgsegError(f"{key} must be a number, not {value!r}")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LgsegError(f"{key} must be a whole number, not {value!r}")
        return value
    if kind in (str, bool) and not isinstance(value, kind):
        raise LgsegError(f"{key} must be {'text' if kind is str else 'true or false'}, not {value!r}")
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
