"""The docker runner with a real engine: all five images build offline with no CUDA inside, the
data stages in containers give the local runner's bytes, files belong to the caller, a container
reads the repository but writes only its stage's folders and reaches no network, exit codes pass
through, Ctrl-C and kill -9 leave no container behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import HOST_BIN, ROOT, SHARED, copy_repository, shoptune

pytestmark = pytest.mark.docker
DATA_STAGES = ("synthesize", "clean", "dataset")
IMAGE_LIMIT = 4 * 1024**3

PACKAGES = """
import importlib.metadata as m, json, os
print(json.dumps({"uid": os.getuid(), "packages": {d.metadata["Name"].lower(): d.version for d in m.distributions()}}))
"""


# What Triton does at its first kernel launch (vLLM's attention on a T4, unsloth's kernels):
# compile a small C launcher against Python's headers.
LAUNCHER = """
import subprocess, sysconfig, pathlib
source = pathlib.Path("/tmp/launcher.c")
source.write_text("#include <Python.h>\\nstatic PyModuleDef m = {PyModuleDef_HEAD_INIT, \\"launcher\\"};\\n"
                  "PyMODINIT_FUNC PyInit_launcher(void) { return PyModule_Create(&m); }\\n")
include = sysconfig.get_paths()["include"]
subprocess.run(["gcc", "-shared", "-fPIC", "-O1", f"-I{include}", str(source), "-o", "/tmp/launcher.so"], check=True)
import sys; sys.path.insert(0, "/tmp"); import launcher; print("compiled", launcher.__name__)
"""


def test_every_image_builds_without_cuda_and_under_4_gb(images, docker_client):
    assert sorted(images) == ["data", "eval", "infer", "quant", "train"]
    for image, tag in images.items():
        size = docker_client.images.get(tag).attrs["Size"]
        assert size < IMAGE_LIMIT, (image, size / 1024**3)
        inside = json.loads(docker_client.containers.run(tag, ["python", "-c", PACKAGES], remove=True))
        assert inside["uid"] == 65534, image  # not root by default
        packages = inside["packages"]
        assert not [name for name in packages if name.startswith("nvidia-")], image
        if "torch" in packages:
            assert packages["torch"].endswith("+cpu"), image
    for image in ("train", "infer"):  # the GPU stages: Triton compiles a launcher at the first kernel
        assert b"compiled launcher" in docker_client.containers.run(
            images[image], ["python", "-c", LAUNCHER], remove=True
        ), image


PROBE_STAGE = """
import os, pathlib
marker = pathlib.Path(os.environ["HOME"]) / "runs.txt"
runs = int(marker.read_text()) + 1 if marker.exists() else 1
marker.write_text(str(runs))
print("probe", os.environ["HOME"], runs, os.environ.get("NCCL_P2P_DISABLE"), os.environ.get("HF_HUB_OFFLINE"),
      os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK"), "AWS" in "".join(os.environ))
"""


def test_containers_keep_their_caches_and_get_the_gpu_settings(images, tmp_path, monkeypatch, capfd):
    """HOME is a host folder per image, kept between runs (Triton, vLLM and Hugging Face caches);
    NCCL_*, VLLM_* and HF_* reach the stage, other host variables do not."""
    from shoptune import runner

    folder = copy_repository(tmp_path / "probe")
    (folder / "stages" / "probe.py").write_text(PROBE_STAGE)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("SHOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NCCL_P2P_DISABLE", "1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-stages")
    environment = {**runner.STAGE_ENVIRONMENT, **runner.OFFLINE_ENVIRONMENT}
    for _ in range(2):
        assert runner.run_docker("probe", [], images["infer"], environment) == 0
    logs = capfd.readouterr().err
    assert "probe /cache 1 1 1 1 False" in logs and "probe /cache 2 1 1 1 False" in logs
    assert (tmp_path / "cache" / "infer" / "runs.txt").read_text() == "2"


def outputs(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for stage in DATA_STAGES
        for p in sorted((folder / "runs" / "demo" / stage).rglob("*"))
        if p.is_file() and p.name != "provenance.json"
    }


def test_data_stages_in_containers_match_the_local_runner(images, tmp_path):
    docker_copy = copy_repository(tmp_path / "docker")
    local_copy = copy_repository(tmp_path / "local")
    for stage in DATA_STAGES:
        shoptune("--runner", "docker", "run", stage, "--profile", "demo", cwd=docker_copy)
        shoptune("--runner", "local", "run", stage, "--profile", "demo", cwd=local_copy)
    in_docker, local = outputs(docker_copy), outputs(local_copy)
    assert len(in_docker) == 10 and in_docker == local  # failures.jsonl (empty offline) and the card too
    for path in (docker_copy / "runs").rglob("*"):
        assert (path.stat().st_uid, path.stat().st_gid) == (os.getuid(), os.getgid()), path
    record = json.loads((docker_copy / "runs/demo/clean/provenance.json").read_text())
    assert (record["runner"], record["exit_status"], record["environment"]) == ("docker", 0, "data/cpu")
    assert record["image"]["tag"] == images["data"] and record["image"]["id"].startswith("sha256:")
    assert record["lock"] == "docker/data/lock-cpu.txt" and record["started"] <= record["ended"]


def test_a_container_writes_only_its_stage_folders_and_has_no_network(
    images, docker_client, tmp_path, monkeypatch, capfd
):
    from shoptune import containers

    folder = copy_repository(tmp_path / "ro")
    monkeypatch.chdir(folder)
    probe = (
        "import os, pathlib\n"
        "pathlib.Path('runs/demo/clean/ok.txt').write_text('ok')\n"
        "print('interfaces', sorted(os.listdir('/sys/class/net')))\n"
        "try:\n    pathlib.Path('stages/clean.py').write_text('planted')\n"
        "except OSError as err:\n    print('refused', err.errno)\n"
    )
    status = containers.run(
        docker_client,
        images["data"],
        ["python", "-c", probe],
        labels={"shoptune.workspace": str(folder), "shoptune.stage": "probe", "shoptune.profile": "demo"},
        environment={},
        writable=[Path("runs/demo/clean")],
        network=False,
        gpus=False,
    )
    assert status == 0
    logs = capfd.readouterr().err
    assert "interfaces ['lo']" in logs and "refused 30" in logs  # 30: EROFS, a read-only file system
    assert (folder / "runs/demo/clean/ok.txt").read_text() == "ok"
    assert (folder / "stages/clean.py").read_text() == (ROOT / "stages/clean.py").read_text()
    assert not docker_client.containers.list(all=True, filters={"label": "shoptune.stage=probe"})


@pytest.fixture
def scratch_for_4242():
    """A folder user 4242 can reach (pytest's own folders are private to root)."""
    scratch = Path(tempfile.mkdtemp(prefix="shoptune-user-"))
    copy_repository(scratch / "user")
    for path in [scratch, *scratch.rglob("*")]:
        os.lchown(path, 4242, 4242)
    yield scratch
    shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user (CI runs as root)")
def test_files_belong_to_a_non_root_caller(images, scratch_for_4242):
    """The stage runs as the caller's uid:gid, here 4242:4242 in the docker group."""
    from shoptune import runner

    tmp_path, folder = scratch_for_4242, scratch_for_4242 / "user"
    docker_gid = os.stat("/var/run/docker.sock").st_gid
    # load every module the runner needs before dropping root
    runner.run_docker("synthesize", ["--help"], images["data"])
    pid = os.fork()
    if pid == 0:  # the child: become uid 4242, run a stage, report through the exit status
        status = 1
        try:
            os.setgroups([docker_gid])
            os.setgid(4242)
            os.setuid(4242)
            os.chdir(folder)
            status = runner.run_docker("synthesize", ["--profile", "demo"], images["data"], profile="demo")
        except BaseException as err:  # reported by the parent
            (tmp_path / "child-error.txt").write_text(repr(err))
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    error = tmp_path / "child-error.txt"
    assert os.waitstatus_to_exitcode(status) == 0, error.read_text() if error.exists() else "see the output"
    made = list((folder / "runs").rglob("*"))
    assert made and {(p.stat().st_uid, p.stat().st_gid) for p in made} == {(4242, 4242)}


def test_a_stage_error_passes_through_as_one_line(images, tmp_path):
    folder = copy_repository(tmp_path / "bad")
    params = folder / "params.yaml"
    params.write_text(params.read_text().replace("      min_options: 2\n", "      min_options: two\n", 1))
    result = shoptune("--runner", "docker", "run", "clean", "--profile", "demo", cwd=folder, check=False)
    assert result.returncode == 2
    assert "error: params.yaml: profiles.demo.clean.min_options: expected an integer, got 'two'" in result.stderr
    assert "Traceback" not in result.stderr


def hanging_synthesis(folder: Path) -> subprocess.Popen:
    """A synthesis against an unreachable API, retrying for minutes, in a container."""
    params = folder / "params.yaml"
    text = params.read_text()
    demo = text.index("      backend: offline")
    text = text[:demo] + text[demo:].replace("backend: offline", "backend: openai", 1).replace(
        "base_url: null", "base_url: http://127.0.0.1:9/v1", 1
    ).replace("max_retries: 3", "max_retries: 50", 1)
    params.write_text(text)
    return subprocess.Popen(
        [str(HOST_BIN / "shoptune"), "--runner", "docker", "run", "synthesize", "--profile", "demo"],
        cwd=folder,
        env={**os.environ, **SHARED, "OPENAI_API_KEY": "sk-never-logged"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_container(docker_client, process, folder: Path):
    for _ in range(120):
        running = docker_client.containers.list(filters={"label": f"shoptune.workspace={folder}"})
        if running:
            return running[0]
        time.sleep(0.5)
    process.kill()
    pytest.fail("the stage's container never started")


def test_ctrl_c_stops_and_removes_the_container(images, docker_client, tmp_path):
    folder = copy_repository(tmp_path / "interrupt")
    process = hanging_synthesis(folder)
    wait_for_container(docker_client, process, folder)
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert not docker_client.containers.list(all=True, filters={"label": f"shoptune.workspace={folder}"})
    assert "sk-never-logged" not in stderr
    assert not (folder / "runs" / "demo" / "synthesize" / "generations.jsonl").exists()


def test_after_kill_9_the_next_run_removes_the_orphan(images, docker_client, tmp_path):
    folder = copy_repository(tmp_path / "killed")
    process = hanging_synthesis(folder)
    orphan = wait_for_container(docker_client, process, folder)
    process.kill()  # SIGKILL: the runner cannot clean up
    process.communicate(timeout=30)
    orphan.reload()
    assert orphan.status == "running"  # left behind, still holding the key in its environment
    shutil.copy(ROOT / "params.yaml", folder / "params.yaml")  # the offline backend again
    result = shoptune("--runner", "docker", "run", "synthesize", "--profile", "demo", cwd=folder)
    assert f"removing container {orphan.short_id} left by an earlier run" in result.stderr
    assert not docker_client.containers.list(all=True, filters={"label": f"shoptune.workspace={folder}"})
    assert (folder / "runs/demo/synthesize/generations.jsonl").is_file()


def test_a_network_stage_reaches_a_server_on_the_host(images, docker_client, tmp_path, monkeypatch, capfd):
    """An OpenAI-compatible server on the host (a local vLLM, say), listening on all interfaces,
    is http://host.docker.internal:PORT from the synthesize stage's container."""
    import http.server
    import threading

    from shoptune import containers

    class Pong(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"pong from the host")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Pong)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.chdir(tmp_path)
    url = f"http://host.docker.internal:{server.server_address[1]}/"
    try:
        status = containers.run(
            docker_client,
            images["data"],
            ["python", "-c", f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=20).read())"],
            labels={"shoptune.workspace": str(tmp_path), "shoptune.stage": "host", "shoptune.profile": "demo"},
            environment={},
            writable=[],
            network=True,
        )
    finally:
        server.shutdown()
    assert status == 0 and "pong from the host" in capfd.readouterr().err
