"""(Q)LoRA training's memory on the training GPU (or in host RAM when training runs on the CPU).

What unsloth holds while it fine-tunes: the base model (NF4 for QLoRA, else 16-bit), the LoRA
weights with their gradients and the optimizer's state, one layer's activations (gradient
checkpointing offloads each layer's input to host RAM), the logits. Estimates from the model's
shape and the profile's finetune section; each constant says what it assumes.
"""

from __future__ import annotations

from shoptune import UserError
from shoptune.model_shape import DTYPE_BYTES, ModelShape, linears, parameter_count, parameter_groups
from shoptune.sizes import GIB

# The training GPU's CUDA context, cuBLAS workspace and allocator fragmentation.
TRAIN_OVERHEAD_BYTES = int(1.5 * GIB)
# bitsandbytes NF4 with double quantization (what unsloth loads): 4 bits per weight, an 8-bit
# absmax per block of 64 and a float32 constant per 256 of those.
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
# Optimizer state bytes per trainable parameter (two moments); unknown names count as 8.
OPTIMIZER_STATE_BYTES = {
    "adamw_8bit": 2,
    "adamw_bnb_8bit": 2,
    "paged_adamw_8bit": 2,
    "adamw_torch": 8,
    "adamw_torch_fused": 8,
    "adamw_hf": 8,
    "adamw": 8,
    "paged_adamw_32bit": 8,
    "adafactor": 4,
    "sgd": 4,
}


def lora_parameters(shape: ModelShape, r: int, modules: list[str], where: str) -> int:
    shapes = {
        **linears(shape),
        "embed_tokens": (shape.vocab_size, shape.hidden_size),
        "lm_head": (shape.hidden_size, shape.vocab_size),
    }
    total = 0
    for module in modules:
        if module not in shapes:
            raise UserError(f"{where}: unknown module {module!r} (known: {', '.join(shapes)})")
        a, b = shapes[module]
        total += r * (a + b) * (1 if module in ("embed_tokens", "lm_head") else shape.num_hidden_layers)
    return total


def layer_activation_bytes(shape: ModelShape, batch: int, seq: int, act_bytes: int, attention_matrix: bool) -> int:
    """What backpropagation through one decoder layer holds: about 10 hidden-wide and 4
    intermediate-wide tensors per token (norms, q/k/v, attention output, residuals; gate, up,
    their product, the activation), plus the attention matrix unless a fused kernel (flash,
    memory-efficient SDPA) avoids it."""
    tokens = batch * seq
    per_token = 10 * shape.hidden_size + 4 * shape.intermediate_size
    matrix = batch * shape.num_attention_heads * seq * seq if attention_matrix else 0
    return (tokens * per_token + matrix) * act_bytes


def training_memory(shape: ModelShape, finetune, on_gpu: bool, where: str) -> dict:
    """Memory of (Q)LoRA training, by part, in bytes.

    On a GPU (what unsloth does): the base in NF4 if load_in_4bit (embeddings, lm_head, norms in
    16 bits), else 16-bit; LoRA weights and gradients in float32 with the optimizer's state;
    gradient checkpointing ("unsloth" mode) keeps one layer's activations on the GPU and offloads
    each layer's input to host RAM; the logits and their gradient in 16 bits (unsloth's cross-entropy
    does not make a float32 copy); a dequantized 16-bit copy of the largest projection per matmul.
    On a CPU: the base in its own dtype, no checkpointing (every layer's activations kept), float32
    logits with their softmax and gradient."""
    groups = parameter_groups(shape)
    if finetune.load_in_4bit:
        base = int(groups["linear"] * NF4_BITS / 8) + groups["other"] * 2
    else:
        base = parameter_count(shape) * (2 if on_gpu else DTYPE_BYTES.get(shape.dtype, 4))
    lora = lora_parameters(shape, finetune.lora_r, finetune.target_modules, f"{where}.finetune.target_modules")
    optimizer = OPTIMIZER_STATE_BYTES.get(finetune.optim, 8)
    batch, seq = finetune.per_device_train_batch_size, finetune.max_seq_length
    tokens = batch * seq
    if on_gpu:
        act_bytes = 2
        activations = layer_activation_bytes(shape, batch, seq, act_bytes, attention_matrix=False)
        if finetune.load_in_4bit:
            activations += max(a * b for a, b in linears(shape).values()) * 2
        offloaded = shape.num_hidden_layers * tokens * shape.hidden_size * act_bytes
        logits = tokens * shape.vocab_size * 2 * 2
        overhead = TRAIN_OVERHEAD_BYTES
    else:
        act_bytes = DTYPE_BYTES.get(shape.dtype, 4)
        activations = shape.num_hidden_layers * layer_activation_bytes(shape, batch, seq, act_bytes, True)
        offloaded = 0
        logits = tokens * shape.vocab_size * 4 * 3
        overhead = 0
    parts = {
        "base_weights": base,
        "lora": lora * (4 + 4 + optimizer),
        "activations": activations,
        "logits": logits,
        "overhead": overhead,
    }
    return {
        "parts": parts,
        "total_bytes": sum(parts.values()),
        "lora_parameters": lora,
        "optimizer_state_bytes_per_parameter": optimizer,
        "offloaded_checkpoints_bytes": offloaded,
        "tokens_per_step": tokens,
    }
