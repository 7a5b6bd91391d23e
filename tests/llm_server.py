"""A local OpenAI-compatible completions server for the tests and the bench, with faults on demand.

    with LLMServer(latency=0.01) as server:          # asyncio streams in a background thread
        client = openai.AsyncOpenAI(base_url=server.url, api_key="test")
        ...
        server.log                                   # every request received: ServedRequest(prompt, status, fault)

    python -m tests.llm_server --latency 0.2 --fault-rate 429=0.05 --fault-rate 500=0.05
                                                     # the same, as a process (the bench): prints "listening on PORT"

POST /v1/chat/completions (and Azure's /openai/deployments/<name>/chat/completions) answers, after
`latency` seconds, "reply to: <last user message>" with usage counted as one token per four
characters; POST /v1/completions answers "reply to: <prompt>" as a text completion. Faults come
from markers in the prompt or from random draws:

    {fault:KIND}      every attempt of this prompt gets KIND
    {fault:KIND:N}    the first N attempts get KIND, later ones are answered; markers run in order,
                      "{fault:hang:1}{fault:500:1}" is a hang, then a 500, then a reply
    fault_rates       {KIND: probability} for prompts without a marker, drawn from (seed, prompt,
                      attempt): two clients sending the same prompts meet the same faults

KIND: 429 (with Retry-After: `retry_after` seconds, if set), 500 (or any 5xx), 400 (prompt refused), 401 (its
message echoes the API key: the client must scrub it), hang (no answer for `hang_seconds`),
truncated (status 200, half the JSON body, a Content-Length that matches it), cut (status 200, the
connection closed halfway through the body), length (finish_reason "length"), empty (empty
content), refusal (message.refusal), slow=S (S seconds instead of `latency`).
Attempts are counted per prompt text (the last user message).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import re
import sys
import threading
import time

MARKER = re.compile(r"\{fault:([a-z0-9]+(?:=[0-9.]+)?)(?::(\d+))?\}")
KINDS = ("429", "500", "400", "401", "hang", "truncated", "cut", "length", "empty", "refusal", "slow")
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests", 500: "Error"}


@dataclasses.dataclass(frozen=True)
class ServedRequest:
    prompt: str  # the last user message
    status: int | str  # the HTTP status sent, or "hang" / "cut"
    fault: str | None  # the fault injected, None for a plain reply
    time: float  # time.monotonic() when the request arrived


def split_fault(fault: str) -> tuple[str, float | None]:
    kind, _, value = fault.partition("=")
    return kind, float(value) if value else None


class LLMServer:
    def __init__(
        self,
        *,
        latency: float = 0.0,
        fault_rates: dict[str, float] | None = None,
        seed: int = 0,
        retry_after: float | None = None,
        hang_seconds: float = 30.0,
        port: int = 0,
    ):
        for kind in fault_rates or {}:
            if split_fault(kind)[0] not in KINDS and not kind.isdigit():
                raise ValueError(f"unknown fault {kind!r}; choose from {', '.join(KINDS)}")
        self.latency = latency
        self.fault_rates = dict(fault_rates or {})
        self.retry_after = retry_after
        self.hang_seconds = hang_seconds
        self.port = port
        self.log: list[ServedRequest] = []
        self.answered: list[str] = []  # prompts whose complete 200 answer was written
        self.seed = seed
        self._attempts: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()

    # ---------------------------------------------------------------- life cycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> LLMServer:
        """Serve from a background thread with its own event loop."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="llm-server", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.listen(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def listen(self) -> None:
        self._server = await asyncio.start_server(self._serve_connection, "127.0.0.1", self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    # ---------------------------------------------------------------- what the tests read

    def prompts(self, status: int | str | None = None) -> list[str]:
        """The prompts received, in order (only those answered with `status` if given)."""
        return [r.prompt for r in list(self.log) if status is None or r.status == status]

    def clear(self) -> None:
        self.log.clear()

    # ---------------------------------------------------------------- HTTP

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if not await self._answer(method, path, headers, body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()

    def _fault_for(self, prompt: str) -> str | None:
        attempt = self._attempts.get(prompt, 0)
        self._attempts[prompt] = attempt + 1
        markers = MARKER.findall(prompt)
        if markers:
            for kind, count in markers:
                if not count:
                    return kind
                if attempt < int(count):
                    return kind
                attempt -= int(count)
            return None
        draw = random.Random(f"{self.seed}:{prompt}:{attempt}").random()  # the same for any arrival order
        for kind, rate in self.fault_rates.items():
            if draw < rate:
                return kind
            draw -= rate
        return None

    async def _answer(self, method: str, path: str, headers: dict, body: bytes, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection is to be closed."""
        route = path.split("?")[0]
        if method != "POST" or not route.endswith("/completions"):
            await self._send(writer, 404, {"error": {"message": f"no route {method} {path}", "type": "not_found"}})
            return True
        request = json.loads(body)
        text_completion = not route.endswith("/chat/completions")
        users = [m for m in request.get("messages", []) if m.get("role") == "user"]
        prompt = str(request.get("prompt", "")) if text_completion else users[-1]["content"] if users else ""
        fault = self._fault_for(prompt)
        kind, value = split_fault(fault) if fault else (None, None)
        if kind is not None and kind.isdigit():
            status = int(kind)
        else:
            status = kind if kind in ("hang", "cut") else 200
        self.log.append(ServedRequest(prompt, status, fault, time.monotonic()))  # on arrival

        if kind == "429":
            wait = {"retry-after": f"{self.retry_after:g}"} if self.retry_after is not None else {}
            await self._send(writer, 429, error("rate limit reached", "rate_limit_exceeded"), wait)
            return True
        if kind is not None and kind.isdigit():  # 400, 401, 5xx (429 is above)
            token = headers.get("authorization", "").removeprefix("Bearer ") or headers.get("api-key", "")
            message = {
                "400": "prompt is too long\nfor this model",
                "401": f"Incorrect API key provided: {token}",  # echoes the key: the client must scrub it
            }.get(kind, "internal error")
            await self._send(writer, int(kind), error(message, "invalid_request_error"))
            return True
        if kind == "hang":
            await asyncio.sleep(self.hang_seconds)
            return False
        await asyncio.sleep(value if kind == "slow" else self.latency)
        reply = "" if kind == "empty" else f"reply to: {prompt}"
        choice = {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
        if kind == "length":
            choice["finish_reason"] = "length"
        if kind == "refusal":
            choice["message"] = {"role": "assistant", "content": None, "refusal": "I cannot help with that."}
        if text_completion:
            choice = {"index": 0, "text": reply, "finish_reason": choice["finish_reason"], "logprobs": None}
        prompt_chars = (
            len(prompt) if text_completion else sum(len(str(m.get("content", ""))) for m in request["messages"])
        )
        usage = {"prompt_tokens": prompt_chars // 4 + 1, "completion_tokens": len(reply) // 4 + 1}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        completion = {
            "id": "cmpl-test" if text_completion else "chatcmpl-test",
            "object": "text_completion" if text_completion else "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", ""),
            "choices": [choice],
            "usage": usage,
        }
        data = json.dumps(completion).encode()
        if kind == "truncated":
            await self._send_bytes(writer, 200, data[: len(data) // 2])
            return True
        if kind == "cut":
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
            writer.write(head.encode() + data[: len(data) // 2])
            await writer.drain()
            return False
        await self._send_bytes(writer, 200, data)
        self.answered.append(prompt)  # the whole answer written: what a client pays for
        return True

    async def _send(self, writer, status: int, payload: dict, headers: dict | None = None) -> None:
        await self._send_bytes(writer, status, json.dumps(payload).encode(), headers)

    async def _send_bytes(self, writer, status: int, data: bytes, headers: dict | None = None) -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (
            f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n{extra}\r\n"
        )
        writer.write(head.encode() + data)
        await writer.drain()


def error(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def main(argv: list[str] | None = None) -> None:
    """Serve in the foreground until killed (the bench runs the server in its own process)."""
    parser = argparse.ArgumentParser(prog="python -m tests.llm_server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--retry-after", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fault-rate", action="append", default=[], metavar="KIND=P", help="e.g. 429=0.05")
    args = parser.parse_args(argv)
    rates = {}
    for item in args.fault_rate:
        kind, _, rate = item.rpartition("=")
        rates[kind] = float(rate)
    server = LLMServer(latency=args.latency, fault_rates=rates, seed=args.seed, retry_after=args.retry_after)
    server.port = args.port

    async def serve() -> None:
        await server.listen()
        print(f"listening on {server.port}", flush=True)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    sys.exit(0)


if __name__ == "__main__":
    main()
