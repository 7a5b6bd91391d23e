"""Locks: each image's lock matches its requirements, pins everything with hashes, CPU locks carry
no CUDA, and the CUDA locks resolve on a plain machine (pip with no configuration at all)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from shoptune import UserError, environments
from tests.conftest import ROOT

LOCKS = [(image, accelerator) for image in environments.images() for accelerator in environments.ACCELERATORS]
CUDA_BUILDS = ("nvidia-", "cuda-", "cupy", "triton")


def test_there_are_five_images_with_both_locks():
    assert environments.images() == ["data", "eval", "infer", "quant", "train"]
    for image, accelerator in LOCKS:
        assert environments.lock_path(image, accelerator).is_file()


def test_every_lock_matches_its_inputs():
    assert environments.stale_locks() == [], "run `make lock`"


@pytest.fixture
def docker_copy(tmp_path, monkeypatch):
    copy = tmp_path / "docker"
    shutil.copytree(ROOT / "docker", copy)
    monkeypatch.setattr(environments, "DOCKER_DIR", copy)
    return copy


def test_a_changed_requirement_makes_the_lock_stale(docker_copy):
    requirements = docker_copy / "eval" / "requirements.txt"
    requirements.write_text(requirements.read_text().replace("rouge-score==0.1.2", "rouge-score==0.1.1"))
    assert environments.stale_locks() == ["eval/cpu", "eval/cuda"]
    stale = r"docker/eval/lock-cpu.txt: out of date with its requirements \(run `make lock`\)"
    with pytest.raises(UserError, match=stale):
        environments.read_lock("eval", "cpu")
    (docker_copy / "data" / "lock-cuda.txt").unlink()
    with pytest.raises(UserError, match=r"lock-cuda.txt: no such lock \(run `make lock`\)"):
        environments.read_lock("data", "cuda")


@pytest.mark.parametrize(("image", "accelerator"), LOCKS)
def test_a_lock_pins_every_package_with_hashes_and_keeps_the_top_level_pins(image, accelerator):
    pins = {pin.name.replace("_", "-"): pin for pin in environments.read_lock(image, accelerator)}
    assert pins and all(pin.hashes for pin in pins.values())
    top = environments.image_dir(image) / "requirements.txt"
    for line in top.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            name = name.split("[")[0].lower().replace("_", "-")
            assert pins[name].version.split("+")[0] == version, (image, accelerator, name)


@pytest.mark.parametrize("image", environments.images())
def test_cpu_locks_carry_no_cuda(image):
    pins = {pin.name: pin.version for pin in environments.read_lock(image, "cpu")}
    if "torch" in pins:
        assert pins["torch"].endswith("+cpu")
    # only train keeps Triton (unsloth imports it even on a CPU)
    cuda = [name for name in pins if name.startswith(CUDA_BUILDS) and (name, image) != ("triton", "train")]
    assert cuda == [], cuda
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(pins)


@pytest.mark.parametrize("image", environments.images())
def test_cuda_locks_resolve_on_a_plain_machine(image, tmp_path):
    """pip with its configuration files disabled (no local wheels, no extra index), Python 3.11 on
    linux x86_64: the full resolution of the lock picks exactly the locked versions, and every file
    pip picks carries one of the locked hashes; the --no-deps packages by themselves, as they are
    installed. pip's dry run reads the index's metadata files, so the 4 GB of CUDA wheels are never
    downloaded (a hash-checked dry run would download them all)."""
    pins = environments.read_lock(image, "cuda")
    nodeps_file = environments.image_dir(image) / "requirements-nodeps.txt"
    nodeps = set(environments.requirement_names(nodeps_file)) if nodeps_file.is_file() else set()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", TMPDIR=str(tmp_path))
    resolved = [p for p in pins if p.name not in nodeps]
    alone = [p for p in pins if p.name in nodeps]
    for group, extra in ((resolved, []), (alone, ["--no-deps"])):
        if not group:
            continue
        lock = tmp_path / f"{image}-{len(extra)}.txt"
        lock.write_text("".join(f"{p.spec}\n" for p in group))
        report = tmp_path / f"{image}-{len(extra)}.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--report", str(report)]
        command += ["--prefer-binary", "--no-cache-dir", "--quiet", *extra, "-r", str(lock)]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        chosen = {
            re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower(): (
                item["metadata"]["version"],
                item["download_info"]["archive_info"]["hashes"]["sha256"],
            )
            for item in json.loads(report.read_text())["install"]
        }
        assert {name: version for name, (version, _) in chosen.items()} == {p.name: p.version for p in group}
        locked = {p.name: set(p.hashes) for p in group}
        assert [name for name, (_, digest) in chosen.items() if digest not in locked[name]] == []


def test_identical_files_of_environments_are_shared_as_hardlinks(tmp_path):
    first, second = tmp_path / "quant", tmp_path / "eval"
    for venv in (first, second):
        (venv / "lib/torch").mkdir(parents=True)
        (venv / "lib/torch/libtorch_cpu.so").write_bytes(b"\1" * 300_000)
        (venv / "lib/small.py").write_bytes(b"x = 1\n")
    (first / "lib/torch/other.so").write_bytes(b"\2" * 300_000)
    (second / "lib/torch/other.so").write_bytes(b"\3" * 300_000)  # same size, other bytes
    saved = environments.share_identical_files(second, [first])
    assert saved == 300_000
    same = [(first / n).stat().st_ino == (second / n).stat().st_ino for n in ("lib/torch/libtorch_cpu.so",)]
    assert same == [True]
    assert (first / "lib/torch/other.so").stat().st_ino != (second / "lib/torch/other.so").stat().st_ino
    assert (second / "lib/torch/other.so").read_bytes() == b"\3" * 300_000
    assert (second / "lib/small.py").stat().st_nlink == 1  # small files are left alone
    assert environments.share_identical_files(second, [first]) == 0  # already shared
