"""Flat YAML recipes loaded into frozen dataclasses.

A recipe names every setting explicitly (INC's own parameter names for
quantization); unknown keys and wrong types are refused rather than ignored,
and command-line flags override what the recipe says.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

from tangquant.errors import RecipeError

T = TypeVar("T")


def _check_type(cls: type, name: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        annotation = next(a for a in args if a is not type(None))
        origin = typing.get_origin(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is typing.Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{cls.__name__}: '{name}' must be a list, got {value!r}")
        return tuple(value)
    expected = origin or annotation
    if isinstance(expected, type) and (not isinstance(value, expected)
                                       or (expected is int and isinstance(value, bool))):
        hint = " (write floats like 0.01, not 1e-2)" if expected is float and isinstance(value, str) else ""
        raise RecipeError(f"{cls.__name__}: '{name}' must be {expected.__name__}, "
                          f"got {value!r}{hint}")
    return value


def from_dict(cls: type[T], data: dict, source: str = "recipe") -> T:
    if not isinstance(data, dict):
        raise RecipeError(f"{source} must be a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RecipeError(f"{source}: unknown key(s) {', '.join(unknown)}; "
                          f"known keys are {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {k: _check_type(cls, k, v, hints[k]) for k, v in data.items()}
    return cls(**values)


def load(cls: type[T], path: str | Path | None, overrides: dict | None = None) -> T:
    """Load ``path`` (may be None: the dataclass defaults) and apply non-None overrides."""
    data: dict = {}
    if path is not None:
        data = read_yaml(Path(path))
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    return from_dict(cls, data, source=str(path) if path else "settings")


def read_yaml(path: Path) -> dict:
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} does not exist") from None
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a flat mapping of keys to values")
    return data


def save(obj: Any, path: Path) -> None:
    """Write the resolved recipe next to an output, in the same flat YAML form."""
    import yaml

    data = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
