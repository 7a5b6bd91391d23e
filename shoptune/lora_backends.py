"""The finetune stage's two backends (finetune.backend): the base model with its LoRA adapters in,
the merged 16-bit model out.

unsloth  the recipe's: FastLanguageModel loads the base (in 4 bits for QLoRA) and adds the adapters,
         its own gradient checkpointing on a GPU, its merged_16bit save (the adapters merged into the
         16-bit base shards). One whole model per process: DDP at most.
trl      no unsloth imported at all: transformers loads the base (in 4 bits when load_in_4bit: NF4,
         double quantization, the 4-bit weights stored in the compute dtype, since FSDP and ZeRO-3
         shard only floating-point tensors), trl's SFTTrainer adds peft's LoRA adapters, and the
         merged model is the adapter merged into the base reloaded in 16 bits (never into the 4-bit
         weights: merging into a quantized base is no true 16-bit merge). DDP, FSDP or DeepSpeed.

Runs inside the train environment; every import of a training library is inside a function, so the
stage decides when unsloth comes (before transformers, trl and peft) or whether it comes at all.
"""

from __future__ import annotations

import os
from pathlib import Path

from shoptune import training_processes


def import_first(backend: str) -> None:
    """What must come before transformers, trl and peft are used: unsloth patches them as it loads;
    under FSDP, peft is taught FSDP's module names."""
    if backend == "unsloth":
        import unsloth  # noqa: F401
    elif training_processes.sharded_by() == "fsdp":
        training_processes.peft_sees_through_fsdp()


def trainer_options(backend: str) -> dict:
    """This backend's SFTConfig settings beyond the profile's hyperparameters."""
    import torch

    cuda = torch.cuda.is_available()
    # every adapter takes part in every step (no search for unused parameters under DDP); without a
    # GPU, the CPU: with several processes that makes accelerate join them over gloo (training_launch.py)
    options = {"use_cpu": not cuda, "ddp_find_unused_parameters": False}
    if backend == "unsloth":
        return options  # gradient checkpointing: unsloth's own (get_peft_model)
    if cuda:
        options["gradient_checkpointing"] = True
        if training_processes.sharded_by() != "deepspeed":  # ZeRO-3 with peft needs the reentrant variant: trl sets it
            options["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    return options


def load(p):
    """(model, tokenizer, peft_config) for the settings `p` (FinetuneParams): the adapters already on
    the model (unsloth, peft_config None), or for SFTTrainer to add (trl)."""
    # An absolute path: a relative one reads as a hub id (unsloth asks the hub about it).
    path = str(Path(p.base_model).resolve())
    return _load_unsloth(p, path) if p.backend == "unsloth" else _load_trl(p, path)


def _load_unsloth(p, path: str):
    import torch
    from unsloth import FastLanguageModel

    # the base in 4 bits (QLoRA) on a GPU, or as it is on a CPU
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=path, max_seq_length=p.max_seq_length, dtype=None, load_in_4bit=p.load_in_4bit, local_files_only=True
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=p.lora_r,
        lora_alpha=p.lora_alpha,
        lora_dropout=p.lora_dropout,
        target_modules=p.target_modules,
        bias="none",
        use_gradient_checkpointing="unsloth" if torch.cuda.is_available() else False,
        random_state=p.seed,
    )
    return model, tokenizer, None


def training_dtype():
    """What the weights train in: bfloat16 on a GPU that has it, else float16; float32 on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def merged_dtype():
    """The merged model's 16 bits, as unsloth's merged_16bit writes them: float16 on a GPU without
    bfloat16 (compute capability < 8.0), else bfloat16."""
    import torch

    cuda = torch.cuda.is_available()
    return torch.float16 if cuda and not torch.cuda.is_bf16_supported() else torch.bfloat16


def _load_trl(p, path: str):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    dtype = training_dtype()
    quantization = None
    if p.load_in_4bit:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,  # a float type: FSDP and ZeRO-3 can shard the 4-bit weights
        )
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=quantization, device_map=_placement(), local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    adapters = LoraConfig(
        r=p.lora_r,
        lora_alpha=p.lora_alpha,
        lora_dropout=p.lora_dropout,
        target_modules=list(p.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return model, tokenizer, adapters


def _placement():
    """Where each process loads the base: its own GPU (DDP: a whole model per GPU; 4-bit weights
    cannot move after loading); FSDP and ZeRO-3 place their shards themselves; a CPU needs none."""
    import torch

    if not torch.cuda.is_available() or training_processes.sharded_by():
        return None
    return {"": int(os.environ.get("LOCAL_RANK", "0"))}


def gather_adapter(p, trainer, folder: Path) -> Path | None:
    """Called by every process: the trained adapter written whole to `folder` by the main process
    (under FSDP and ZeRO-3 each process holds a shard, so all take part); None for unsloth, whose
    merge reads the model in memory."""
    if p.backend == "unsloth":
        return None
    if trainer.is_fsdp_enabled:  # checkpoints stay sharded; the adapter is gathered in full
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(folder))  # ZeRO-3: gathered in 16 bits (zero3_save_16bit_model)
    return folder


def save_merged(p, model, tokenizer, adapter: Path | None, out: Path) -> None:
    """The main process only: the base with the adapter merged in, in 16 bits, and the tokenizer, to `out`."""
    if p.backend == "unsloth":
        model.save_pretrained_merged(str(out), tokenizer, save_method="merged_16bit")
        return
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # Training is over. Under ZeRO-3 from_pretrained would partition the base as it loads (zero.Init,
    # which every process must join) and refuses a device_map: this process alone loads it whole.
    unset_hf_deepspeed_config()
    base = AutoModelForCausalLM.from_pretrained(
        str(Path(p.base_model).resolve()), dtype=merged_dtype(), device_map="cpu", local_files_only=True
    )
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
