"""quantize: AWQ 4-bit (AutoAWQ 0.2.9) of the padded model, calibrated on our own training data.

Recipe: zero_point=True, q_group_size=128, w_bit=4, version="GEMM" (Qwen2-72B comes out
at 38.74 GB). AutoAWQ's default calibration set is a hub download; here the calibration
texts are the project's own training prompts (runs/<profile>/dataset/train.jsonl).

Check, on any machine: the saved 4-bit weights are dequantized with AutoAWQ's own
unpacking (no AWQ kernel needed) and the model's logits compared with the padded
16-bit model's on held-out prompts: top-1 agreement and relative error go to metrics.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from shoptune import UserError, params
from shoptune.artifacts import atomic_dir, read_jsonl, sort_safetensors_metadata, write_json
from shoptune.ecinstruct import alpaca_prompt
from shoptune.profile import QuantizeParams
from shoptune.workspace import entrypoint, stage_dir

log = logging.getLogger("quantize")


def calibration_texts(rows: list[dict], count: int, seed: int = 0) -> list[str]:
    texts = [alpaca_prompt(row, eos_token="") for row in rows]
    random.Random(seed).shuffle(texts)
    return texts[:count]


def dequantized_state(quantized: Path, bits: int, group_size: int) -> dict:
    """The quantized model's weights, dequantized to float32 with AutoAWQ's unpacking."""
    from awq.utils.packing_utils import dequantize_gemm
    from safetensors import safe_open

    raw = {}
    for path in sorted(quantized.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as shard:
            raw.update({name: shard.get_tensor(name) for name in shard.keys()})
    state = {}
    for name, tensor in raw.items():
        if name.endswith(".qweight"):
            base = name[: -len(".qweight")]
            weight = dequantize_gemm(tensor, raw[f"{base}.qzeros"], raw[f"{base}.scales"], bits, group_size)
            state[f"{base}.weight"] = weight.T.float().contiguous()
        elif not name.endswith((".qzeros", ".scales")):
            state[name] = tensor.float()
    return state


def compare_with_reference(reference: Path, quantized: Path, prompts: list[str], bits: int, group_size: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reference)
    original = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    config = AutoConfig.from_pretrained(reference)
    dequantized = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = dequantized.load_state_dict(dequantized_state(quantized, bits, group_size), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise UserError(
            f"{quantized}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    dequantized.tie_weights()
    agree = total = 0
    worst = 0.0
    with torch.no_grad():
        for prompt in prompts:
            batch = tokenizer(prompt, return_tensors="pt")
            a, b = original(**batch).logits[0], dequantized(**batch).logits[0]
            if torch.isnan(b).any():
                raise UserError(f"{quantized}: the dequantized model gives NaN logits")
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0]
            worst = max(worst, float((a - b).norm() / a.norm()))
    return {"top1_agreement": agree / total, "max_relative_logits_error": worst, "positions": total}


def quantize(profile: str) -> None:
    p = params.load(profile, "quantize", QuantizeParams)
    if p.version.upper() != "GEMM":
        raise UserError(f"params.yaml: profiles.{profile}.quantize.version: only GEMM is supported, got {p.version!r}")
    padded = stage_dir(profile, "pad") / "model"
    if not (padded / "config.json").is_file():
        raise UserError(f"{padded}: no padded model (run the pad stage first)")
    rows = read_jsonl(stage_dir(profile, "dataset") / "train.jsonl")
    held_out = [alpaca_prompt(r, eos_token="") for r in read_jsonl(stage_dir(profile, "dataset") / "val.jsonl")][:8]
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    quant_config = {"zero_point": p.zero_point, "q_group_size": p.q_group_size, "w_bit": p.w_bit, "version": p.version}
    model = AutoAWQForCausalLM.from_pretrained(str(padded), safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(padded)
    model.quantize(
        tokenizer,
        quant_config=quant_config,
        calib_data=calibration_texts(rows, p.calib_samples),
        max_calib_samples=p.calib_samples,
        max_calib_seq_len=p.calib_max_len,
    )
    folder = stage_dir(profile, "quantize")
    with atomic_dir(folder / "model") as out:
        model.save_quantized(str(out))
        for shard in out.glob("*.safetensors"):
            sort_safetensors_metadata(shard)  # the same weights, the same bytes
        tokenizer.save_pretrained(out)
        check = compare_with_reference(
            padded, out, held_out or calibration_texts(rows, 4, seed=1), p.w_bit, p.q_group_size
        )
    size = sum(f.stat().st_size for f in (folder / "model").glob("*.safetensors"))
    config = json.loads((folder / "model" / "config.json").read_text())
    write_json(
        folder / "metrics.json", {"size_bytes": size, "quantization_config": config["quantization_config"], **check}
    )
    log.info(
        "AWQ model in %s (%.1f MB); top-1 agreement with the 16-bit model %.3f",
        folder / "model",
        size / 1e6,
        check["top1_agreement"],
    )


if __name__ == "__main__":
    entrypoint(quantize)
