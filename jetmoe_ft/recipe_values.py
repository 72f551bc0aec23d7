"""Reading a recipe's values: the YAML file, `--key value` overrides, and each value checked against the type of
its field (YAML reads `2e-5` as a string; `no` as false), with the nearest valid name for a key that is not one."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError


class YamlValue:
    """A field that takes any YAML value (a word, a list, a mapping); on the command line, YAML text."""

    def __new__(cls, text: str) -> Any:
        return yaml.safe_load(text)


def read_recipe_file(path: Path) -> dict[str, Any]:
    """The YAML mapping of a recipe file, with a readable error for a missing or malformed file."""
    if not path.is_file():
        raise RecipeError(f"--config: no recipe file at {path}.")
    try:
        values = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise RecipeError(f"{path}: line {line} is not UTF-8; save the recipe as UTF-8.") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}:{where} is not valid YAML ({getattr(error, 'problem', error)}).") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: a recipe is a flat YAML mapping of `key: value` lines.")
    if "config" in values:
        raise RecipeError(f"{path}: `config` is not a recipe key (it is the --config flag itself).")
    return values


def field_types(dataclass_types) -> dict[str, Any]:
    hints = {}
    for cls in dataclass_types:
        resolved = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                hints[f.name] = resolved.get(f.name, f.type)
    return hints


def did_you_mean(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def command_line_keys(argv: list[str], actions: dict[str, argparse.Action]) -> list[str]:
    """The keys of the `--key value` overrides, refusing unknown ones with a suggestion."""
    keys = []
    for token in argv:
        if token.startswith("--"):
            key = token[2:].split("=", 1)[0].replace("-", "_")
            if key not in actions:
                raise RecipeError(f"--{key}: unknown option{did_you_mean(key, actions)}.")
            keys.append(key)
    return keys


def plain(value: Any) -> Any:
    """A YAML-friendly copy of a parsed value (enums become their value)."""
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return getattr(value, "value", value)


def _allows(annotation, kind: type) -> bool:
    """Whether a type annotation admits values of `kind` (dict, list, NoneType)."""
    if annotation is YamlValue:
        return True
    if annotation is kind or typing.get_origin(annotation) is kind:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_allows(arg, kind) for arg in typing.get_args(annotation))
    return False


def coerce(key: str, value: Any, actions: dict[str, argparse.Action], field_types: dict[str, Any]) -> Any:
    """Check one YAML value against its field, converting what YAML reads loosely (`2e-5` is a string)."""
    if key not in actions:
        raise RecipeError(f"unknown key `{key}`{did_you_mean(key, actions)}.")
    action, annotation = actions[key], field_types.get(key)
    if value is None:
        return value
    if isinstance(value, dict):
        if _allows(annotation, dict):
            return value
        raise RecipeError(f"{key}: expected {_describe(action, annotation)}, got a mapping.")
    if isinstance(value, list):
        if _allows(annotation, list) and any(isinstance(item, dict) for item in value):
            return value  # a list of mappings (`datasets:`), checked by its dataclass
        if action.nargs in ("+", "*"):
            return [_convert(key, item, action, annotation) for item in value]
        if _allows(annotation, list):
            return value
        raise RecipeError(f"{key}: expected {_describe(action, annotation)}, got a list.")
    return _convert(key, value, action, annotation)


def _convert(key: str, value: Any, action: argparse.Action, annotation: Any) -> Any:
    choices = list(action.choices) if action.choices is not None else None
    if isinstance(value, bool) and choices and {"no", "yes"} & set(map(str, choices)):
        value = "yes" if value else "no"  # YAML 1.1 reads a bare `no` as false
    try:
        converted = action.type(value if isinstance(value, str) else str(value)) if action.type else value
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise RecipeError(f"{key}: expected {_describe(action, annotation)}, got {value!r}.") from None
    if choices is not None and converted not in choices and str(converted) not in map(str, choices):
        raise RecipeError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}.")
    return converted


def _describe(action: argparse.Action, annotation: Any) -> str:
    """What a field accepts, in words."""
    if action.choices is not None:
        return "one of " + ", ".join(map(str, action.choices))
    kinds = typing.get_args(annotation) or (annotation,)
    element_kinds = {arg for kind in kinds for arg in typing.get_args(kind)[:1]}
    words = next(
        (
            text
            for kind, text in (
                (bool, "true or false"),
                (int, "an integer"),
                (float, "a number"),
                (str, "a string"),
            )
            if kind in kinds or kind in element_kinds
        ),
        "a value",
    )
    if action.nargs in ("+", "*"):
        return "a list of " + (
            "true/false values" if words == "true or false" else words.split(" ", 1)[-1] + "s"
        )
    return words


def value_before_parsing(argv: list[str], key: str, default: Any = None) -> Any:
    """`key`'s value from `--key V` / `--key=V`, else from the `--config` file, else `default`: read before
    parsing, for a key that decides which arguments class the recipe is parsed into (cls: `num_labels`,
    orpo: `method`)."""
    value = default
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        value = read_recipe_file(Path(argv[argv.index("--config") + 1])).get(key, default)
    for index, token in enumerate(argv):
        if token == f"--{key}" and index + 1 < len(argv):
            value = argv[index + 1]
        elif token.startswith(f"--{key}="):
            value = token.split("=", 1)[1]
    return value
