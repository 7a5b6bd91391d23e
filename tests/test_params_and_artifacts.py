import dataclasses
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from shoptune import UserError, params
from shoptune.artifacts import atomic_dir, atomic_file, read_jsonl, sort_safetensors_metadata
from shoptune.profile import CleanParams, SynthesizeParams
from tests.conftest import ROOT


@dataclasses.dataclass
class Example:
    rate: float
    steps: int
    name: str | None
    modules: list[str]
    flag: bool = False


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_a_section_loads_typed(tmp_path):
    path = write(tmp_path, "profiles:\n  p:\n    s: {rate: 2, steps: 3, name: null, modules: [a, b]}\n")
    assert params.load("p", "s", Example, path) == Example(2.0, 3, None, ["a", "b"])


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("{rate: 1, steps: 3, name: x}", r"params.yaml: profiles.p.s.modules: missing"),
        ("{rate: 1, steps: 3, name: x, modules: [], extra: 1}", r"profiles.p.s.extra: unknown key"),
        ("{rate: fast, steps: 3, name: x, modules: []}", r"profiles.p.s.rate: expected a number, got 'fast'"),
        ("{rate: 1, steps: true, name: x, modules: []}", r"profiles.p.s.steps: expected an integer"),
        ("{rate: 1, steps: 1, name: x, modules: [1]}", r"profiles.p.s.modules\[0\]: expected a string"),
    ],
)
def test_bad_params_name_the_key(tmp_path, section, message):
    path = write(tmp_path, f"profiles:\n  p:\n    s: {section}\n")
    with pytest.raises(UserError, match=message):
        params.load("p", "s", Example, path)


def test_unknown_profile_and_bad_yaml(tmp_path):
    path = write(tmp_path, "profiles:\n  p: {}\n")
    with pytest.raises(UserError, match="no profile 'q' \\(have: p\\)"):
        params.load("q", "s", Example, path)
    path = write(tmp_path, "profiles: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        params.load("p", "s", Example, path)


def test_the_repository_params_load_as_whole_profiles():
    """Every section of both profiles of the real params.yaml passes the schema."""
    for profile in ("demo", "paper"):
        loaded = params.load_profile(profile)
        assert loaded.infer.multiple_choice.max_new_tokens == 1
    assert params.load_profile("demo").gpus is False and params.load_profile("paper").gpus is True


def repository_params_with(tmp_path, old: str, new: str):
    """The real params.yaml with the first `old` after the demo profile's start replaced."""
    text = (ROOT / "params.yaml").read_text()
    start = text.index("  demo:")
    assert old in text[start:], old
    return write(tmp_path, text[:start] + text[start:].replace(old, new, 1))


def demo_section(name: str) -> str:
    """The demo profile's section `name` as params.yaml writes it (comments included)."""
    text = (Path(__file__).resolve().parents[1] / "params.yaml").read_text()
    start = text.index(f"    {name}:")
    return text[start : _next_section(text, start)]


def _next_section(text: str, start: int) -> int:
    lines = text[start:].splitlines(keepends=True)
    end = start + len(lines[0])
    for line in lines[1:]:
        if not line.startswith("      "):
            break
        end += len(line)
    return end


CLEAN_SECTION = demo_section("clean")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("    gpus: false", "    gpu: true", r"profiles.demo.gpu: unknown key"),
        ("    gpus: false", "    gpus: 'no'", r"profiles.demo.gpus: expected true or false, got 'no'"),
        ("      constrain_choices: true", "      constrain_choices: 'yes'", r"profiles.demo.infer.constrain_choices"),
        (
            "      multiple_choice: {max_new_tokens: 1,",
            "      multiple_choice: {max_new_token: 1,",
            r"infer.multiple_choice.max_new_token: unknown key",
        ),
        (
            CLEAN_SECTION,
            "    clean: &demo_clean [2, 10]\n",
            r"profiles.demo.clean: expected a mapping",
        ),
        ("    evaluate:", "    evaluation:", r"profiles.demo.evaluation: unknown key"),
    ],
)
def test_a_profile_with_a_typo_anywhere_names_the_key(tmp_path, old, new, message):
    path = repository_params_with(tmp_path, old, new)
    with pytest.raises(UserError, match=message):
        params.load_profile("demo", path)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("max_products: null", "max_products: -1", r"synthesize.max_products: expected a positive integer or null"),
        ("max_products: null", "max_products: 0", r"synthesize.max_products: expected a positive integer or null"),
        ("DE: 10,", "DE: 0,", r"synthesize.products_per_locale.DE: expected a positive integer or null"),
        ("DE: 10,", "DE: many,", r"synthesize.products_per_locale.DE: expected an integer or null, got 'many'"),
        ("DE: 10,", "XX: 10,", r"synthesize.products_per_locale.XX: not a locale \(have: DE, JP, UK, ES, FR, IT\)"),
        ("products_per_locale: {DE", "products_per_locale: {} #", r"synthesize.products_per_locale: no locale named"),
        ("query_ner: {items: 2}", "query_ner: {items: 0}", r"synthesize.families.query_ner.items: .* at least 1"),
        ("query_ner: {items: 2}", "query_ner: {item: 2}", r"synthesize.families.query_ner.item: unknown key"),
        ("query_ner: {items: 2}", "query_nre: {items: 2}", r"synthesize.families.query_nre: no such task family"),
        ("query_ner: {items: 2}", "query_ner: {items: 2, locales: [XX]}", r"families.query_ner.locales: 'XX' is not"),
        ("query_ner: {items: 2}", "review_retrieval: {items: 2}", r"families.review_retrieval: needs an LLM"),
        ("ngram: 13", "ngram: 0", r"clean.ngram: expected an integer of at least 1, got 0"),
        ("max_eval_overlap: 0.5", "max_eval_overlap: 1.5", r"clean.max_eval_overlap: expected a share in \[0, 1\]"),
        (
            "options_per_question: 3",
            "options_per_question: 1",
            r"synthesize.options_per_question: .* at least 2, got 1",
        ),
        ("max_tokens: 1000", "max_tokens: 0", r"synthesize.max_tokens: expected an integer of at least 1"),
        ("concurrency: 1", "concurrency: 0", r"synthesize.concurrency: expected an integer of at least 1, got 0"),
        ("max_retries: 3", "max_retries: -1", r"synthesize.max_retries: expected an integer of at least 0, got -1"),
        ("temperature: 0.3", "temperature: 2.5", r"synthesize.temperature: expected a number in \[0, 2\], got 2.5"),
        ("top_p: 0.95", "top_p: 0", r"synthesize.top_p: expected a number in \(0, 1\], got 0"),
        ("timeout: 60 ", "timeout: 0 ", r"synthesize.timeout: expected a positive number of seconds, got 0"),
        ("max_cost: null", "max_cost: -5", r"synthesize.max_cost: expected a positive amount or null"),
        ("max_requests: null", "max_requests: 0", r"synthesize.max_requests: expected a positive integer or null"),
        ("max_failed_fraction: 0.0", "max_failed_fraction: 2", r"synthesize.max_failed_fraction: .* \[0, 1\], got 2"),
        ("min_options: 2", "min_options: 1", r"clean.min_options: expected an integer of at least 2, got 1"),
        ("min_options: 2", "min_options: 12", r"clean.max_options: 10 is less than min_options 12 \(every item"),
        (
            "api_version: null",
            "api_version: 2024-02-01",
            r'demo.synthesize.api_version: YAML read 2024-02-01 as a date; quote it: api_version: "2024-02-01"$',
        ),
        (
            "api_version: null",
            'api_version: "2024-02-01"',
            r"profiles.demo.synthesize.base_url: null, but api_version is set \(Azure OpenAI\): set base_url to",
        ),
    ],
)
def test_a_value_a_stage_would_take_silently_or_fail_on_names_the_key(tmp_path, old, new, message):
    """Checked both where `shoptune run` loads the whole profile and where the stage loads its section."""
    path = repository_params_with(tmp_path, old, new)
    is_clean = any(key in old for key in ("min_options", "ngram", "overlap"))
    section, schema = ("clean", CleanParams) if is_clean else ("synthesize", SynthesizeParams)
    for load in (lambda: params.load_profile("demo", path), lambda: params.load("demo", section, schema, path)):
        with pytest.raises(UserError, match=message) as err:
            load()
        assert "\n" not in str(err.value)


def test_azure_params_that_load(tmp_path):
    path = repository_params_with(tmp_path, "api_version: null", 'api_version: "2024-02-01"')
    text = path.read_text()
    start = text.index("  demo:")
    path.write_text(text[:start] + text[start:].replace("base_url: null", "base_url: https://shop.openai.azure.com", 1))
    loaded = params.load_profile("demo", path).synthesize
    assert (loaded.base_url, loaded.api_version) == ("https://shop.openai.azure.com", "2024-02-01")


def test_an_unknown_top_level_key_is_named(tmp_path):
    path = write(tmp_path, (ROOT / "params.yaml").read_text() + "\nprofile:\n  x: {}\n")
    with pytest.raises(UserError, match=r"params.yaml: profile: unknown key"):
        params.load_profile("demo", path)


def test_paper_profile_pads_29568_to_29696():
    from stages.pad import padded_size

    profile = params.read_profiles()["paper"]
    size = padded_size(29568, profile["quantize"]["q_group_size"], profile["infer"]["tensor_parallel_size"])
    assert size == 29696 and size // 4 == 58 * 128


def test_atomic_file_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_file(target) as out:
        out.write("half")
        raise RuntimeError
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as out:
        (out / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as out:
        (out / "b").write_text("2")
        raise RuntimeError
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_dir_removes_the_temporary_folders_of_writers_gone(tmp_path):
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = tmp_path / f".model.{finished.pid}.k2j4h9x1.tmp"  # its process was killed
    reused = tmp_path / f".model.{os.getpid()}.q7w8e9r0.tmp"  # written before this process began: a number reused
    live = tmp_path / f".model.{os.getpid()}.a8d7f6s5.tmp"  # this process's, still being written
    other = tmp_path / f".model.1.{finished.pid}.z1x2c3v4.tmp"  # model.1's, not model's
    for folder in (dead, reused, live, other):
        folder.mkdir()
    os.utime(reused, (1_000_000, 1_000_000))
    with atomic_dir(tmp_path / "model") as out:
        (out / "a").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "model"])


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n[1, 2]\n')
    with pytest.raises(UserError, match=r"rows.jsonl:3: expected a JSON object, got list"):
        read_jsonl(path)
    with pytest.raises(UserError, match=r"nothing.jsonl: no such file"):
        read_jsonl(tmp_path / "nothing.jsonl")


def safetensors_bytes(metadata: dict, tensors: dict[str, bytes]) -> bytes:
    header, offset = {"__metadata__": metadata}, 0
    for name, data in tensors.items():
        header[name] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text = text.ljust(-(-len(text) // 8) * 8, b" ")
    return struct.pack("<Q", len(text)) + text + b"".join(tensors.values())


def test_safetensors_metadata_is_put_in_key_order_in_place(tmp_path):
    tensors = {"a": b"\x01\x02", "b": b"\x03"}
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes({"lm_head.weight": "model.embed_tokens.weight", "format": "pt"}, tensors))
    sort_safetensors_metadata(path)
    wanted = safetensors_bytes({"format": "pt", "lm_head.weight": "model.embed_tokens.weight"}, tensors)
    assert path.read_bytes() == wanted
    sort_safetensors_metadata(path)  # already in order: unchanged
    assert path.read_bytes() == wanted


# the demo's infer on the openai backend: a vLLM server's API (constraints allowed), a key variable
OPENAI_INFER = (
    "      backend: transformers                 # CPU: no AWQ kernel runs, so the padded fp16 model\n",
    "      backend: openai\n      api: {model: served, base_url: 'http://127.0.0.1:8000/v1', api_key_env: MY_KEY,"
    " api_version: null, concurrency: 4, max_retries: 2, timeout: 60, requests_per_minute: null,"
    " tokens_per_minute: null, max_cost: null, max_requests: null, prices: {}, max_failed_fraction: 0.0}\n",
)


def test_the_openai_inference_backend_loads_with_its_api(tmp_path):
    from shoptune.profile import InferParams

    p = params.load("demo", "infer", InferParams, repository_params_with(tmp_path, *OPENAI_INFER))
    assert (p.backend, p.api.model, p.api.base_url) == ("openai", "served", "http://127.0.0.1:8000/v1")
    assert (p.api.api_key_env, p.api.concurrency, p.api.max_failed_fraction) == ("MY_KEY", 4, 0.0)


@pytest.mark.parametrize(
    "old, new, message",
    [
        (
            "backend: openai\n",
            "backend: llama\n",
            r"profiles.demo.infer.backend: 'llama' is not one of vllm, transformers, openai",
        ),
        ("      api: {model", "      apis: {model", r"profiles.demo.infer.apis: unknown key"),
        (
            "base_url: 'http://127.0.0.1:8000/v1'",
            "base_url: null",
            r"infer.constrain_choices, constrain_number_lists: answer constraints need a self-hosted",
        ),
        (
            "concurrency: 4",
            "concurrency: 0",
            r"profiles.demo.infer.api.concurrency: expected an integer of at least 1, got 0",
        ),
        (
            "api_version: null, concurrency",
            "api_version: 2024-02-01, concurrency",
            r"infer.api.api_version: YAML read 2024-02-01 as a date",
        ),
        (
            "max_failed_fraction: 0.0}",
            "max_failed_fraction: 1.5}",
            r"infer.api.max_failed_fraction: expected a number in \[0, 1\], got 1.5",
        ),
    ],
)
def test_bad_openai_inference_params_name_the_key(tmp_path, old, new, message):
    text = (ROOT / "params.yaml").read_text()
    start = text.index("  demo:")
    path = write(tmp_path, text[:start] + text[start:].replace(*OPENAI_INFER, 1).replace(old, new, 1))
    with pytest.raises(UserError, match=message) as err:
        params.load_profile("demo", path)
    assert "\n" not in str(err.value)


def test_the_openai_backend_without_its_api_names_the_key(tmp_path):
    path = repository_params_with(tmp_path, "backend: transformers ", "backend: openai ")
    with pytest.raises(UserError, match=r"profiles.demo.infer.api: missing \(the openai backend's API"):
        params.load_profile("demo", path)
