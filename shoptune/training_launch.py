"""How the finetune stage starts: one process, or N processes under `accelerate launch`.

    finetune.num_processes: 1   python -m stages.finetune --profile P              (as every stage)
    finetune.num_processes: N   python -m accelerate.commands.launch --num_processes N
                                    [--config_file configs/accelerate/X.yaml | --multi_gpu]
                                    -m stages.finetune --profile P

One process goes through accelerate too when its config shards (FSDP, DeepSpeed): on one GPU that
is how their offload to host RAM (fsdp_offload_params, offload_param_device) trains a model larger
than the GPU, and how a one-GPU host checks those configs.

On GPUs each process drives one GPU (NCCL): plain data parallel with no config file or
configs/accelerate/ddp.yaml, the model sharded with fsdp_qlora.yaml or deepspeed_zero3.yaml
(backend trl only: unsloth trains a whole model per GPU). Without a GPU the N processes share the
cores and average their gradients over gloo.

Why `--multi_gpu` on a CPU too: in accelerate 1.15 `--cpu` goes through its simple launcher, which
starts a single process unless mpirun is given a hostfile (`--mpirun_hostfile`: Intel MPI or
oneCCL, not installed here); `--multi_gpu` goes through torchrun, which starts N processes on any
host (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, OMP_NUM_THREADS=1 each). Each process then
asks for the CPU (TrainingArguments.use_cpu) and accelerate's PartialState sees LOCAL_RANK with
cpu=True: DistributedType.MULTI_CPU over gloo.

This module runs on the host (the runner) and in the stage: no torch here.
"""

from __future__ import annotations

from pathlib import Path

from shoptune import UserError
from shoptune.params import read_yaml

BACKENDS = ("unsloth", "trl")
CONFIGS = Path("configs/accelerate")
# accelerate's distributed_type of the configs that shard the model: trl's path only
SHARDING = {"FSDP": "FSDP", "DEEPSPEED": "DeepSpeed"}
LAUNCHER = ("-m", "accelerate.commands.launch")


def check(p, where: str) -> None:
    """finetune.backend, num_processes and accelerate_config: one line naming the key for a mistake."""
    if p.backend not in BACKENDS:
        raise UserError(f"{where}.backend: expected one of {', '.join(BACKENDS)}, got {p.backend!r}")
    if p.num_processes < 1:
        raise UserError(f"{where}.num_processes: expected an integer of at least 1, got {p.num_processes}")
    if p.accelerate_config is None:
        return
    kind = distributed_type(p.accelerate_config, f"{where}.accelerate_config")
    if p.num_processes == 1 and kind not in SHARDING:
        raise UserError(
            f"{where}.accelerate_config: {p.accelerate_config} ({kind}) is for num_processes > 1 "
            "(one process of data parallel is plain training); set it to null or raise num_processes"
        )
    if kind in SHARDING and p.backend != "trl":
        raise UserError(
            f"{where}.accelerate_config: {p.accelerate_config} shards the model ({SHARDING[kind]}), which needs "
            f"backend: trl (unsloth trains a whole model per GPU: {CONFIGS / 'ddp.yaml'})"
        )


def distributed_type(config: str, where: str) -> str:
    """The `distributed_type` of an accelerate config file (MULTI_GPU, FSDP, DEEPSPEED ...)."""
    return read_config(config, where)["distributed_type"].upper()


def offloads_weights(config: dict) -> bool:
    """Whether a sharding config (read_config's mapping) keeps the weights in host RAM between uses
    (FSDP's fsdp_offload_params, ZeRO-3's offload_param_device: cpu)."""
    fsdp, zero = config.get("fsdp_config") or {}, config.get("deepspeed_config") or {}
    return fsdp.get("fsdp_offload_params") is True or str(zero.get("offload_param_device", "none")).lower() == "cpu"


def read_config(config: str, where: str) -> dict:
    """An accelerate config file inside the repository, as a mapping with a distributed_type."""
    path = Path(config)
    if path.is_absolute():
        raise UserError(f"{where}: {config}: give a path inside the repository (containers see only that)")
    if not path.is_file():
        known = ", ".join(str(c) for c in sorted(CONFIGS.glob("*.yaml"))) or "none"
        raise UserError(f"{where}: {config}: no such file (shipped: {known})")
    data = read_yaml(path, f"{where}: {config}")
    if not isinstance(data, dict) or not isinstance(data.get("distributed_type"), str):
        raise UserError(f"{where}: {config}: not an accelerate config (no distributed_type)")
    return data


def command(python: str, stage_args: list[str], p) -> list[str]:
    """The finetune stage's command line for its settings `p` (FinetuneParams), run with `python`."""
    stage = ["-m", "stages.finetune", *stage_args]
    if p.num_processes == 1 and p.accelerate_config is None:
        return [python, *stage]
    launch = [python, *LAUNCHER, "--num_processes", str(p.num_processes)]
    if p.accelerate_config is not None:
        launch += ["--config_file", p.accelerate_config]
    else:  # torchrun's launcher, on GPUs and CPUs alike (see above); no defaults left for accelerate to warn about
        launch += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*launch, *stage]


def gpus(p) -> int:
    """How many GPUs the stage uses on a GPU host: one per process."""
    return p.num_processes
