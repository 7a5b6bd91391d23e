"""Running a stage in its environment: a local virtual environment or a Docker container.

Each image of docker/<image>/ (Dockerfile + requirements) is the single definition of an
environment; the local runner builds .venvs/<image> from the same requirement files with
the same install script. IMAGES is the one map from stage to image.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

from shoptune import UserError

IMAGES = {
    "synthesize": "data",
    "clean": "data",
    "dataset": "data",
    "tiny_model": "train",
    "finetune": "train",
    "pad": "quant",
    "quantize": "quant",
    "infer": "infer",
    "evaluate": "eval",
}


def code_root() -> Path:
    """The checkout whose stages/ and docker/ are run: the current folder when it is one
    (a DVC run in any clone), else the checkout this package was installed from."""
    here = Path.cwd()
    if (here / "stages" / "__init__.py").is_file() and (here / "docker").is_dir():
        return here
    return Path(__file__).resolve().parents[1]


REPOSITORY = code_root()
DOCKER_DIR = REPOSITORY / "docker"
INSTALL_SCRIPT = DOCKER_DIR / "install-requirements.sh"
# Local environments; SHOPTUNE_VENVS lets several clones share one set.
VENVS = Path(os.environ.get("SHOPTUNE_VENVS", REPOSITORY / ".venvs"))
DEFAULT_BASE_IMAGE = "shoptune/base:bookworm"
WORKDIR_IN_CONTAINER = "/workspace"
# Variables a stage may need at run time; their values are passed to the process or
# container, never written to an image, a log or an output.
PASSED_ENVIRONMENT = ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "HF_TOKEN", "SHOPTUNE_API_KEY")


def image_of(stage: str) -> str:
    if stage not in IMAGES:
        raise UserError(f"unknown stage '{stage}' (stages: {', '.join(IMAGES)})")
    return IMAGES[stage]


def environment_files(image: str) -> list[Path]:
    """What defines an image's Python environment: the install script and its requirements."""
    folder = DOCKER_DIR / image
    if not (folder / "requirements.txt").is_file():
        raise UserError(f"{folder}/requirements.txt: no such file (images: {', '.join(sorted(set(IMAGES.values())))})")
    return [INSTALL_SCRIPT, *sorted(folder.glob("requirements*.txt"))]


def definition_files(image: str) -> list[Path]:
    """What defines an image: its environment and docker/<image>/Dockerfile if it has its
    own, else the shared docker/Dockerfile."""
    own = DOCKER_DIR / image / "Dockerfile"
    return [*environment_files(image), own if own.is_file() else DOCKER_DIR / "Dockerfile"]


def digest(files: list[Path], extra: str = "") -> str:
    sha = hashlib.sha256(extra.encode())
    for path in files:
        sha.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return sha.hexdigest()[:16]


def accelerator(gpus: bool) -> str:
    """Which requirement variant an environment takes: requirements-cuda.txt or -cpu.txt."""
    return "cuda" if gpus else "cpu"


def stage_command(stage: str, args: list[str], python: str) -> list[str]:
    return [python, "-m", f"stages.{stage}", *args]


def run(stage: str, args: list[str], runner: str, gpus: bool = False) -> int:
    """Run `python -m stages.<stage> ARGS` in the stage's environment; its exit status."""
    if runner == "local":
        return run_local(stage, args, gpus)
    if runner == "docker":
        return run_docker(stage, args, gpus)
    raise UserError(f"unknown runner '{runner}' (local or docker)")


# ---------------------------------------------------------------- local runner


def local_python(image: str, kind: str = "cpu") -> Path:
    """The interpreter of .venvs/<image> (.venvs/<image>-cuda for GPUs), (re)built when its
    requirement files change."""
    name = image if kind == "cpu" else f"{image}-{kind}"
    venv = VENVS / name
    python = venv / "bin" / "python"
    stamp = venv / ".shoptune-digest"
    wanted = digest(environment_files(image), sys.version + kind)
    VENVS.mkdir(parents=True, exist_ok=True)
    with open(VENVS / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others wait and reuse it
        if python.exists() and stamp.is_file() and stamp.read_text() == wanted:
            return python
        print(f"shoptune: building the '{name}' environment in {venv} (once) ...", file=sys.stderr, flush=True)
        # A venv records its own path in its scripts, so it is built in place; the digest
        # stamp, written last, marks it complete: an interrupted build is redone next time.
        stamp.unlink(missing_ok=True)
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        try:
            subprocess.run(["sh", str(INSTALL_SCRIPT), str(python), str(DOCKER_DIR / image), kind], check=True)
        except subprocess.CalledProcessError:
            failed = f"installing {DOCKER_DIR / image}/requirements.txt failed (see pip's output above)"
            raise UserError(failed) from None
        stamp.write_text(wanted)
    return python


def run_local(stage: str, args: list[str], gpus: bool = False) -> int:
    python = local_python(image_of(stage), accelerator(gpus))
    env = dict(os.environ, PYTHONPATH=str(REPOSITORY))
    process = subprocess.Popen(stage_command(stage, args, str(python.absolute())), env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        return process.wait()


# ---------------------------------------------------------------- docker runner


def ca_bundle() -> bytes:
    """The CA certificates the build trusts: the system's, plus SHOPTUNE_EXTRA_CA_BUNDLE if set."""
    system = Path(os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"))
    data = system.read_bytes() if system.is_file() else b""
    extra = os.environ.get("SHOPTUNE_EXTRA_CA_BUNDLE")
    if extra:
        if not Path(extra).is_file():
            raise UserError(f"SHOPTUNE_EXTRA_CA_BUNDLE={extra}: no such file")
        data += b"\n" + Path(extra).read_bytes()
    return data


def build_context(image: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in definition_files(image):
            tar.add(path, arcname=path.name)
        data = ca_bundle()
        info = tarfile.TarInfo("ca-bundle.pem")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def base_image() -> str:
    return os.environ.get("SHOPTUNE_BASE_IMAGE", DEFAULT_BASE_IMAGE)


def docker_client():
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as err:  # the SDK raises several types for "no engine"
        raise UserError(f"cannot reach the Docker engine ({type(err).__name__}); is dockerd running?") from None
    return client


def ensure_image(client, image: str, kind: str = "cpu") -> str:
    """Build docker/<image> unless an image of the same definition, base and accelerator
    exists; return its tag."""
    import docker

    base = base_image()
    name = f"shoptune/{image}" if kind == "cpu" else f"shoptune/{image}-{kind}"
    tag = f"{name}:{digest(definition_files(image), base + kind)}"
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    print(f"shoptune: building image {tag} from {DOCKER_DIR / image} (base {base}) ...", file=sys.stderr, flush=True)
    stream = client.api.build(
        fileobj=io.BytesIO(build_context(image)),
        custom_context=True,
        tag=tag,
        buildargs={"BASE_IMAGE": base, "ACCELERATOR": kind},
        rm=True,
        forcerm=True,
        decode=True,
    )
    for chunk in stream:
        if "stream" in chunk:
            sys.stderr.write(chunk["stream"])
        if "error" in chunk:
            raise UserError(f"building {tag} failed: {chunk['error'].strip()}")
    client.images.get(tag).tag(name, "latest")
    return tag


def run_docker(stage: str, args: list[str], gpus: bool = False) -> int:
    import docker

    client = docker_client()
    tag = ensure_image(client, image_of(stage), accelerator(gpus))
    environment = {name: os.environ[name] for name in PASSED_ENVIRONMENT if name in os.environ}
    environment.update(PYTHONPATH=WORKDIR_IN_CONTAINER, HOME="/tmp", PYTHONUNBUFFERED="1")
    device_requests = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])] if gpus else []
    container = client.containers.run(
        tag,
        stage_command(stage, args, "python"),
        detach=True,
        user=f"{os.getuid()}:{os.getgid()}",
        working_dir=WORKDIR_IN_CONTAINER,
        volumes={os.getcwd(): {"bind": WORKDIR_IN_CONTAINER, "mode": "rw"}},
        environment=environment,
        device_requests=device_requests,
        shm_size="8g" if gpus else None,
        labels={"shoptune.stage": stage},
    )
    try:
        for chunk in container.logs(stream=True, follow=True):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
        return container.wait()["StatusCode"]
    except KeyboardInterrupt:
        print(f"\nshoptune: stopping container {container.short_id} ...", file=sys.stderr)
        container.stop(timeout=10)
        return 130
    finally:
        container.remove(force=True)
