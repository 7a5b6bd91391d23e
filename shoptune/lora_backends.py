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


def import_first(backend: str) -> None:
    """What must come before transformers, trl and peft are used: unsloth patches them as it loads;
    under FSDP, peft is taught FSDP's module names."""
    if backend == "unsloth":
        import unsloth  # noqa: F401
    elif sharded_by() == "fsdp":
        peft_sees_through_fsdp()


def peft_sees_through_fsdp() -> None:
    """Two places where peft 0.21 loses its way in FSDP's module names (FSDP's own state dict has
    none of FSDP's name parts; every name below the root FSDP unit has them):
    - saving: it finds the adapter's entries by its LoRA layers' names and strips
      `_fsdp_wrapped_module.` only at their start, while with one FSDP unit per decoder layer each
      name has it in the middle (...layers.0._fsdp_wrapped_module.self_attn.q_proj.lora_A). It
      matched nothing: every checkpoint held an empty adapter, and so did the adapter saved at the
      end (the merged model was the base). The names it derives now lose the part wherever it is.
    - loading (resume): it adds the PeftModel prefix (base_model.model.) to the checkpoint's keys
      only when the model's parameter names start with it, and under the root FSDP unit they do
      not, so nothing loaded and the resumed run went on from fresh LoRA weights. An FSDP model
      now gets the checkpoint's entries under its own state dict's names, every one of them used.
    Seen with FSDP on the CPU (tests/test_finetune_launch.py); the code is the same on GPUs."""
    import peft
    from peft.tuners import tuners_utils

    prefixes_of = tuners_utils._get_tuner_state_dict_key_prefixes
    if getattr(prefixes_of, "sees_through_fsdp", False):
        return

    def prefixes(model, adapter_name=None):
        return {prefix.replace("_fsdp_wrapped_module.", "") for prefix in prefixes_of(model, adapter_name)}

    prefixes.sees_through_fsdp = True
    tuners_utils._get_tuner_state_dict_key_prefixes = prefixes
    load = peft.set_peft_model_state_dict  # accelerate's load_fsdp_model imports it from peft when called

    def set_state(model, state, adapter_name="default", **options):
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not isinstance(model, FullyShardedDataParallel):
            return load(model, state, adapter_name=adapter_name, **options)
        names = set(model.state_dict())  # inside the caller's state_dict_type: the names loading takes
        named = {}
        for key, value in state.items():  # ...q_proj.lora_A.weight -> ...q_proj.lora_A.default.weight
            stem, _, leaf = key.rpartition(".")
            name = next((n for n in (f"{stem}.{adapter_name}.{leaf}", key) if n in names), None)
            if name is None:
                raise RuntimeError(f"FSDP resume: the checkpoint's {key} is no entry of the model")
            named[name] = value
        result = model.load_state_dict(named, strict=False)
        if set(named) & set(result.missing_keys):
            raise RuntimeError("FSDP resume: the adapter did not load")
        return result

    peft.set_peft_model_state_dict = set_state


# What a resumed FSDP run gets back, said in the log. accelerate 1.15 loads FSDP1's sharded optimizer
# state into a template made from the fresh optimizer, which holds no moments before its first step,
# so nothing fills them: Adam restarts from zero moments at the checkpoint (measured on the demo: the
# first step after resuming matches, the next loss differs by 8e-4).
FSDP_RESUME = (
    "FSDP: resumed with the adapter, learning-rate schedule, RNG and data position of the checkpoint; "
    "the optimizer's moments start afresh (accelerate 1.15 does not restore FSDP's sharded optimizer state)"
)


def sharded_by() -> str | None:
    """ "fsdp" or "deepspeed" when `accelerate launch` shards the model (its config file), else None."""
    for name, variable in (("fsdp", "ACCELERATE_USE_FSDP"), ("deepspeed", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(variable, "false").lower() == "true":
            return name
    return None


def processes_on_cpu() -> str | None:
    """Several processes without a GPU (how CI trains DDP, FSDP and ZeRO-3 on 2 CPU processes over
    gloo): what this changes, for the log, or None on a GPU or in one plain process.
    - The device is `cpu`: accelerate's MULTI_CPU gives each process cpu:<rank>, which checkpoints
      then carry and torch.load cannot map back when a run resumes ("don't know how to restore data
      location ... cpu:0"), and which FSDP refuses as its device_id.
    - FSDP: accelerate 1.15 keeps its plugin only for GPU-like distributed types, so on the CPU the
      model would quietly train as plain DDP: the plugin is put back. fsdp_sync_module_states (and
      the cpu_ram_efficient_loading that needs it) broadcasts from a GPU: off, so every process
      reads the checkpoint itself."""
    import torch

    if torch.cuda.is_available() or "LOCAL_RANK" not in os.environ:
        return None
    os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    if sharded_by() != "fsdp":
        return "processes on the CPU over gloo, device cpu"
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    changed = [k for k in ("FSDP_SYNC_MODULE_STATES", "FSDP_CPU_RAM_EFFICIENT_LOADING") if os.environ.get(k) == "true"]
    for key in changed:
        os.environ[key] = "false"
    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init
    off = f"; {' and '.join(k.lower() for k in changed)} off (they need a GPU)" if changed else ""
    return f"FSDP on the CPU over gloo{off}"


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
        if sharded_by() != "deepspeed":  # ZeRO-3 with peft needs the reentrant variant: trl sets it
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

    if not torch.cuda.is_available() or sharded_by():
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


def leave_process_group(trainer) -> None:
    """Every process, once the adapter is gathered: wait for the others, drop the DDP wrapper, then
    leave the process group, in that order. A DDP wrapper left to the interpreter's exit destroys
    gloo's process group while holding the GIL and can deadlock with gloo's worker thread, which
    needs the GIL to free a finished barrier (pytorch/pytorch#56297; seen here once in ten runs)."""
    import gc

    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        trainer.model_wrapped = trainer.model  # the wrapper's only other holders are accelerate's lists
        accelerator.free_memory()
        gc.collect()
    accelerator.end_training()  # destroy_process_group: the group is freed here, the GIL released


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
