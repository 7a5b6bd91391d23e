"""Bench of the LLM client (make bench): throughput against a local server with a fixed latency.

    python -m tests.bench_llm [N [REPEATS]]     (N requests per run, 3000 by default; each configuration
                                                 run REPEATS times, 2 by default, interleaved)

The server (tests/llm_server.py, in its own process so that it does not share the client's GIL)
answers every request after 200 ms. Each run sends N distinct requests with one client at one
concurrency, with no fault or with 10 % of attempts answered at once by a 429 (5 %, no Retry-After)
or a 500 (5 %). Clients: ours (run_requests: journal, budget, adaptive window, retries, all at their
defaults) and a minimal baseline (one AsyncOpenAI with the SDK's own 2 retries, a semaphore,
asyncio.gather, no journal). Reported per run, with achieved = successful requests / wall time:

  * achieved/ideal: ideal = concurrency / latency requests a second;
  * achieved/allowed: allowed = what the retries allow, the rate of an overhead-free client with the
    same concurrency and the same retry policy (ours: RetryPolicy(); the baseline: the SDK's 3
    attempts and its waits) on the same faults. The server draws each attempt's fault from (seed,
    prompt, attempt), so the bench knows, per prompt, how many attempts fail before one is answered.
    The model: requests go out in order; a slot is never idle while an attempt may go (a retry whose
    wait is over first, as ours does); a faulted attempt is answered at once and holds its slot for
    no time; a retry waits the policy's backoff with its jitter; an answered attempt holds its slot
    for exactly `latency`. allowed = the requests that succeed within the policy's attempts / the
    time the last one ends, the mean over 20 draws of the jitter (their range is reported too: at
    concurrency 64 the one request that fails 4 times, sent late, decides when the run ends, and its
    jitter alone moves `allowed` by about 10 %). Without faults allowed = N / (ceil(N / concurrency)
    x latency), the ideal but for the last, partial round; with faults it is below the ideal by the
    retries' tail (ours: 3 faults in a row wait 1.75-3.5 s, 4 faults 3.75-7.5 s).
  * the client's CPU per request, failures, the adaptive window's smallest limit, the load average
    when the run started (the runs are noisy on a busy machine), and `aborted`: 1 when the run would
    have stopped with an exception (ours must never; the baseline's gather raises on its first request
    that fails after the SDK's retries).
"""

from __future__ import annotations

import asyncio
import heapq
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shoptune.llm_client import ClientConfig, Limits, Request, RetryPolicy, run_requests  # noqa: E402
from tests.llm_server import LLMServer  # noqa: E402

LATENCY = 0.2
FAULTS = ["429=0.05", "500=0.05"]
SDK_ATTEMPTS = 3  # the baseline: AsyncOpenAI's default max_retries=2


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


# ------------------------------------------------------------------ what the retries allow


def faulted_attempts(prompts: list[str], faults: list[str], most: int) -> list[int]:
    """Per prompt, how many of its attempts (at most `most`) the bench server answers with a fault
    before one is answered: the server's own draw (its default seed, the rates as its CLI parses them)."""
    rates = {kind: float(rate) for kind, _, rate in (f.rpartition("=") for f in faults)}
    server = LLMServer(fault_rates=rates)  # not started: only its draw is used
    counts = []
    for prompt in prompts:
        count = 0
        while count < most and server._fault_for(prompt) is not None:
            count += 1
        counts.append(count)
    return counts


def ours_wait(policy: RetryPolicy):
    def wait(attempts: int, rng: random.Random) -> float:  # RetryPolicy.wait without Retry-After
        cap = min(policy.max_backoff, policy.backoff * 2 ** (attempts - 1))
        return rng.uniform(cap / 2, cap)

    return wait


def sdk_wait(attempts: int, rng: random.Random) -> float:  # openai's _calculate_retry_timeout
    return min(0.5 * 2.0 ** (attempts - 1), 8.0) * (1 - 0.25 * rng.random())


def allowed_run(faulted: list[int], concurrency: int, attempts: int, wait, rng: random.Random) -> tuple[int, float]:
    """(requests that succeed, seconds until the last request ends) for an overhead-free client (see the docstring)."""
    busy: list[float] = []  # end times of the answered attempts in flight
    retries: list[tuple[float, int, int]] = []  # (due, request, attempts made)
    fresh, now, end, succeeded = 0, 0.0, 0.0, 0
    while True:
        while len(busy) < concurrency:
            if retries and retries[0][0] <= now:
                _, index, made = heapq.heappop(retries)
            elif fresh < len(faulted):
                index, made, fresh = fresh, 0, fresh + 1
            else:
                break
            made += 1
            if made > faulted[index]:  # answered
                heapq.heappush(busy, now + LATENCY)
                succeeded += 1
                end = max(end, now + LATENCY)
            elif made < attempts:  # a fault, answered at once: retried after the policy's wait
                heapq.heappush(retries, (now + wait(made, rng), index, made))
            else:  # a fault on the last attempt: the request fails now
                end = max(end, now)
        if busy and len(busy) == concurrency:
            now = heapq.heappop(busy)
        elif busy or retries:
            candidates = ([busy[0]] if busy else []) + ([retries[0][0]] if retries else [])
            now = min(candidates)
            while busy and busy[0] <= now:
                heapq.heappop(busy)
        else:
            return succeeded, end


def allowed_rps(
    faulted: list[int], concurrency: int, attempts: int, wait, draws: int = 20
) -> tuple[float, float, float]:
    """The mean, lowest and highest allowed rate over `draws` draws of the retries' jitter."""
    rng = random.Random(1)
    rates = []
    for _ in range(draws):
        succeeded, seconds = allowed_run(faulted, concurrency, attempts, wait, rng)
        rates.append(succeeded / seconds)
    return sum(rates) / len(rates), min(rates), max(rates)


# ------------------------------------------------------------------ the clients


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


CLIENTS = {
    "ours": (ours, RetryPolicy().attempts, ours_wait(RetryPolicy())),
    "baseline": (baseline, SDK_ATTEMPTS, sdk_wait),
}


def one_run(name: str, faults: list[str], concurrency: int, n: int, allowed: tuple[float, float, float]) -> dict:
    client = CLIENTS[name][0]
    load = os.getloadavg()[0]
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
    achieved = counts["succeeded"] / wall
    allowed, allowed_low, allowed_high = allowed
    return {
        "client": name,
        "concurrency": concurrency,
        "faults": "+".join(faults) or "none",
        "seconds": round(wall, 2),
        "achieved_rps": round(achieved, 1),
        "ideal_rps": ideal,
        "allowed_rps": round(allowed, 1),
        "allowed_rps_over_jitter": [round(allowed_low, 1), round(allowed_high, 1)],
        "achieved_over_ideal": round(achieved / ideal, 3),
        "achieved_over_allowed": round(achieved / allowed, 3),
        "cpu_ms_per_request": round(1000 * cpu / n, 2),
        "load_average": round(load, 2),
        **counts,
    }


def bench_llm_client(n: int = 3000, concurrencies: tuple[int, ...] = (8, 64), repeats: int = 2) -> dict:
    """Our client and the baseline at each concurrency, without and with 10 % faults, `repeats` times
    (interleaved): achieved/ideal and achieved/allowed. Each run has a server of its own and the same
    prompts: both clients meet the same faults."""
    configurations = [(faults, c, name) for faults in ([], FAULTS) for c in concurrencies for name in CLIENTS]
    allowed = {}
    for faults, c, name in configurations:
        _, attempts, wait = CLIENTS[name]
        allowed[name, c, bool(faults)] = allowed_rps(
            faulted_attempts(prompts_for(f"c{c}", n), faults, attempts), c, attempts, wait
        )
    runs = []
    for repeat in range(repeats):
        for faults, c, name in configurations:
            run = one_run(name, faults, c, n, allowed[name, c, bool(faults)])
            runs.append({"repeat": repeat, **run})
            print(line(run), flush=True)
    return {"requests_per_run": n, "latency_s": LATENCY, "runs": runs, "summary": summary(runs)}


def line(run: dict) -> str:
    ideal, allowed, (low, high) = run["ideal_rps"], run["allowed_rps"], run["allowed_rps_over_jitter"]
    return (
        f"{run['client']:8} c={run['concurrency']:<3} faults={run['faults']:17} {run['seconds']:7.2f} s  "
        f"achieved/ideal {run['achieved_over_ideal']:.3f}  achieved/allowed {run['achieved_over_allowed']:.3f} "
        f"(allowed {allowed / ideal:.3f} of ideal, {low / ideal:.3f}-{high / ideal:.3f} by the jitter)  "
        f"cpu {run['cpu_ms_per_request']:.2f} ms/req  "
        f"failed {run['failed']}  aborted {run['aborted']}  smallest window {run.get('smallest_window', '-')}  "
        f"load {run['load_average']:.2f}"
    )


def summary(runs: list[dict]) -> list[dict]:
    """Per configuration: the range (min, max) over the repeats."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["faults"], run["concurrency"], run["client"]), []).append(run)
    rows = []
    for (faults, concurrency, client), group in groups.items():
        row = {"client": client, "concurrency": concurrency, "faults": faults, "runs": len(group)}
        for key in ("achieved_over_ideal", "achieved_over_allowed", "cpu_ms_per_request"):
            row[key] = [min(r[key] for r in group), max(r[key] for r in group)]
        row["allowed_over_ideal"] = round(group[0]["allowed_rps"] / group[0]["ideal_rps"], 3)
        row["allowed_over_ideal_by_jitter"] = [
            round(x / group[0]["ideal_rps"], 3) for x in group[0]["allowed_rps_over_jitter"]
        ]
        row["aborted_runs"] = sum(r["aborted"] for r in group)
        row["failed"] = [r["failed"] for r in group]
        rows.append(row)
    return rows


def main(argv: list[str]) -> None:
    n = int(argv[0]) if argv else 3000
    repeats = int(argv[1]) if len(argv) > 1 else 2
    result = bench_llm_client(n, repeats=repeats)
    print(f"\n{n} requests per run, latency {LATENCY} s; per configuration the range over {repeats} runs:")
    print("client   conc faults            achieved/ideal  achieved/allowed  allowed/ideal (jitter)  aborted runs")
    for row in result["summary"]:
        ideal, allowed = row["achieved_over_ideal"], row["achieved_over_allowed"]
        low, high = row["allowed_over_ideal_by_jitter"]
        print(
            f"{row['client']:8} {row['concurrency']:<4} {row['faults']:17} {ideal[0]:.3f}-{ideal[1]:.3f}     "
            f"{allowed[0]:.3f}-{allowed[1]:.3f}       {row['allowed_over_ideal']:.3f} ({low:.3f}-{high:.3f})   "
            f"{row['aborted_runs']}/{row['runs']}"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
