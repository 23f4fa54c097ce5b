"""Dict <-> dataclass conversion with errors that name the key path, the bad value and the fix."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, TypeVar, Union

__all__ = ["RecipeError", "build_dataclass", "check_choice", "to_plain"]

T = TypeVar("T")


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the key, the bad value and what is allowed."""


def check_choice(key: str, value: Any, allowed: typing.Sequence[Any]) -> None:
    """Raise a RecipeError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        listed = ", ".join(str(a) for a in allowed)
        raise RecipeError(f"`{key}` must be one of {listed}; got {value!r}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except RecipeError as err:
                errors.append(str(err))
        raise RecipeError(errors[0] if len(errors) == 1 else f"`{path}` has an invalid value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"`{path}` must be a list; got {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_convert(item, item_type, f"{path}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"`{path}` must be a mapping; got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise RecipeError(f"`{path}` must be a mapping of {tp.__name__} fields; got {value!r}")
        return build_dataclass(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"`{path}` must be true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"`{path}` must be an integer; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"`{path}` must be a number; got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"`{path}` must be a string; got {value!r}")
        return value
    if tp is Any:
        return value
    raise RecipeError(f"`{path}` has unsupported type {_type_name(tp)}")  # pragma: no cover


def build_dataclass(cls: type[T], data: dict[str, Any], path: str) -> T:
    """Validate ``data`` against the fields of ``cls`` (recursively) and build it.

    Unknown keys raise an error that suggests the nearest known key; values are type-checked
    before ``__post_init__`` checks their ranges.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean `{_join(path, close[0])}`?" if close else ""
            raise RecipeError(f"unknown key `{_join(path, str(key))}`{hint} (known keys: {', '.join(fields)})")
    kwargs = {key: _convert(value, hints[key], _join(path, key)) for key, value in data.items()}
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise RecipeError(f"`{_join(path, missing[0])}` is required")
    return cls(**kwargs)


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts, recursively (YAML/JSON friendly)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
