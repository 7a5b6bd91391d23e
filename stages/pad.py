"""pad: grow the MLP intermediate size with zero channels so AWQ groups split evenly under TP.

vLLM splits down_proj along its input under tensor parallelism; with AWQ groups of
`group_size`, each shard's width must be a multiple of the group size, so the
intermediate size is padded up to a multiple of group_size x tensor_parallel_size
(Qwen2-72B, group 128, TP 4: 29568 -> 29696, 7424 = 58 x 128 per shard).

Zero rows go into gate_proj and up_proj, zero columns into down_proj: silu(0) * 0 = 0,
so the MLP's output is unchanged. The zero channels are spread over all quantization
groups (the real channels keep their order) so that no group of down_proj is all zeros
(AutoAWQ before 0.2.6 gave NaN scales for those).

The model is rewritten one safetensors shard at a time (memory: about one shard, not
the whole model); each layer's MLP is checked on random inputs as soon as its three
projections are padded, and with `check_logits` both models are loaded and their
logits compared on a few prompts.

Also a direct command: shoptune pad MODEL_DIR OUT_DIR --group-size N --tensor-parallel-size N
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
from pathlib import Path

from shoptune import UserError, params
from shoptune.artifacts import atomic_dir, write_json
from shoptune.profile import PadParams
from shoptune.workspace import entrypoint, report_errors, stage_dir

log = logging.getLogger("pad")

MLP_TENSOR = re.compile(r"^(?P<layer>.*\.mlp)\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<kind>weight|bias)$")
CHECK_PROMPTS = [
    "The product 'Stainless Steel Water Bottle' appears on an e-commerce website. What is it made of?",
    "Produkt: Edelstahl Thermoskanne 1 Liter. Welche Farbe hat sie?",
    "商品「竹製 お箸 5膳セット」の素材はどれですか？",
]


def padded_size(intermediate_size: int, group_size: int, tensor_parallel_size: int) -> int:
    step = group_size * tensor_parallel_size
    return -(-intermediate_size // step) * step


def zero_layout(size: int, padded: int, group_size: int) -> list[int]:
    """For each padded channel, the original channel it copies, or -1 for a zero channel.

    The padded width is cut into groups of `group_size`; the zero channels are dealt out
    evenly, at the end of each group, so every group keeps at least one real channel.
    """
    groups = padded // group_size
    zeros = padded - size
    layout, channel = [], 0
    for group in range(groups):
        group_zeros = zeros // groups + (1 if group < zeros % groups else 0)
        real = group_size - group_zeros
        if real < 1:
            raise UserError(f"intermediate size {size} is too small to pad to {padded} without an all-zero group")
        layout += list(range(channel, channel + real)) + [-1] * group_zeros
        channel += real
    assert channel == size and len(layout) == padded
    return layout


def pad_tensor(tensor, layout: list[int], dim: int):
    import torch

    index = torch.tensor([max(i, 0) for i in layout])
    out = tensor.index_select(dim, index)
    zero = torch.tensor([i < 0 for i in layout])
    if dim == 0:
        out[zero] = 0
    else:
        out[:, zero] = 0
    return out


def mlp_difference(original: dict, padded: dict, seed: int = 0) -> float:
    """Max |MLP(x) - padded MLP(x)| over random inputs, relative to max |MLP(x)|."""
    import torch

    def mlp(t, x):
        def linear(name, x):
            y = x @ t[f"{name}.weight"].float().T
            return y + t[f"{name}.bias"].float() if f"{name}.bias" in t else y

        return linear("down_proj", torch.nn.functional.silu(linear("gate_proj", x)) * linear("up_proj", x))

    hidden = original["gate_proj.weight"].shape[1]
    x = torch.randn(4, hidden, generator=torch.Generator().manual_seed(seed))
    a, b = mlp(original, x), mlp(padded, x)
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def pad_model(
    src: Path, dst: Path, group_size: int, tensor_parallel_size: int, check_logits: bool, logits_atol: float
) -> dict:
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm import tqdm

    config_path = src / "config.json"
    if not config_path.is_file():
        raise UserError(f"{src}: no config.json (not a Hugging Face model folder)")
    config = json.loads(config_path.read_text())
    if "intermediate_size" not in config:
        raise UserError(f"{config_path}: no intermediate_size")
    size = config["intermediate_size"]
    padded = padded_size(size, group_size, tensor_parallel_size)
    layout = zero_layout(size, padded, group_size)
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise UserError(f"{src}: no *.safetensors files")
    log.info(
        "intermediate_size %d -> %d (group %d x tensor parallel %d; %d zero channels)",
        size,
        padded,
        group_size,
        tensor_parallel_size,
        padded - size,
    )

    pending: dict[str, tuple[dict, dict]] = {}  # layer -> (original, padded) projections seen so far
    worst_mlp, layers_checked, padded_tensors, total_bytes = 0.0, 0, 0, 0
    with atomic_dir(dst) as out:
        for path in shards:
            tensors, meta = {}, None
            with safe_open(str(path), framework="pt") as shard:
                meta = shard.metadata()
                for name in tqdm(list(shard.keys()), desc=f"pad {path.name}", unit="tensor", leave=False):
                    tensor = shard.get_tensor(name)
                    match = MLP_TENSOR.match(name)
                    if match and padded != size:
                        proj, kind = match["proj"], match["kind"]
                        dim = 1 if proj == "down_proj" and kind == "weight" else 0
                        if not (proj == "down_proj" and kind == "bias"):
                            if tensor.shape[dim] != size:
                                raise UserError(
                                    f"{path}: {name} has shape {list(tensor.shape)}, expected "
                                    f"{size} along dimension {dim}"
                                )
                            new = pad_tensor(tensor, layout, dim)
                        else:
                            new = tensor
                        padded_tensors += 1
                        before, after = pending.setdefault(match["layer"], ({}, {}))
                        before[f"{proj}.{kind}"], after[f"{proj}.{kind}"] = tensor, new
                        if all(f"{p}.weight" in before for p in ("gate_proj", "up_proj", "down_proj")):
                            worst_mlp = max(worst_mlp, mlp_difference(before, after))
                            layers_checked += 1
                            del pending[match["layer"]]
                        tensor = new
                    tensors[name] = tensor.contiguous()
            save_file(tensors, str(out / path.name), metadata=meta or {"format": "pt"})
            total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        if pending:
            raise UserError(f"{src}: layer(s) {', '.join(sorted(pending))} lack a gate, up or down projection")
        for item in src.iterdir():
            if item.suffix != ".safetensors" and item.name != "config.json" and item.is_file():
                shutil.copy2(item, out / item.name)
        index = out / "model.safetensors.index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            data.setdefault("metadata", {})["total_size"] = total_bytes
            index.write_text(json.dumps(data, indent=2) + "\n")
        config["intermediate_size"] = padded
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if worst_mlp > 1e-5:
            raise UserError(f"padding changed an MLP's output (relative difference {worst_mlp:.2e})")
        logits = compare_logits(src, out) if check_logits else None
        if logits is not None and logits > logits_atol:
            raise UserError(f"padded model's logits differ by {logits:.2e} (> logits_atol {logits_atol:g})")
    report = {
        "intermediate_size": size,
        "padded_intermediate_size": padded,
        "zero_channels": padded - size,
        "group_size": group_size,
        "tensor_parallel_size": tensor_parallel_size,
        "shard_width": padded // tensor_parallel_size,
        "groups_per_shard": padded // tensor_parallel_size // group_size,
        "padded_tensors": padded_tensors,
        "layers_checked": layers_checked,
        "mlp_max_relative_difference": worst_mlp,
        "logits_max_abs_difference": logits,
        "logits_checked_prompts": len(CHECK_PROMPTS) if check_logits else 0,
    }
    return report


def compare_logits(original: Path, padded: Path) -> float:
    """Max |logits difference| of the two models (float32, CPU or GPU) on CHECK_PROMPTS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(original)
    worst = 0.0
    logits = {}
    for name, path in (("original", original), ("padded", padded)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        with torch.no_grad():
            logits[name] = [model(**tokenizer(p, return_tensors="pt").to(device)).logits.cpu() for p in CHECK_PROMPTS]
        del model
    for a, b in zip(logits["original"], logits["padded"], strict=True):
        worst = max(worst, float((a - b).abs().max()))
    log.info("logits of original and padded model: max |difference| %.3g over %d prompts", worst, len(CHECK_PROMPTS))
    return worst


def pad(profile: str) -> None:
    p = params.load(profile, "pad", PadParams)
    group_size = params.profile_section(profile, "quantize").get("q_group_size")
    tensor_parallel_size = params.profile_section(profile, "infer").get("tensor_parallel_size")
    for key, value in (("quantize.q_group_size", group_size), ("infer.tensor_parallel_size", tensor_parallel_size)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"params.yaml: profiles.{profile}.{key}: expected a positive integer, got {value!r}")
    folder = stage_dir(profile, "pad")
    report = pad_model(
        stage_dir(profile, "finetune") / "model",
        folder / "model",
        group_size,
        tensor_parallel_size,
        p.check_logits,
        p.logits_atol,
    )
    write_json(folder / "metrics.json", report)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--profile" in argv:
        return entrypoint(pad, argv)
    parser = argparse.ArgumentParser(prog="shoptune pad", description="Pad a model's MLP for AWQ + tensor parallel.")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--tensor-parallel-size", type=int, required=True)
    parser.add_argument("--check-logits", action="store_true", help="also load both models and compare logits")
    parser.add_argument("--logits-atol", type=float, default=1e-4)
    args = parser.parse_args(argv)

    def pad_directly():
        if args.group_size < 1 or args.tensor_parallel_size < 1:
            raise UserError("--group-size and --tensor-parallel-size must be positive")
        return pad_model(
            args.model_dir,
            args.out_dir,
            args.group_size,
            args.tensor_parallel_size,
            args.check_logits,
            args.logits_atol,
        )

    print(json.dumps(report_errors(pad_directly), indent=2))


if __name__ == "__main__":
    main()
