"""The docker runner with a real engine: the data stages in containers give the local runner's
bytes, files belong to the calling user, exit codes pass through, Ctrl-C stops the container."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import HOST_BIN, ROOT, copy_repository, shoptune

pytestmark = pytest.mark.docker
DATA_STAGES = ("synthesize", "clean", "dataset")


@pytest.fixture(scope="module")
def data_image(docker_client):
    from shoptune import runner

    if not docker_client.images.list(name=runner.base_image()):
        subprocess.run(["sh", str(ROOT / "docker" / "base" / "build.sh")], check=True)
    return runner.ensure_image(docker_client, "data")


def outputs(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for stage in DATA_STAGES
        for p in sorted((folder / "runs" / "demo" / stage).rglob("*"))
        if p.is_file()
    }


def test_data_stages_in_containers_match_the_local_runner(data_image, tmp_path):
    docker_copy = copy_repository(tmp_path / "docker")
    local_copy = copy_repository(tmp_path / "local")
    for stage in DATA_STAGES:
        shoptune("--runner", "docker", "run", stage, "--profile", "demo", cwd=docker_copy)
        shoptune(
            "--runner",
            "local",
            "run",
            stage,
            "--profile",
            "demo",
            cwd=local_copy,
            env={"SHOPTUNE_VENVS": str(ROOT / ".venvs")},
        )
    in_docker, local = outputs(docker_copy), outputs(local_copy)
    assert len(in_docker) == 8 and in_docker == local
    for path in (docker_copy / "runs").rglob("*"):
        assert (path.stat().st_uid, path.stat().st_gid) == (os.getuid(), os.getgid()), path


@pytest.fixture
def scratch_for_4242():
    """A folder user 4242 can reach (pytest's own folders are private to root)."""
    scratch = Path(tempfile.mkdtemp(prefix="shoptune-user-"))
    copy_repository(scratch / "user")
    for path in [scratch, *scratch.rglob("*")]:
        os.chown(path, 4242, 4242)
    yield scratch
    shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user (CI runs as root)")
def test_files_belong_to_a_non_root_caller(data_image, scratch_for_4242):
    """The stage runs as the caller's uid:gid, here 4242:4242 in the docker group."""
    from shoptune import runner

    tmp_path, folder = scratch_for_4242, scratch_for_4242 / "user"
    docker_gid = os.stat("/var/run/docker.sock").st_gid
    runner.run_docker("synthesize", ["--help"])  # load every module the runner needs before dropping root
    pid = os.fork()
    if pid == 0:  # the child: become uid 4242, run a stage, report through the exit status
        status = 1
        try:
            os.setgroups([docker_gid])
            os.setgid(4242)
            os.setuid(4242)
            os.chdir(folder)
            status = runner.run_docker("synthesize", ["--profile", "demo"])
        except BaseException as err:  # reported by the parent
            (tmp_path / "child-error.txt").write_text(repr(err))
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    error = tmp_path / "child-error.txt"
    assert os.waitstatus_to_exitcode(status) == 0, error.read_text() if error.exists() else "see the output"
    made = list((folder / "runs").rglob("*"))
    assert made and {(p.stat().st_uid, p.stat().st_gid) for p in made} == {(4242, 4242)}


def test_a_stage_error_passes_through_as_one_line(data_image, tmp_path):
    folder = copy_repository(tmp_path / "bad")
    params = folder / "params.yaml"
    params.write_text(params.read_text().replace("      min_options: 2\n", "      min_options: two\n", 1))
    result = shoptune("--runner", "docker", "run", "clean", "--profile", "demo", cwd=folder, check=False)
    assert result.returncode == 2
    assert "error: params.yaml: profiles.demo.clean.min_options: expected an integer, got 'two'" in result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_stops_the_container(data_image, docker_client, tmp_path):
    """A synthesis against an unreachable API retries for a while; Ctrl-C must stop and remove it."""
    folder = copy_repository(tmp_path / "interrupt")
    params = folder / "params.yaml"
    text = params.read_text()
    demo_synthesize = text.index("      backend: offline")
    text = text[:demo_synthesize] + text[demo_synthesize:].replace("backend: offline", "backend: openai", 1).replace(
        "base_url: null", "base_url: http://127.0.0.1:9/v1", 1
    ).replace("max_retries: 3", "max_retries: 50", 1)
    params.write_text(text)
    process = subprocess.Popen(
        [str(HOST_BIN / "shoptune"), "--runner", "docker", "run", "synthesize", "--profile", "demo"],
        cwd=folder,
        env={**os.environ, "OPENAI_API_KEY": "sk-never-logged"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for _ in range(60):
        if docker_client.containers.list(filters={"label": "shoptune.stage=synthesize"}):
            break
        time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("the stage's container never started")
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert not docker_client.containers.list(all=True, filters={"label": "shoptune.stage=synthesize"})
    assert "sk-never-logged" not in stderr
    assert not (folder / "runs" / "demo" / "synthesize" / "generations.jsonl").exists()
