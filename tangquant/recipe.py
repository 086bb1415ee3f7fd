"""Stage parameters: one frozen dataclass per stage, from which flags and recipe keys derive.

A stage declares each parameter once, with :func:`param` (default, help, and
how it looks on the command line). :func:`add_flags` turns the fields into
argparse flags (plus ``--recipe``), :func:`resolve` reads a flat YAML recipe
of the same keys and applies the flags on top, and :func:`save` writes the
resolved values beside an output. Unknown keys and wrong types are refused
rather than ignored; a value out of range is refused by the dataclass itself
(``__post_init__`` raising :class:`ParameterError`), so every parameter of a
stage is checked before the stage writes anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, TypeVar

from tangquant.errors import ParameterError, RecipeError

T = TypeVar("T")
MAX_RECIPE_BYTES = 1 << 20  # recipes are a few hundred bytes; refuse anything that is not one
# The range every integer parameter must lie in (a C int64), and the seeds' (numpy's, torch's,
# OpenVINO's and Python's generators all take 0..2³²-1), so no stage fails inside a library.
INT_RANGES = {None: (-(1 << 63), (1 << 63) - 1), "seed": (0, (1 << 32) - 1)}


def param(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
          short: str | None = None, negative: str | None = None, choices: tuple | None = None,
          metavar: str | None = None, repeat: bool = False, alias: str | None = None):
    """A stage parameter: its default, help text and, where it differs from ``--name``, its flag.

    ``negative`` names the flag that sets a boolean to False (``--asym`` for ``use_sym``);
    ``repeat`` makes a tuple field a repeatable flag instead of a comma list; ``alias`` is an
    older name of the parameter still accepted as a flag and a recipe key.
    """
    meta = {"help": help, "flag": flag, "short": short, "negative": negative, "choices": choices,
            "metavar": metavar, "repeat": repeat, "alias": alias}
    return dataclasses.field(default=default, metadata=meta)


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _unwrap(annotation):
    """(base type, element type or None) of ``X | None`` / ``tuple[X, ...]`` annotations."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        annotation = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (tuple, list):
        return tuple, args[0] if args else str
    return annotation, None


def _comma_list(elem):
    def parse(text: str):
        try:
            return tuple(elem(part.strip()) for part in str(text).split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list of {elem.__name__}, "
                                             f"got {text!r}") from None
    return parse


def add_flags(parser, cls: type, recipe_help: str | None = None, recipe_flag: bool = True) -> None:
    """Add ``--recipe`` (unless ``recipe_flag`` is False) and one flag per field of ``cls``
    (all default None: unset, so a recipe's value or the field's default applies)."""
    if recipe_flag:
        parser.add_argument("--recipe", metavar="FILE",
                            help=recipe_help or "flat YAML recipe whose keys are the flags' names "
                            "with _ for -; flags override it")
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"parameters (recipe keys: {', '.join(f.name for f in dataclasses.fields(cls))})")
    for f in dataclasses.fields(cls):
        meta = f.metadata
        kind, elem = _unwrap(hints[f.name])
        names = [flag_name(f)] + ([meta["short"]] if meta.get("short") else [])
        # The recipe key spelled as a flag (--use-sym for use_sym) and an alias are accepted too.
        for other in (f.name, meta.get("alias")):
            if other and "--" + other.replace("_", "-") not in names:
                names.append("--" + other.replace("_", "-"))
        shown = "" if f.default in (None, (), dataclasses.MISSING) else f" (default {_shown(f.default)})"
        kwargs = {"dest": f.name, "default": None, "help": (meta.get("help") or "") + shown}
        if kind is bool and meta.get("negative"):
            pair = group.add_mutually_exclusive_group()
            pair.add_argument(*names, action="store_const", const=True, **kwargs)
            pair.add_argument(meta["negative"], dest=f.name, action="store_const", const=False,
                              default=None, help=f"the opposite of {names[0]}")
            continue
        if kind is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if kind is tuple and meta.get("repeat"):
            group.add_argument(*names, action="append", type=elem, **kwargs)
        elif kind is tuple:
            group.add_argument(*names, type=_comma_list(elem), **kwargs)
        else:
            group.add_argument(*names, type=kind if kind in (int, float) else str,
                               choices=meta.get("choices"), **kwargs)


def _shown(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def from_args(cls: type[T], args, **extra) -> T:
    """The stage's parameters from parsed flags on top of ``args.recipe`` (and ``extra``)."""
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
    overrides.update({k: v for k, v in extra.items() if v is not None})
    return resolve(cls, getattr(args, "recipe", None), overrides)


def resolve(cls: type[T], recipe=None, overrides: dict | None = None) -> T:
    """``recipe`` (None, a YAML path, a mapping or a ``cls``) with the non-None ``overrides`` on top."""
    if isinstance(recipe, cls):
        data, source = dataclasses.asdict(recipe), "parameters"
    elif isinstance(recipe, dict):
        data, source = dict(recipe), "parameters"
    elif recipe is not None:
        data, source = read_yaml(Path(recipe)), str(recipe)
    else:
        data, source = {}, "parameters"
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = list(value) if isinstance(value, tuple) else value
            source = source if source != "parameters" else "flags"
    return from_dict(cls, data, source=source)


def _check_type(cls: type, name: str, value: Any, annotation: Any) -> Any:
    optional = type(None) in typing.get_args(annotation)
    if value is None and optional:
        return None
    kind, elem = _unwrap(annotation)
    if kind is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{cls.__name__}: '{name}' must be a list, got {_short(value)}")
        return tuple(_check_type(cls, name, v, elem) for v in value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, float) and not math.isfinite(value):
        # No stage parameter means anything at NaN or infinity (and NaN passes every range check).
        raise ParameterError(f"{cls.__name__}: '{name}' must be a finite number, got {value}")
    if kind is Any:
        return value
    if isinstance(kind, type) and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        hint = " (write floats like 0.01, not 1e-2)" if kind is float and isinstance(value, str) else ""
        raise RecipeError(f"{cls.__name__}: '{name}' must be {kind.__name__}, got {_short(value)}{hint}")
    if kind is int:
        low, high = INT_RANGES.get(name, INT_RANGES[None])
        if not low <= value <= high:  # every library below takes a C integer, none a bignum
            raise ParameterError(f"{cls.__name__}: '{name}' must be between {low} and {high}, got "
                                 f"{_short(value)}")
    return value


def _short(value: Any, limit: int = 60) -> str:
    """A value for an error message, cut short: a hostile value must not be formatted whole."""
    text = repr(value) if not isinstance(value, (list, dict)) else f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + "…"


def from_dict(cls: type[T], data: dict, source: str = "recipe") -> T:
    if not isinstance(data, dict):
        raise RecipeError(f"{source} must be a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    aliases = {f.metadata["alias"]: f.name for f in fields.values() if f.metadata.get("alias")}
    data = {aliases.get(k, k): v for k, v in data.items()}
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        raise RecipeError(f"{source}: unknown key(s) {', '.join(unknown)[:200]}; "
                          f"known keys are {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {k: _check_type(cls, k, v, hints[k]) for k, v in data.items()}
    return cls(**values)


def read_yaml(path: Path) -> dict:
    import yaml

    path = Path(path)
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe {path} is larger than {MAX_RECIPE_BYTES} bytes; it is not a recipe")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} does not exist") from None
    except IsADirectoryError:
        raise RecipeError(f"recipe {path} is a directory, not a YAML file") from None
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path} is not UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=_flat_loader())
    except RecursionError:
        raise RecipeError(f"recipe {path} is nested too deeply; a recipe is a flat mapping") from None
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"recipe {path} is not valid flat YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a flat mapping of keys to values")
    return data


def _flat_loader():
    import yaml

    class FlatLoader(yaml.SafeLoader):
        """SafeLoader without aliases: a flat recipe never needs one, and nested aliases
        expand exponentially (a few hundred bytes can ask for gigabytes)."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a "
                                                  "recipe", event.start_mark)
            return super().compose_node(parent, index)

    return FlatLoader


def save(obj: Any, path: Path) -> None:
    """Write the resolved recipe next to an output, in the same flat YAML form."""
    import yaml

    data = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def require(condition: bool, message: str) -> None:
    """Raise :class:`ParameterError` with ``message`` unless ``condition`` holds (for ``__post_init__``)."""
    if not condition:
        raise ParameterError(message)
