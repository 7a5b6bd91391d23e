"""The runner's pieces that need no engine (the builds and containers themselves: test_docker.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shoptune import UserError, cli, containers, environments, runner


def test_every_stage_has_an_environment_with_both_locks():
    for stage, image in runner.IMAGES.items():
        for accelerator in environments.ACCELERATORS:
            assert environments.lock_path(image, accelerator).is_file(), stage


def test_image_tags_follow_the_lock_the_base_and_the_accelerator(monkeypatch):
    tag = containers.image_tag("data", "cpu")
    assert tag.startswith("shoptune/data:") and containers.image_tag("data", "cpu") == tag
    assert containers.image_tag("data", "cuda").startswith("shoptune/data-cuda:")
    monkeypatch.setenv("SHOPTUNE_BASE_IMAGE", "some/cuda-base:1")
    assert containers.image_tag("data", "cpu") != tag
    assert containers.image_tag("data", "cpu", "sha256:another-base") != containers.image_tag("data", "cpu")


def test_unknown_stage_runner_and_accelerator_are_user_errors():
    with pytest.raises(UserError, match="unknown stage 'train'"):
        runner.image_of("train")
    with pytest.raises(UserError, match="unknown runner 'ssh'"):
        runner.run("clean", [], "ssh")
    with pytest.raises(UserError, match="unknown accelerator 'rocm'"):
        environments.lock_path("data", "rocm")


def test_a_stage_writes_only_its_own_folders():
    own = [Path("runs/demo/finetune"), Path("runs/demo/.checkpoints/finetune")]
    assert runner.writable_dirs("finetune", "demo") == [*own, Path("plots")]  # plots/demo-loss.svg
    assert runner.writable_dirs("pad", "demo") == [Path("runs/demo/pad"), Path("runs/demo/.checkpoints/pad")]
    assert runner.writable_dirs("evaluate", "demo")[2:] == [Path("metrics"), Path("plots")]
    assert Path("models") in runner.writable_dirs("tiny_model", "demo")
    assert runner.NETWORK_STAGES == {"synthesize"}


@pytest.mark.parametrize(
    ("argv", "position"),
    [
        (["evaluate", "--help"], 0),
        (["--runner", "docker", "pad", "a", "b"], 2),
        (["--runner=local", "run", "evaluate", "--profile", "demo"], 1),
        (["--help"], None),
    ],
)
def test_the_command_is_found_after_the_global_options(argv, position):
    assert cli.command_position(argv) == position


def test_each_stage_gets_the_gpus_it_uses(monkeypatch):
    from shoptune import params

    paper, demo = params.load_profile("paper"), params.load_profile("demo")
    wanted = {"finetune": 1, "quantize": 1, "infer": paper.infer.tensor_parallel_size, "evaluate": 1, "pad": 0}
    assert {stage: runner.gpus_for(stage, paper) for stage in wanted} == wanted
    assert [runner.gpus_for(stage, demo) for stage in runner.IMAGES] == [0] * len(runner.IMAGES)
    monkeypatch.delenv("SHOPTUNE_GPUS", raising=False)
    assert runner.visible_gpus(4) is None
    monkeypatch.setenv("SHOPTUNE_GPUS", "2, 3,4,5,6")
    assert runner.visible_gpus(4) == ["2", "3", "4", "5"]
    with pytest.raises(UserError, match="SHOPTUNE_GPUS=1: the stage needs 4 GPUs"):
        monkeypatch.setenv("SHOPTUNE_GPUS", "1")
        runner.visible_gpus(4)


def test_docker_asks_for_the_chosen_gpus():
    assert containers.device_requests(0, None) == []
    (any_four,) = containers.device_requests(4, None)
    assert (any_four["Count"], any_four["Capabilities"]) == (4, [["gpu"]])
    (chosen,) = containers.device_requests(2, ["1", "3"])
    assert chosen["DeviceIDs"] == ["1", "3"]


def test_gpu_library_settings_pass_and_other_variables_do_not(monkeypatch):
    monkeypatch.setenv("NCCL_P2P_DISABLE", "1")
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "TRITON_ATTN")
    monkeypatch.setenv("HF_HOME", "/data/hf")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-stages")
    passed = runner.passed_environment()
    assert {"NCCL_P2P_DISABLE", "VLLM_ATTENTION_BACKEND", "HF_HOME"} <= set(passed)
    assert "AWS_SECRET_ACCESS_KEY" not in passed
    # torch must ask NVML, not the CUDA driver, before vLLM forks its workers
    assert runner.STAGE_ENVIRONMENT["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    assert runner.OFFLINE_ENVIRONMENT["HF_HUB_OFFLINE"] == "1"


def test_the_cache_folder_falls_back_when_home_is_not_writable(monkeypatch, tmp_path):
    monkeypatch.delenv("SHOPTUNE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert runner.cache_dir("shoptune/infer-cuda:abc") == tmp_path / "home/.cache/shoptune/infer-cuda"
    monkeypatch.setenv("SHOPTUNE_CACHE", str(tmp_path / "mine"))
    assert runner.cache_dir("shoptune/infer:abc") == tmp_path / "mine/infer"
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SHOPTUNE_CACHE", str(tmp_path / "file"))
    with pytest.raises(UserError, match="set SHOPTUNE_CACHE to a writable folder"):
        runner.cache_dir("shoptune/infer:abc")


def test_the_gpu_check_profile_is_a_valid_profile_on_the_gpu_paths(tmp_path):
    """make gpu-check needs a GPU host; what it runs is checked here: a valid profile, on the
    paper's code paths (4-bit QLoRA, AWQ model on vLLM in float16)."""
    import yaml

    from shoptune import params
    from tests.conftest import ROOT
    from tests.gpu_check import PROFILE, gpu_profile

    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["profiles"][PROFILE] = gpu_profile(data["profiles"]["demo"], 2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    profile = params.load_profile(PROFILE, tmp_path / "params.yaml")
    assert profile.gpus and profile.finetune.load_in_4bit and profile.finetune.optim == "adamw_8bit"
    assert (profile.infer.backend, profile.infer.model, profile.infer.dtype) == ("vllm", "quantized", "float16")
    assert profile.infer.tensor_parallel_size == 2 and data["profiles"]["demo"]["infer"]["backend"] == "transformers"
    assert runner.gpus_for("infer", profile) == 2


def test_keys_reach_only_the_stage_that_calls_an_api(monkeypatch):
    """synthesize gets the variable its profile names (api_key_env), as well as the usual key
    names; no other stage gets any key."""
    import dataclasses

    from shoptune import params

    paper = params.load_profile("paper")
    azure = dataclasses.replace(paper, synthesize=dataclasses.replace(paper.synthesize, api_key_env="MY_AZURE_KEY"))
    monkeypatch.setenv("MY_AZURE_KEY", "secret-1")
    monkeypatch.setenv("OPENAI_API_KEY", "secret-2")
    monkeypatch.setenv("HF_TOKEN", "secret-3")
    monkeypatch.setenv("NCCL_P2P_DISABLE", "1")
    synthesize = runner.passed_environment("synthesize", azure)
    assert {"MY_AZURE_KEY", "OPENAI_API_KEY", "HF_TOKEN", "NCCL_P2P_DISABLE"} <= set(synthesize)
    for stage in ("finetune", "infer", "evaluate", None):
        passed = runner.passed_environment(stage, azure)
        assert "NCCL_P2P_DISABLE" in passed and not {"MY_AZURE_KEY", "OPENAI_API_KEY", "HF_TOKEN"} & set(passed)


def test_infer_on_the_openai_backend_gets_the_network_and_its_key(monkeypatch):
    import dataclasses

    from shoptune import params
    from shoptune.profile import ApiParams

    demo = params.load_profile("demo")
    api = ApiParams(
        "served", "http://127.0.0.1:8000/v1", "MY_SERVER_KEY", None, 4, 2, 60, None, None, None, None, {}, 0.0
    )
    served = dataclasses.replace(demo, infer=dataclasses.replace(demo.infer, backend="openai", api=api))
    monkeypatch.setenv("MY_SERVER_KEY", "secret-1")
    assert runner.calls_api("infer", served) and not runner.calls_api("infer", demo)
    assert runner.calls_api("synthesize", demo) and not runner.calls_api("evaluate", served)
    assert runner.passed_environment("infer", served)["MY_SERVER_KEY"] == "secret-1"
    for stage in ("synthesize", "evaluate", None):  # the infer key is for infer only
        assert "MY_SERVER_KEY" not in runner.passed_environment(stage, served)
    assert "MY_SERVER_KEY" not in runner.passed_environment("infer", demo)


# A stand-in for .venv/bin/shoptune and .venv/bin/dvc: records its arguments and SHOPTUNE_RUNNER.
RECORDER = """#!{python}
import json, os, sys
with open({log!r}, "a") as out:
    out.write(json.dumps([os.path.basename(sys.argv[0]), sys.argv[1:], os.environ.get("SHOPTUNE_RUNNER")]) + "\\n")
"""


def runner_picked(monkeypatch, argv: list[str], variable: str | None) -> str:
    """The runner `shoptune ARGV` uses when SHOPTUNE_RUNNER is `variable` (None: unset)."""
    picked = []
    monkeypatch.setattr(runner, "run", lambda stage, args, name, *rest: picked.append(name) or 0)
    monkeypatch.setattr(runner, "build", lambda name, image, kind="cpu": picked.append(name) or "built")
    monkeypatch.setattr(cli.doctor_checks, "diagnose", lambda profile, name, *rest: picked.append(name) or [])
    monkeypatch.setattr(cli.doctor_checks, "render", lambda *args: "")
    monkeypatch.setattr(cli.params, "load_profile", lambda *args, **kwargs: None)
    if variable is None:
        monkeypatch.delenv("SHOPTUNE_RUNNER", raising=False)
    else:
        monkeypatch.setenv("SHOPTUNE_RUNNER", variable)
    with pytest.raises(SystemExit):
        cli.main(argv)
    return picked[0]


@pytest.mark.parametrize("profile", ["demo", "paper"])
@pytest.mark.parametrize(
    ("variable", "make_args", "wanted"),
    [
        (None, [], None),  # None: where `dvc repro STAGE@PROFILE` runs it, with the same SHOPTUNE_RUNNER
        ("docker", [], None),
        ("local", [], None),
        (None, ["RUNNER=docker"], "docker"),
        ("docker", ["RUNNER=local"], "local"),
        (None, ["DEMO_RUNNER=docker"], "docker"),  # the old name
    ],
    ids=["unset", "variable-docker", "variable-local", "RUNNER=docker", "RUNNER-over-variable", "DEMO_RUNNER"],
)
def test_make_runs_a_stage_where_dvc_repro_runs_it(monkeypatch, tmp_path, profile, variable, make_args, wanted):
    """`make STAGE PROFILE=P` and `dvc repro STAGE@P` (dvc.yaml: `shoptune run STAGE --profile P`) pick
    the same runner: make passes RUNNER on and has no default of its own (it had: docker for every
    profile but demo)."""
    from tests.conftest import ROOT

    log = tmp_path / "calls.jsonl"
    for name in ("shoptune", "dvc"):
        (tmp_path / name).write_text(RECORDER.format(python=sys.executable, log=str(log)))
        (tmp_path / name).chmod(0o755)
    environment = {k: v for k, v in os.environ.items() if k not in ("RUNNER", "DEMO_RUNNER", "SHOPTUNE_RUNNER")}
    environment.update({"SHOPTUNE_RUNNER": variable} if variable else {})
    # the stand-ins are up to date and base-image is not built
    make = ["make", "-s", f"BIN={tmp_path}", "-o", f"{tmp_path}/shoptune", "-o", "base-image"]
    alone = wanted or runner_picked(monkeypatch, ["run", "synthesize", "--profile", profile], variable)
    for target in ("synthesize", "doctor"):
        log.unlink(missing_ok=True)
        subprocess.run(
            [*make, target, f"PROFILE={profile}", *make_args],
            cwd=ROOT,
            env=environment,
            check=True,
            capture_output=True,
        )
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        assert calls and all(program in ("shoptune", "dvc") for program, _, _ in calls)
        for program, argv, passed in calls:
            if program == "dvc":
                assert argv == ["repro", f"{target}@{profile}"]
                argv = ["run", target, "--profile", profile]  # what dvc.yaml runs
            assert runner_picked(monkeypatch, argv, passed) == alone, (target, program, argv, passed)
