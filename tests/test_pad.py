"""The pad stage: a real (tiny, random) Qwen2 whose MLP really grows, small synthetic checkpoints
(bf16, several shards, an index, biases) padded as torch-based padding would, byte for byte, and
every refusal: one line, exit 2, nothing written or deleted."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from stages.pad import padded_size, zero_layout
from tests.conftest import ROOT, shoptune

GROUP, TP = 64, 2


@pytest.mark.parametrize(
    ("size", "group", "tp", "expected"),
    [(29568, 128, 4, 29696), (29568, 128, 1, 29568), (344, 128, 2, 512), (256, 64, 2, 256), (1, 128, 8, 1024)],
)
def test_padded_size(size, group, tp, expected):
    assert padded_size(size, group, tp) == expected


@pytest.mark.parametrize(("size", "group", "tp"), [(29568, 128, 4), (344, 128, 2), (200, 64, 2), (257, 64, 4)])
def test_zero_layout_keeps_order_and_leaves_no_group_all_zero(size, group, tp):
    padded = padded_size(size, group, tp)
    layout = zero_layout(size, padded, group)
    assert [i for i in layout if i >= 0] == list(range(size))
    groups = [layout[g : g + group] for g in range(0, padded, group)]
    assert all(any(i >= 0 for i in g) for g in groups)
    zeros = [sum(i < 0 for i in g) for g in groups]
    assert max(zeros) - min(zeros) <= 1  # dealt out evenly


# ---------------------------------------------------------------- checkpoints, written by hand


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]], metadata: dict | None = None) -> None:
    """A safetensors file, in the given tensor order (not safetensors' own), from raw-bit arrays."""
    header, blobs, offset = ({} if metadata is None else {"__metadata__": metadata}), [], 0
    for name, (dtype, array) in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def read_safetensors(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, {name: raw bits with the tensor's shape})."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    bits = {"BF16": "<u2", "F16": "<u2", "F32": "<u4", "I64": "<u8"}
    arrays = {
        name: np.frombuffer(
            data[8 + length + info["data_offsets"][0] : 8 + length + info["data_offsets"][1]], bits[info["dtype"]]
        ).reshape(info["shape"])
        for name, info in header.items()
        if name != "__metadata__"
    }
    return header, arrays


def random_bits(rng, shape, dtype: str) -> np.ndarray:
    values = rng.standard_normal(shape).astype(np.float32)
    if dtype == "BF16":
        return (values.view(np.uint32) >> 16).astype(np.uint16)
    return values.astype(np.float16).view(np.uint16) if dtype == "F16" else values.view(np.uint32)


def make_model(
    folder: Path,
    *,
    model_type: str = "qwen2",
    dtype: str = "F16",
    layers: int = 2,
    hidden: int = 16,
    intermediate: int = 40,
    shards: int = 1,
    bias: bool = False,
) -> Path:
    """A small checkpoint: per layer a norm, an attention projection and the gate/up/down MLP
    (biases too with `bias`), an F32 embedding and an I64 buffer; layer i in shard i % shards,
    tensors written in reverse name order; an index when there are several shards; a stand-in
    tokenizer.json."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    names = (
        [f"model-{s + 1:05d}-of-{shards:05d}.safetensors" for s in range(shards)]
        if shards > 1
        else ["model.safetensors"]
    )
    contents: list[dict] = [{} for _ in names]
    contents[0]["model.embed_tokens.weight"] = ("F32", random_bits(rng, (50, hidden), "F32"))
    contents[-1]["model.position_ids"] = ("I64", np.arange(8, dtype=np.int64).view(np.uint64))
    for i in range(layers):
        p, shard = f"model.layers.{i}.", contents[i % shards]
        shard[p + "input_layernorm.weight"] = (dtype, random_bits(rng, (hidden,), dtype))
        shard[p + "self_attn.q_proj.weight"] = (dtype, random_bits(rng, (hidden, hidden), dtype))
        shard[p + "mlp.gate_proj.weight"] = (dtype, random_bits(rng, (intermediate, hidden), dtype))
        shard[p + "mlp.up_proj.weight"] = (dtype, random_bits(rng, (intermediate, hidden), dtype))
        shard[p + "mlp.down_proj.weight"] = (dtype, random_bits(rng, (hidden, intermediate), dtype))
        if bias:
            for proj, width in (("gate_proj", intermediate), ("up_proj", intermediate), ("down_proj", hidden)):
                shard[p + f"mlp.{proj}.bias"] = (dtype, random_bits(rng, (width,), dtype))
    metadata = [{"format": "pt", "zz": "last", "aa": "first"}, None]
    for s, (name, tensors) in enumerate(zip(names, contents, strict=True)):
        write_safetensors(folder / name, dict(sorted(tensors.items(), reverse=True)), metadata[s % 2])
    if shards > 1:
        weight_map = {t: name for name, tensors in zip(names, contents, strict=True) for t in tensors}
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    architecture = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
    config = {"model_type": model_type, "architectures": [architecture.get(model_type, "GPT2LMHeadModel")]}
    config |= {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer.json").write_text('{"model": {}}\n')
    return folder


def pad(model: Path, out: Path, *extra: str, group: int = GROUP, tp: int = TP, check: bool = True):
    return shoptune(
        "pad", str(model), str(out), "--group-size", str(group), "--tensor-parallel-size", str(tp), *extra, check=check
    )


# torch-based padding (what pad did before it worked on bytes): index_select, zeros, safetensors' writer
TORCH_PADDING = r"""
import json, re, sys
from pathlib import Path
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from shoptune.artifacts import sort_safetensors_metadata
from stages.pad import padded_size, zero_layout

src, out, reference, group, tp = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), *map(int, sys.argv[4:])
size = json.loads((src / "config.json").read_text())["intermediate_size"]
layout = zero_layout(size, padded_size(size, group, tp), group)
index, zero = torch.tensor([max(i, 0) for i in layout]), torch.tensor([i < 0 for i in layout])
same = {}
for path in sorted(src.glob("*.safetensors")):
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for name, tensor in tensors.items():
        match = re.fullmatch(r".*\.mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)", name)
        if match and match.groups() != ("down_proj", "bias"):
            dim = 1 if match.groups() == ("down_proj", "weight") else 0
            tensor = tensor.index_select(dim, index)
            if dim == 0:
                tensor[zero] = 0
            else:
                tensor[:, zero] = 0
            tensors[name] = tensor.contiguous()
    save_file(tensors, str(reference / path.name), metadata=metadata or {"format": "pt"})
    sort_safetensors_metadata(reference / path.name)
    same[path.name] = (reference / path.name).read_bytes() == (out / path.name).read_bytes()
print(json.dumps(same))
"""


def same_as_torch_padding(stage_python, model: Path, out: Path, reference: Path, group: int = GROUP, tp: int = TP):
    reference.mkdir()
    result = subprocess.run(
        [stage_python("quant"), "-c", TORCH_PADDING, str(model), str(out), str(reference), str(group), str(tp)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return json.loads(result.stdout)


# ---------------------------------------------------------------- a real model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, stage_python):
    """A random Qwen2 with the real Qwen2 tokenizer and intermediate size 200, made by the tiny_model stage."""
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "params.yaml").write_text(
        "profiles: {}\ntiny_model: {out: model, hidden_size: 64, intermediate_size: 200, num_hidden_layers: 2,"
        " num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 512, vocab_size: 151936,"
        " seed: 1}\n"
    )
    subprocess.run(
        [stage_python("train"), "-m", "stages.tiny_model", "--profile", "any"],
        cwd=folder,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
    )
    return folder / "model"


def test_pad_command_grows_the_mlp_and_keeps_the_outputs(tiny_model, tmp_path, stage_python):
    out = tmp_path / "padded"
    report = json.loads(pad(tiny_model, out, "--check-logits").stdout)
    assert (report["intermediate_size"], report["padded_intermediate_size"]) == (200, 256)
    assert report["shard_width"] == 128 and report["groups_per_shard"] == 2
    assert report["padded_tensors"] == 6 and report["layers_checked"] == 2
    assert report["mlp_max_relative_difference"] < 1e-5 and report["logits_max_abs_difference"] < 1e-4
    assert report["bytes_verified"] == report["bytes_written"]
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 256
    assert (out / "tokenizer.json").read_bytes() == (tiny_model / "tokenizer.json").read_bytes()

    # byte for byte what loading, index_select-ing and save_file gave
    assert same_as_torch_padding(stage_python, tiny_model, out, tmp_path / "torch") == {"model.safetensors": True}
    header, padded = read_safetensors(out / "model.safetensors")
    assert header["__metadata__"] == {"format": "pt"}
    down = padded["model.layers.0.mlp.down_proj.weight"]
    assert down.shape == (64, 256) and all(down[:, g : g + GROUP].any() for g in range(0, 256, GROUP))


# ---------------------------------------------------------------- synthetic checkpoints


def test_bf16_shards_with_an_index_and_biases_pad_as_torch_does(tmp_path, stage_python):
    model = make_model(tmp_path / "llama", model_type="llama", dtype="BF16", layers=3, shards=2, bias=True)
    out = tmp_path / "padded"
    report = json.loads(pad(model, out).stdout)
    assert (report["padded_intermediate_size"], report["padded_tensors"], report["layers_checked"]) == (128, 18, 3)
    assert report["mlp_max_relative_difference"] < 1e-5 and report["logits_checked_prompts"] == 0

    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert same_as_torch_padding(stage_python, model, out, tmp_path / "torch") == dict.fromkeys(names, True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["metadata"]["total_size"] == report["bytes_written"]
    assert report["bytes_written"] == sum(a.nbytes for n in names for a in read_safetensors(out / n)[1].values())

    header, padded = read_safetensors(out / names[0])
    _, original = read_safetensors(model / names[0])
    assert list(header["__metadata__"].items()) == [("aa", "first"), ("format", "pt"), ("zz", "last")]
    layout = np.array(zero_layout(40, 128, GROUP))
    real, zeros = np.flatnonzero(layout >= 0), np.flatnonzero(layout < 0)
    for name in ("gate_proj.weight", "up_proj.weight", "gate_proj.bias", "up_proj.bias"):
        tensor, source = padded[f"model.layers.0.mlp.{name}"], original[f"model.layers.0.mlp.{name}"]
        assert np.array_equal(tensor[real], source) and not tensor[zeros].any()
    down, source = padded["model.layers.0.mlp.down_proj.weight"], original["model.layers.0.mlp.down_proj.weight"]
    assert np.array_equal(down[:, real], source) and not down[:, zeros].any()
    for name in (
        "model.layers.0.mlp.down_proj.bias",
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
    ):
        assert np.array_equal(padded[name], original[name])
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["intermediate_size"]) == ("llama", 128)


def test_a_model_already_padded_is_copied_unchanged(tmp_path):
    model = make_model(tmp_path / "model", intermediate=128)
    report = json.loads(pad(model, tmp_path / "padded").stdout)
    assert (report["padded_intermediate_size"], report["zero_channels"], report["padded_tensors"]) == (128, 0, 0)
    _, original = read_safetensors(model / "model.safetensors")
    _, padded = read_safetensors(tmp_path / "padded" / "model.safetensors")
    assert original.keys() == padded.keys() and all(np.array_equal(original[k], padded[k]) for k in original)


def test_overwrite_replaces_out_dir_and_a_dead_runs_temporary_folder_goes(tmp_path):
    model = make_model(tmp_path / "model", model_type="mistral")
    out = tmp_path / "padded"
    out.mkdir()
    (out / "old.txt").write_text("old")
    finished = subprocess.Popen(["true"])
    finished.wait()
    stale = tmp_path / f".padded.{finished.pid}.k2j4h9x1.tmp"  # left by a killed run
    live = tmp_path / f".padded.{os.getpid()}.a8d7f6s5.tmp"  # another run of the same output, still going
    for folder in (stale, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    pad(model, out, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "model", "padded"]


def test_the_pipeline_stage_replaces_its_previous_output(tmp_path, stage_python):
    """DVC owns runs/<profile>/pad/model: the stage replaces it without being asked."""
    (tmp_path / "params.yaml").write_text(
        "profiles:\n  p:\n    pad: {check_logits: false, logits_atol: 1.0e-4}\n"
        "    quantize: {q_group_size: 64}\n    infer: {tensor_parallel_size: 2}\n"
    )
    make_model(tmp_path / "runs/p/finetune/model")
    previous = tmp_path / "runs/p/pad/model"
    previous.mkdir(parents=True)
    (previous / "stale.txt").write_text("from the last run")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([stage_python("quant"), "-m", "stages.pad", "--profile", "p"], cwd=tmp_path, env=env, check=True)
    metrics = json.loads((tmp_path / "runs/p/pad/metrics.json").read_text())
    assert (metrics["padded_intermediate_size"], metrics["layers_checked"]) == (128, 2)
    # the measured differences (rounding noise, BLAS-dependent) stay out of the hashed metrics.json
    assert "mlp_max_relative_difference" not in metrics and metrics["mlp_relative_difference_below"] == 1e-5
    measured = json.loads((tmp_path / "runs/p/pad/differences.json").read_text())
    assert measured["mlp_max_relative_difference"] < 1e-5
    assert sorted(p.name for p in previous.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


# ---------------------------------------------------------------- refusals


def rewrite_header(shard: Path, change) -> None:
    """Replace a shard's header by change(header), its data kept."""
    data = shard.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    text = json.dumps(change(json.loads(data[8 : 8 + length]))).encode()
    shard.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])


def edit_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text()) | changes
    (model / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


def overlapping(header: dict) -> dict:
    layer = "model.layers.0.mlp."
    header[layer + "gate_proj.weight"]["data_offsets"] = header[layer + "up_proj.weight"]["data_offsets"]
    return header


def wrong_index(model: Path) -> None:
    weight_map = dict.fromkeys(header_names(model / SHARD), SHARD) | {"model.position_ids": "model-2.safetensors"}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def header_names(shard: Path) -> list[str]:
    data = shard.read_bytes()
    return [n for n in json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]]) if n != "__metadata__"]


def linked_out(model: Path, out: Path) -> Path:
    out.symlink_to(model)
    return out


def non_empty_out(model: Path, out: Path) -> Path:
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    return out


def file_out(model: Path, out: Path) -> Path:
    out.write_text("mine")
    return out


def out_under_a_file(model: Path, out: Path) -> Path:
    (out.parent / "blocker.txt").write_text("mine")
    return out.parent / "blocker.txt" / "padded"


@dataclasses.dataclass
class Refusal:
    pattern: str  # the error line after "error: ", formatted with model, out, tmp, shard
    spoil: Callable[[Path], object] | None = None  # what is done to the model
    out: Callable[[Path, Path], Path] | None = None  # OUT_DIR, from the model and the default OUT_DIR
    args: tuple[str, ...] = ()


SHARD = "model.safetensors"
REFUSALS = {
    "out_is_model": Refusal(r"{model}: is the model folder {model} itself; choose another OUT_DIR", out=lambda m, o: m),
    "out_inside_model": Refusal(
        r"{model}/padded: is inside the model folder {model}; choose an OUT_DIR outside it",
        out=lambda m, o: m / "padded",
    ),
    "out_contains_model": Refusal(
        r"{tmp}: contains the model folder {model}; replacing it would delete the model", out=lambda m, o: m.parent
    ),
    "out_links_to_model": Refusal(r"{out}: is the model folder {model} itself; choose another OUT_DIR", out=linked_out),
    "out_not_empty": Refusal(r"{out}: exists and is not empty; pass --overwrite to replace it", out=non_empty_out),
    "out_is_a_file": Refusal(r"{out}: exists and is not a folder", out=file_out, args=("--overwrite",)),
    "out_under_a_file": Refusal(
        r"{tmp}/blocker.txt/padded: {tmp}/blocker.txt exists and is not a folder",
        out=out_under_a_file,
    ),
    "gpt2": Refusal(
        r"{model}/config.json: model_type 'gpt2' is not a Qwen2 or Llama-family model; "
        r"pad knows their gate/up/down MLP only",
        lambda m: edit_config(m, model_type="gpt2", architectures=["GPT2LMHeadModel"]),
    ),
    "no_model_type": Refusal(
        r"{model}/config.json: neither model_type nor architectures \(\['BertModel'\]\) name a Qwen2 or "
        r"Llama-family model; pad knows their gate/up/down MLP only",
        lambda m: edit_config(m, model_type=None, architectures=["BertModel"]),
    ),
    "size_a_string": Refusal(
        r"{model}/config.json: intermediate_size must be a positive integer, got '40'",
        lambda m: edit_config(m, intermediate_size="40"),
    ),
    "size_true": Refusal(
        r"{model}/config.json: intermediate_size must be a positive integer, got True",
        lambda m: edit_config(m, intermediate_size=True),
    ),
    "size_zero": Refusal(
        r"{model}/config.json: intermediate_size must be a positive integer, got 0",
        lambda m: edit_config(m, intermediate_size=0),
    ),
    "size_missing": Refusal(
        r"{model}/config.json: no intermediate_size", lambda m: edit_config(m, intermediate_size=None)
    ),
    "config_not_json": Refusal(
        r"{model}/config.json: not valid JSON \(Expecting property name enclosed in double quotes at line 1\)",
        lambda m: (m / "config.json").write_text("{intermediate_size: 40"),
    ),
    "no_config": Refusal(
        r"{model}: no config.json \(not a Hugging Face model folder\)", lambda m: (m / "config.json").unlink()
    ),
    "shard_too_short": Refusal(
        r"{model}/{shard}: not a safetensors file \(only 3 bytes\)", lambda m: (m / SHARD).write_bytes(b"abc")
    ),
    "header_too_long": Refusal(
        r"{model}/{shard}: corrupt safetensors file \(a 1000000-byte header in a 10-byte file\)",
        lambda m: (m / SHARD).write_bytes(struct.pack("<Q", 10**6) + b"{}"),
    ),
    "header_not_json": Refusal(
        r"{model}/{shard}: corrupt safetensors header \(Expecting property name enclosed in double quotes\)",
        lambda m: (m / SHARD).write_bytes(struct.pack("<Q", 8) + b"{oops   "),
    ),
    "truncated": Refusal(
        r"{model}/{shard}: tensor model.embed_tokens.weight ends at byte \d+ of the data, which has \d+ "
        r"\(a truncated file\?\)",
        lambda m: (m / SHARD).write_bytes((m / SHARD).read_bytes()[:-100]),
    ),
    "overlapping": Refusal(
        r"{model}/{shard}: corrupt safetensors header \(tensor model.layers.0.mlp.gate_proj.weight overlaps "
        r"model.layers.0.mlp.up_proj.weight\)",
        lambda m: rewrite_header(m / SHARD, overlapping),
    ),
    "unknown_dtype": Refusal(
        r"{model}/{shard}: tensor model.position_ids has an unknown or unsupported dtype 'Q7'",
        lambda m: rewrite_header(
            m / SHARD, lambda h: h | {"model.position_ids": h["model.position_ids"] | {"dtype": "Q7"}}
        ),
    ),
    "no_mlp": Refusal(
        r"{model}: no tensor is named like \*.mlp.gate_proj.weight, \*.mlp.up_proj.weight or \*.mlp.down_proj.weight",
        lambda m: rewrite_header(m / SHARD, lambda h: {k.replace(".mlp.", ".feed_forward."): v for k, v in h.items()}),
    ),
    "no_down_proj": Refusal(
        r"{model}/{shard}: layer model.layers.1.mlp has no model.layers.1.mlp.down_proj.weight in any shard",
        lambda m: rewrite_header(
            m / SHARD, lambda h: {k.replace("1.mlp.down_proj", "1.down"): v for k, v in h.items()}
        ),
    ),
    "wrong_size": Refusal(
        r"{model}/{shard}: model.layers.0.mlp.gate_proj.weight has shape \[40, 16\], expected \[48, 16\] "
        r"\(intermediate_size 48 in config.json\)",
        lambda m: edit_config(m, intermediate_size=48),
    ),
    "wrong_index": Refusal(
        r"{model}/model.safetensors.index.json: tensor model.position_ids is in {shard}, but the weight_map puts it "
        r"in model-2.safetensors",
        wrong_index,
    ),
    "no_tokenizer": Refusal(
        r"{model}: no tokenizer \(tokenizer.json, tokenizer.model, vocab.json\), which the logits check needs",
        lambda m: (m / "tokenizer.json").unlink(),
        args=("--check-logits",),
    ),
    "zero_tensor_parallel": Refusal(
        r"--group-size and --tensor-parallel-size must be positive", args=("--tensor-parallel-size", "0")
    ),
}


def tree(folder: Path) -> dict[str, str]:
    """Every path under `folder` with its content's digest: what a refusal must leave as it was."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_one_line_and_change_nothing(case, tmp_path):
    refusal = REFUSALS[case]
    model, out = make_model(tmp_path / "model"), tmp_path / "padded"
    if refusal.spoil:
        refusal.spoil(model)
    if refusal.out:
        out = refusal.out(model, out)
    before = tree(tmp_path)

    result = pad(model, out, *refusal.args, check=False)

    assert result.returncode == 2, result.stderr
    expected = refusal.pattern.format(model=model, out=tmp_path / "padded", tmp=tmp_path, shard=SHARD)
    assert re.fullmatch(f"error: {expected}", result.stderr.strip()), result.stderr
    assert tree(tmp_path) == before


def test_a_missing_model_folder_is_one_line(tmp_path):
    result = pad(tmp_path / "missing", tmp_path / "out", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'missing'}: no config.json (not a Hugging Face model folder)"
    assert not (tmp_path / "out").exists()
