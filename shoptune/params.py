"""Typed access to params.yaml: one profile, one stage section, checked against a dataclass.

    params.yaml
      profiles:
        demo:
          finetune: {learning_rate: 2.0e-4, ...}

`load("demo", "finetune", FinetuneParams)` returns a FinetuneParams, or raises a
UserError naming the file and the key that is missing, unknown or of the wrong type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from shoptune import UserError
from shoptune.profile import Profile, TinyModelParams

PARAMS_FILE = Path("params.yaml")
# params.yaml: the demo's tiny model (shared by every profile) and the profiles
TOP_LEVEL_KEYS = {"tiny_model", "profiles"}


def read_params(path: Path = PARAMS_FILE) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: no such file (run from the repository root)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("profiles"), dict):
        raise UserError(f"{path}: expected a top-level 'profiles' mapping")
    return data


def read_profiles(path: Path = PARAMS_FILE) -> dict:
    return read_params(path)["profiles"]


def read_profile(profile: str, path: Path = PARAMS_FILE) -> dict:
    profiles = read_profiles(path)
    if profile not in profiles:
        raise UserError(f"{path}: no profile '{profile}' (have: {', '.join(profiles)})")
    if not isinstance(profiles[profile], dict):
        raise UserError(f"{path}: profiles.{profile}: expected a mapping")
    return profiles[profile]


def load_profile(profile: str, path: Path = PARAMS_FILE) -> Profile:
    """The whole profile, every section checked: an unknown key anywhere, a wrong type or a
    section of the wrong shape is a UserError naming the key."""
    data = read_params(path)
    unknown = sorted(set(data) - TOP_LEVEL_KEYS)
    if unknown:
        raise UserError(f"{path}: {unknown[0]}: unknown key (known: {', '.join(sorted(TOP_LEVEL_KEYS))})")
    if "tiny_model" in data:
        load_shared("tiny_model", TinyModelParams, path)
    return parse(read_profile(profile, path), Profile, f"{path}: profiles.{profile}")


def profile_section(profile: str, section: str, path: Path = PARAMS_FILE) -> dict:
    sections = read_profile(profile, path)
    if section not in sections:
        raise UserError(f"{path}: profiles.{profile}.{section}: missing")
    value = sections[section]
    if not isinstance(value, dict):
        raise UserError(f"{path}: profiles.{profile}.{section}: expected a mapping")
    return value


def load(profile: str, section: str, schema: type, path: Path = PARAMS_FILE):
    """The section `profiles.<profile>.<section>` as an instance of the dataclass `schema`."""
    raw = profile_section(profile, section, path)
    return parse(raw, schema, f"{path}: profiles.{profile}.{section}")


def load_shared(section: str, schema: type, path: Path = PARAMS_FILE):
    """A top-level section shared by all profiles (for example `tiny_model`)."""
    raw = read_params(path).get(section)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: {section}: missing or not a mapping")
    return parse(raw, schema, f"{path}: {section}")


def parse(raw: dict, schema: type, where: str):
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise UserError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(fields)})")
    values = {}
    for name, field in fields.items():
        if name not in raw:
            no_default = field.default is dataclasses.MISSING
            if no_default and field.default_factory is dataclasses.MISSING:
                raise UserError(f"{where}.{name}: missing")
            continue
        values[name] = _check(raw[name], hints[name], f"{where}.{name}")
    return schema(**values)


def _check(value, hint, where: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(value, option, where)
            except UserError:
                pass
        raise UserError(f"{where}: expected {_name(hint)}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return parse(value, hint, where)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (typing.Any,)
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is typing.Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool):
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if typing.get_origin(hint) is typing.Literal:
        if value not in typing.get_args(hint):
            raise UserError(f"{where}: expected one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if not isinstance(value, hint):
        raise UserError(f"{where}: expected {_name(hint)}, got {value!r}")
    return value


def _name(hint) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        hint, str(hint).replace("typing.", "")
    )
