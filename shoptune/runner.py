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

from shoptune import UserError, environments, training_launch
from shoptune.artifacts import write_json
from shoptune.environments import REPOSITORY, say
from shoptune.profile import endpoints
from shoptune.workspace import METRICS, PLOTS, checkpoints_dir, stage_dir

IMAGES = {
    "synthesize": "data",
    "clean": "data",
    "dataset": "data",
    "tiny_model": "train",
    "smol_model": "train",
    "finetune": "train",
    "pad": "quant",
    "quantize": "quant",
    "infer": "infer",
    "evaluate": "eval",
}
# Only these stages reach the network in a container (the API of an LLM), and infer with the
# openai backend (calls_api).
NETWORK_STAGES = {"synthesize"}
# Local environments; SHOPTUNE_VENVS lets several clones share one set.
VENVS = Path(os.environ.get("SHOPTUNE_VENVS", REPOSITORY / ".venvs"))
WORKDIR_IN_CONTAINER = "/workspace"
# Variables a stage may need at run time; their values are passed to the process or
# container, never written to an image, a log or an output: the host's threading and BLAS
# kernel settings (OpenBLAS picks another kernel without them, and numpy's results differ in
# the last bits from the local runner's), and the GPU libraries' own settings
# (NCCL_P2P_DISABLE=1 on PCIe T4 boxes, VLLM_*, TRITON_*, HF_*).
PASSED_ENVIRONMENT = (
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
)
PASSED_PREFIXES = ("NCCL_", "VLLM_", "TRITON_", "HF_", "TORCH_CUDA_ARCH_LIST")
# Keys reach only the stages that call an API (calls_api): these, and the variables the
# profile names in synthesize.api_key_env and infer.api.api_key_env.
SECRETS = ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "HF_TOKEN", "SHOPTUNE_API_KEY")
# Set for every stage, whatever the runner: a fixed hash seed (any walk over a set of strings
# then takes the same order in every run); torch asks NVML, not the CUDA driver, whether a GPU
# is there (a driver initialized before vLLM forks its workers breaks them); unsloth sends no
# statistics and writes the kernels it compiles outside the repository.
STAGE_ENVIRONMENT = {
    "PYTHONHASHSEED": "0",
    "PYTORCH_NVML_BASED_CUDA_CHECK": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "UNSLOTH_COMPILE_LOCATION": f"/tmp/unsloth_compiled_cache-{os.getuid()}",
}
# Stages other than NETWORK_STAGES read models from disk only (no hub lookups, no waiting
# for timeouts on a host without internet).
OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# Persistent caches for containers (Triton's compiled launchers and kernels, vLLM's
# compilation cache, Hugging Face's cache): one folder per image on the host, the container's
# HOME. Without it every run on a T4 recompiles.
CACHE_IN_CONTAINER = "/cache"


def cache_dir(tag: str) -> Path:
    """The host folder of an image's caches: $SHOPTUNE_CACHE/<image>, by default under
    ~/.cache/shoptune (or /tmp/shoptune-cache-<uid> where the home folder is not writable)."""
    name = tag.split(":")[0].split("/")[-1]  # one per image and accelerator
    chosen = os.environ.get("SHOPTUNE_CACHE")
    roots = (
        [Path(chosen)] if chosen else [Path.home() / ".cache" / "shoptune", Path(f"/tmp/shoptune-cache-{os.getuid()}")]
    )
    for root in roots:
        try:
            (root / name).mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(root / name, os.W_OK):
            return root / name
    raise UserError(f"cannot make the cache folder {roots[0] / name} (set SHOPTUNE_CACHE to a writable folder)")


def calls_api(stage: str | None, profile=None) -> bool:
    """Does the stage call an LLM's API (network and key)? synthesize; infer with the openai backend."""
    if stage in NETWORK_STAGES:
        return True
    return stage == "infer" and profile is not None and profile.infer.backend == "openai"


def key_names(profile, stage: str | None = None) -> set[str]:
    """The variables that hold API keys: the usual names, and those the profile's sections name
    (synthesize.api_key_env, infer.api.api_key_env), or with a stage only that stage's own."""
    names = set(SECRETS)
    if profile is not None and stage in (None, "synthesize"):
        names |= {e.api_key_env for e in endpoints(profile.synthesize)}
    if profile is not None and stage in (None, "infer") and profile.infer.api is not None:
        names |= {e.api_key_env for e in endpoints(profile.infer.api)}
    return names


def passed_environment(stage: str | None = None, profile=None) -> dict[str, str]:
    """The host's variables a stage's container receives: the settings above, and the keys only
    for a stage that calls an API (the usual names and the one its own section names)."""
    keys = key_names(profile)
    settings = {
        name: value
        for name, value in os.environ.items()
        if (name in PASSED_ENVIRONMENT or name.startswith(PASSED_PREFIXES)) and name not in keys
    }
    if calls_api(stage, profile):
        settings.update({name: os.environ[name] for name in sorted(key_names(profile, stage)) if name in os.environ})
    return settings


def gpus_for(stage: str, profile) -> int:
    """How many GPUs a stage of a profile gets: training one per process (finetune.num_processes),
    quantizing one, inference its tensor-parallel size, the others none (a profile with gpus: false:
    none at all)."""
    if profile is None or not profile.gpus:
        return 0
    training = training_launch.gpus(profile.finetune)
    infer = profile.infer
    # pipeline parallel on one node: all its stages here; over Ray, this node gives one stage's GPUs
    stages_here = infer.pipeline_parallel_size if infer.distributed_executor_backend != "ray" else 1
    inference = infer.tensor_parallel_size * stages_here
    return {"finetune": training, "quantize": 1, "infer": inference, "evaluate": 1}.get(stage, 0)


def visible_gpus(count: int) -> list[str] | None:
    """Which GPUs a stage that needs `count` of them uses: the first of $SHOPTUNE_GPUS
    (e.g. "2,3,4,5"), or None to take any `count` GPUs."""
    chosen = [g.strip() for g in os.environ.get("SHOPTUNE_GPUS", "").split(",") if g.strip()]
    if not chosen:
        return None
    if len(chosen) < count:
        raise UserError(f"SHOPTUNE_GPUS={os.environ['SHOPTUNE_GPUS']}: the stage needs {count} GPUs")
    return chosen[:count]


def image_of(stage: str) -> str:
    if stage not in IMAGES:
        raise UserError(f"unknown stage '{stage}' (stages: {', '.join(IMAGES)})")
    return IMAGES[stage]


def accelerator(gpus: bool) -> str:
    """Which lock an environment installs: lock-cuda.txt or lock-cpu.txt."""
    return "cuda" if gpus else "cpu"


def stage_command(stage: str, args: list[str], python: str, profile=None) -> list[str]:
    """`python -m stages.<stage> ARGS`; finetune with finetune.num_processes > 1 under `accelerate
    launch` (shoptune/training_launch.py)."""
    if stage == "finetune" and profile is not None:
        return training_launch.command(python, args, profile.finetune)
    return [python, "-m", f"stages.{stage}", *args]


def build(runner: str, image: str, kind: str = "cpu") -> str:
    """Build (or find up to date) what `runner` needs for `image`: a venv's python or an image tag."""
    if runner == "local":
        return str(local_python(image, kind))
    if runner == "docker":
        from shoptune import containers

        return containers.ensure_image(containers.client(), image, kind)
    raise UserError(f"unknown runner '{runner}' (local or docker)")


def run(stage: str, args: list[str], runner: str, profile_name: str | None = None, profile=None) -> int:
    """Run `python -m stages.<stage> ARGS` in the stage's environment; its exit status.
    With a profile (a pipeline stage), the container may write only the stage's folders, gets
    the stage's GPUs, and the run leaves its provenance record."""
    image, kind = image_of(stage), accelerator(bool(profile and profile.gpus))
    if runner not in ("local", "docker"):
        raise UserError(f"unknown runner '{runner}' (local or docker)")
    if runner == "docker" and stage == "infer" and profile and profile.infer.distributed_executor_backend == "ray":
        raise UserError(
            "infer.distributed_executor_backend ray: a container cannot join the nodes' Ray cluster; run infer "
            "with the local runner on the Ray head node (RUNNER=local; README, 'Scaling out')"
        )
    if stage == "finetune" and profile is not None:  # how it starts, checked before anything is built
        training_launch.check(profile.finetune, f"params.yaml: profiles.{profile_name}.finetune")
    gpus = gpus_for(stage, profile)
    devices = visible_gpus(gpus) if gpus else None
    built = build(runner, image, kind)  # before anything runs: a failed build changes nothing
    started = now()
    environment = {**STAGE_ENVIRONMENT, **({} if stage in NETWORK_STAGES else OFFLINE_ENVIRONMENT)}
    if runner == "local":
        if devices is not None:
            environment["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        status = run_local(stage, args, Path(built), environment, profile)
    else:
        status = run_docker(
            stage,
            args,
            built,
            environment,
            gpus,
            devices,
            profile_name,
            passed_environment(stage, profile),
            network=calls_api(stage, profile),
            profile_settings=profile,
        )
    if profile_name is not None:
        record = provenance(stage, profile_name, runner, image, kind, built, started, status)
        write_json(stage_dir(profile_name, stage) / "provenance.json", record)
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
        others = [v for v in VENVS.iterdir() if v.is_dir() and v != venv and (v / ".shoptune-lock").is_file()]
        saved = environments.share_identical_files(venv, others)
        stamp.write_text(wanted)
        if saved:
            say(f"{saved / 1e9:.1f} GB of files shared with the other environments (hardlinks)")
        say(f"environment '{name}' ready")
    return python


def run_local(
    stage: str, args: list[str], python: Path, environment: dict[str, str] | None = None, profile_settings=None
) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPOSITORY), **(environment or STAGE_ENVIRONMENT))
    process = subprocess.Popen(stage_command(stage, args, str(python.absolute()), profile_settings), env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        return process.wait()


# ---------------------------------------------------------------- docker runner


def run_docker(
    stage: str,
    args: list[str],
    tag: str,
    environment: dict[str, str] | None = None,
    gpus: int = 0,
    devices: list[str] | None = None,
    profile: str | None = None,
    host_environment: dict[str, str] | None = None,
    network: bool | None = None,
    profile_settings=None,
) -> int:
    from shoptune import containers

    mounts = {cache_dir(tag): CACHE_IN_CONTAINER}
    env = passed_environment(stage) if host_environment is None else dict(host_environment)
    if "HF_HOME" in env:  # the host's Hugging Face cache, where the host has it
        mounts[Path(env["HF_HOME"])] = env["HF_HOME"]
    env.update(
        PYTHONPATH=WORKDIR_IN_CONTAINER,
        HOME=CACHE_IN_CONTAINER,
        XDG_CACHE_HOME=f"{CACHE_IN_CONTAINER}/.cache",
        PYTHONUNBUFFERED="1",
        **(environment or STAGE_ENVIRONMENT),
    )
    if "UNSLOTH_COMPILE_LOCATION" in env:
        env["UNSLOTH_COMPILE_LOCATION"] = f"{CACHE_IN_CONTAINER}/unsloth_compiled_cache"
    return containers.run(
        containers.client(),
        tag,
        stage_command(stage, args, "python", profile_settings),
        labels={
            "shoptune.workspace": str(Path.cwd()),
            "shoptune.stage": stage,
            "shoptune.profile": profile or "",
        },
        environment=env,
        writable=writable_dirs(stage, profile) if profile else [],
        network=(stage in NETWORK_STAGES if network is None else network) or profile is None,
        gpus=gpus,
        devices=devices,
        mounts=mounts,
    )


# Stages that build a base model into models/ (of no profile: the profile named is the one they serve)
MODEL_BUILDERS = {"tiny_model", "smol_model"}


def writable_dirs(stage: str, profile: str) -> list[Path]:
    """What a pipeline stage may write: its own folder and checkpoints (a base model builder: models/),
    and its profile's file in metrics/ or plots/."""
    if stage in MODEL_BUILDERS:
        return [Path("models"), stage_dir(profile, stage)]
    shared = {"finetune": [PLOTS], "evaluate": [METRICS, PLOTS]}.get(stage, [])  # one file per profile in each
    return [stage_dir(profile, stage), checkpoints_dir(profile, stage), *shared]


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
