"""shoptune doctor: the checks on sample nvidia-smi and docker info answers, and the command on
this machine (no GPU, no nvidia-smi; the demo passes, the paper profile does not)."""

import dataclasses
import os
import subprocess
from collections import namedtuple

import pytest

from shoptune import doctor, params
from shoptune.doctor import Gpu
from tests.conftest import ROOT, shoptune

SECRET = "sk-doctor-test-0123456789"
T4 = "Tesla T4, 7.5, 15360 MiB"


def profile(name="paper", **infer):
    loaded = params.load_profile(name, ROOT / "params.yaml")
    return dataclasses.replace(loaded, infer=dataclasses.replace(loaded.infer, **infer)) if infer else loaded


def test_nvidia_smi_lines_are_read():
    text = f"{T4}\nNVIDIA RTX A6000, 8.6, 49140 MiB\n\nNVIDIA A100-SXM4-80GB, 8.0, 81920 MiB\n"
    gpus = doctor.parse_nvidia_smi(text)
    assert gpus[0] == Gpu("Tesla T4", 7.5, 15360) and gpus[0].memory_gib == 15.0
    assert [g.compute_capability for g in gpus] == [7.5, 8.6, 8.0] and gpus[1].name == "NVIDIA RTX A6000"
    with pytest.raises(ValueError, match=r"nvidia-smi line 2: cannot read 'Tesla T4, \[N/A\], 15360 MiB'"):
        doctor.parse_nvidia_smi(f"{T4}\nTesla T4, [N/A], 15360 MiB\n")


def results(gpus, prof, stages=("finetune", "infer")):
    return {r.name: r for r in doctor.check_gpus(gpus, "", "paper", prof, list(stages))}


def test_four_t4s_serve_the_paper_profile():
    t4s = doctor.parse_nvidia_smi("\n".join([T4] * 3 + ["Tesla T4, 7.5, 15109 MiB"]))  # some drivers show 15109
    checks = results(t4s, profile(), ["infer"])
    assert all(r.ok for r in checks.values()), checks
    assert "4 GPU(s) for infer.tensor_parallel_size 4" in checks["inference GPU count"].detail


def test_too_few_gpus_bfloat16_on_a_t4_and_a_small_training_gpu_fail_with_a_fix():
    t4s = doctor.parse_nvidia_smi("\n".join([T4] * 2))
    checks = results(t4s, profile(dtype="bfloat16"))
    assert not checks["inference GPU count"].ok and "2 GPU(s) for infer.tensor_parallel_size 4" in (
        checks["inference GPU count"].detail
    )
    assert not checks["compute capability"].ok and "float16" in checks["compute capability"].fix
    assert not checks["training GPU"].ok and "hardware.train_gpu_memory_gib: 15.00" in checks["training GPU"].fix
    a6000 = doctor.parse_nvidia_smi("NVIDIA RTX A6000, 8.6, 49140 MiB")
    assert results(a6000, profile(), ["finetune"])["training GPU"].ok


def test_finetune_wants_one_gpu_per_process_each_as_large_as_planned():
    paper = profile()
    four = dataclasses.replace(paper, finetune=dataclasses.replace(paper.finetune, num_processes=4))
    a6000 = "NVIDIA RTX A6000, 8.6, 49140 MiB"
    two = results(doctor.parse_nvidia_smi("\n".join([a6000] * 2)), four, ["finetune"])["training GPU"]
    assert not two.ok and "2 GPU(s) for finetune.num_processes 4" in two.detail
    assert two.fix == "run finetune on a host with 4 GPUs, or set finetune.num_processes: 2"
    mixed = doctor.parse_nvidia_smi("\n".join([a6000, T4, "NVIDIA A100-SXM4-80GB, 8.0, 81920 MiB", a6000, T4]))
    small = results(mixed, four, ["finetune"])["training GPU"]  # the fourth largest is a T4
    assert not small.ok and "the smallest of them 15.00 GiB" in small.detail
    assert "hardware.train_gpu_memory_gib: 15.00" in small.fix
    assert results(doctor.parse_nvidia_smi("\n".join([a6000] * 4)), four, ["finetune"])["training GPU"].ok


def test_no_nvidia_smi_is_one_fail_with_its_fix():
    (result,) = doctor.check_gpus(None, "nvidia-smi not found", "paper", profile(), list(doctor.STAGES))
    assert not result.ok and "nvidia-smi not found" in result.detail and "infer 4" in result.detail
    assert "install the NVIDIA driver" in result.fix
    assert doctor.check_gpus(None, "nvidia-smi not found", "demo", profile("demo"), list(doctor.STAGES)) == []


def test_query_gpus_reads_the_command_and_its_failures():
    Done = namedtuple("Done", "returncode stdout stderr")
    gpus, why = doctor.query_gpus(lambda *a, **k: Done(0, T4 + "\n", ""))
    assert gpus == [Gpu("Tesla T4", 7.5, 15360)] and not why

    def missing(*args, **kwargs):
        raise FileNotFoundError

    assert doctor.query_gpus(missing) == (None, "nvidia-smi not found (no NVIDIA driver on this host)")
    failed = doctor.query_gpus(lambda *a, **k: Done(9, "", "NVIDIA-SMI has failed because it couldn't communicate\n"))
    assert failed[0] is None and "couldn't communicate" in failed[1]


def test_the_nvidia_runtime_is_found_in_docker_info():
    assert doctor.nvidia_runtime({"Runtimes": {"nvidia": {}, "runc": {}}}, which=lambda _: None).ok
    cdi = {"Runtimes": {"runc": {}}, "DiscoveredDevices": [{"Source": "cdi", "ID": "nvidia.com/gpu=all"}]}
    assert doctor.nvidia_runtime(cdi, which=lambda _: None).ok
    missing = doctor.nvidia_runtime({"Runtimes": {"runc": {}}}, which=lambda _: None)
    assert not missing.ok and "runtimes: runc" in missing.detail and "nvidia-ctk runtime configure" in missing.fix


def test_ram_and_disk_against_the_plan(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:    8388608 kB\n")
    assert doctor.check_ram(8 * 2**30, meminfo).ok and not doctor.check_ram(9 * 2**30, meminfo).ok
    usage = namedtuple("usage", "total used free")
    needs = {"workspace_bytes": 5 * 2**30, "cache_bytes": 5 * 2**30}
    (same,) = doctor.check_disk(needs, tmp_path, tmp_path / ".dvc" / "cache", lambda _: usage(0, 0, 9 * 2**30))
    assert not same.ok and "needs 10.0 GiB" in same.detail and "cache.type reflink,hardlink,symlink" in same.fix


def test_the_api_key_check_never_holds_the_value():
    synthesize = profile().synthesize
    ok = doctor.check_api_key("synthesize", synthesize.backend, synthesize.api_key_env, {"OPENAI_API_KEY": SECRET})
    assert ok.ok and SECRET not in repr(ok)
    empty = doctor.check_api_key("synthesize", synthesize.backend, synthesize.api_key_env, {"OPENAI_API_KEY": " "})
    assert not empty.ok and "synthesize.api_key_env" in empty.fix
    demo = profile("demo").synthesize
    assert doctor.check_api_key("synthesize", demo.backend, demo.api_key_env, {}) is None  # offline: no key
    served = doctor.check_api_key("infer", "openai", "MY_SERVER_KEY", {})  # infer's openai backend
    assert not served.ok and "(infer backend openai)" in served.detail and "infer.api.api_key_env" in served.fix
    assert doctor.check_api_key("infer", "vllm", "MY_SERVER_KEY", {}) is None


# ---------------------------------------------------------------- the command on this machine


def no_gpu_path(tmp_path):
    """A PATH without nvidia-smi (as on this machine), whatever the host running the tests has."""
    folder = tmp_path / "bin"
    folder.mkdir()
    return str(folder)


def test_the_demo_with_the_local_runner_passes():
    result = shoptune("--runner", "local", "doctor", "--profile", "demo", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok    RAM:" in result.stdout and "ok    disk" in result.stdout and "FAIL" not in result.stdout


def test_the_paper_profile_fails_on_gpus_with_the_fix(tmp_path):
    result = shoptune(
        "--runner", "local", "doctor", "--profile", "paper", env={"PATH": no_gpu_path(tmp_path)}, check=False
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "FAIL  GPUs: nvidia-smi not found" in result.stdout
    assert "fix: install the NVIDIA driver" in result.stdout


def test_an_unreachable_docker_engine_fails_with_the_fix(tmp_path):
    socket = f"unix://{tmp_path}/no-such-docker.sock"
    result = shoptune("--runner", "docker", "doctor", "--profile", "demo", env={"DOCKER_HOST": socket}, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"FAIL  Docker engine: not reachable at {socket}" in result.stdout
    assert "fix: start it (`sudo systemctl start docker`)" in result.stdout and "--runner local" in result.stdout


@pytest.mark.docker
def test_a_running_docker_engine_passes(docker_client):
    result = shoptune("--runner", "docker", "doctor", "--profile", "demo", env={"DOCKER_HOST": ""}, check=False)
    assert "ok    Docker engine: reachable" in result.stdout and result.returncode == 0, result.stdout


def test_the_api_key_passes_when_set_fails_when_not_and_is_never_printed():
    ok = shoptune("doctor", "--profile", "paper", "--stage", "synthesize", env={"OPENAI_API_KEY": SECRET}, check=False)
    assert ok.returncode == 0 and "ok    API key: OPENAI_API_KEY is set" in ok.stdout
    unset = shoptune("doctor", "--profile", "paper", "--stage", "synthesize", env={"OPENAI_API_KEY": ""}, check=False)
    assert unset.returncode == 1 and "FAIL  API key: OPENAI_API_KEY is not set" in unset.stdout
    assert "fix: export OPENAI_API_KEY=..." in unset.stdout
    everything = shoptune("doctor", "--profile", "paper", env={"OPENAI_API_KEY": SECRET}, check=False)
    for result in (ok, unset, everything):
        assert SECRET not in result.stdout + result.stderr


def test_make_doctor_runs_the_command():
    result = subprocess.run(
        ["make", "--no-print-directory", "doctor", "PROFILE=demo", "DEMO_RUNNER=local"],
        cwd=ROOT,
        env={**os.environ, "SHOPTUNE_RUNNER": ""},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "shoptune doctor: profile demo, runner local" in result.stdout
