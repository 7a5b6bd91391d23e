"""The GPU check (make gpu-check): the paper's model path, on a tiny Qwen2, on this host's GPUs.

In a throw-away copy of the repository, a `gpucheck` profile (the demo's data and tiny Qwen2,
whose intermediate size 344 needs padding) runs every stage through DVC with the CUDA
environments, each with its own code:
  finetune  QLoRA steps with unsloth on CUDA (4-bit base, adamw_8bit), merged to 16 bits
  pad       344 -> a multiple of 128 x tensor parallel
  quantize  AutoAWQ on CUDA (layer by layer), the dequantized check
  infer     vLLM, quantization=awq, dtype float16 (as on a T4), constrained multiple choice
  evaluate  the ShopBench scores
then infer runs again with the transformers backend on the padded 16-bit model, and the two
backends' answers are compared. Then the training layouts of README "Scaling out" run the
same QLoRA steps, each as its own profile (`shoptune run finetune`):
  trl           the trl backend (transformers + bitsandbytes NF4 stored in bf16, peft), one process
  trl_fsdp      trl under configs/accelerate/fsdp_qlora.yaml, one process per GPU (one GPU: one)
  trl_zero3     trl under configs/accelerate/deepspeed_zero3.yaml, one process per GPU likewise
  unsloth_ddp   unsloth, one process per GPU, with two GPUs or more
Prints a JSON summary; exits non-zero when a stage or a layout fails, a multiple-choice answer
is not an option's number, or the AWQ check finds NaN.

    make gpu-check [RUNNER=docker|local] [GPU_CHECK_TP=1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import GIT_IDENTITY, SHARED, copy_repository, git_repository  # noqa: E402

PROFILE = "gpucheck"


def gpu_profile(demo: dict, tensor_parallel_size: int) -> dict:
    """The demo profile, moved onto the paper's GPU code paths."""
    profile = json.loads(json.dumps(demo))
    profile["gpus"] = True
    profile["finetune"].update(load_in_4bit=True, optim="adamw_8bit", max_steps=4, save_steps=2)
    profile["infer"].update(
        backend="vllm",
        model="quantized",
        dtype="float16",
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=0.5,
        max_model_len=2048,
        constrain_choices=True,
    )
    return profile


def training_layouts(gpus: int) -> dict[str, dict | None]:
    """The finetune settings of each layout the check trains; None: not run on this host."""
    processes = max(1, min(gpus, 2))
    return {
        "trl": {"backend": "trl"},
        "trl_fsdp": {
            "backend": "trl",
            "num_processes": processes,
            "accelerate_config": "configs/accelerate/fsdp_qlora.yaml",
        },
        "trl_zero3": {
            "backend": "trl",
            "num_processes": processes,
            "accelerate_config": "configs/accelerate/deepspeed_zero3.yaml",
        },
        "unsloth_ddp": {"num_processes": 2} if gpus >= 2 else None,
    }


def train_layouts(folder: Path, params: dict, gpus: int, runner: str) -> dict:
    """Each layout's finetune on the gpucheck profile's dataset: its metrics and time, or why not run."""
    layouts = training_layouts(gpus)
    for name, changes in layouts.items():
        if changes is not None:
            profile = json.loads(json.dumps(params["profiles"][PROFILE]))
            profile["finetune"].update(changes)
            params["profiles"][name] = profile
            shutil.copytree(folder / "runs" / PROFILE / "dataset", folder / "runs" / name / "dataset")
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    results: dict = {}
    for name, changes in layouts.items():
        if changes is None:
            results[name] = {"run": False, "why": "needs two GPUs"}
            continue
        start = time.perf_counter()
        sh(".venv/bin/shoptune", "run", "finetune", "--profile", name, cwd=folder, runner=runner)
        metrics = json.loads((folder / "runs" / name / "finetune" / "metrics.json").read_text())
        results[name] = {"run": True, **changes, "seconds": round(time.perf_counter() - start, 1), **metrics}
    return results


def sh(*args: str, cwd: Path, runner: str) -> str:
    env = {**os.environ, **SHARED, **GIT_IDENTITY, "SHOPTUNE_RUNNER": runner}
    print("$", " ".join(args), file=sys.stderr, flush=True)
    result = subprocess.run(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sys.stderr.write(result.stdout[-20000:])
    if result.returncode != 0:
        raise SystemExit(f"gpu-check: `{' '.join(args)}` failed ({result.returncode}); its output is above")
    return result.stdout


def predictions(folder: Path) -> list[str]:
    path = folder / "runs" / PROFILE / "infer" / "predictions.jsonl"
    return [json.loads(line)["prediction"] for line in path.read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(prog="make gpu-check", description=__doc__.split("\n")[0])
    parser.add_argument("--runner", choices=("docker", "local"), default="docker")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the working copy (its path is printed)")
    args = parser.parse_args()
    if not shutil.which("nvidia-smi"):
        raise SystemExit("gpu-check: no nvidia-smi here; this check needs an NVIDIA GPU host")

    work = Path(tempfile.mkdtemp(prefix="shoptune-gpu-check-"))
    folder = git_repository(copy_repository(work / "shoptune"))
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["profiles"] = {"demo": params["profiles"]["demo"]}
    params["profiles"][PROFILE] = gpu_profile(params["profiles"]["demo"], args.tensor_parallel_size)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    summary: dict = {"gpus": sh("nvidia-smi", "-L", cwd=folder, runner=args.runner).strip().splitlines()}

    start = time.perf_counter()
    sh(".venv/bin/shoptune", "--runner", args.runner, "build", "--accelerator", "cuda", cwd=folder, runner=args.runner)
    sh(".venv/bin/dvc", "repro", f"evaluate@{PROFILE}", cwd=folder, runner=args.runner)
    summary["pipeline_seconds"] = round(time.perf_counter() - start, 1)
    runs = folder / "runs" / PROFILE
    for stage in ("finetune", "pad", "quantize", "evaluate"):
        summary[stage] = json.loads((runs / stage / "metrics.json").read_text())
    summary["evaluate"] = {"overall": summary["evaluate"].get("overall")}
    summary["vllm_info"] = json.loads((runs / "infer" / "info.json").read_text())
    awq = predictions(folder)

    # the same questions with the transformers backend on the padded 16-bit model
    params["profiles"][PROFILE]["infer"].update(backend="transformers", model="padded", dtype="float16")
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(".venv/bin/shoptune", "run", "infer", "--profile", PROFILE, cwd=folder, runner=args.runner)
    reference = predictions(folder)

    questions = [json.loads(line) for line in (folder / "data/demo/questions.jsonl").read_text().splitlines()]
    choice = [i for i, q in enumerate(questions) if q["is_multiple_choice"]]
    invalid = [
        i for i in choice if awq[i] not in re.findall(r"^\s*(\d)[.)]\s", questions[i]["input_field"], re.MULTILINE)
    ]
    summary["multiple_choice"] = {
        "questions": len(choice),
        "not_an_option": len(invalid),
        "awq_vllm_agrees_with_fp16_transformers": round(sum(awq[i] == reference[i] for i in choice) / len(choice), 3),
    }
    summary["training_layouts"] = train_layouts(folder, params, len(summary["gpus"]), args.runner)
    print(json.dumps(summary, indent=2))
    if args.keep:
        print(f"working copy: {folder}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    if invalid:
        raise SystemExit(f"gpu-check: {len(invalid)} multiple-choice answers of vLLM are not an option's number")


if __name__ == "__main__":
    main()
