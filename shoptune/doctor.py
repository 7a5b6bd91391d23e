"""Is this machine ready for a profile? Each check prints ok or FAIL, and with FAIL its fix.

    shoptune [--runner docker] doctor --profile paper [--stage infer ...] [--config PATH]

Checks, where the profile and the stages asked about need them: the Docker engine (docker
runner); the NVIDIA container runtime (docker runner, a profile with GPUs); the GPUs that
nvidia-smi reports (count, compute capability, memory) against the profile's infer and
hardware sections; free disk (the repository and the DVC cache) and available RAM against
what `shoptune plan` says the stages need; the API key of the synthesis backend (set or not:
its value is never printed). Exit status 1 when a check fails.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

from shoptune import UserError, params, plan
from shoptune.inference import serves_awq
from shoptune.profile import Profile
from shoptune.runner import IMAGES, MODEL_BUILDERS, gpus_for

GIB = plan.GIB
# The profile stages, in dvc.yaml's order (not the base model builders, of no profile).
STAGES = tuple(stage for stage in IMAGES if stage not in MODEL_BUILDERS)
NVIDIA_SMI_QUERY = ["nvidia-smi", "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader"]
NVIDIA_TOOLKIT_FIX = (
    "install the NVIDIA Container Toolkit, then `sudo nvidia-ctk runtime configure --runtime=docker "
    "&& sudo systemctl restart docker` (or generate CDI specs: `sudo nvidia-ctk cdi generate`)"
)


@dataclasses.dataclass
class Result:
    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: float
    memory_mib: int

    @property
    def memory_gib(self) -> float:
        return self.memory_mib / 1024


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """GPUs from `nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader`,
    one a line: "Tesla T4, 7.5, 15360 MiB". ValueError naming the line it cannot read."""
    gpus = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.rsplit(",", 2)]
        try:
            name, capability, memory = fields
            value, _, unit = memory.partition(" ")
            if unit not in ("MiB", ""):
                raise ValueError(unit)
            gpus.append(Gpu(name, float(capability), int(value)))
        except ValueError:
            raise ValueError(f"nvidia-smi line {number}: cannot read {line.strip()!r}") from None
    return gpus


def mem_available(meminfo: str) -> int:
    """MemAvailable from /proc/meminfo's text, in bytes."""
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise ValueError("no MemAvailable line")


# ---------------------------------------------------------------- checks


def check_docker() -> tuple[Result, object | None]:
    from shoptune import containers

    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        engine = containers.client()
        version = engine.version().get("Version", "?")
    except UserError as err:
        return (
            Result(
                "Docker engine",
                False,
                f"not reachable at {where}: {err}",
                "start it (`sudo systemctl start docker`), point DOCKER_HOST at its socket, or run "
                "without Docker: --runner local (SHOPTUNE_RUNNER=local, DEMO_RUNNER=local for make demo)",
            ),
            None,
        )
    except Exception as err:  # the engine answered the ping, then failed
        return Result("Docker engine", False, f"{where}: {type(err).__name__}", "check `docker info`"), None
    return Result("Docker engine", True, f"reachable at {where} (server {version})"), engine


def nvidia_runtime(info: dict, which=shutil.which) -> Result:
    """Can Docker give a container GPUs: an `nvidia` runtime, NVIDIA CDI devices, or the toolkit's
    hook (dockerd uses nvidia-container-runtime-hook for --gpus when it finds it)."""
    runtimes = sorted(info.get("Runtimes") or {})
    cdi = [d.get("ID", "") for d in info.get("DiscoveredDevices") or [] if d.get("Source") == "cdi"]
    cdi = [d for d in cdi if d.startswith("nvidia.com/")]
    hook = which("nvidia-container-runtime-hook")
    if "nvidia" in runtimes:
        return Result("NVIDIA container runtime", True, "docker info: runtime nvidia")
    if cdi:
        return Result("NVIDIA container runtime", True, f"docker info: CDI devices {', '.join(cdi[:4])}")
    if hook:
        return Result("NVIDIA container runtime", True, f"{hook} (dockerd's --gpus hook)")
    return Result(
        "NVIDIA container runtime",
        False,
        f"docker info lists no nvidia runtime (runtimes: {', '.join(runtimes) or 'none'}), no NVIDIA CDI "
        "devices, and nvidia-container-runtime-hook is not installed: containers cannot get GPUs",
        NVIDIA_TOOLKIT_FIX,
    )


def query_gpus(run=subprocess.run) -> tuple[list[Gpu] | None, str]:
    """The GPUs nvidia-smi lists (those of $SHOPTUNE_GPUS when set), or None and why not."""
    command = list(NVIDIA_SMI_QUERY)
    if os.environ.get("SHOPTUNE_GPUS"):
        command.append(f"--id={os.environ['SHOPTUNE_GPUS']}")
    try:
        result = run(command, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return None, "nvidia-smi not found (no NVIDIA driver on this host)"
    except subprocess.TimeoutExpired:
        return None, "nvidia-smi did not answer within 60 s"
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        return None, f"nvidia-smi failed: {message[0] if message else f'exit status {result.returncode}'}"
    try:
        return parse_nvidia_smi(result.stdout), ""
    except ValueError as err:
        return None, str(err)


def check_gpus(gpus: list[Gpu] | None, why: str, name: str, profile: Profile, stages: list[str]) -> list[Result]:
    """The GPUs against what the stages need: finetune.num_processes for finetune with hardware.train_gpu_memory_gib,
    infer.tensor_parallel_size for inference with the compute capability its dtype and AWQ need
    and hardware.infer_gpu_memory_gib each."""
    hw, infer = profile.hardware, profile.infer
    wanted = {stage: gpus_for(stage, profile) for stage in stages if gpus_for(stage, profile)}
    if not wanted:
        return []
    summary = ", ".join(f"{stage} {count}" for stage, count in wanted.items())
    if gpus is None:
        return [
            Result(
                "GPUs",
                False,
                f"{why}; the profile's stages want GPUs ({summary})",
                "install the NVIDIA driver (nvidia-smi must work; drivers >= 510 report compute_cap), "
                "or run the GPU stages on a GPU host (dvc push there, dvc pull here)",
            )
        ]
    listed = "; ".join(f"{g.name} ({g.compute_capability:g}, {g.memory_gib:.2f} GiB)" for g in gpus) or "none"
    results = [Result("GPUs", bool(gpus), f"nvidia-smi: {len(gpus)}: {listed}", "" if gpus else "no GPU found")]
    if not gpus:
        return results
    if "finetune" in wanted and hw.train_gpu_memory_gib:
        n = wanted["finetune"]  # finetune.num_processes: one GPU each
        ranked = sorted(gpus, key=lambda g: g.memory_mib, reverse=True)
        weakest = ranked[min(n, len(ranked)) - 1]  # the smallest of the n largest
        ok = len(gpus) >= n and weakest.memory_gib >= hw.train_gpu_memory_gib
        have = (
            f"largest GPU {weakest.memory_gib:.2f} GiB"
            if n == 1
            else f"{len(gpus)} GPU(s) for finetune.num_processes {n}, the smallest of them {weakest.memory_gib:.2f} GiB"
        )
        if len(gpus) < n:
            fix = f"run finetune on a host with {n} GPUs, or set finetune.num_processes: {len(gpus)}"
        else:
            fix = (
                f"set hardware.train_gpu_memory_gib: {weakest.memory_gib:.2f} and run `make plan` to see "
                "whether finetune still fits (lower per_device_train_batch_size or max_seq_length if not)"
            )
        results.append(
            Result(
                "training GPU",
                ok,
                f"{have}; the plan assumes {hw.train_gpu_memory_gib:g} GiB (hardware.train_gpu_memory_gib)",
                "" if ok else fix,
            )
        )
    if "infer" in wanted:
        tp = infer.tensor_parallel_size
        ok = len(gpus) >= tp
        results.append(
            Result(
                "inference GPU count",
                ok,
                f"{len(gpus)} GPU(s) for infer.tensor_parallel_size {tp}",
                "" if ok else f"run infer on a host with {tp} GPUs, or set infer.tensor_parallel_size (and rerun pad)",
            )
        )
        dtype = infer.dtype
        need = plan.BF16_MIN_CC if dtype == "bfloat16" else 0.0
        if serves_awq(name, infer) and infer.backend == "vllm":
            need = max(need, plan.AWQ_MIN_CC)
        if need:
            low = [g for g in gpus if g.compute_capability < need]
            why = "bfloat16" if dtype == "bfloat16" and need == plan.BF16_MIN_CC else "vLLM's AWQ kernels"
            results.append(
                Result(
                    "compute capability",
                    not low,
                    f"{why} need >= {need:g}; "
                    + (f"{low[0].name} has {low[0].compute_capability:g}" if low else "every GPU has it"),
                    ""
                    if not low
                    else "infer.dtype: float16 (T4, V100: no bfloat16)"
                    if dtype == "bfloat16" and low[0].compute_capability >= plan.AWQ_MIN_CC
                    else "use GPUs of compute capability 7.5 or newer (T4, A10, L4, A100 ...)",
                )
            )
        if hw.infer_gpu_memory_gib:
            small = min(gpus, key=lambda g: g.memory_mib)
            ok = small.memory_gib >= hw.infer_gpu_memory_gib
            results.append(
                Result(
                    "inference GPU memory",
                    ok,
                    f"smallest GPU {small.memory_gib:.2f} GiB; the plan assumes {hw.infer_gpu_memory_gib:g} GiB each "
                    "(hardware.infer_gpu_memory_gib)",
                    ""
                    if ok
                    else f"set hardware.infer_gpu_memory_gib: {small.memory_gib:.2f} and run `make plan` to see "
                    "what max_model_len still fits",
                )
            )
    return results


def check_disk(needs: dict, repository: Path, cache: Path, usage=shutil.disk_usage) -> list[Result]:
    """Free space of the repository's filesystem and the DVC cache's (the same one counts both)."""
    places = {"repository": (plan.existing(repository), needs["workspace_bytes"])}
    cache_at = plan.existing(cache)
    if cache_at.stat().st_dev == places["repository"][0].stat().st_dev:
        places["repository"] = (places["repository"][0], needs["workspace_bytes"] + needs["cache_bytes"])
        label = {"repository": "repository and DVC cache"}
    else:
        places["DVC cache"] = (cache_at, needs["cache_bytes"])
        label = {"repository": "repository", "DVC cache": "DVC cache"}
    results = []
    for key, (path, need) in places.items():
        free = usage(path).free
        ok = free >= need
        results.append(
            Result(
                f"disk ({label[key]})",
                ok,
                f"{free / GIB:,.1f} GiB free at {path}; the plan needs {need / GIB:,.1f} GiB",
                ""
                if ok
                else "free space, move the DVC cache (`dvc cache dir PATH`), or link instead of copying: "
                "`dvc config cache.type reflink,hardlink,symlink`",
            )
        )
    return results


def check_ram(need: int, meminfo: Path = Path("/proc/meminfo"), why: str = "") -> Result:
    try:
        available = mem_available(meminfo.read_text())
    except (OSError, ValueError) as err:
        return Result("RAM", False, f"cannot read {meminfo}: {err}", "check on Linux (/proc/meminfo)")
    ok = available >= need
    return Result(
        "RAM",
        ok,
        f"{available / GIB:,.1f} GiB available; the plan needs {need / GIB:,.1f} GiB{why}",
        "" if ok else "close what uses memory, or run the stage on a host with more (`make plan` says what each needs)",
    )


def check_api_key(stage: str, backend: str, name: str, environ=os.environ) -> Result | None:
    """An API backend's key (synthesize's, infer's openai backend): set or not (its value is never shown)."""
    if backend not in ("openai",):
        return None
    section = "synthesize" if stage == "synthesize" else "infer.api"
    ok = bool(environ.get(name, "").strip())
    return Result(
        "API key",
        ok,
        f"{name} is {'set' if ok else 'not set'} ({stage} backend {backend})",
        "" if ok else f"export {name}=... before running {stage} (or name another variable in {section}.api_key_env)",
    )


# ---------------------------------------------------------------- the whole check


def diagnose(
    profile_name: str, runner: str, stages: list[str] | None = None, config: Path | None = None
) -> list[Result]:
    profile = params.load_profile(profile_name)
    stages = list(stages or STAGES)
    results: list[Result] = []
    wants_gpus = any(gpus_for(stage, profile) for stage in stages)
    if runner == "docker":
        result, engine = check_docker()
        results.append(result)
        if wants_gpus and engine is not None:
            results.append(nvidia_runtime(engine.info()))
    if wants_gpus:
        gpus, why = query_gpus()
        results += check_gpus(gpus, why, profile_name, profile, stages)
    sized = [stage for stage in stages if stage in plan.MODEL_STAGES]
    if sized:
        try:
            the_plan = plan.load(profile_name, config)
        except UserError as err:
            results.append(
                Result(
                    "disk and RAM",
                    False,
                    f"cannot size the model: {err}",
                    "download the base model (README, 'The paper profile') or pass --config PATH",
                )
            )
        else:
            needs = the_plan.needs(sized)
            cache, _ = plan.dvc_cache()
            results += check_disk(needs, Path.cwd(), cache)
            largest = max(sized, key=lambda s: the_plan.stages[s].ram_bytes)
            results.append(check_ram(needs["ram_bytes"], why=f" ({largest})"))
    keys = []
    if "synthesize" in stages:
        keys.append(check_api_key("synthesize", profile.synthesize.backend, profile.synthesize.api_key_env))
    if "infer" in stages and profile.infer.api is not None:
        keys.append(check_api_key("infer", profile.infer.backend, profile.infer.api.api_key_env))
    results += [key for key in keys if key]
    return results


def render(profile_name: str, runner: str, stages: list[str], results: list[Result]) -> str:
    scope = "every stage" if list(stages) == list(STAGES) else ", ".join(stages)
    out = [f"shoptune doctor: profile {profile_name}, runner {runner}, {scope}"]
    for r in results:
        out.append(f"{'ok' if r.ok else 'FAIL':5} {r.name}: {r.detail}")
        if not r.ok and r.fix:
            out.append(f"      fix: {r.fix}")
    failed = sum(not r.ok for r in results)
    checks = f"{len(results)} check{'' if len(results) == 1 else 's'}"
    out.append(f"doctor: {failed} of {checks} failed" if failed else f"doctor: {checks}, all ok")
    return "\n".join(out)
