"""Typed access to params.yaml: one profile, one stage section, checked against a dataclass.

    params.yaml
      profiles:
        demo:
          finetune: {learning_rate: 2.0e-4, ...}

`load("demo", "finetune", FinetuneParams)` returns a FinetuneParams, or raises a
UserError naming the file and the key that is missing, unknown or of the wrong type, or
whose value a stage would take silently or fail on late (VALUE_CHECKS).
"""

from __future__ import annotations

import dataclasses
import datetime
import types
import typing
from pathlib import Path

import yaml

from shoptune import UserError
from shoptune.catalog import LOCALES
from shoptune.profile import (
    ApiParams,
    CleanParams,
    FinetuneParams,
    InferParams,
    Profile,
    SynthesizeParams,
    TinyModelParams,
    is_self_hosted,
)

PARAMS_FILE = Path("params.yaml")
# params.yaml: the demo's tiny model (shared by every profile) and the profiles
TOP_LEVEL_KEYS = {"tiny_model", "profiles"}


def read_yaml(path: Path, name: str):
    """A YAML file's content; a syntax error is one line starting with `name` (the file, or the key naming it)."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"{name}: not valid YAML ({str(err).splitlines()[0]})") from None


def read_params(path: Path = PARAMS_FILE) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: no such file (run from the repository root)")
    data = read_yaml(path, str(path))
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
    result = schema(**values)
    if schema in VALUE_CHECKS:
        VALUE_CHECKS[schema](result, where)
    return result


def _check(value, hint, where: str):
    origin = typing.get_origin(hint)
    takes_text = hint is str or (origin in (typing.Union, types.UnionType) and str in typing.get_args(hint))
    if isinstance(value, datetime.date) and takes_text:  # api_version: 2024-02-01, unquoted
        key, text = where.rsplit(".", 1)[-1], value.isoformat()
        raise UserError(f'{where}: YAML read {text} as a date; quote it: {key}: "{text}"')
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(value, option, where)
            except UserError as err:
                if not str(err).startswith(f"{where}:"):  # the shape fits, a key inside does not: name that key
                    raise
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
        key_hint, value_hint = typing.get_args(hint) or (typing.Any, typing.Any)
        return {_check(k, key_hint, f"{where}.{k}"): _check(v, value_hint, f"{where}.{k}") for k, v in value.items()}
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
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        names = [_name(option) for option in options if option is not type(None)]
        return " or ".join(names + ["null"] * (type(None) in options))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        hint, str(hint).replace("typing.", "")
    )


# ---------------------------------------------------------------- values, per section


def check_synthesize(p: SynthesizeParams, where: str) -> None:
    _positive_or_null(p.max_products, f"{where}.max_products")
    if p.products_per_locale is not None:
        if not p.products_per_locale:
            raise UserError(f"{where}.products_per_locale: no locale named (null: every product)")
        for locale, count in p.products_per_locale.items():
            if locale not in LOCALES:
                raise UserError(f"{where}.products_per_locale.{locale}: not a locale (have: {', '.join(LOCALES)})")
            _positive_or_null(count, f"{where}.products_per_locale.{locale}")
    check_families(p, where)
    _at_least(p.options_per_question, 2, f"{where}.options_per_question")
    _at_least(p.max_tokens, 1, f"{where}.max_tokens")
    if not 0 <= p.temperature <= 2:
        raise UserError(f"{where}.temperature: expected a number in [0, 2], got {p.temperature}")
    if not 0 < p.top_p <= 1:
        raise UserError(f"{where}.top_p: expected a number in (0, 1], got {p.top_p}")
    check_connection(p, where)


def check_connection(p: SynthesizeParams | ApiParams, where: str) -> None:
    """An API connection's keys (synthesize's, infer.api's): limits, budget, endpoint."""
    _at_least(p.concurrency, 1, f"{where}.concurrency")
    _at_least(p.max_retries, 0, f"{where}.max_retries")
    if not p.timeout > 0:
        raise UserError(f"{where}.timeout: expected a positive number of seconds, got {p.timeout}")
    for key in ("requests_per_minute", "tokens_per_minute", "max_requests"):
        _positive_or_null(getattr(p, key), f"{where}.{key}")
    if p.max_cost is not None and not p.max_cost > 0:
        raise UserError(f"{where}.max_cost: expected a positive amount or null (no limit), got {p.max_cost}")
    if not 0 <= p.max_failed_fraction <= 1:
        raise UserError(f"{where}.max_failed_fraction: expected a number in [0, 1], got {p.max_failed_fraction}")
    if p.api_version is not None and not p.base_url:
        raise UserError(
            f"{where}.base_url: null, but api_version is set (Azure OpenAI): "
            "set base_url to the resource endpoint, https://<resource>.openai.azure.com"
        )
    if isinstance(p.base_url, list):
        check_endpoints(p.base_url, f"{where}.base_url")


def check_endpoints(listed: list, where: str) -> None:
    """base_url as a list: at least one endpoint, each a URL, none twice."""
    if not listed:
        raise UserError(f"{where}: no endpoint in the list (null: OpenAI's; a URL: one endpoint)")
    seen = set()
    for i, entry in enumerate(listed):
        url = entry if isinstance(entry, str) else entry.base_url
        if not url.strip():
            raise UserError(f"{where}[{i}]: an empty URL")
        if url in seen:
            raise UserError(f"{where}: {url} is named twice")
        seen.add(url)


def check_finetune(p: FinetuneParams, where: str) -> None:
    from shoptune import training_launch

    training_launch.check(p, where)


INFER_BACKENDS = ("vllm", "transformers", "openai")


def check_infer(p: InferParams, where: str) -> None:
    if p.backend not in INFER_BACKENDS:
        raise UserError(f"{where}.backend: {p.backend!r} is not one of {', '.join(INFER_BACKENDS)}")
    _at_least(p.tensor_parallel_size, 1, f"{where}.tensor_parallel_size")
    _at_least(p.pipeline_parallel_size, 1, f"{where}.pipeline_parallel_size")
    if p.distributed_executor_backend not in (None, "mp", "ray"):
        raise UserError(
            f"{where}.distributed_executor_backend: {p.distributed_executor_backend!r} is not null, mp or ray"
        )
    if p.backend != "vllm" and (p.pipeline_parallel_size > 1 or p.distributed_executor_backend):
        raise UserError(
            f"{where}.pipeline_parallel_size, distributed_executor_backend: only the vllm backend uses them "
            f"(backend: {p.backend})"
        )
    if p.backend != "openai":
        return
    if p.api is None:
        raise UserError(f"{where}.api: missing (the openai backend's API: model, base_url, api_key_env, ...)")
    if (p.constrain_choices or p.constrain_number_lists) and not is_self_hosted(p.api):
        raise UserError(
            f"{where}.constrain_choices, constrain_number_lists: answer constraints need a self-hosted "
            "server (vLLM's structured outputs); set them to false for OpenAI or Azure OpenAI"
        )


def check_families(p: SynthesizeParams, where: str) -> None:
    from shoptune.families import FAMILIES

    if not p.families:
        raise UserError(f"{where}.families: no family named (have: {', '.join(FAMILIES)})")
    for name, family in p.families.items():
        if name not in FAMILIES:
            raise UserError(f"{where}.families.{name}: no such task family (have: {', '.join(FAMILIES)})")
        _at_least(family.items, 1, f"{where}.families.{name}.items")
        for locale in family.locales or []:
            if locale not in LOCALES:
                raise UserError(f"{where}.families.{name}.locales: {locale!r} is not a locale ({', '.join(LOCALES)})")
        if family.locales == []:
            raise UserError(f"{where}.families.{name}.locales: empty (null: every locale)")
        if p.backend == "offline" and FAMILIES[name].needs_llm:
            offline = ", ".join(n for n, f in FAMILIES.items() if not f.needs_llm)
            raise UserError(
                f"{where}.families.{name}: needs an LLM (backend: openai); the offline backend writes {offline}"
            )


def check_clean(p: CleanParams, where: str) -> None:
    _at_least(p.ngram, 1, f"{where}.ngram")
    for key in ("max_fewshot_overlap", "max_eval_overlap"):
        if not 0 <= getattr(p, key) <= 1:
            raise UserError(f"{where}.{key}: expected a share in [0, 1], got {getattr(p, key)}")
    _at_least(p.min_options, 2, f"{where}.min_options")
    if p.max_options < p.min_options:
        raise UserError(
            f"{where}.max_options: {p.max_options} is less than min_options {p.min_options} "
            "(every item would be rejected)"
        )


# schema -> its value check, called by parse() once the types are right
VALUE_CHECKS = {
    SynthesizeParams: check_synthesize,
    CleanParams: check_clean,
    ApiParams: check_connection,
    InferParams: check_infer,
    FinetuneParams: check_finetune,
}


def _positive_or_null(value: int | None, where: str) -> None:
    if value is not None and value < 1:
        raise UserError(f"{where}: expected a positive integer or null (all), got {value}")


def _at_least(value: int, least: int, where: str) -> None:
    if value < least:
        raise UserError(f"{where}: expected an integer of at least {least}, got {value}")
