"""The pad stage on a real (tiny, random) Qwen2 whose MLP really grows."""

from __future__ import annotations

import json
import subprocess

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


INSPECT = """
import json, sys
from safetensors.torch import load_file
a = load_file(sys.argv[1] + "/model.safetensors"); b = load_file(sys.argv[2] + "/model.safetensors")
group = int(sys.argv[3])
out = {"shapes": {k: list(v.shape) for k, v in b.items() if ".mlp." in k and "layers.0." in k},
       "same_other": all((a[k] == b[k]).all().item() for k in a if ".mlp." not in k)}
down = b["model.layers.0.mlp.down_proj.weight"]
out["down_groups_nonzero"] = [bool(down[:, g:g + group].abs().sum() > 0) for g in range(0, down.shape[1], group)]
gate_a, gate_b = a["model.layers.0.mlp.gate_proj.weight"], b["model.layers.0.mlp.gate_proj.weight"]
nonzero_rows = gate_b.abs().sum(1) > 0
out["real_rows_kept"] = bool((gate_b[nonzero_rows] == gate_a).all())
print(json.dumps(out))
"""


def test_pad_command_grows_the_mlp_and_keeps_the_outputs(tiny_model, tmp_path, stage_python):
    out = tmp_path / "padded"
    result = shoptune(
        "pad",
        str(tiny_model),
        str(out),
        "--group-size",
        str(GROUP),
        "--tensor-parallel-size",
        str(TP),
        "--check-logits",
    )
    report = json.loads(result.stdout)
    assert (report["intermediate_size"], report["padded_intermediate_size"]) == (200, 256)
    assert report["shard_width"] == 128 and report["groups_per_shard"] == 2
    assert report["layers_checked"] == 2 and report["mlp_max_relative_difference"] < 1e-5
    assert report["logits_max_abs_difference"] < 1e-4
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 256
    assert (out / "tokenizer.json").is_file()

    seen = json.loads(
        subprocess.run(
            [stage_python("quant"), "-c", INSPECT, str(tiny_model), str(out), str(GROUP)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert seen["shapes"] == {
        "model.layers.0.mlp.gate_proj.weight": [256, 64],
        "model.layers.0.mlp.up_proj.weight": [256, 64],
        "model.layers.0.mlp.down_proj.weight": [64, 256],
    }
    assert seen["same_other"] and seen["real_rows_kept"]
    assert all(seen["down_groups_nonzero"])


def test_pad_errors_are_one_line(tmp_path):
    result = shoptune(
        "pad", str(tmp_path / "missing"), str(tmp_path / "out"), "--tensor-parallel-size", "2", check=False
    )
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == f"error: {tmp_path / 'missing'}: no config.json (not a Hugging Face model folder)"
    assert not (tmp_path / "out").exists()
