"""The quantize stage's check on a real AWQ model: run one decoder layer at a time, it gives the
whole-model comparison's numbers, in one layer's memory."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import ROOT

LAYERS = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory, stage_python):
    """A random Qwen2 (12 layers, the real Qwen2 tokenizer) and its AWQ model, quantized by
    AutoAWQ with the stage's layer-by-layer quantizer."""
    folder = tmp_path_factory.mktemp("awq")
    (folder / "params.yaml").write_text(
        "profiles: {}\ntiny_model: {out: model, hidden_size: 256, intermediate_size: 2048, num_hidden_layers: "
        f"{LAYERS}, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 512,"
        " vocab_size: 151936, seed: 1}\n"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(folder)}
    subprocess.run(
        [stage_python("train"), "-m", "stages.tiny_model", "--profile", "any"],
        cwd=folder,
        check=True,
        env=env,
        capture_output=True,
    )
    subprocess.run([stage_python("quant"), "-c", QUANTIZE], cwd=folder, check=True, env=env, capture_output=True)
    return folder


QUANTIZE = """
from awq import AutoAWQForCausalLM
from transformers import AutoTokenizer
from stages.quantize import layer_by_layer_quantizer
model = AutoAWQForCausalLM.from_pretrained("model", safetensors=True, device_map="cpu")
tokenizer = AutoTokenizer.from_pretrained("model")
texts = ["The product 'Steel water bottle' appears on an e-commerce website. What is it made of? 0. steel 1. wood"]
model.quantize(tokenizer, quant_config={"zero_point": True, "q_group_size": 128, "w_bit": 4, "version": "GEMM"},
               calib_data=texts * 4, max_calib_samples=4, max_calib_seq_len=32,
               quantizer_cls=layer_by_layer_quantizer())
model.save_quantized("quantized")
tokenizer.save_pretrained("quantized")
"""

PROMPTS = ["The product 'Bamboo chopsticks' appears on an e-commerce website. What are they made of?", "Farbe?"]

# The comparison as a whole-model check would make it: both models in float32, all at once.
WHOLE_MODELS = """
import json, sys, torch
from awq.utils.packing_utils import dequantize_gemm
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
prompts = json.loads(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained("model")
original = AutoModelForCausalLM.from_pretrained("model", dtype=torch.float32).eval()
raw = load_file("quantized/model.safetensors")
state = {}
for name, tensor in raw.items():
    if name.endswith(".qweight"):
        base = name[: -len(".qweight")]
        w = dequantize_gemm(tensor, raw[base + ".qzeros"], raw[base + ".scales"], 4, 128)
        state[base + ".weight"] = w.T.float()
    elif not name.endswith((".qzeros", ".scales")):
        state[name] = tensor.float()
dequantized = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained("model"), dtype=torch.float32).eval()
dequantized.load_state_dict(state, strict=False)
dequantized.tie_weights()
agree = total = 0
worst = 0.0
with torch.no_grad():
    for prompt in prompts:
        batch = tokenizer(prompt, return_tensors="pt")
        a, b = original(**batch).logits[0], dequantized(**batch).logits[0]
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
        worst = max(worst, float((a - b).norm() / a.norm()))
print(json.dumps({"top1_agreement": agree / total, "max_relative_logits_error": worst, "positions": total}))
"""

LAYER_BY_LAYER = """
import json, resource, sys
from pathlib import Path
import torch, transformers, awq.utils.packing_utils  # the libraries are loaded before the baseline
from stages.quantize import compare_with_reference
if sys.argv[2] == "tokenizer":  # what loading the tokenizer alone adds
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    transformers.AutoTokenizer.from_pretrained("model")
    print(json.dumps({"growth_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}))
    sys.exit()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = compare_with_reference(Path("model"), Path("quantized"), json.loads(sys.argv[1]), 4, 128)
report["growth_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps(report))
"""


def run(stage_python, folder, script: str, *args: str) -> dict:
    result = subprocess.run(
        [stage_python("quant"), "-c", script, json.dumps(PROMPTS), *args],
        cwd=folder,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(folder)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_layer_by_layer_check_gives_the_whole_model_numbers_in_one_layers_memory(models, stage_python):
    whole = run(stage_python, models, WHOLE_MODELS)
    layered = run(stage_python, models, LAYER_BY_LAYER, "check")
    assert layered["positions"] == whole["positions"] and layered["layers_checked"] == LAYERS
    assert layered["top1_agreement"] == whole["top1_agreement"]
    assert layered["max_relative_logits_error"] == pytest.approx(whole["max_relative_logits_error"], rel=1e-4)
    assert 0 < layered["max_relative_layer_error"] < 1

    # Memory: beyond the tokenizer, one layer of each model in float32 and blocks of the output
    # head; the whole-model check held three float32 copies of the model (more than 700 MB here).
    tokenizer_kb = run(stage_python, models, LAYER_BY_LAYER, "tokenizer")["growth_kb"]
    layer_kb = 4 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 2048) // 1024
    assert layered["growth_kb"] < tokenizer_kb + 4 * layer_kb + 64 * 1024, (layered["growth_kb"], tokenizer_kb)
