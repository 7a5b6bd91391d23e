"""The model as its config.json describes it, and what its weights and KV cache weigh.

`ModelShape` holds the numbers of a dense decoder (Qwen2, Llama, Mistral) read from a Hugging
Face config.json; the rest are pure functions of it: parameter counts, bytes in 16 bits and
as AWQ (AutoAWQ GEMM), one GPU's share under vLLM's tensor parallelism, KV cache bytes per
token. Nothing here reads a profile or imports torch; each constant says what it assumes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from shoptune import UserError

DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}
# vLLM pads the vocabulary to a multiple of 64.
VOCAB_PADDING = 64
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split along the output


@dataclasses.dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    dtype: str

    def padded(self, intermediate_size: int) -> ModelShape:
        return dataclasses.replace(self, intermediate_size=intermediate_size)


def shape_from_config(config: dict, where: str) -> ModelShape:
    """The numbers the plan needs from a Hugging Face config.json (a dense decoder: Qwen2, Llama, Mistral)."""
    if "num_experts" in config or "num_local_experts" in config:
        raise UserError(f"{where}: a mixture-of-experts model; plan knows dense decoders only")
    values = {}
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "max_position_embeddings",
    ):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{where}: {key}: expected a positive integer, got {value!r}")
        values[key] = value
    defaults = {
        "num_key_value_heads": values["num_attention_heads"],
        "head_dim": values["hidden_size"] // values["num_attention_heads"],
    }
    for key, default in defaults.items():
        value = config.get(key) or default
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{where}: {key}: expected a positive integer, got {value!r}")
        values[key] = value
    model_type = str(config.get("model_type", "?"))
    return ModelShape(
        model_type=model_type,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        # Qwen2's q, k and v projections have biases (its config does not say so)
        attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
        dtype=str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"),
        **values,
    )


def read_config(path: Path) -> ModelShape:
    if not path.is_file():
        raise UserError(f"{path}: no such file (expected a model's config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object")
    return shape_from_config(config, str(path))


def tiny_model_config(tiny: dict) -> dict:
    """The config.json stages/tiny_model.py writes for the params.yaml `tiny_model` section."""
    return {**tiny, "model_type": "qwen2", "tie_word_embeddings": True, "torch_dtype": "float32"}


def padded_size(size: int, group_size: int, tensor_parallel_size: int) -> int:
    """The MLP width the pad stage writes: `size` up to a multiple of group x TP, so every
    tensor-parallel shard of down_proj's input is whole AWQ groups."""
    step = group_size * tensor_parallel_size
    return -(-size // step) * step


def linears(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """Each decoder layer's projections: name -> (in_features, out_features)."""
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def parameter_groups(shape: ModelShape) -> dict[str, int]:
    """Parameters by kind: the decoder layers' linear weights (what 4-bit formats quantize) and the
    rest (embeddings, lm_head, norms, biases: kept in 16 bits)."""
    layer_linear = sum(a * b for a, b in linears(shape).values())
    bias = (shape.num_attention_heads + 2 * shape.num_key_value_heads) * shape.head_dim if shape.attention_bias else 0
    embeddings = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    norms = shape.num_hidden_layers * 2 * shape.hidden_size + shape.hidden_size
    return {
        "linear": shape.num_hidden_layers * layer_linear,
        "other": embeddings + norms + shape.num_hidden_layers * bias,
    }


def parameter_count(shape: ModelShape) -> int:
    return sum(parameter_groups(shape).values())


def dense_bytes(shape: ModelShape, bytes_per_param: int = 2) -> int:
    return parameter_count(shape) * bytes_per_param


def awq_linear_bytes(in_features: int, out_features: int, w_bit: int, group_size: int) -> int:
    """AutoAWQ GEMM: qweight (w_bit per weight, packed in int32), float16 scales per group and
    output, and zero points per group and output packed like the weights."""
    groups = -(-in_features // group_size)
    return in_features * out_features * w_bit // 8 + groups * out_features * 2 + groups * out_features * w_bit // 8


def awq_bytes(shape: ModelShape, w_bit: int, group_size: int) -> int:
    """The AWQ model's weights: every decoder projection quantized, everything else 16-bit."""
    layer = sum(awq_linear_bytes(a, b, w_bit, group_size) for a, b in linears(shape).values())
    return shape.num_hidden_layers * layer + parameter_groups(shape)["other"] * 2


def per_gpu_bytes(shape: ModelShape, tp: int, bytes_per_param: int = 2, awq: tuple[int, int] | None = None) -> int:
    """One GPU's share of the weights under vLLM's tensor parallelism: q, k, v, gate, up split along
    their outputs, o and down along their inputs, the (padded) vocabulary split, norms replicated.
    KV heads fewer than GPUs are replicated. awq=(w_bit, group_size) for the AWQ model."""
    kv_heads = max(1, shape.num_key_value_heads // tp)
    shard = {}
    for name, (a, b) in linears(shape).items():
        if name in ("k_proj", "v_proj"):
            shard[name] = (a, kv_heads * shape.head_dim)
        elif name in COLUMN_PARALLEL:
            shard[name] = (a, -(-b // tp))
        else:
            shard[name] = (-(-a // tp), b)
    if awq:
        layer = sum(awq_linear_bytes(a, b, awq[0], awq[1]) for a, b in shard.values())
        rest_bytes = 2
    else:
        layer = sum(a * b for a, b in shard.values()) * bytes_per_param
        rest_bytes = bytes_per_param
    bias = (shape.num_attention_heads // tp + 2 * kv_heads) * shape.head_dim if shape.attention_bias else 0
    vocab = -(-shape.vocab_size // VOCAB_PADDING) * VOCAB_PADDING
    embeddings = -(-vocab // tp) * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    norms = shape.num_hidden_layers * 2 * shape.hidden_size + shape.hidden_size
    return shape.num_hidden_layers * layer + (embeddings + norms + shape.num_hidden_layers * bias) * rest_bytes


def kv_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """Keys and values of every layer for one token: 2 x layers x KV heads x head_dim x bytes."""
    return 2 * shape.num_hidden_layers * shape.num_key_value_heads * shape.head_dim * dtype_bytes


def dtype_bytes(name: str, shape: ModelShape, where: str) -> int:
    name = shape.dtype if name == "auto" else name
    if name not in DTYPE_BYTES:
        raise UserError(f"{where}: unknown dtype {name!r} (known: auto, {', '.join(DTYPE_BYTES)})")
    return DTYPE_BYTES[name]
