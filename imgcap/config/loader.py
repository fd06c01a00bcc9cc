"""Declarative job configuration: TOML files loaded into typed, validated dataclasses.

Every job reads one TOML file whose tables map onto the dataclasses below. Loading rejects unknown keys,
wrong types and out-of-range values with a message naming the file, the key and what to change, so a bad
config fails before any data is read or any Ray worker starts.

Relative paths in a config are resolved against the directory of the config file, so a config can be run
from anywhere; a value with a scheme (``s3://...``, ``imgcap:flickr8k``) is a URI or a name, not a path.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

IdFrom = Literal["stem", "relpath", "uri"]
CaptionFormat = Literal["auto", "flickr8k", "csv", "coco", "karpathy"]


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message says which key and how to fix it."""


T = TypeVar("T")


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


# A scheme of two or more letters: "s3://bucket/x", "imgcap:flickr8k"; not a Windows drive ("C:\\x").
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")
_PATH_KEYS = {"captions", "features", "train_split", "dev_split", "glove_path", "output_dir",
              "path", "weights_file", "bundle", "references", "split", "storage_path", "resume_from", "init_from"}


def _coerce(value: Any, annotation: Any, where: str, base: Path) -> Any:
    """Check `value` against a (resolved) type annotation and convert nested tables to dataclasses."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        require(isinstance(value, dict), f"{where} must be a table, got {value!r}")
        return _build(annotation, value, where, base)
    if origin is Literal:
        choices = typing.get_args(annotation)
        require(value in choices, f"{where} must be one of {', '.join(map(repr, choices))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        inner = [a for a in options if a is not type(None)]
        return _coerce(value, inner[0], where, base)
    if origin in (list, tuple):
        require(isinstance(value, list), f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(annotation)[:1]
        return type(origin())(_coerce(v, item, f"{where}[{i}]", base) for i, v in enumerate(value))
    if annotation is float:
        require(isinstance(value, (int, float)) and not isinstance(value, bool),
               f"{where} must be a number, got {value!r}")
        return float(value)
    if annotation is int:
        require(isinstance(value, int) and not isinstance(value, bool), f"{where} must be an integer, got {value!r}")
        return value
    if annotation in (str, bool):
        require(isinstance(value, annotation), f"{where} must be a {annotation.__name__}, got {value!r}")
        return value
    return value


def _build(cls: type[T], table: dict[str, Any], where: str, base: Path) -> T:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - known)
    require(not unknown, f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in table.items():
        key = f"{where}.{name}" if where else name
        value = _coerce(value, hints[name], key, base)
        if name in _PATH_KEYS and isinstance(value, str) and value and not _URI.match(value):
            value = str((base / value).resolve()) if not Path(value).is_absolute() else value
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required table or key is missing
        raise ConfigError(f"{where or 'config'}: {exc}") from None
    except ConfigError as exc:  # messages of __post_init__ name keys relative to their own table
        raise ConfigError(f"{where}.{exc}" if where else str(exc)) from None


def config_from_dict(cls: type[T], table: dict[str, Any], base_dir: str | Path = ".") -> T:
    """Build and validate a config dataclass from a plain dict (as parsed from TOML)."""
    return _build(cls, table, "", Path(base_dir).resolve())


def read_config_table(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The TOML table of `path` with dotted-key `overrides` (e.g. {"train.epochs": 2}) applied."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        node = table
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            require(isinstance(node, dict), f"override {dotted!r}: {part!r} is a value, not a table")
        node[leaf] = value
    return table


def load_config(cls: type[T], path: str | Path, overrides: dict[str, Any] | None = None) -> T:
    """Load `path` (TOML) into `cls`, applying dotted-key `overrides` (e.g. {"train.epochs": 2}) first."""
    table = read_config_table(path, overrides)
    try:
        return config_from_dict(cls, table, Path(path).parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """The plain-dict form of a config dataclass (for recording in bundles and checkpoints)."""
    return dataclasses.asdict(config)



