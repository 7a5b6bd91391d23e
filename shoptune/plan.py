"""Will a profile fit its hardware? Sizes, memory and disk from a model's config.json, before any GPU time.

    shoptune plan --profile paper [--config PATH] [--tensor-parallel-size N] [--json]

The plan puts together the model's sizes (shoptune.model_shape), the training GPU's memory
(shoptune.training_memory) and each stage's host RAM and disk (shoptune.host_needs) with the
profile's numbers: the checks (can vLLM split the model, does the KV cache fit), one section
of lines per part, rendering and JSON, and reading the inputs. Nothing here imports torch. The
figures are estimates: each constant, here and in those modules, says what it assumes.

Checked against known figures (tests/test_plan.py): Qwen2-72B-Instruct, padded to 29696, as
AWQ 4-bit (group 128, zero point, GEMM) is 41.6e9 bytes = 38.7 GiB (the team's 38.74 "GB"
is GiB) and 9.7 GiB per T4 at tensor parallel 4; the demo's tiny model as AWQ comes out within
0.1 % of the bytes its quantize stage wrote.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from shoptune import UserError, params, training_launch
from shoptune.host_needs import MODEL_STAGES, VLLM_CPU_KV_BYTES, Stage, cache_copies, needs_of, stage_needs
from shoptune.inference import serves_awq
from shoptune.model_shape import (
    COLUMN_PARALLEL,
    DTYPE_BYTES,
    ModelShape,
    awq_bytes,
    dense_bytes,
    dtype_bytes,
    kv_bytes_per_token,
    linears,
    padded_size,
    parameter_count,
    per_gpu_bytes,
    read_config,
    shape_from_config,
    tiny_model_config,
)
from shoptune.profile import Profile, TinyModelParams
from shoptune.sizes import GIB, file_size, size
from shoptune.training_memory import training_memory

# ---------------------------------------------------------------- assumptions

# Inside gpu_memory_utilization, per GPU, besides weights and KV cache: vLLM's profiled peak
# activations (max_num_batched_tokens through one layer, the sampler's logits), CUDA graphs,
# NCCL and cuBLAS workspaces. About 0.3-0.6 GiB of activations and 0.3-0.5 GiB of graphs and
# buffers for a 70B model at TP 4; change it with --overhead-gib.
INFER_OVERHEAD_BYTES = 1 * GIB
# vLLM allocates the KV cache in blocks of 16 tokens.
KV_BLOCK_TOKENS = 16
# Compute capability vLLM's kernels need: bfloat16 (Ampere), AWQ (Turing).
BF16_MIN_CC = 8.0
AWQ_MIN_CC = 7.5


# ---------------------------------------------------------------- checks


@dataclasses.dataclass
class Check:
    """One verdict of the plan: ok, or not and why. `applies` False: shown, but the profile does
    not need it (for example AWQ shards when inference runs on one CPU)."""

    name: str
    ok: bool
    detail: str
    applies: bool = True

    @property
    def mark(self) -> str:
        return ("ok" if self.ok else "FAIL") if self.applies else "--"


def shard_checks(shape: ModelShape, tp: int, group_size: int, w_bit: int = 4, quantized: bool = True) -> list[Check]:
    """Can vLLM split this model over `tp` GPUs: heads, and (for AWQ) every projection's input per
    GPU in whole groups and its output per GPU in whole packed int32 words."""
    checks = []
    heads, kv = shape.num_attention_heads, shape.num_key_value_heads
    checks.append(
        Check(
            "attention heads",
            heads % tp == 0,
            f"num_attention_heads {heads} -> {heads // tp} per GPU"
            if heads % tp == 0
            else f"num_attention_heads {heads} does not split over {tp} GPUs ({heads} % {tp} = {heads % tp})",
        )
    )
    kv_ok = kv % tp == 0 or tp % kv == 0
    checks.append(
        Check(
            "KV heads",
            kv_ok,
            (
                f"num_key_value_heads {kv} -> {kv // tp} per GPU"
                if kv % tp == 0
                else f"num_key_value_heads {kv}: 1 per GPU, each on {tp // kv} GPUs"
            )
            if kv_ok
            else f"num_key_value_heads {kv} neither splits over nor replicates onto {tp} GPUs",
        )
    )
    if not quantized:
        return checks
    pack = 32 // w_bit
    widths = {
        "hidden_size": (shape.hidden_size, 1, "q/k/v/gate/up input, whole on every GPU"),
        "attention width": (heads * shape.head_dim, tp, "o_proj input"),
        "intermediate_size": (shape.intermediate_size, tp, "down_proj input"),
    }
    for name, (width, split, what) in widths.items():
        per_gpu, rest = divmod(width, split)
        if rest:
            checks.append(Check(name, False, f"{name} {width} ({what}) does not split over {split} GPUs"))
        elif per_gpu % group_size:
            checks.append(
                Check(
                    name,
                    False,
                    f"{name} {width} ({what}) -> {per_gpu} per GPU: not whole AWQ groups "
                    f"({per_gpu} % {group_size} = {per_gpu % group_size})",
                )
            )
        else:
            where = "" if split == 1 else f" -> {per_gpu} per GPU"
            checks.append(Check(name, True, f"{name} {width} ({what}){where} = {per_gpu // group_size} x {group_size}"))
    # AWQ packs `pack` outputs into one int32: each GPU's share of a column-parallel output in whole words
    for name, (_, out) in linears(shape).items():
        split = tp if name in COLUMN_PARALLEL else 1
        if name in ("k_proj", "v_proj"):
            out, split = max(1, kv // tp) * shape.head_dim, 1
        if out % split:
            continue  # the heads or the widths above say so
        if (out // split) % pack:
            checks.append(
                Check(f"{name} output", False, f"{name} output {out // split} per GPU: not a multiple of {pack}")
            )
    return checks


def kv_fit(
    gpu_bytes: float, utilization: float, weights: int, overhead: int, kv_per_token: int, max_model_len: int
) -> dict:
    """How many tokens of KV cache fit one GPU after the weights and the overhead, and how many
    sequences of max_model_len that makes (vLLM: in blocks of 16 tokens)."""
    free = gpu_bytes * utilization - weights - overhead
    blocks = max(0, int(free // (kv_per_token * KV_BLOCK_TOKENS))) if kv_per_token else 0
    tokens = blocks * KV_BLOCK_TOKENS
    return {
        "budget_bytes": int(gpu_bytes * utilization),
        "weights_bytes": weights,
        "overhead_bytes": overhead,
        "kv_cache_bytes": int(max(free, 0)),
        "kv_tokens": tokens,
        "sequences_at_max_model_len": tokens // max_model_len if max_model_len else 0,
    }


# ---------------------------------------------------------------- the plan


@dataclasses.dataclass
class Section:
    title: str
    lines: list[str]


@dataclasses.dataclass
class Plan:
    profile: str
    config: str
    config_note: str
    shape: ModelShape
    tp: int
    sections: list[Section]
    checks: list[Check]
    stages: dict[str, Stage]
    data: dict

    @property
    def fits(self) -> bool:
        return all(c.ok for c in self.checks if c.applies)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.applies and not c.ok]

    def needs(self, stages: list[str] | tuple[str, ...] = MODEL_STAGES) -> dict:
        """Host RAM and disk for these stages (see needs_of)."""
        return needs_of(self.stages, self.data["disk"], stages)


@dataclasses.dataclass
class Context:
    """What every part of the plan reads: the profile, the model, and a few derived numbers."""

    name: str
    profile: Profile
    shape: ModelShape
    tp: int
    overhead: int
    where: str

    def __post_init__(self):
        quant, infer, hw = self.profile.quantize, self.profile.infer, self.profile.hardware
        self.group, self.w_bit = quant.q_group_size, quant.w_bit
        self.padded = padded_size(self.shape.intermediate_size, self.group, self.tp)
        self.served = self.shape.padded(self.padded)  # the model pad writes, quantize and infer read
        self.quantized = serves_awq(self.name, infer)
        self.on_gpus = infer.backend == "vllm" and hw.infer_gpus > 0
        self.pp = infer.pipeline_parallel_size if infer.backend == "vllm" else 1
        # pipeline parallel: the largest stage holds ceil(L / pp) of the L layers, and their KV cache
        self.stage_share = math.ceil(self.shape.num_hidden_layers / self.pp) / self.shape.num_hidden_layers
        self.infer_bytes = dtype_bytes(infer.dtype, self.shape, f"{self.where}.infer.dtype")
        self.awq = awq_bytes(self.served, self.w_bit, self.group)
        # what inference holds: the AWQ model, or the padded model in infer.dtype
        self.infer_weights = self.awq if self.quantized else dense_bytes(self.served, self.infer_bytes)
        self.kv_token = kv_bytes_per_token(self.shape, self.infer_bytes)


def line(check: Check) -> str:
    return f"{check.mark:5} {check.detail}"


def model_section(c: Context, checks: list[Check]) -> Section:
    s, hw = c.shape, c.profile.hardware
    n = c.profile.finetune.num_processes
    train = (
        f"train: {n} GPU{'s' if n > 1 else ''} x {hw.train_gpu_memory_gib:g} GiB"
        if hw.train_gpu_memory_gib
        else f"train: CPU{f' ({n} processes)' if n > 1 else ''}"
    )
    infer = (
        f"infer: {hw.infer_gpus} GPU(s) x {hw.infer_gpu_memory_gib:g} GiB, compute capability "
        f"{hw.infer_gpu_compute_capability:g}"
        if hw.infer_gpus
        else "infer: CPU"
    )
    lines = [
        f"hidden {s.hidden_size}, intermediate {s.intermediate_size}, {s.num_hidden_layers} layers, "
        f"{s.num_attention_heads} heads ({s.num_key_value_heads} KV, head_dim {s.head_dim}), vocab {s.vocab_size}, "
        f"{s.dtype}, max_position_embeddings {s.max_position_embeddings}",
        f"hardware: {train}; {infer}; host {hw.host_ram_gib:g} GiB RAM, {hw.disk_gib:g} GiB disk",
    ]
    if c.profile.gpus and not (hw.train_gpu_memory_gib or hw.infer_gpus):
        checks.append(Check("hardware", False, f"{c.where}: gpus is true but hardware names no GPU"))
        lines.append(line(checks[-1]))
    count = parameter_count(s)
    count_text = f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"
    return Section(f"model: {s.model_type}, {count_text} parameters", lines)


def layout_section(c: Context, checks: list[Check]) -> Section:
    """Padding, AWQ groups for the quantize stage (one device), and the tensor-parallel split."""
    s, hw, infer = c.shape, c.profile.hardware, c.profile.infer
    lines = []
    before = next(x for x in shard_checks(s, c.tp, c.group, c.w_bit) if x.name == "intermediate_size")
    if c.padded != s.intermediate_size:
        lines.append(f"pad   {before.detail}")
        lines.append(
            f"      the pad stage makes it {c.padded} (+{c.padded - s.intermediate_size} zero channels) -> "
            f"{c.padded // c.tp} per GPU = {c.padded // c.tp // c.group} x {c.group}"
        )
    else:
        lines.append(f"pad   intermediate_size {c.padded}: a multiple of {c.group} x {c.tp} already, nothing to pad")
    # the quantize stage (AutoAWQ, one device): every projection's input in whole groups
    for x in shard_checks(c.served, 1, c.group, c.w_bit):
        if not x.ok and x.name not in ("attention heads", "KV heads"):
            checks.append(Check(f"AWQ {x.name}", False, f"quantize (AutoAWQ): {x.detail}"))
            lines.append(line(checks[-1]))
    for x in shard_checks(c.served, c.tp, c.group, c.w_bit, quantized=c.quantized):
        x.name, x.applies = f"TP {x.name}", c.on_gpus
        checks.append(x)
        if x.name != "TP intermediate_size" or not x.ok:
            lines.append(line(x))
    if c.on_gpus and c.tp * c.pp > hw.infer_gpus:
        parallel = f"tensor parallel {c.tp}" + (f" x pipeline parallel {c.pp}" if c.pp > 1 else "")
        checks.append(
            Check(
                "TP GPUs",
                False,
                f"{parallel} needs {c.tp * c.pp} GPUs; {c.where}.hardware.infer_gpus is {hw.infer_gpus}",
            )
        )
        lines.append(line(checks[-1]))
    if c.on_gpus and c.pp > 1:
        executor = infer.distributed_executor_backend or "vLLM's default"
        lines.append(
            f"      pipeline parallel {c.pp}: the {c.shape.num_hidden_layers} layers in {c.pp} stages of {c.tp} GPUs "
            f"({c.tp * c.pp} GPUs in all, {executor} executor; hardware.infer_gpus counts every node's); the "
            f"largest stage holds {math.ceil(c.shape.num_hidden_layers / c.pp)} layers"
        )
    if not c.on_gpus:
        device = "the CPU" if not hw.infer_gpus else "one GPU"
        lines.insert(
            1,
            f"--    not checked: infer.backend {infer.backend} runs on {device}, one device; "
            f"TP {c.tp} only sets the pad stage's layout",
        )
    served = "AWQ" if c.quantized else "16-bit"
    return Section(f"tensor parallel {c.tp}, AWQ group {c.group}, the {served} model served:", lines)


def weights_section(c: Context, data: dict) -> Section:
    quant = c.profile.quantize
    base, padded = dense_bytes(c.shape), dense_bytes(c.served)
    gpu_16, gpu_awq = per_gpu_bytes(c.served, c.tp), per_gpu_bytes(c.served, c.tp, awq=(c.w_bit, c.group))
    data["weights"] = {
        "bf16_bytes": base,
        "padded_bf16_bytes": padded,
        "awq_bytes": c.awq,
        "per_gpu_bf16_bytes": gpu_16,
        "per_gpu_awq_bytes": gpu_awq,
        "tensor_parallel_size": c.tp,
        "padded_intermediate_size": c.padded,
    }
    return Section(
        "weights:",
        [
            f"16-bit: {file_size(base)}, padded {file_size(padded)}; {size(gpu_16)} per GPU at TP {c.tp}",
            f"AWQ {c.w_bit}-bit (group {c.group}, zero point {str(quant.zero_point).lower()}, {quant.version}): "
            f"{file_size(c.awq)}; {size(gpu_awq)} per GPU at TP {c.tp}",
        ],
    )


def inference_section(c: Context, checks: list[Check], data: dict) -> Section:
    s, hw, infer = c.shape, c.profile.hardware, c.profile.infer
    mml = infer.max_model_len
    kv_heads = max(1, s.num_key_value_heads // c.tp) if c.on_gpus else s.num_key_value_heads
    kv_gpu = c.kv_token * kv_heads // s.num_key_value_heads
    if c.on_gpus and c.pp > 1:  # a GPU caches its stage's layers only
        kv_gpu = math.ceil(kv_gpu * c.stage_share)
    data["kv_cache"] = {"bytes_per_token": c.kv_token, "bytes_per_token_per_gpu": kv_gpu}
    lines = [
        f"KV cache: {c.kv_token:,} bytes per token ({infer.dtype})" + (f", {kv_gpu:,} per GPU" if c.on_gpus else "")
    ]
    if mml > s.max_position_embeddings:
        checks.append(
            Check(
                "max_model_len",
                False,
                f"infer.max_model_len {mml} is longer than the model's max_position_embeddings "
                f"{s.max_position_embeddings} (vLLM refuses it)",
            )
        )
        lines.append(line(checks[-1]))
    cc = hw.infer_gpu_compute_capability
    dtype = s.dtype if infer.dtype == "auto" else infer.dtype
    if c.on_gpus and dtype == "bfloat16" and cc < BF16_MIN_CC:
        checks.append(
            Check(
                "dtype",
                False,
                f"infer.dtype bfloat16 needs compute capability >= {BF16_MIN_CC:g}; "
                f"hardware.infer_gpu_compute_capability is {cc:g} (use float16)",
            )
        )
        lines.append(line(checks[-1]))
    if c.on_gpus and c.quantized and cc < AWQ_MIN_CC:
        checks.append(
            Check("AWQ kernels", False, f"vLLM's AWQ kernels need compute capability >= {AWQ_MIN_CC:g}; have {cc:g}")
        )
        lines.append(line(checks[-1]))
    if c.on_gpus:
        weights = (
            per_gpu_bytes(c.served, c.tp, awq=(c.w_bit, c.group))
            if c.quantized
            else per_gpu_bytes(c.served, c.tp, c.infer_bytes)
        )
        weights = math.ceil(weights * c.stage_share)  # pipeline parallel: its stage's layers (about)
        fit = kv_fit(hw.infer_gpu_memory_gib * GIB, infer.gpu_memory_utilization, weights, c.overhead, kv_gpu, mml)
        data["inference"] = {"device": "gpu", "pipeline_parallel_size": c.pp, **fit}
        lines.append(
            f"per GPU: {size(fit['budget_bytes'])} ({hw.infer_gpu_memory_gib:g} GiB x gpu_memory_utilization "
            f"{infer.gpu_memory_utilization:g}) - {size(weights)} weights - {size(c.overhead)} activations and "
            "CUDA graphs"
        )
        lines.append(f"         = {size(fit['kv_cache_bytes'])} KV cache = {fit['kv_tokens']:,} tokens")
        longest = min(fit["kv_tokens"], s.max_position_embeddings)
        if fit["kv_tokens"] >= mml:
            check = Check(
                "KV cache",
                True,
                f"max_model_len {mml}: {fit['sequences_at_max_model_len']} sequences of {mml} tokens at once "
                f"(batch_size {infer.batch_size}: vLLM queues the rest); largest max_model_len: {longest}",
            )
        elif fit["kv_cache_bytes"] <= 0:
            check = Check(
                "KV cache",
                False,
                f"no room for a KV cache: {size(weights)} of weights and {size(c.overhead)} overhead per GPU exceed "
                f"{size(fit['budget_bytes'])} ({hw.infer_gpu_memory_gib:g} GiB x gpu_memory_utilization "
                f"{infer.gpu_memory_utilization:g})",
            )
        else:
            check = Check(
                "KV cache",
                False,
                f"infer.max_model_len {mml} does not fit one sequence: the KV cache holds {fit['kv_tokens']:,} tokens "
                f"(largest max_model_len that fits: {longest})",
            )
        checks.append(check)
        lines.append(line(check))
    elif infer.backend == "vllm":
        tokens = VLLM_CPU_KV_BYTES // c.kv_token
        data["inference"] = {"device": "cpu", "kv_tokens": tokens}
        checks.append(
            Check(
                "KV cache",
                tokens >= mml,
                f"vllm-cpu: {size(VLLM_CPU_KV_BYTES)} of KV cache (VLLM_CPU_KVCACHE_SPACE) = {tokens:,} tokens; "
                f"max_model_len {mml}",
            )
        )
        lines.append(line(checks[-1]))
    else:
        kv = infer.batch_size * mml * c.kv_token
        data["inference"] = {"device": "cpu", "kv_cache_bytes": kv}
        lines.append(
            f"transformers on the CPU: {size(c.infer_weights)} of weights + {size(kv)} KV cache at most "
            f"(batch_size {infer.batch_size} x max_model_len {mml}), in host RAM"
        )
    return Section(f"inference ({infer.backend}, {'AWQ' if c.quantized else '16-bit'} model, {infer.dtype}):", lines)


def training_layout(ft, where: str) -> tuple[str, bool]:
    """How finetune spreads over its processes: "one process", "DDP", "FSDP" or "DeepSpeed" (sized as
    ZeRO-3, the shipped config: a config of ZeRO stage 1 or 2 shards less and needs more), and whether
    a sharding config offloads the weights to host RAM."""
    if ft.accelerate_config is None:
        return ("one process" if ft.num_processes == 1 else "DDP"), False
    config = training_launch.read_config(ft.accelerate_config, f"{where}.finetune.accelerate_config")
    layout = training_launch.SHARDING.get(config["distributed_type"].upper(), "DDP")
    return layout, layout in training_launch.SHARDING.values() and training_launch.offloads_weights(config)


def training_section(c: Context, checks: list[Check], data: dict) -> tuple[Section, dict]:
    ft, gpu = c.profile.finetune, c.profile.hardware.train_gpu_memory_gib
    lines = []
    if ft.load_in_4bit and not gpu:
        checks.append(
            Check(
                "QLoRA GPU",
                False,
                "finetune.load_in_4bit needs a GPU (bitsandbytes); hardware.train_gpu_memory_gib is null",
            )
        )
        lines.append(line(checks[-1]))
    layout, offload = training_layout(ft, c.where)
    sharded = layout in training_launch.SHARDING.values()
    train = training_memory(c.shape, ft, bool(gpu), c.where, sharded, offload)
    train["layout"] = layout
    data["training"] = train
    p, n = train["parts"], ft.num_processes
    kind = "QLoRA, NF4 base" if ft.load_in_4bit else "LoRA, 16-bit base" if gpu else "LoRA on the CPU"
    where = ("GPU" if gpu else "host RAM") if n == 1 else f"each of {n} GPUs" if gpu else f"{n} processes in host RAM"
    if n > 1 or sharded:
        if offload:
            how = f"the weights in host RAM ({size(train['offloaded_weights_bytes'])}) between uses"
        elif sharded:
            how = f"weights, LoRA and optimizer state divided by {n}"
        else:
            how = "a whole model per process, the LoRA gradients averaged each step"
        if sharded:
            how += ", two layers and the embeddings gathered whole"
        lines.append(f"{ft.backend}, {n} process{'es' if n > 1 else ''}, {layout}: {how}")
    lines.append(
        f"base {size(p['base_weights'])}"
        + (f" + gathered {size(p['gathered_weights'])}" if sharded else "")
        + f" + LoRA {size(p['lora'])} (r={ft.lora_r}: {train['lora_parameters'] / 1e6:.1f}M parameters, their "
        f"gradients and {ft.optim} state{', divided' if sharded and n > 1 else ''})"
    )
    lines.append(
        f"+ activations {size(p['activations'])} + logits {size(p['logits'])}"
        + (f" + CUDA and allocator {size(p['overhead'])}" if gpu else "")
        + f" = {size(train['total_bytes'])}"
        + (" per process" if n > 1 else "")
    )
    rows = ft.per_device_train_batch_size * ft.gradient_accumulation_steps * n
    lines.append(
        f"batch {ft.per_device_train_batch_size} x max_seq_length {ft.max_seq_length} = {train['tokens_per_step']:,} "
        f"tokens per forward; {rows} rows per optimizer step"
        + (
            f"; gradient checkpoints offloaded to host RAM: {size(train['offloaded_checkpoints_bytes'])}"
            if train["offloaded_checkpoints_bytes"]
            else ""
        )
    )
    if gpu:
        total, limit = train["total_bytes"], gpu * GIB
        advice = "lower finetune.per_device_train_batch_size or max_seq_length"
        if sharded:
            advice += ", or raise finetune.num_processes"
        elif ft.backend == "trl":
            advice += f", or shard the model over GPUs ({training_launch.CONFIGS}/fsdp_qlora.yaml)"
        check = Check(
            "training memory",
            total <= limit,
            f"{size(total)} of {'each' if n > 1 else 'the'} training GPU's {gpu:g} GiB ({size(limit - total)} spare)"
            if total <= limit
            else f"finetune needs {size(total)} on {'each' if n > 1 else 'a'} GPU of {gpu:g} GiB ({advice})",
        )
        checks.append(check)
        lines.append(line(check))
    return Section(f"training (finetune: {kind}, {where}):", lines), train


def host_section(c: Context, stages: dict[str, Stage], cache: tuple[str | None, bool], base_cached: bool, checks, data):
    ft, hw = c.profile.finetune, c.profile.hardware
    cache_type, same_filesystem = cache
    copies = cache_copies(cache_type, same_filesystem)
    for name in ("finetune", "pad", "quantize"):
        stages[name].cache_bytes = stages[name].disk_bytes - stages[name].scratch_bytes if copies else 0
    base = dense_bytes(c.shape, DTYPE_BYTES.get(c.shape.dtype, 2))
    data["disk"] = {
        "base_model_bytes": base,
        "base_model_cache_bytes": base if base_cached and copies else 0,
        "cache_type": cache_type,
        "cache_copies": copies,
    }
    needs = needs_of(stages, data["disk"], MODEL_STAGES)
    cache_text = cache_type or "unset: reflink,copy"
    lines = [f"{'':9} {'host RAM':>10} {'disk':>10} {'DVC cache':>10}"]
    lines.append(
        f"{'base':9} {'':>10} {size(base):>10} {size(data['disk']['base_model_cache_bytes']):>10}  {ft.base_model}"
    )
    for name, s in stages.items():
        lines.append(f"{name:9} {size(s.ram_bytes):>10} {size(s.disk_bytes):>10} {size(s.cache_bytes):>10}")
    lines.append(
        f"{'needed':9} {size(needs['ram_bytes']):>10} {size(needs['workspace_bytes']):>10} "
        f"{size(needs['cache_bytes']):>10}  RAM: the largest stage; disk: all at once"
    )
    lines += [f"{name}: RAM: {s.ram_why}; disk: {s.disk_why}" for name, s in stages.items()]
    if copies:
        lines.append(
            f"DVC cache: a copy of each output (cache.type {cache_text}: copies unless the filesystem has reflinks"
            + ("" if same_filesystem else "; the cache is on another filesystem: no hardlinks")
            + ");"
        )
        lines.append("  `dvc config cache.type reflink,hardlink,symlink` links instead (no copies)")
    else:
        lines.append(f"DVC cache: no copies (cache.type {cache_text}: outputs linked to the cache)")
    biggest = max(stages, key=lambda s: stages[s].ram_bytes)
    ram_ok = needs["ram_bytes"] <= hw.host_ram_gib * GIB
    checks.append(
        Check(
            "host RAM",
            ram_ok,
            f"host RAM: {biggest} needs {size(needs['ram_bytes'])}"
            + (
                f" of hardware.host_ram_gib {hw.host_ram_gib:g}"
                if ram_ok
                else f", hardware.host_ram_gib is {hw.host_ram_gib:g}"
            )
            + ("" if ram_ok else f" ({stages[biggest].ram_why})"),
        )
    )
    disk = needs["workspace_bytes"] + needs["cache_bytes"]
    checks.append(
        Check(
            "disk",
            disk <= hw.disk_gib * GIB,
            f"disk: {size(disk)} (workspace {size(needs['workspace_bytes'])} + DVC cache {size(needs['cache_bytes'])}) "
            + ("of" if disk <= hw.disk_gib * GIB else "over")
            + f" hardware.disk_gib {hw.disk_gib:g}",
        )
    )
    lines += [line(x) for x in checks[-2:]]
    lines.append(
        "not counted: environments (.venvs, Docker images, .wheelhouse), data, older outputs left in the cache"
    )
    data["stages"] = {name: dataclasses.asdict(s) for name, s in stages.items()}
    data["needs"] = needs
    return Section("host RAM and disk:", lines)


def make_plan(
    profile_name: str,
    profile: Profile,
    shape: ModelShape,
    config: str,
    config_note: str = "",
    tp: int | None = None,
    cache_type: str | None = None,
    base_cached: bool = False,
    overhead_bytes: int = INFER_OVERHEAD_BYTES,
    cache_same_filesystem: bool = True,
) -> Plan:
    """The plan of a profile for a model: every section's lines, every check, the figures."""
    where = f"params.yaml: profiles.{profile_name}"
    validate_hardware(profile.hardware, where)
    validate_numbers(profile, where)
    tp = tp or profile.infer.tensor_parallel_size
    if tp < 1:
        raise UserError(f"{where}.infer.tensor_parallel_size: expected a positive integer, got {tp}")
    c = Context(profile_name, profile, shape, tp, overhead_bytes, where)
    checks: list[Check] = []
    data: dict = {"profile": profile_name, "config": config, "model": dataclasses.asdict(shape)}
    data["parameters"] = parameter_count(shape)
    sections = [
        model_section(c, checks),
        layout_section(c, checks),
        weights_section(c, data),
        inference_section(c, checks, data),
    ]
    section, train = training_section(c, checks, data)
    sections.append(section)
    stages = stage_needs(c, train)
    sections.append(host_section(c, stages, (cache_type, cache_same_filesystem), base_cached, checks, data))
    return Plan(profile_name, config, config_note, shape, tp, sections, checks, stages, data)


def validate_numbers(profile: Profile, where: str) -> None:
    """The numbers the arithmetic divides by or multiplies with, where a stage would only fail later."""
    positive = {
        "quantize.q_group_size": profile.quantize.q_group_size,
        "infer.max_model_len": profile.infer.max_model_len,
        "infer.batch_size": profile.infer.batch_size,
        "finetune.max_seq_length": profile.finetune.max_seq_length,
        "finetune.per_device_train_batch_size": profile.finetune.per_device_train_batch_size,
        "finetune.lora_r": profile.finetune.lora_r,
    }
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"{where}.{key}: expected a positive integer, got {value}")
    if profile.quantize.w_bit not in (2, 4, 8):
        raise UserError(f"{where}.quantize.w_bit: expected 2, 4 or 8, got {profile.quantize.w_bit}")
    if not 0 < profile.infer.gpu_memory_utilization <= 1:
        raise UserError(
            f"{where}.infer.gpu_memory_utilization: expected a fraction in (0, 1], "
            f"got {profile.infer.gpu_memory_utilization}"
        )


def validate_hardware(hw, where: str) -> None:
    for key in ("train_gpu_memory_gib", "infer_gpu_memory_gib", "infer_gpu_compute_capability"):
        value = getattr(hw, key)
        if value is not None and value <= 0:
            raise UserError(f"{where}.hardware.{key}: expected a positive number or null, got {value!r}")
    for key in ("host_ram_gib", "disk_gib"):
        if getattr(hw, key) <= 0:
            raise UserError(f"{where}.hardware.{key}: expected a positive number, got {getattr(hw, key)!r}")
    if hw.infer_gpus < 0:
        raise UserError(f"{where}.hardware.infer_gpus: expected 0 or more, got {hw.infer_gpus}")
    if hw.infer_gpus and (hw.infer_gpu_memory_gib is None or hw.infer_gpu_compute_capability is None):
        missing = "infer_gpu_memory_gib" if hw.infer_gpu_memory_gib is None else "infer_gpu_compute_capability"
        raise UserError(f"{where}.hardware.{missing}: needed when infer_gpus is {hw.infer_gpus}")


# ---------------------------------------------------------------- printing


def render(plan: Plan) -> str:
    out = [f"shoptune plan: profile {plan.profile}, model config {plan.config}{plan.config_note}"]
    for section in plan.sections:
        out.append(section.title)
        out += [f"  {text}" for text in section.lines]
    if plan.fits:
        out.append(f"plan: the {plan.profile} profile fits its hardware")
    else:
        out.append(f"plan: does NOT fit ({len(plan.failures)} problem(s)):")
        out += [f"  {c.detail}" for c in plan.failures]
    return "\n".join(out)


def as_json(plan: Plan) -> str:
    data = {
        **plan.data,
        "fits": plan.fits,
        "checks": [dataclasses.asdict(c) for c in plan.checks],
    }
    return json.dumps(data, indent=2)


# ---------------------------------------------------------------- inputs


def model_shape(profile_name: str, profile: Profile, config: Path | None) -> tuple[ModelShape, str, str, bool]:
    """The shape of the model the profile fine-tunes, where it came from, a note, and whether the
    base model is itself a DVC output (cached): --config, else <finetune.base_model>/config.json,
    else, for the demo's tiny model not built yet, the numbers params.yaml gives its builder."""
    if config is not None:
        return read_config(config), str(config), " (--config)", False
    path = Path(profile.finetune.base_model) / "config.json"
    data = params.read_params()
    tiny = data.get("tiny_model") if isinstance(data.get("tiny_model"), dict) else None
    is_tiny = tiny is not None and Path(str(tiny.get("out"))) == Path(profile.finetune.base_model)
    if path.is_file():
        return read_config(path), str(path), "", is_tiny
    if is_tiny:
        params.load_shared("tiny_model", TinyModelParams)  # checked as the stage will
        note = (
            " not built yet: read from params.yaml tiny_model "
            "(`make demo` or `.venv/bin/dvc repro tiny_model` builds it)"
        )
        return shape_from_config(tiny_model_config(tiny), "params.yaml: tiny_model"), str(path), note, True
    raise UserError(
        f"{path}: no such file (profiles.{profile_name}.finetune.base_model has no model yet: download it, "
        "see README 'The paper profile', or pass --config PATH to a copy of its config.json)"
    )


def dvc_cache() -> tuple[Path, str | None]:
    """DVC's cache folder and cache.type (None: DVC's default, reflink,copy), as DVC reads its
    configuration (repository, local, global, system)."""
    try:
        from dvc.repo import Repo

        repo = Repo(".")
        types = repo.config["cache"].get("type")
        folder = Path(repo.cache.local_cache_dir)
    except Exception:  # not a DVC repository, or DVC unusable: its defaults
        return Path(".dvc/cache"), None
    if isinstance(types, list | tuple):
        types = ",".join(types)
    return folder, types


def load(
    profile_name: str, config: Path | None = None, tp: int | None = None, overhead_gib: float | None = None
) -> Plan:
    """The plan of a profile of params.yaml (UserError for a mistake in the inputs)."""
    profile = params.load_profile(profile_name)
    if tp is not None and tp < 1:
        raise UserError(f"--tensor-parallel-size: expected a positive integer, got {tp}")
    if overhead_gib is not None and overhead_gib < 0:
        raise UserError(f"--overhead-gib: expected 0 or more, got {overhead_gib}")
    shape, where, note, base_cached = model_shape(profile_name, profile, config)
    cache, cache_type = dvc_cache()
    overhead = INFER_OVERHEAD_BYTES if overhead_gib is None else int(overhead_gib * GIB)
    same = existing(cache).stat().st_dev == existing(Path.cwd()).stat().st_dev
    return make_plan(profile_name, profile, shape, where, note, tp, cache_type, base_cached, overhead, same)


def existing(path: Path) -> Path:
    """The path, or its nearest existing parent (a cache folder not made yet)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
