"""finetune: (Q)LoRA on the ECInstruct rows with unsloth or trl, merged 16-bit model out.

Recipe (4th place): Qwen2-72B-Instruct loaded in 4 bits (bitsandbytes) by unsloth, LoRA
on every projection, Alpaca prompt with the EOS token appended (prompt_format: alpaca; raw and
chat are the other formats, shoptune/prompts.py), batch 2 x accumulation
4, 22000 steps, lr 2e-4, adamw_8bit, weight decay 0.01, linear schedule; saved merged
in 16 bits. Load the 16-bit base with load_in_4bit=True (merging into a pre-quantized
*-bnb-4bit checkpoint does not give a true 16-bit merge).

finetune.backend: unsloth (the recipe's) or trl (SFTTrainer with a peft LoRA, no unsloth: the one
FSDP and DeepSpeed can shard), shoptune/lora_backends.py. finetune.num_processes: N > 1 starts this
program N times under `accelerate launch` (shoptune/training_launch.py): one per GPU, or sharing
the CPU's cores over gloo; every process has the same seed, only the main one writes outputs.

Checkpoints go to runs/<profile>/.checkpoints/finetune/<settings digest>/ (the last
`save_total_limit` of them are kept) and a rerun resumes from the last one. The stage runs
offline (HF_HUB_OFFLINE=1): the base model is a local folder. The loss curve is written as loss.csv and
drawn as plots/<profile>-loss.svg (a DVC plot that renders offline).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
from pathlib import Path

from shoptune import UserError, charts, lora_backends, params, training_launch, training_processes
from shoptune.artifacts import atomic_dir, atomic_file, dumps, read_jsonl, write_json
from shoptune.profile import FinetuneParams
from shoptune.prompts import check_format, training_text
from shoptune.workspace import checkpoints_dir, entrypoint, plot_file, stage_dir

log = logging.getLogger("finetune")


def finetune(profile: str) -> None:
    p = params.load(profile, "finetune", FinetuneParams)
    where = f"params.yaml: profiles.{profile}.finetune"
    check_format(p.prompt_format, f"{where}.prompt_format")
    training_launch.check(p, where)
    if not (Path(p.base_model) / "config.json").is_file():
        raise UserError(f"{p.base_model}: no model here (params: finetune.base_model; see README, 'Models')")
    data_dir = stage_dir(profile, "dataset")
    lora_backends.import_first(p.backend)  # unsloth: before transformers, trl and peft
    if on_cpu := training_processes.processes_on_cpu():
        log.info(on_cpu)
    import torch
    from datasets import Dataset
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTConfig, SFTTrainer

    # Seed: the same in every process, so each starts from the same adapters and a rerun repeats the curve.
    set_seed(p.seed)

    # Trainer settings, before the model: under DeepSpeed ZeRO-3 they decide how it loads (sharded).
    # Checkpoints: resumed from the last one made with the same settings and data.
    digest = hashlib.sha256(dumps(dataclasses.asdict(p)).encode())
    digest.update((data_dir / "train.jsonl").read_bytes())
    output_dir = checkpoints_dir(profile, "finetune") / digest.hexdigest()[:16]
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = SFTConfig(
        output_dir=str(output_dir),
        dataset_text_field="text",
        max_length=p.max_seq_length,
        per_device_train_batch_size=p.per_device_train_batch_size,  # per process: N processes take N x as many rows
        gradient_accumulation_steps=p.gradient_accumulation_steps,
        max_steps=p.max_steps,
        learning_rate=p.learning_rate,
        warmup_steps=p.warmup_steps,
        optim=p.optim,
        weight_decay=p.weight_decay,
        lr_scheduler_type=p.lr_scheduler_type,
        logging_steps=p.logging_steps,
        save_steps=p.save_steps,
        save_total_limit=p.save_total_limit,  # 22000 / 500 steps would keep 44 checkpoints
        seed=p.seed,
        fp16=torch.cuda.is_available() and not torch.cuda.is_bf16_supported(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        report_to="none",
        disable_tqdm=False,
        **lora_backends.trainer_options(p.backend),
    )

    # Model: the base in 4 bits (QLoRA) on a GPU, or as it is on a CPU; LoRA adapters on top
    # (unsloth adds them now, trl's SFTTrainer from peft_config).
    model, tokenizer, peft_config = lora_backends.load(p)

    # Data: each row in the prompt format, the answer, then the end of the turn (EOS), so the model
    # learns where to stop.
    def texts(name: str) -> Dataset:
        rows = read_jsonl(data_dir / name)
        return Dataset.from_dict({"text": [training_text(row, p.prompt_format, tokenizer) for row in rows]})

    train, val = texts("train.jsonl"), texts("val.jsonl")

    # Train, from the last checkpoint if there is one.
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=train,
        eval_dataset=val if len(val) else None,
        args=settings,
        peft_config=peft_config,
    )
    if trainer.is_world_process_zero():
        state = trainer.accelerator.state
        log.info("backend %s, %d process(es): %s", p.backend, state.num_processes, state.distributed_type.value)
    last = get_last_checkpoint(str(output_dir))
    if last:
        log.info("resuming from %s", last)
        if trainer.is_fsdp_enabled and trainer.is_world_process_zero():
            log.warning(training_processes.FSDP_RESUME)
    result = trainer.train(resume_from_checkpoint=last)
    val_loss = trainer.evaluate()["eval_loss"] if len(val) else None

    # Outputs, written by the main process alone once every process has handed in its part of the
    # adapter (trl: gathered into the checkpoint folder; FSDP and ZeRO-3 hold a shard each).
    adapter = lora_backends.gather_adapter(p, trainer, output_dir / "adapter")
    training_processes.leave_process_group(trainer)
    if not trainer.is_world_process_zero():
        return
    # The merged 16-bit model, the loss curve, the final metrics.
    folder = stage_dir(profile, "finetune")
    with atomic_dir(folder / "model") as out:
        lora_backends.save_merged(p, trainer.model, tokenizer, adapter, out)
    with atomic_file(folder / "loss.csv") as out:
        out.write("step,loss\n")
        for entry in trainer.state.log_history:
            if "loss" in entry:
                out.write(f"{entry['step']},{entry['loss']:.6f}\n")
    chart = charts.line_chart(
        charts.series_from_csv(folder / "loss.csv", "step", ["loss"]), "Training loss", "step", "loss"
    )
    with atomic_file(plot_file(profile, "loss")) as out:  # a static image: `dvc plots show` needs no network
        out.write(chart)
    write_json(
        folder / "metrics.json",
        {
            "train_loss": round(result.training_loss, 6),
            "val_loss": None if val_loss is None else round(val_loss, 6),
            "steps": trainer.state.global_step,
            "train_rows": len(train),
        },
    )
    shutil.rmtree(output_dir, ignore_errors=True)
    log.info("merged model in %s; train loss %.4f", folder / "model", result.training_loss)


if __name__ == "__main__":
    entrypoint(finetune)
