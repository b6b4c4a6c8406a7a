"""Typed configuration: dataclasses loaded from YAML, unknown keys rejected with the valid ones listed.

    recipe = load_config(DataRecipe, "configs/data/diffutron-cpt.yaml")
    recipe = override(recipe, {"pack.max_length": 256})

Nested dataclasses, lists of dataclasses and Optional fields are built from plain YAML mappings.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from diffutron.errors import UsageError

T = TypeVar("T")
# words YAML 1.1 reads as booleans; a text field gets them back as text from parse_value
BOOLEAN_WORDS = {"yes": True, "no": False, "on": True, "off": False, "true": True, "false": False}


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from a mapping; nested mappings become nested dataclasses."""
    data = data or {}
    if not isinstance(data, dict):
        raise UsageError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UsageError(
            f"{where or cls.__name__}: unknown key{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
            f"valid keys: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    values = {name: _convert(hints[name], value, f"{where}{name}") for name, value in data.items()}
    return cls(**values)


def _convert(hint, value, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in args if a is not type(None)]
        hint, origin, args = options[0], typing.get_origin(options[0]), typing.get_args(options[0])
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where + ".")
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise UsageError(f"{where}: expected a list")
        return [from_dict(args[0], item, f"{where}[{i}].") for i, item in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 2e-3 (no dot) as text
            return float(value)
        except ValueError:
            pass
    if hint is bool and isinstance(value, str) and value.lower() in BOOLEAN_WORDS:
        return BOOLEAN_WORDS[value.lower()]
    if hint is str and isinstance(value, bool):
        # YAML 1.1 reads no/yes/off/on as booleans
        raise UsageError(f"{where}: expected text, got {value!r} (YAML reads no/yes/on/off as booleans: quote it)")
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise UsageError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def parse_value(text: str):
    """A command-line value: YAML (numbers, lists, null), but yes/no/on/off stay text until a field's
    type says otherwise, so `--set train.precision=no` means the text and `--set train.plot=no` False."""
    if text.strip().lower() in BOOLEAN_WORDS.keys() - {"true", "false"}:
        return text.strip()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"{text!r} is not a valid value ({str(e).splitlines()[0]})") from None


def load_config(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return from_dict(cls, data, where=f"{path.name}: ")


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def override(config: T, changes: dict[str, Any]) -> T:
    """A copy of `config` with dotted keys ("pack.max_length") replaced (None sets a field to None)."""
    data = to_dict(config)
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return from_dict(type(config), data)
