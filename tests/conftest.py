"""Shared fixtures: the repository, stage environments, and the Docker engine rule
(tests that need the engine fail, not skip, when CI is set)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOST_BIN = Path(sys.executable).parent
# Copies of the repository share the checkout's environments and wheelhouse.
SHARED = {"SHOPTUNE_VENVS": str(ROOT / ".venvs"), "SHOPTUNE_WHEELHOUSE": str(ROOT / ".wheelhouse")}


@pytest.fixture(scope="session")
def stage_python():
    """The interpreter of a stage environment (.venvs/IMAGE), built on first use."""
    from shoptune import runner

    return lambda image: str(runner.local_python(image).absolute())


@pytest.fixture(scope="session")
def images(docker_client):
    """Every stage image (cpu), built once for the whole test run: {image: tag}."""
    from shoptune import containers, environments

    if not docker_client.images.list(name=containers.base_image()):
        subprocess.run(["sh", str(ROOT / "docker" / "base" / "build.sh")], check=True)
    return {image: containers.ensure_image(docker_client, image) for image in environments.images()}


@pytest.fixture(scope="session")
def docker_client():
    try:
        import docker

        client = docker.from_env()
        client.ping()
    except Exception as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and the Docker engine is unreachable: {err}")
        pytest.skip(f"no Docker engine: {err}")
    return client


def shoptune(*args: str, cwd: Path = ROOT, env: dict | None = None, check: bool = True):
    """Run the shoptune command as a user would; returns the CompletedProcess."""
    result = subprocess.run(
        [str(HOST_BIN / "shoptune"), *args],
        cwd=cwd,
        env={**os.environ, **SHARED, **(env or {})},
        capture_output=True,
        text=True,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"shoptune {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def copy_repository(dest: Path) -> Path:
    """A clean copy of the tracked files (and the working tree's changes to them), with the
    checkout's host environment as its .venv (dvc.yaml runs .venv/bin/shoptune)."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)  # mtimes kept: make finds the shared .venv up to date
    (dest / ".venv").symlink_to(ROOT / ".venv")
    return dest


GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}


def git_repository(folder: Path) -> Path:
    """Make a copy a git repository with everything committed (DVC needs one)."""
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        subprocess.run(["git", *command], cwd=folder, env={**os.environ, **GIT_IDENTITY}, check=True)
    return folder


@pytest.fixture(scope="session")
def real_llm(stage_python, tmp_path_factory):
    """A real OpenAI-compatible server for the whole test session: vLLM (the infer environment)
    serving SmolLM2-135M-Instruct (tests/real_llm.py; the model is converted once per machine).
    Use server.base_url ("http://127.0.0.1:PORT/v1"), server.model (the served name),
    server.api_key (required by the server), server.completions() (chat completions served so far)."""
    from tests.real_llm import serve_smollm2

    try:
        with serve_smollm2(stage_python("infer"), stage_python("train"), tmp_path_factory.mktemp("real-llm")) as server:
            yield server
    except RuntimeError as err:
        pytest.fail(str(err), pytrace=False)
