"""quantize: AWQ 4-bit (AutoAWQ 0.2.9) of the padded model, calibrated on our own training data.

Recipe: zero_point=True, q_group_size=128, w_bit=4, version="GEMM" (Qwen2-72B comes out
at 38.74 GB). AutoAWQ's default calibration set is a hub download; here the calibration
texts are the project's own training prompts (runs/<profile>/dataset/train.jsonl).

Memory, as on the paper's hardware: the 16-bit model is loaded on the CPU (host RAM about
2 bytes a parameter, 145 GB for Qwen2-72B), calibration moves one decoder layer at a time to
the GPU, and each quantized layer goes back to the CPU (AutoAWQ 0.2.9 would keep them all on
the GPU).

Check, on any machine: the saved 4-bit weights are dequantized with AutoAWQ's own
unpacking (no AWQ kernel needed); the 16-bit and dequantized models run side by side on
held-out prompts one decoder layer at a time (memory: one layer of each in float32, plus the
embeddings): each layer's error, then both models' logits: top-1 agreement and relative
error go to metrics.
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


def layer_by_layer_quantizer():
    """AutoAWQ's quantizer, each decoder layer moved back to the CPU once quantized.

    AutoAWQ 0.2.9 moves one layer at a time to the GPU for calibration but leaves it there:
    all 80 quantized layers of Qwen2-72B (about 39 GB) plus the layer being calibrated do not
    fit beside the activations on one 48 GB card."""
    from awq.quantize.quantizer import AwqQuantizer

    class LayerByLayer(AwqQuantizer):
        def _apply_quant(self, module, named_linears):
            super()._apply_quant(module, named_linears)
            module.cpu()

    return LayerByLayer


class Checkpoint:
    """The tensors of a safetensors model folder, read one at a time (never the whole model)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.files = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as shard:
                self.files.update(dict.fromkeys(shard.keys(), path))
        if not self.files:
            raise UserError(f"{folder}: no *.safetensors files")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def head(self) -> str:
        """The output head's tensor: lm_head, or the embeddings where the model ties them."""
        return "lm_head.weight" if "lm_head.weight" in self.files else "model.embed_tokens.weight"

    def shape(self, name: str) -> list[int]:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as shard:
            return shard.get_slice(name).get_shape()

    def rows(self, name: str, start: int, stop: int):
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as shard:
            return shard.get_slice(name)[start:stop]

    def rows_at(self, name: str, indices: list[int]):
        """Rows `indices` of a tensor (a prompt's token embeddings), the file opened once."""
        import torch
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as shard:
            rows = shard.get_slice(name)
            return torch.cat([rows[i : i + 1] for i in indices])

    def get(self, name: str):
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as shard:
            return shard.get_tensor(name)

    def layer(self, prefix: str, bits: int, group_size: int) -> dict:
        """The float32 weights under `prefix`, 4-bit linears dequantized with AutoAWQ's unpacking."""
        from awq.utils.packing_utils import dequantize_gemm

        state = {}
        for name in (n for n in self.files if n.startswith(prefix)):
            short = name[len(prefix) :]
            if short.endswith(".qweight"):
                base = name[: -len(".qweight")]
                weight = dequantize_gemm(
                    self.get(name), self.get(f"{base}.qzeros"), self.get(f"{base}.scales"), bits, group_size
                )
                state[short[: -len(".qweight")] + ".weight"] = weight.T.float().contiguous()
            elif not short.endswith((".qzeros", ".scales")):
                state[short] = self.get(name).float()
        return state


def compare_with_reference(reference: Path, quantized: Path, prompts: list[str], bits: int, group_size: int) -> dict:
    """The 16-bit and the dequantized 4-bit model run side by side, one decoder layer at a time:
    memory is one layer of each in float32 (plus the embeddings), whatever the model's size.

    Per layer: the quantized layer's output error on the 16-bit model's own hidden states,
    relative to what the layer adds. At the end: both models' logits, top-1 agreement and
    relative error, as a whole-model comparison would give them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(reference)
    config = AutoConfig.from_pretrained(reference)
    with torch.device("meta"):  # the model's modules, holding no weights
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    body = skeleton.model
    original, packed = Checkpoint(reference), Checkpoint(quantized)
    with torch.device(device):
        rotary = type(body.rotary_emb)(config=config)

    def load(module, state: dict, where: str):
        module.to_empty(device=device)
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(
                f"{where}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        return module

    # each model's own embeddings (AWQ keeps them in 16 bits), a prompt's rows only
    token_ids = [tokenizer(prompt).input_ids for prompt in prompts]

    def embedded(checkpoint: Checkpoint, ids: list[int]):
        return checkpoint.rows_at("model.embed_tokens.weight", ids).float().to(device)[None]

    ours = [embedded(original, ids) for ids in token_ids]  # the 16-bit model's hidden states, per prompt
    theirs = [embedded(packed, ids) for ids in token_ids]  # the dequantized model's
    # per prompt: the causal mask and the rotary position embeddings, the same in every layer
    context = []
    for h in ours:
        positions = torch.arange(h.shape[1], device=device)[None]
        mask = torch.full((h.shape[1], h.shape[1]), float("-inf"), device=device).triu(1)[None, None]
        context.append({"attention_mask": mask, "position_embeddings": rotary(h, positions)})
    worst_layer = 0.0
    with torch.no_grad():
        for i, layer in enumerate(body.layers):
            prefix = f"model.layers.{i}."
            a = load(layer, original.layer(prefix, bits, group_size), str(reference))
            outputs = [a(h, **c) for h, c in zip(ours, context, strict=True)]
            b = load(layer, packed.layer(prefix, bits, group_size), str(quantized))
            for k, (h, c) in enumerate(zip(ours, context, strict=True)):
                on_ours = b(h, **c)
                if torch.isnan(on_ours).any():
                    raise UserError(f"{quantized}: layer {i} of the dequantized model gives NaN")
                change = (outputs[k] - h).norm().clamp_min(1e-12)
                worst_layer = max(worst_layer, float((on_ours - outputs[k]).norm() / change))
                theirs[k] = b(theirs[k], **c)
            ours = outputs
            layer.to("meta")
        final = {}
        for name, folder, checkpoint, states in (
            ("ours", reference, original, ours),
            ("theirs", quantized, packed, theirs),
        ):
            norm = load(body.norm, checkpoint.layer("model.norm.", bits, group_size), str(folder))
            final[name] = [norm(h)[0] for h in states]
        agree, total, worst = compare_logits(final["ours"], final["theirs"], original, packed, device)
        if worst != worst:
            raise UserError(f"{quantized}: the dequantized model gives NaN logits")
    return {
        "top1_agreement": agree / total,
        "max_relative_logits_error": worst,
        "max_relative_layer_error": worst_layer,
        "layers_checked": len(body.layers),
        "positions": total,
    }


def compare_logits(ours: list, theirs: list, original: Checkpoint, packed: Checkpoint, device: str, rows: int = 16384):
    """Top-1 agreement, positions and the worst relative error of the two models' logits, the
    output heads read a block of vocabulary rows at a time (the full logits of a 152k-token
    vocabulary are never held)."""
    import torch

    heads = [c.head() for c in (original, packed)]
    vocabulary = original.shape(heads[0])[0]
    squares = [[0.0, 0.0] for _ in ours]  # per prompt: sum (la - lb)^2, sum la^2
    best = [[None, None] for _ in ours]  # per prompt: running (max, argmax) of each model
    for start in range(0, vocabulary, rows):
        wa = original.rows(heads[0], start, start + rows).to(device).float()
        wb = packed.rows(heads[1], start, start + rows).to(device).float()
        for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            la, lb = a @ wa.T, b @ wb.T
            squares[k][0] += float(((la - lb) ** 2).sum())
            squares[k][1] += float((la**2).sum())
            for m, block in enumerate((la, lb)):
                value, index = block.max(-1)
                if best[k][m] is None:
                    best[k][m] = (value, index + start)
                else:
                    better = value > best[k][m][0]
                    best[k][m] = (
                        torch.where(better, value, best[k][m][0]),
                        torch.where(better, index + start, best[k][m][1]),
                    )
    agree = sum(int((b[0][1] == b[1][1]).sum()) for b in best)
    total = sum(a.shape[0] for a in ours)
    worst = max((d / max(n, 1e-24)) ** 0.5 for d, n in squares)
    return agree, total, worst


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
    # The 16-bit model in host RAM (about 2 bytes a parameter: 145 GB for Qwen2-72B), never
    # `device_map="auto"` (AutoAWQ's default would spread it over a GPU it then runs out of);
    # calibration moves one decoder layer at a time to the GPU and back.
    model = AutoAWQForCausalLM.from_pretrained(str(padded), safetensors=True, device_map="cpu")
    tokenizer = AutoTokenizer.from_pretrained(padded)
    model.quantize(
        tokenizer,
        quant_config=quant_config,
        calib_data=calibration_texts(rows, p.calib_samples),
        max_calib_samples=p.calib_samples,
        max_calib_seq_len=p.calib_max_len,
        quantizer_cls=layer_by_layer_quantizer(),
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
