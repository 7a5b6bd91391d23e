"""Running a stage in its environment: a local virtual environment or a Docker container.

IMAGES is the one map from stage to environment (docker/<image>/). Both runners install
the same locked wheels (shoptune/environments.py), so a stage gives the same bytes either
way. Every run of a pipeline stage leaves runs/<profile>/<stage>/provenance.json beside its
outputs: what ran, where, from which commit and lock, when (DVC hashes none of it).
"""

from __future__ import annotations

import datetime
import fcntl
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from shoptune import UserError, environments
from shoptune.artifacts import write_json
from shoptune.environments import REPOSITORY, say
from shoptune.workspace import checkpoints_dir, stage_dir

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
# Only these stages reach the network in a container (the API of an LLM).
NETWORK_STAGES = {"synthesize"}
# Local environments; SHOPTUNE_VENVS lets several clones share one set.
VENVS = Path(os.environ.get("SHOPTUNE_VENVS", REPOSITORY / ".venvs"))
WORKDIR_IN_CONTAINER = "/workspace"
# Variables a stage may need at run time; their values are passed to the process or
# container, never written to an image, a log or an output: keys, and the host's threading
# and BLAS kernel settings (OpenBLAS picks another kernel without them, and numpy's results
# differ in the last bits from the local runner's).
PASSED_ENVIRONMENT = (
    *("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "HF_TOKEN", "SHOPTUNE_API_KEY"),
    *("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"),
)
# Set for every stage, whatever the runner: a fixed hash seed (any walk over a set of strings
# then takes the same order in every run), and where unsloth writes the kernels it compiles
# (by default the current folder: the repository).
STAGE_ENVIRONMENT = {"PYTHONHASHSEED": "0", "UNSLOTH_COMPILE_LOCATION": f"/tmp/unsloth_compiled_cache-{os.getuid()}"}


def image_of(stage: str) -> str:
    if stage not in IMAGES:
        raise UserError(f"unknown stage '{stage}' (stages: {', '.join(IMAGES)})")
    return IMAGES[stage]


def accelerator(gpus: bool) -> str:
    """Which lock an environment installs: lock-cuda.txt or lock-cpu.txt."""
    return "cuda" if gpus else "cpu"


def stage_command(stage: str, args: list[str], python: str) -> list[str]:
    return [python, "-m", f"stages.{stage}", *args]


def build(runner: str, image: str, kind: str = "cpu") -> str:
    """Build (or find up to date) what `runner` needs for `image`: a venv's python or an image tag."""
    if runner == "local":
        return str(local_python(image, kind))
    if runner == "docker":
        from shoptune import containers

        return containers.ensure_image(containers.client(), image, kind)
    raise UserError(f"unknown runner '{runner}' (local or docker)")


def run(stage: str, args: list[str], runner: str, gpus: bool = False, profile: str | None = None) -> int:
    """Run `python -m stages.<stage> ARGS` in the stage's environment; its exit status.
    With a profile (a pipeline stage), the container may write only the stage's folders and
    the run leaves its provenance record."""
    image, kind = image_of(stage), accelerator(gpus)
    if runner not in ("local", "docker"):
        raise UserError(f"unknown runner '{runner}' (local or docker)")
    built = build(runner, image, kind)  # before anything runs: a failed build changes nothing
    started = now()
    if runner == "local":
        status = run_local(stage, args, Path(built))
    else:
        status = run_docker(stage, args, built, gpus, profile)
    if profile is not None:
        record = provenance(stage, profile, runner, image, kind, built, started, status)
        write_json(stage_dir(profile, stage) / "provenance.json", record)
    return status


# ---------------------------------------------------------------- local runner


def local_python(image: str, kind: str = "cpu") -> Path:
    """The interpreter of .venvs/<image> (.venvs/<image>-cuda for GPUs), (re)built from the
    wheelhouse when its lock changes."""
    name = image if kind == "cpu" else f"{image}-{kind}"
    venv = VENVS / name
    python = venv / "bin" / "python"
    stamp = venv / ".shoptune-lock"
    script = environments.file_digest(environments.INSTALL_SCRIPT)
    wanted = f"{environments.lock_digest(image, kind)} {sys.version.split()[0]} {script}"
    environments.read_lock(image, kind)  # a stale lock is an error before anything is built
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if here != environments.PYTHON_VERSION:
        raise UserError(f"the locks are made for Python {environments.PYTHON_VERSION}; this is Python {here}")
    VENVS.mkdir(parents=True, exist_ok=True)
    with open(VENVS / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others wait and reuse it
        if python.exists() and stamp.is_file() and stamp.read_text() == wanted:
            return python
        listing, wheels = environments.wheelhouse(image, kind)
        say(f"building the '{name}' environment in {venv}: {len(wheels)} locked wheels ...")
        # A venv records its own path in its scripts, so it is built in place; the stamp,
        # written last, marks it complete: an interrupted build is redone next time.
        stamp.unlink(missing_ok=True)
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        environments.install(python, listing)
        stamp.write_text(wanted)
        say(f"environment '{name}' ready")
    return python


def run_local(stage: str, args: list[str], python: Path) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPOSITORY), **STAGE_ENVIRONMENT)
    process = subprocess.Popen(stage_command(stage, args, str(python.absolute())), env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        return process.wait()


# ---------------------------------------------------------------- docker runner


def run_docker(stage: str, args: list[str], tag: str, gpus: bool = False, profile: str | None = None) -> int:
    from shoptune import containers

    environment = {name: os.environ[name] for name in PASSED_ENVIRONMENT if name in os.environ}
    environment.update(PYTHONPATH=WORKDIR_IN_CONTAINER, HOME="/tmp", PYTHONUNBUFFERED="1", **STAGE_ENVIRONMENT)
    return containers.run(
        containers.client(),
        tag,
        stage_command(stage, args, "python"),
        labels={
            "shoptune.workspace": str(Path.cwd()),
            "shoptune.stage": stage,
            "shoptune.profile": profile or "",
        },
        environment=environment,
        writable=writable_dirs(stage, profile) if profile else [],
        network=stage in NETWORK_STAGES or profile is None,
        gpus=gpus,
    )


def writable_dirs(stage: str, profile: str) -> list[Path]:
    """What a pipeline stage may write: its own folder and checkpoints (the demo's model: models/)."""
    if stage == "tiny_model":
        return [Path("models"), stage_dir(profile, stage)]
    return [stage_dir(profile, stage), checkpoints_dir(profile, stage)]


# ---------------------------------------------------------------- provenance


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def provenance(stage, profile, runner, image, kind, built, started, status) -> dict:
    """Who ran what, where: the record each pipeline stage leaves beside its outputs."""
    record = {
        "stage": stage,
        "profile": profile,
        "exit_status": status,
        "runner": runner,
        "environment": f"{image}/{kind}",
        "lock": f"docker/{image}/lock-{kind}.txt",
        "lock_sha256": environments.lock_digest(image, kind),
        "image": None,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "gpus": _gpus(),
        "started": started,
        "ended": now(),
    }
    if record["git_commit"]:
        record["git_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
    if runner == "docker":
        from shoptune import containers

        record["image"] = {"tag": built, "id": containers.client().images.get(built).id}
    return record


def _git(*args: str) -> str | None:
    result = subprocess.run(["git", *args], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def _gpus() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    result = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return [line.strip() for line in result.stdout.splitlines() if line.strip()] if result.returncode == 0 else []
