import dataclasses
import json
import os
import struct
import subprocess

import pytest

from shoptune import UserError, params
from shoptune.artifacts import atomic_dir, atomic_file, read_jsonl, sort_safetensors_metadata
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
            "    clean:\n      min_options: 2\n      max_options: 10\n",
            "    clean: [2, 10]\n",
            r"profiles.demo.clean: expected a mapping",
        ),
        ("    evaluate:", "    evaluation:", r"profiles.demo.evaluation: unknown key"),
    ],
)
def test_a_profile_with_a_typo_anywhere_names_the_key(tmp_path, old, new, message):
    path = repository_params_with(tmp_path, old, new)
    with pytest.raises(UserError, match=message):
        params.load_profile("demo", path)


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
