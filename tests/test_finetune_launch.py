"""finetune on several processes: the launch command and its settings, accelerate 1.15 reading the
shipped config files, and (slow) the demo's finetune through the trl backend for real, in one process,
in two CPU processes over gloo (DDP), and in two sharded by FSDP and by DeepSpeed ZeRO-3, in a copy of
the repository.

The two runs see the same rows per optimizer step: one process with gradient accumulation 4, two
processes with accumulation 2 each (accelerate hands the micro-batches out in turn, DDP averages the
gradients), so their loss curves agree to summation order (LOSS_TOLERANCE). The timings are printed
(pytest -s): `.venv/bin/pytest tests/test_finetune_launch.py -m slow -s`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from shoptune import UserError, params, runner, training_launch
from shoptune.profile import FinetuneParams
from tests.conftest import ROOT, copy_repository, shoptune

CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
# one process vs two: the same rows per step, the sums taken in another order
LOSS_TOLERANCE = 1e-5


def settings(**changes) -> FinetuneParams:
    raw = params.profile_section("demo", "finetune", ROOT / "params.yaml")
    return params.parse({**raw, **changes}, FinetuneParams, "params.yaml: profiles.demo.finetune")


# ---------------------------------------------------------------- the launch, without training


def test_one_process_starts_as_every_stage_and_several_under_accelerate():
    args = ["--profile", "demo"]
    assert training_launch.command("py", args, settings()) == ["py", "-m", "stages.finetune", *args]
    assert training_launch.command("py", args, settings(num_processes=2)) == [
        *["py", "-m", "accelerate.commands.launch", "--num_processes", "2"],
        *["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
        *["-m", "stages.finetune", *args],
    ]
    fsdp = settings(backend="trl", num_processes=4, accelerate_config="configs/accelerate/fsdp_qlora.yaml")
    assert training_launch.command("python", args, fsdp)[3:7] == [
        *["--num_processes", "4"],
        *["--config_file", "configs/accelerate/fsdp_qlora.yaml"],
    ]


def test_the_runner_gives_finetune_one_gpu_per_process_and_its_launch_command():
    paper = params.load_profile("paper", ROOT / "params.yaml")
    four = dataclasses.replace(paper, finetune=dataclasses.replace(paper.finetune, num_processes=4))
    assert (runner.gpus_for("finetune", paper), runner.gpus_for("finetune", four)) == (1, 4)
    assert runner.gpus_for("infer", four) == paper.infer.tensor_parallel_size  # the others as they were
    cpu = dataclasses.replace(four, gpus=False)
    assert runner.gpus_for("finetune", cpu) == 0  # the processes share the CPU
    command = runner.stage_command("finetune", ["--profile", "p"], "python", four)
    assert command[:3] == ["python", "-m", "accelerate.commands.launch"] and command[-4:-2] == ["-m", "stages.finetune"]
    assert runner.stage_command("finetune", ["--profile", "p"], "python", paper) == [
        *["python", "-m", "stages.finetune", "--profile", "p"]
    ]
    assert runner.stage_command("pad", ["x"], "python", four) == ["python", "-m", "stages.pad", "x"]


def test_every_profile_says_how_it_trains():
    profiles = yaml.safe_load((ROOT / "params.yaml").read_text())["profiles"]
    for name in ("demo", "smol", "paper"):
        section = profiles[name]["finetune"]
        assert (section["backend"], section["num_processes"], section["accelerate_config"]) == ("unsloth", 1, None)
        training_launch.check(params.load_profile(name, ROOT / "params.yaml").finetune, name)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"backend": "axolotl"}, r"\.backend: expected one of unsloth, trl, got 'axolotl'"),
        ({"num_processes": 0}, r"\.num_processes: expected an integer of at least 1, got 0"),
        (
            {"accelerate_config": "configs/accelerate/ddp.yaml"},
            r"\.accelerate_config: configs/accelerate/ddp.yaml \(MULTI_GPU\) is for num_processes > 1",
        ),
        ({"num_processes": 2, "accelerate_config": "configs/accelerate/zero.yaml"}, r"zero.yaml: no such file"),
        ({"num_processes": 2, "accelerate_config": "/etc/ddp.yaml"}, r"a path inside the repository"),
        (
            {"num_processes": 2, "accelerate_config": "configs/accelerate/fsdp_qlora.yaml"},
            r"shards the model \(FSDP\), which needs backend: trl",
        ),
        (
            {"num_processes": 2, "accelerate_config": "configs/accelerate/deepspeed_zero3.yaml"},
            r"shards the model \(DeepSpeed\), which needs backend: trl",
        ),
    ],
)
def test_launch_mistakes_are_one_line_naming_the_key(changes, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(UserError, match=message):
        training_launch.check(settings(**changes), "params.yaml: profiles.demo.finetune")


def test_the_sharding_configs_take_the_trl_backend_and_ddp_either(monkeypatch):
    monkeypatch.chdir(ROOT)
    for config in CONFIGS:
        training_launch.check(
            settings(backend="trl", num_processes=2, accelerate_config=str(config.relative_to(ROOT))), "w"
        )
    training_launch.check(settings(num_processes=2, accelerate_config="configs/accelerate/ddp.yaml"), "w")


def test_one_process_launches_through_accelerate_when_its_config_shards(monkeypatch):
    """FSDP or ZeRO-3 on one GPU: their offload to host RAM, or a one-GPU host checking the configs."""
    monkeypatch.chdir(ROOT)
    for config in ("fsdp_qlora.yaml", "deepspeed_zero3.yaml"):
        one = settings(backend="trl", accelerate_config=f"configs/accelerate/{config}")
        training_launch.check(one, "w")
        assert training_launch.command("py", ["--profile", "demo"], one)[1:7] == [
            *["-m", "accelerate.commands.launch", "--num_processes", "1"],
            *["--config_file", f"configs/accelerate/{config}"],
        ]


# What accelerate 1.15 itself makes of each launch: its own parser and checks, then the environment
# its launcher hands the processes (FSDP_*, ACCELERATE_DEEPSPEED_*); nothing is started.
ACCELERATE_READS = r"""
import json, sys
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

args = launch_command_parser().parse_args(sys.argv[1:])
args, defaults, _ = _validate_launch_command(args)
if args.use_deepspeed:
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
else:
    env = prepare_multi_gpu_env(args)
kinds = {"multi_gpu": args.multi_gpu, "fsdp": args.use_fsdp, "deepspeed": args.use_deepspeed, "cpu": args.cpu}
print(json.dumps({"launcher": [k for k, v in kinds.items() if v], "processes": args.num_processes,
                  "env": {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}}))
"""


@pytest.fixture(scope="module")
def accelerate_reads(stage_python):
    def reads(p: FinetuneParams) -> dict:
        command = training_launch.command(stage_python("train"), ["--profile", "demo"], p)
        launch_args = command[command.index("accelerate.commands.launch") + 1 :]
        result = subprocess.run(
            [stage_python("train"), "-c", ACCELERATE_READS, *launch_args], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.splitlines()[-1])

    return reads


def test_accelerate_reads_the_cpu_launch_as_torchrun_with_two_processes(accelerate_reads):
    read = accelerate_reads(settings(backend="trl", num_processes=2))
    assert read["launcher"] == ["multi_gpu"] and read["processes"] == 2  # torchrun: N processes (not --cpu: one)


def test_accelerate_reads_every_shipped_config(accelerate_reads):
    assert [c.name for c in CONFIGS] == ["ddp.yaml", "deepspeed_zero3.yaml", "fsdp_qlora.yaml"]
    read = {
        c.stem: accelerate_reads(
            settings(backend="trl", num_processes=4, accelerate_config=f"configs/accelerate/{c.name}")
        )
        for c in CONFIGS
    }
    assert read["ddp"]["launcher"] == ["multi_gpu"] and read["ddp"]["processes"] == 4
    fsdp = read["fsdp_qlora"]
    assert fsdp["launcher"] == ["fsdp"] and fsdp["processes"] == 4
    assert {
        key: fsdp["env"][key]
        for key in (
            "FSDP_VERSION",
            "FSDP_AUTO_WRAP_POLICY",
            "FSDP_CPU_RAM_EFFICIENT_LOADING",
            "FSDP_SYNC_MODULE_STATES",
            "FSDP_USE_ORIG_PARAMS",
            "FSDP_STATE_DICT_TYPE",
            "FSDP_OFFLOAD_PARAMS",
        )
    } == {
        "FSDP_VERSION": "1",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
        "FSDP_SYNC_MODULE_STATES": "true",
        "FSDP_USE_ORIG_PARAMS": "false",
        "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
        "FSDP_OFFLOAD_PARAMS": "false",
    }
    zero = read["deepspeed_zero3"]
    assert zero["launcher"] == ["deepspeed"] and zero["processes"] == 4
    assert {k: v for k, v in zero["env"].items() if k.startswith("ACCELERATE_DEEPSPEED_ZERO")} == {
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true",
        "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true",
    }
    for config in read.values():  # the stage chooses bf16 / fp16 itself
        assert config["env"]["ACCELERATE_MIXED_PRECISION"] == "no"


# ---------------------------------------------------------------- training for real (slow)

# the demo's finetune, shorter: 4 steps of 8 rows, a checkpoint at step 2
RUNS = {
    "trl_one": {"num_processes": 1, "gradient_accumulation_steps": 4},
    "trl_two": {"num_processes": 2, "gradient_accumulation_steps": 2},
    "trl_fsdp_one": {  # one process through accelerate: FSDP on one GPU (its offload), a one-GPU host's check
        "num_processes": 1,
        "gradient_accumulation_steps": 4,
        "accelerate_config": "configs/accelerate/fsdp_qlora.yaml",
    },
    "trl_fsdp": {
        "num_processes": 2,
        "gradient_accumulation_steps": 2,
        "accelerate_config": "configs/accelerate/fsdp_qlora.yaml",
    },
    "trl_zero3": {
        "num_processes": 2,
        "gradient_accumulation_steps": 2,
        "accelerate_config": "configs/accelerate/deepspeed_zero3.yaml",
    },
}
SHORT = {"backend": "trl", "max_steps": 4, "save_steps": 2, "warmup_steps": 1}


@pytest.fixture(scope="module")
def project(tmp_path_factory, stage_python):
    """A copy of the repository with the demo's tiny model and dataset built, and the profiles of RUNS:
    the demo's, finetuned through trl in one process or two."""
    for image in ("data", "train"):
        stage_python(image)
    folder = copy_repository(tmp_path_factory.mktemp("launch") / "shoptune")
    shoptune("run", "tiny_model", "--profile", "demo", cwd=folder)
    for stage in ("synthesize", "clean", "dataset"):
        shoptune("run", stage, "--profile", "demo", cwd=folder)
    data = yaml.safe_load((folder / "params.yaml").read_text())
    for name, changes in RUNS.items():
        profile = copy.deepcopy(data["profiles"]["demo"])
        profile["finetune"].update(SHORT, **changes)
        data["profiles"][name] = profile
        shutil.copytree(folder / "runs/demo/dataset", folder / f"runs/{name}/dataset")
    (folder / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


def finetune(project: Path, profile: str) -> tuple[str, float]:
    """`shoptune run finetune` (local runner); its output (the trainer's logs are on stdout) and wall time."""
    started = time.monotonic()
    result = shoptune("run", "finetune", "--profile", profile, cwd=project, env={"SHOPTUNE_RUNNER": "local"})
    return result.stderr + result.stdout, time.monotonic() - started


def losses(project: Path, profile: str) -> list[tuple[int, float]]:
    rows = (project / f"runs/{profile}/finetune/loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss"
    return [(int(step), float(loss)) for step, loss in (row.split(",") for row in rows[1:])]


def loss_chart(project: Path, profile: str) -> Path:
    """The loss curve's drawing: plots/<profile>-loss.svg."""
    from shoptune import workspace

    return project / workspace.plot_file(profile, "loss")


# the merged model loads with transformers alone, answers with finite logits, and is not the base
LOAD_MERGED = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
merged = AutoModelForCausalLM.from_pretrained(sys.argv[1])
base = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=merged.dtype)  # the base in the same 16 bits
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
logits = merged(**tokenizer("The product 'Tiny Lamp' appears on", return_tensors="pt")).logits
name = "model.layers.0.self_attn.q_proj.weight"
change = (merged.state_dict()[name].float() - base.state_dict()[name].float()).abs().max().item()
print(json.dumps({"dtype": str(merged.dtype), "finite": bool(torch.isfinite(logits).all()), "change": change,
                  "eos": tokenizer.eos_token}))
"""


@pytest.mark.slow
def test_two_cpu_processes_train_as_one_does_and_the_main_one_writes(project, stage_python):
    logs, seconds = {}, {}
    for name in RUNS:
        logs[name], seconds[name] = finetune(project, name)
    print(f"\nfinetune, trl, {SHORT['max_steps']} steps of 8 rows on this machine's cores:")
    for name, changes in RUNS.items():
        training = re.search(r"'train_runtime': '([0-9.]+)'", logs[name])
        layout = Path(changes.get("accelerate_config") or "no config").stem
        print(
            f"  {name}: {changes['num_processes']} process(es), {layout}: shoptune run {seconds[name]:.1f} s, "
            f"training {training[1]} s"
        )

    assert "backend trl, 1 process(es): NO" in logs["trl_one"]
    assert "backend trl, 2 process(es): MULTI_CPU" in logs["trl_two"]  # gloo, over accelerate's torchrun launcher
    # FSDP for real (not DDP under another name), with what the CPU cannot do switched off and said
    assert "backend trl, 2 process(es): FSDP" in logs["trl_fsdp"]
    assert (
        "FSDP on the CPU over gloo; fsdp_sync_module_states and fsdp_cpu_ram_efficient_loading off"
        in (logs["trl_fsdp"])
    )
    assert "backend trl, 1 process(es): FSDP" in logs["trl_fsdp_one"]
    assert "backend trl, 2 process(es): DEEPSPEED" in logs["trl_zero3"]  # DeepSpeed's CPU accelerator, gloo
    for name in ("trl_two", "trl_fsdp_one", "trl_fsdp", "trl_zero3"):
        assert logs[name].count("finetune: merged model in") == 1  # the main process alone writes
    for log in logs.values():
        assert "unsloth" not in log.lower()  # the trl backend imports no unsloth

    one = losses(project, "trl_one")
    assert [step for step, _ in one] == [1, 2, 3, 4]
    for name in ("trl_two", "trl_fsdp_one", "trl_fsdp", "trl_zero3"):
        other = losses(project, name)
        assert [step for step, _ in other] == [1, 2, 3, 4]
        for (_, a), (_, b) in zip(one, other, strict=True):
            assert b == pytest.approx(a, rel=LOSS_TOLERANCE), name
    for name in RUNS:
        folder = project / f"runs/{name}/finetune"
        assert loss_chart(project, name).read_text().startswith("<svg")
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["steps"] == 4 and metrics["train_rows"] > 0 and metrics["val_loss"] is not None
        assert not any((project / f"runs/{name}/.checkpoints/finetune").iterdir())  # done: checkpoints removed
        loaded = subprocess.run(
            [stage_python("train"), "-c", LOAD_MERGED, str(folder / "model"), str(project / "models/tiny-qwen2")],
            capture_output=True,
            text=True,
        )
        assert loaded.returncode == 0, loaded.stderr[-3000:]
        merged = json.loads(loaded.stdout.splitlines()[-1])
        assert merged["dtype"] == "torch.bfloat16" and merged["finite"]  # 16 bits, as unsloth's merged_16bit
        assert merged["change"] > 0 and merged["eos"] == "<|im_end|>"  # the adapter was not lost on the way
    # FSDP's adapter, gathered from the shards, is DDP's: the same merged model
    weights = [(project / f"runs/{n}/finetune/model/model.safetensors").read_bytes() for n in ("trl_two", "trl_fsdp")]
    assert weights[0] == weights[1]


@pytest.mark.slow
def test_two_processes_with_the_same_seed_give_the_same_curve_and_model(project):
    finetune(project, "trl_two")
    first = {name: (project / "runs/trl_two/finetune" / name).read_bytes() for name in ("loss.csv", "metrics.json")}
    first_model = (project / "runs/trl_two/finetune/model/model.safetensors").read_bytes()
    finetune(project, "trl_two")
    for name, content in first.items():
        assert (project / "runs/trl_two/finetune" / name).read_bytes() == content, name
    assert (project / "runs/trl_two/finetune/model/model.safetensors").read_bytes() == first_model


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc: children, their children ...)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("name", ["trl_two", "trl_fsdp", "trl_zero3"])
def test_a_killed_run_of_two_processes_resumes_from_its_checkpoint(project, name):
    """Killed (SIGKILL: the launcher and both ranks) once step 2's checkpoint is written, the rerun
    resumes from it (FSDP: each rank its shard; ZeRO-3: its partitions) and goes on along the curve
    of the run that was not interrupted (FSDP: from the same weights; its optimizer starts afresh)."""
    from tests.conftest import HOST_BIN, SHARED

    if not (project / f"runs/{name}/finetune/loss.csv").is_file():  # run alone: no test above has trained it
        finetune(project, name)
    finished = losses(project, name)  # the uninterrupted run
    checkpoints = project / f"runs/{name}/.checkpoints/finetune"
    command = [str(HOST_BIN / "shoptune"), "run", "finetune", "--profile", name]
    env = {**os.environ, **SHARED, "SHOPTUNE_RUNNER": "local"}
    run = subprocess.Popen(
        command, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("*/checkpoint-2/trainer_state.json")):  # the trainer writes it last
        assert run.poll() is None, f"finetune ended ({run.returncode}) before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.2)
    tree = [run.pid, *descendants(run.pid)]  # torchrun starts each rank in a session of its own
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    run.wait()
    while any(alive(pid) for pid in tree):
        assert time.monotonic() < deadline, "the killed ranks are still running"
        time.sleep(0.1)

    log, _ = finetune(project, name)
    assert re.search(r"resuming from \S+/checkpoint-2", log), log[-3000:]
    assert "finetune: merged model in" in log
    resumed = losses(project, name)
    assert [step for step, _ in resumed] == [1, 2, 3, 4]
    # step 3's loss is computed on the weights step 2 left: the adapter came back from the checkpoint
    agree = resumed if name != "trl_fsdp" else resumed[:3]
    for (_, a), (_, b) in zip(finished, agree, strict=False):
        assert b == pytest.approx(a, rel=LOSS_TOLERANCE)
    if name == "trl_fsdp":  # Adam's moments restart under FSDP (training_processes.FSDP_RESUME): step 4 moves
        assert "FSDP: resumed with the adapter" in log
    assert not any(checkpoints.iterdir())  # done: checkpoints removed
