"""Each training process when several train together (finetune.num_processes > 1, or one under a
sharding accelerate config): what it shards by, what it sets up first, how it leaves.

Besides the launch (shoptune/training_launch.py, on the host), three things the pinned libraries do
not do by themselves, each mended here and tested by tests/test_finetune_launch.py:
- several processes on a CPU: the device, and FSDP at all (processes_on_cpu);
- peft 0.21 under FSDP: its adapter's names (peft_sees_through_fsdp);
- gloo at exit: the order of leaving (leave_process_group).
Runs inside the train environment; imports of training libraries stay inside the functions.
"""

from __future__ import annotations

import os


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
