"""The synthesize stage's openai backend with the docker runner, started as a user does
(`shoptune --runner docker run synthesize`), against a server on the host (tests/llm_server.py),
killed with -9 mid-run, then run again.

A kill -9 of the host process leaves its container running (nothing is left to remove it); the next
run of the same stage removes that orphan before it starts (shoptune/containers.py), then sends only
the requests with no final outcome in the journal: nothing that had finished is paid twice, every
request (so every product) ends in generations.jsonl, and no container of the workspace, nor the key
in its environment, is left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time

import pytest
import yaml

from shoptune.artifacts import read_jsonl
from tests.conftest import HOST_BIN, SHARED, copy_repository
from tests.llm_server import LLMServer

pytestmark = pytest.mark.docker
KEY_VARIABLE, KEY = "SHOP_DOCKER_KEY", "sk-test-docker-synthesize-4567"
JOURNAL = "runs/demo/.checkpoints/synthesize/journal.jsonl"
OUT = "runs/demo/synthesize"
HUNG = 60.0  # seconds: the latency that holds the orphan's requests until it is removed


class HostLLMServer(LLMServer):
    """The test server on every interface: a container reaches it as host.docker.internal."""

    async def listen(self) -> None:
        self._server = await asyncio.start_server(self._serve_connection, "0.0.0.0", self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url_from_containers(self) -> str:
        return f"http://host.docker.internal:{self.port}/v1"


@pytest.fixture
def server():
    with HostLLMServer(latency=0.1) as running:
        yield running


@pytest.fixture
def project(tmp_path, server, docker_client):
    """A copy of the repository whose demo profile synthesizes with the openai backend, from the server
    (after a failed test, its containers are removed)."""
    folder = copy_repository(tmp_path / "project").resolve()
    data = yaml.safe_load((folder / "params.yaml").read_text())
    data["profiles"]["demo"]["synthesize"].update(
        backend="openai",
        model="m",
        base_url=server.url_from_containers,
        api_key_env=KEY_VARIABLE,
        concurrency=2,
        max_retries=2,
        timeout=HUNG * 2,  # a request held by the server is never given up by the orphan
    )
    (folder / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    yield folder
    for container in containers_of(docker_client, folder):
        container.remove(force=True)


@pytest.fixture
def start():
    """start(folder, name): `shoptune --runner docker run synthesize --profile demo` in folder, as a
    user runs it, stderr to ../<name>.err (after a failed test, the runs still going are killed)."""
    started = []

    def run(folder, name: str) -> subprocess.Popen:
        with open(folder.parent / f"{name}.err", "w") as err:  # a file: a full pipe would stall the runner
            started.append(
                subprocess.Popen(
                    [str(HOST_BIN / "shoptune"), "--runner", "docker", "run", "synthesize", "--profile", "demo"],
                    cwd=folder,
                    env={**os.environ, **SHARED, KEY_VARIABLE: KEY},
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
            )
        return started[-1]

    yield run
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def succeeded(folder) -> set[str]:
    """The prompts whose request has succeeded, by the journal's complete lines."""
    path = folder / JOURNAL
    lines = path.read_bytes().splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines if line.endswith(b"}")]
    return {r["text"].removeprefix("reply to: ") for r in records if r["status"] == "success"}


def containers_of(docker_client, folder) -> list:
    return docker_client.containers.list(all=True, filters={"label": f"shoptune.workspace={folder}"})


def test_killed_mid_run_in_docker_a_rerun_removes_the_orphan_and_sends_only_unfinished_requests(
    images, docker_client, project, server, start
):
    folder = project
    first = start(folder, "first")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(succeeded(folder)) < 6 and first.poll() is None:
        time.sleep(0.02)
    server.latency = HUNG  # from now on the orphan's requests hang: it is removed in the middle of them
    first.kill()
    killed_at = time.monotonic()
    assert first.wait(timeout=30) == -9, (folder.parent / "first.err").read_text()[-3000:]
    (orphan,) = containers_of(docker_client, folder)  # left running: no process is left to remove it
    assert orphan.status == "running" and orphan.labels["shoptune.pid"] == str(first.pid)
    time.sleep(0.5)  # the requests the orphan had in flight before it was held finish and are journaled
    finished = succeeded(folder)
    assert len(finished) >= 6 and not (folder / OUT / "generations.jsonl").exists()

    server.latency = 0.005
    rerun_at = time.monotonic()
    rerun = start(folder, "rerun")
    assert rerun.wait(timeout=120) == 0, (folder.parent / "rerun.err").read_text()[-3000:]
    stderr = (folder.parent / "first.err").read_text() + (folder.parent / "rerun.err").read_text()
    assert f"removing container {orphan.short_id} left by an earlier run" in stderr
    assert KEY not in stderr

    every = set(server.prompts())  # one prompt per request of the stage
    assert len(finished) < len(every), "the stage was not killed mid-run"
    after_kill = [r.prompt for r in server.log if r.time >= killed_at]
    assert not set(after_kill) & finished  # nothing that had finished is sent again, by the orphan or the rerun
    resent = [r.prompt for r in server.log if r.time >= rerun_at]
    assert len(resent) == len(set(resent)) and set(resent) == every - finished  # each unfinished one, once
    print(
        f"kill -9 under docker: {len(every)} requests, {len(finished)} finished before the kill, "
        f"{len(after_kill)} sent after it ({len(resent)} by the rerun), none of them finished before"
    )
    generations, failures = read_jsonl(folder / OUT / "generations.jsonl"), read_jsonl(folder / OUT / "failures.jsonl")
    assert failures == [] and sorted(r["reply"] for r in generations) == sorted(f"reply to: {p}" for p in every)

    leftovers = containers_of(docker_client, folder)
    assert not [c.short_id for c in leftovers if any(KEY in v for v in c.attrs["Config"]["Env"] or [])]
    assert leftovers == []  # neither the orphan nor the rerun's container, running or exited
