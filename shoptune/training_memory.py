"""(Q)LoRA training's memory on each training GPU (or in host RAM when training runs on the CPU).

What a training process holds while it fine-tunes: the base model (NF4 for QLoRA, else 16-bit), the
LoRA weights with their gradients and the optimizer's state, one layer's activations, each layer's
input kept for gradient checkpointing (unsloth offloads those to host RAM; trl keeps them on the
GPU), the logits. With several processes (finetune.num_processes, one per GPU) plain data parallel
(DDP) holds all of it on every GPU, plus a bucket copy of the LoRA gradients; FSDP and ZeRO-3
(finetune.accelerate_config) divide the weights, gradients and optimizer state over the GPUs and
gather whole units back while they compute. Estimates from the model's shape and the profile's
finetune section; each constant says what it assumes.
"""

from __future__ import annotations

from shoptune import UserError
from shoptune.model_shape import DTYPE_BYTES, ModelShape, linears, parameter_groups
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


def training_memory(
    shape: ModelShape, finetune, on_gpu: bool, where: str, sharded: bool = False, offload: bool = False
) -> dict:
    """Memory of (Q)LoRA training, by part, in bytes, for one process (one GPU, or the CPU's share).

    On a GPU: the base in NF4 if load_in_4bit (embeddings, lm_head, norms in 16 bits), else 16-bit;
    LoRA weights and gradients in float32 with the optimizer's state; one layer's activations and a
    dequantized 16-bit copy of the largest projection per matmul; each layer's input for gradient
    checkpointing (backend unsloth: offloaded to host RAM; trl: on the GPU); the logits, in 16 bits
    with their gradient for unsloth (its cross-entropy makes no float32 copy), for trl also the
    float32 copy transformers' loss takes, its log-softmax and its gradient.
    `sharded` (FSDP or ZeRO-3 over finetune.num_processes GPUs): weights, LoRA state and optimizer
    state divided by the process count; while computing, two decoder layers gathered whole (the one
    running and the one prefetched) and the unwrapped rest (embeddings, lm_head, norms) in full.
    `offload` (a sharding config that keeps the weights in host RAM between uses): no base on the
    GPU but what is gathered; the whole base, over all processes, in host RAM instead.
    On a CPU: the base in its own dtype, no checkpointing (every layer's activations kept), float32
    logits with their softmax and gradient."""
    groups = parameter_groups(shape)
    n = finetune.num_processes
    shard = n if sharded else 1
    if finetune.load_in_4bit:
        linear, other = int(groups["linear"] * NF4_BITS / 8), groups["other"] * 2
    else:
        per_weight = 2 if on_gpu else DTYPE_BYTES.get(shape.dtype, 4)
        linear, other = groups["linear"] * per_weight, groups["other"] * per_weight
    base = linear + other
    in_host_ram = base if offload and sharded else 0
    gathered = 0
    if sharded and (shard > 1 or offload):
        base = 0 if offload else -(-base // shard)
        gathered = 2 * linear // shape.num_hidden_layers + other
    lora = lora_parameters(shape, finetune.lora_r, finetune.target_modules, f"{where}.finetune.target_modules")
    optimizer = OPTIMIZER_STATE_BYTES.get(finetune.optim, 8)
    lora_bytes = -(-lora * (4 + 4 + optimizer) // shard)
    buckets = lora * 4 if n > 1 and not sharded else 0  # DDP's gradient buckets: one more float32 copy
    batch, seq = finetune.per_device_train_batch_size, finetune.max_seq_length
    tokens = batch * seq
    trl = finetune.backend == "trl"
    if on_gpu:
        act_bytes = 2
        activations = layer_activation_bytes(shape, batch, seq, act_bytes, attention_matrix=False)
        if finetune.load_in_4bit:
            activations += max(a * b for a, b in linears(shape).values()) * 2
        checkpoints = shape.num_hidden_layers * tokens * shape.hidden_size * act_bytes
        offloaded = 0 if trl else checkpoints
        if trl:
            activations += checkpoints
        logits = tokens * shape.vocab_size * (2 + 4 * 3 if trl else 2 * 2)
        overhead = TRAIN_OVERHEAD_BYTES
    else:
        act_bytes = DTYPE_BYTES.get(shape.dtype, 4)
        activations = shape.num_hidden_layers * layer_activation_bytes(shape, batch, seq, act_bytes, True)
        offloaded = 0
        logits = tokens * shape.vocab_size * 4 * 3
        overhead = 0
    parts = {
        "base_weights": base,
        "gathered_weights": gathered,
        "lora": lora_bytes + buckets,
        "activations": activations,
        "logits": logits,
        "overhead": overhead,
    }
    return {
        "parts": parts,
        "total_bytes": sum(parts.values()),
        "processes": n,
        "sharded": sharded,
        "lora_parameters": lora,
        "optimizer_state_bytes_per_parameter": optimizer,
        "offloaded_checkpoints_bytes": offloaded,
        "offloaded_weights_bytes": in_host_ram,
        "tokens_per_step": tokens,
    }
