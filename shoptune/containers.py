"""The docker runner: stage images built offline from the wheelhouse, and stages run in
throw-away containers that never outlive their run.

An image is docker/Dockerfile (or docker/<image>/Dockerfile) over a base image, with
exactly the wheels of the image's lock; its tag is a digest of all of that, so an image
is rebuilt when, and only when, its definition changes.

A container runs as the caller's uid:gid with the repository mounted read-only, except the
folders the stage writes; with no network unless the stage needs one; labelled with its
workspace, stage and the process that started it. It is removed whatever happens: a clean
exit, a stage error, Ctrl-C at any moment (signals wait while it is removed), or, after the
host process was killed, by the next run of the same stage before it starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import sys
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from shoptune import UserError, environments
from shoptune.environments import DOCKER_DIR, INSTALL_SCRIPT, say

DEFAULT_BASE_IMAGE = "shoptune/base:bookworm"
WORKDIR = "/workspace"
# Build-stage images of ours, pruned once an image is built (they hold the wheels).
BUILD_STAGE_LABEL = "shoptune.build-stage"


def base_image() -> str:
    return os.environ.get("SHOPTUNE_BASE_IMAGE", DEFAULT_BASE_IMAGE)


def client():
    import docker

    try:
        engine = docker.from_env()
        engine.ping()
    except Exception as err:  # the SDK raises several types for "no engine"
        raise UserError(f"cannot reach the Docker engine ({type(err).__name__}); is dockerd running?") from None
    return engine


def dockerfile(image: str) -> Path:
    own = DOCKER_DIR / image / "Dockerfile"
    return own if own.is_file() else DOCKER_DIR / "Dockerfile"


def image_tag(image: str, accelerator: str, base_id: str = "") -> str:
    """shoptune/<image>[-cuda]:<digest of lock, Dockerfile, install script, base (name and
    id: a rebuilt base rebuilds the images), accelerator>."""
    sha = hashlib.sha256(f"{base_image()}\0{base_id}\0{accelerator}".encode())
    for path in (environments.lock_path(image, accelerator), dockerfile(image), INSTALL_SCRIPT):
        sha.update(b"\0" + path.read_bytes())
    name = f"shoptune/{image}" if accelerator == "cpu" else f"shoptune/{image}-{accelerator}"
    return f"{name}:{sha.hexdigest()[:16]}"


def ensure_image(engine, image: str, accelerator: str = "cpu") -> str:
    """Build docker/<image> for `accelerator` unless an image of the same definition exists; its tag."""
    import docker

    try:
        base_id = engine.images.get(base_image()).id
    except docker.errors.ImageNotFound:
        raise UserError(f"no base image {base_image()} (run `make base-image`, or set SHOPTUNE_BASE_IMAGE)") from None
    tag = image_tag(image, accelerator, base_id)
    with contextlib.suppress(docker.errors.ImageNotFound):
        engine.images.get(tag)
        return tag
    listing, wheels = environments.wheelhouse(image, accelerator)
    say(f"building image {tag} (base {base_image()}, {len(wheels)} wheels, offline) ...")
    with tempfile.TemporaryFile() as context:
        with tarfile.open(fileobj=context, mode="w") as tar:
            tar.add(dockerfile(image), arcname="Dockerfile")
            tar.add(INSTALL_SCRIPT, arcname=INSTALL_SCRIPT.name)
            tar.add(listing, arcname="wheels/install.txt")
            for wheel in wheels:
                tar.add(wheel, arcname=f"wheels/{wheel.relative_to(environments.WHEELHOUSE)}")
        context.seek(0)
        stream = engine.api.build(
            fileobj=context,
            custom_context=True,
            tag=tag,
            buildargs={"BASE_IMAGE": base_image()},
            rm=True,
            forcerm=True,
            decode=True,
        )
        lines = []
        for chunk in stream:
            if "stream" in chunk:
                sys.stderr.write(chunk["stream"])
                lines += chunk["stream"].splitlines()
            if "error" in chunk:
                detail = environments.pip_failure(lines) or chunk["error"].strip()
                raise UserError(f"building image {tag} failed: {detail}")
    engine.images.prune(filters={"dangling": True, "label": BUILD_STAGE_LABEL})
    engine.images.get(tag).tag(tag.split(":")[0], "latest")
    return tag


# ---------------------------------------------------------------- running


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done (then they are delivered)."""
    signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


def remove_orphans(engine, labels: dict[str, str]) -> None:
    """Remove the containers of earlier runs of this stage in this workspace whose host process
    is gone (killed with -9, say); refuse to start beside one whose process still runs."""
    selector = [f"{key}={labels[key]}" for key in ("shoptune.workspace", "shoptune.stage", "shoptune.profile")]
    for container in engine.containers.list(all=True, filters={"label": selector}):
        pid, host = int(container.labels.get("shoptune.pid", "0")), container.labels.get("shoptune.host")
        if host == socket.gethostname() and pid and _alive(pid) and container.status == "running":
            raise UserError(
                f"stage {labels['shoptune.stage']} of profile {labels['shoptune.profile']} is already running here "
                f"(container {container.short_id}, process {pid})"
            )
        say(f"removing container {container.short_id} left by an earlier run (process {pid} is gone)")
        container.remove(force=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def device_requests(gpus: int, devices: list[str] | None) -> list:
    """Docker's request for `gpus` GPUs: the `devices` named (ids or UUIDs), or any that many."""
    import docker

    if not gpus:
        return []
    selection = {"device_ids": list(devices)} if devices else {"count": gpus}
    return [docker.types.DeviceRequest(capabilities=[["gpu"]], **selection)]


def run(
    engine,
    tag: str,
    command: list[str],
    *,
    labels: dict[str, str],
    environment: dict[str, str],
    writable: list[Path],
    network: bool,
    gpus: int = 0,
    devices: list[str] | None = None,
    mounts: dict[Path, str] | None = None,
) -> int:
    """Run `command` in a container of `tag` over the current folder; its exit status.
    `gpus` GPUs (the `devices` named, or any), `mounts` {host folder: path inside} read-write."""
    import docker

    workspace = Path.cwd()
    volumes = {str(workspace): {"bind": WORKDIR, "mode": "ro" if writable else "rw"}}
    for folder in writable:
        folder.mkdir(parents=True, exist_ok=True)  # made here, so it is the caller's
        volumes[str(folder.resolve())] = {"bind": f"{WORKDIR}/{folder}", "mode": "rw"}
    for host, inside in (mounts or {}).items():
        volumes[str(Path(host).resolve())] = {"bind": inside, "mode": "rw"}
    labels = {
        **labels,
        "shoptune.run": uuid.uuid4().hex,
        "shoptune.pid": str(os.getpid()),
        "shoptune.host": socket.gethostname(),
    }
    remove_orphans(engine, labels)
    previous_term = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM: as Ctrl-C
    try:
        container = engine.containers.create(
            tag,
            command,
            user=f"{os.getuid()}:{os.getgid()}",
            working_dir=WORKDIR,
            volumes=volumes,
            environment=environment,
            network_disabled=not network,
            # a server on the host (a local vLLM, say) is http://host.docker.internal:PORT from inside
            extra_hosts={"host.docker.internal": "host-gateway"} if network else None,
            device_requests=device_requests(gpus, devices),
            shm_size="8g" if gpus else None,  # NCCL and vLLM's workers share tensors through /dev/shm
            labels=labels,
        )
        container.start()
        for chunk in container.logs(stream=True, follow=True):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
        return container.wait()["StatusCode"]
    except KeyboardInterrupt:
        say(f"interrupted: stopping the container of {labels['shoptune.stage']} ...")
        return 130
    finally:
        with signals_deferred():
            for leftover in engine.containers.list(
                all=True, filters={"label": f"shoptune.run={labels['shoptune.run']}"}
            ):
                with contextlib.suppress(docker.errors.NotFound):
                    leftover.stop(timeout=10)
                    leftover.remove(force=True)
            signal.signal(signal.SIGTERM, previous_term)
