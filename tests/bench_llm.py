"""Bench of the LLM client (make bench): throughput against a local server with a fixed latency.

    python -m tests.bench_llm [N]          (N requests per run, 3000 by default)

The server (tests/llm_server.py, in its own process so that it does not share the client's GIL)
answers every request after 200 ms. Each run sends N distinct requests with one client at one
concurrency, with no fault or with 10 % of attempts answered at once by a 429 (5 %, no Retry-After)
or a 500 (5 %). Clients: ours (run_requests: journal, budget, adaptive window, retries) and a
minimal baseline (one AsyncOpenAI with the SDK's own 2 retries, a semaphore, asyncio.gather, no
journal). Reported per run: achieved/ideal, ideal = concurrency / latency requests a second and
achieved = successful requests / wall time; the client's CPU per request; failures; and `aborted`:
1 when the run would have stopped with an exception (ours must never; the baseline's gather
raises on its first request that fails after the SDK's retries).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shoptune.llm_client import ClientConfig, Limits, Request, run_requests  # noqa: E402

LATENCY = 0.2
FAULTS = ["429=0.05", "500=0.05"]


def start_server(faults: list[str]) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "tests.llm_server", "--latency", str(LATENCY)]
    for fault in faults:
        command += ["--fault-rate", fault]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ})
    line = server.stdout.readline()
    if not line.startswith("listening on "):
        server.kill()
        raise RuntimeError(f"the bench server did not start: {line!r}")
    return server, f"http://127.0.0.1:{line.split()[-1]}/v1"


def prompts_for(name: str, n: int) -> list[str]:
    return [f"{name} product {i}: write three questions about it" for i in range(n)]


def ours(url: str, prompts: list[str], concurrency: int) -> dict:
    requests = [Request("m", [{"role": "user", "content": p}], {"max_tokens": 64}) for p in prompts]
    with tempfile.TemporaryDirectory(prefix="bench-llm-") as folder:
        result = run_requests(
            requests,
            ClientConfig("bench", url),
            Path(folder) / "journal.jsonl",
            limits=Limits(concurrency=concurrency, timeout=30),
            progress=False,
        )
    counts = {"succeeded": result.succeeded, "failed": result.failed, "retries": result.retries, "aborted": 0}
    return {**counts, "smallest_window": result.smallest_window}


def baseline(url: str, prompts: list[str], concurrency: int) -> dict:
    import openai

    async def run_all():
        client = openai.AsyncOpenAI(base_url=url, api_key="bench", timeout=30)
        gate = asyncio.Semaphore(concurrency)

        async def one(prompt: str) -> str:
            async with gate:
                reply = await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": prompt}], max_tokens=64
                )
                return reply.choices[0].message.content

        try:
            return await asyncio.gather(*(one(p) for p in prompts), return_exceptions=True)
        finally:
            await client.close()

    replies = asyncio.run(run_all())
    failed = sum(isinstance(r, BaseException) for r in replies)
    return {"succeeded": len(replies) - failed, "failed": failed, "retries": None, "aborted": int(failed > 0)}


def bench_llm_client(n: int = 3000, concurrencies: tuple[int, ...] = (8, 64)) -> dict:
    """Our client and the baseline at each concurrency, without and with 10 % faults: achieved/ideal.
    Each run has a server of its own and the same prompts: both clients meet the same faults."""
    runs = []
    for faults in ([], FAULTS):
        for concurrency in concurrencies:
            for name, client in (("ours", ours), ("baseline", baseline)):
                server, url = start_server(faults)
                try:
                    cpu, wall = time.process_time(), time.perf_counter()
                    try:
                        counts = client(url, prompts_for(f"c{concurrency}", n), concurrency)
                    except Exception as err:  # reported, not raised: the bench compares
                        counts = {"succeeded": 0, "failed": n, "retries": None, "aborted": 1, "error": repr(err)}
                    wall = time.perf_counter() - wall
                    cpu = time.process_time() - cpu
                finally:
                    server.kill()
                    server.wait()
                ideal = concurrency / LATENCY
                runs.append(
                    {
                        "client": name,
                        "concurrency": concurrency,
                        "faults": "+".join(faults) or "none",
                        "seconds": round(wall, 2),
                        "achieved_rps": round(counts["succeeded"] / wall, 1),
                        "ideal_rps": ideal,
                        "achieved_over_ideal": round(counts["succeeded"] / wall / ideal, 3),
                        "cpu_ms_per_request": round(1000 * cpu / n, 2),
                        **counts,
                    }
                )
    return {"requests_per_run": n, "latency_s": LATENCY, "runs": runs}


def main(argv: list[str]) -> None:
    n = int(argv[0]) if argv else 3000
    result = bench_llm_client(n)
    for run in result["runs"]:
        print(
            f"{run['client']:8} c={run['concurrency']:<3} faults={run['faults']:18} {run['seconds']:7.2f} s "
            f"achieved/ideal {run['achieved_over_ideal']:.3f}  cpu {run['cpu_ms_per_request']:.2f} ms/req  "
            f"failed {run['failed']}  aborted {run['aborted']}  smallest window {run.get('smallest_window', '-')}",
            flush=True,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
