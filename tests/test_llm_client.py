"""The LLM client against a real local HTTP server (tests/llm_server.py), no mock of the openai library:
every request ends as a success or a failure with its reason, nothing is sent twice, the budget
stops cleanly, and a run killed with SIGKILL resumes sending only what had not finished."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from shoptune import UserError
from shoptune.journal import FAILURE, NOT_SENT, SUCCESS, Journal
from shoptune.llm_client import (
    AdaptiveWindow,
    Budget,
    ClientConfig,
    Limits,
    Request,
    RetryPolicy,
    TokenBucket,
    run_requests,
    run_requests_async,
)
from shoptune.llm_requests import request_key
from shoptune.llm_verdicts import retry_after_seconds
from tests.llm_server import LLMServer

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-0123456789abcdef"
FAST_RETRY = RetryPolicy(attempts=8, backoff=0.01, max_backoff=0.05)


@pytest.fixture
def server():
    with LLMServer(latency=0.005, hang_seconds=5) as running:
        yield running


def requests_for(prompts, max_tokens: int = 16) -> list[Request]:
    return [
        Request("m", [{"role": "user", "content": p}], {"temperature": 0.0, "max_tokens": max_tokens}) for p in prompts
    ]


def run(server, requests, journal, **settings):
    settings.setdefault("limits", Limits(concurrency=8, timeout=0.5))
    settings.setdefault("retry", FAST_RETRY)
    return run_requests(requests, ClientConfig(KEY, server.url), journal, progress=False, **settings)


def completed(server) -> collections.Counter:
    """Prompts the server answered with a complete, non-empty reply, and how often."""
    return collections.Counter(
        r.prompt for r in server.log if r.status == 200 and r.fault not in ("truncated", "empty")
    )


# ------------------------------------------------------------------ keys, buckets, window


def test_request_key_is_a_function_of_the_inputs():
    messages = [{"role": "user", "content": "Quelle couleur ?"}]
    key = request_key("m", messages, {"temperature": 1, "max_tokens": 64})
    assert key == request_key(
        "m", [{"content": "Quelle couleur ?", "role": "user"}], {"max_tokens": 64, "temperature": 1.0}
    )
    assert key == request_key("m", messages, {"temperature": 1, "max_tokens": 64, "seed": None})
    assert key != request_key("m", messages, {"temperature": 0.7, "max_tokens": 64})
    assert key != request_key("m2", messages, {"temperature": 1, "max_tokens": 64})
    assert key != request_key(
        "m", [{"role": "user", "content": "Quelle couleur?"}], {"temperature": 1, "max_tokens": 64}
    )
    assert len(key) == 64 and Request("m", messages, {"max_tokens": 64, "temperature": 1}).key == key
    assert len({Request("m", messages, {"temperature": 1}), Request("m", list(messages), {"temperature": 1.0})}) == 1


def test_token_bucket_allows_its_rate_and_overdraws_once():
    bucket = TokenBucket(per_minute=600, now=0.0)  # 10 a second, holds 10
    for _ in range(10):
        assert bucket.delay(0.0) == 0
        bucket.take(1, 0.0)
    assert bucket.delay(0.0) > 0 and bucket.delay(0.1) == 0  # empty, then a tenth of a second refills one
    bucket.take(25, 0.0)  # a large request overdraws...
    assert bucket.delay(0.0) == pytest.approx(2.5, abs=0.01)  # ...and the next waits for the debt
    bucket.give_back(20)  # usage said it was smaller
    assert bucket.delay(0.0) == pytest.approx(0.5, abs=0.01)


def test_window_halves_on_a_burst_of_429s_and_grows_back():
    window = AdaptiveWindow(ceiling=64, adaptive=True)
    for _ in range(15):
        window.answered(started=1.0, rate_limited=True, retry_after=None, now=1.1)
    assert window.limit == 64  # stray 429s are retried, not a reason to shrink
    window.answered(started=1.0, rate_limited=True, retry_after=2.0, now=1.2)  # a quarter of 64
    assert window.limit == 32 and window.paused_until == pytest.approx(3.2)
    for _ in range(40):  # answers to attempts sent before the change do not count
        window.answered(started=1.15, rate_limited=True, retry_after=None, now=1.3)
    assert window.limit == 32
    for _ in range(32):
        window.answered(started=1.5, rate_limited=False, retry_after=None, now=1.7)
    assert window.limit == 36 and window.smallest == 32  # + 64/16 after an epoch without 429s
    small = AdaptiveWindow(ceiling=4, adaptive=True)
    for _ in range(4):
        small.answered(started=1.0, rate_limited=True, retry_after=None, now=1.1)
    assert small.limit == 4  # fewer than five 429s are never enough
    small.answered(started=1.0, rate_limited=True, retry_after=None, now=1.1)
    assert small.limit == 2  # five among the last 16 answers
    fixed = AdaptiveWindow(ceiling=8, adaptive=False)
    fixed.answered(started=1.0, rate_limited=True, retry_after=5.0, now=1.1)
    fixed.answered(started=1.0, rate_limited=True, retry_after=5.0, now=1.1)
    assert fixed.limit == 8 and fixed.paused_until == 0


def rounds_against_a_rate_limit(window: AdaptiveWindow, allowed: int, rounds: int) -> list[int]:
    """Round after round, `window.limit` attempts go out together and a server that takes `allowed`
    a round answers the rest with 429s; returns the window's limit after each round."""
    limits = []
    for number in range(rounds):
        sent = window.limit
        for i in range(sent):
            window.answered(started=float(number), rate_limited=i >= allowed, retry_after=None, now=number + 0.9)
        limits.append(window.limit)
    return limits


def test_window_backs_off_to_a_real_rate_limit_and_ignores_stray_429s():
    for ceiling, allowed in ((64, 10), (64, 40), (8, 3), (16, 1)):
        limits = rounds_against_a_rate_limit(AdaptiveWindow(ceiling, adaptive=True), allowed, 200)
        settled = limits[50:]
        assert max(settled) <= max(2 * allowed, allowed + 4), (ceiling, allowed, settled)  # backs off, no Retry-After
        assert sum(settled) / len(settled) >= allowed / 2, (ceiling, allowed, settled)  # and uses what is allowed
    for ceiling in (8, 64):  # one answer in 20 is a 429, evenly or in pairs: the window never shrinks
        for pattern in ([True] + [False] * 19, [True, True] + [False] * 38):
            window = AdaptiveWindow(ceiling, adaptive=True)
            for i in range(2000):
                window.answered(started=float(i), rate_limited=pattern[i % len(pattern)], retry_after=None, now=i + 0.5)
            assert window.smallest == ceiling
    rng = random.Random(0)  # 5 % of answers are 429s at random: the window stays near full
    window, limits = AdaptiveWindow(8, adaptive=True), []
    for i in range(3000):
        window.answered(started=float(i), rate_limited=rng.random() < 0.05, retry_after=None, now=i + 0.5)
        limits.append(window.limit)
    assert window.smallest >= 4 and sum(limits) / len(limits) > 7.9


def test_retry_after_forms():
    assert retry_after_seconds({"retry-after": "2"}) == 2
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0  # in the past
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None


# ------------------------------------------------------------------ faults


def test_mixed_faults_every_request_ends_with_an_outcome(server, tmp_path):
    server.fault_rates = {"429": 0.04, "500": 0.04, "truncated": 0.04, "cut": 0.03}  # 15 % of four kinds
    server.retry_after = 0.05
    prompts = [f"product {i}" for i in range(300)]
    prompts += ["refused {fault:400}", "long {fault:length}", "refuse {fault:refusal}", "empty {fault:empty:2}"]
    prompts += ["hung {fault:hang:1}", "always failing {fault:500}"]
    requests = requests_for(prompts)
    result = run(server, requests, tmp_path / "journal.jsonl", limits=Limits(concurrency=16, timeout=2.0))

    outcomes = [result.outcomes[r.key] for r in requests]
    assert result.stopped_by is None and result.not_sent == 0
    assert all(o.status in (SUCCESS, FAILURE) for o in outcomes)
    by_prompt = dict(zip(prompts, outcomes, strict=True))
    for prompt, outcome in by_prompt.items():
        if outcome.status == SUCCESS:
            assert outcome.text == f"reply to: {prompt}"
    assert by_prompt["refused {fault:400}"].reason == "HTTP 400: prompt is too long for this model"  # one line
    assert by_prompt["refused {fault:400}"].permanent and by_prompt["refused {fault:400}"].attempts == 1
    assert by_prompt["long {fault:length}"].finish_reason == "length" and result.finish_reasons["length"] == 1
    assert by_prompt["refuse {fault:refusal}"].failure == "refusal" and by_prompt["refuse {fault:refusal}"].permanent
    assert by_prompt["empty {fault:empty:2}"].status == SUCCESS and by_prompt["empty {fault:empty:2}"].attempts == 3
    assert by_prompt["hung {fault:hang:1}"].status == SUCCESS
    exhausted = by_prompt["always failing {fault:500}"]
    assert (exhausted.status, exhausted.failure, exhausted.attempts, exhausted.permanent) == (
        FAILURE,
        "http_500",
        8,
        False,
    )
    assert result.failed == 3 and result.succeeded == len(prompts) - 3
    assert result.failures == {"http_400": 1, "refusal": 1, "http_500": 1}
    assert {"http_429", "http_500", "invalid_response", "connection", "timeout", "empty_reply"} <= set(result.retried)
    assert result.sent == len(prompts) and result.attempts == len(server.log)
    assert max(completed(server).values()) == 1  # no request answered twice
    lines = (tmp_path / "journal.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(prompts)


def test_retry_exhaustion_is_a_failure_and_is_sent_again_next_run(server, tmp_path):
    requests = requests_for(["fine", "down {fault:503}", "down {fault:500}"])
    result = run(server, requests, tmp_path / "j.jsonl", retry=RetryPolicy(attempts=3, backoff=0.01))
    down = result.outcomes[requests[2].key]
    assert (down.status, down.reason, down.attempts) == (FAILURE, "HTTP 500: internal error", 3)
    assert server.prompts().count("down {fault:500}") == 3
    server.clear()
    again = run(server, requests, tmp_path / "j.jsonl", retry=RetryPolicy(attempts=2, backoff=0.01))
    assert again.reused == 1 and again.sent == 2  # the failures were not final: sent again, "fine" not
    assert again.outcomes[requests[1].key].reason == "HTTP 503: internal error"


def test_a_hung_request_is_cut_at_the_timeout_and_retried(server, tmp_path):
    requests = requests_for(["hung {fault:hang:1}"])
    start = time.monotonic()
    result = run(server, requests, tmp_path / "j.jsonl", limits=Limits(concurrency=2, timeout=0.3))
    elapsed = time.monotonic() - start
    outcome = result.outcomes[requests[0].key]
    assert outcome.status == SUCCESS and outcome.attempts == 2 and result.retried == {"timeout": 1}
    assert 0.3 <= elapsed < 2.0
    assert [r.status for r in server.log] == ["hang", 200]


def test_retry_after_is_honoured(server, tmp_path):
    server.retry_after = 0.4
    requests = requests_for(["busy {fault:429:1}"])
    result = run(server, requests, tmp_path / "j.jsonl", retry=RetryPolicy(backoff=0.01))
    assert result.outcomes[requests[0].key].status == SUCCESS
    first, second = server.log
    assert first.status == 429 and second.status == 200
    assert second.time - first.time >= 0.4


def test_a_burst_of_429s_shrinks_the_window_and_pauses_sending(server, tmp_path):
    server.retry_after = 0.1
    requests = requests_for([f"p{i} {{fault:429:1}}" for i in range(16)])  # every first attempt is refused
    result = run(server, requests, tmp_path / "j.jsonl", limits=Limits(concurrency=16, timeout=0.5))
    assert result.succeeded == 16 and result.smallest_window == 8
    rejected = [r.time for r in server.log if r.status == 429]
    answered = [r.time for r in server.log if r.status == 200]
    assert min(answered) - min(rejected) >= 0.1


def test_text_completions_go_to_their_endpoint_retried_and_journaled_like_chat(server, tmp_path):
    """A Request with `prompt` is a text completion (POST /v1/completions): its faults are retried as
    a chat completion's; an empty answer is retried unless the request takes it as an answer."""
    sampling = {"temperature": 0.0, "max_tokens": 4}
    requests = [
        Request("m", [], sampling, prompt="plain"),
        Request("m", [], sampling, prompt="flaky {fault:500:2}"),
        Request("m", [], sampling, prompt="nothing {fault:empty}", empty_is_answer=True),
        Request("m", [], sampling, prompt="empty twice {fault:empty:2}"),
        Request("m", [{"role": "user", "content": "plain"}], sampling),  # the chat twin: another request
    ]
    assert len({r.key for r in requests}) == len(requests)
    assert requests[0].key != request_key("m", [], sampling) and requests[-1].key == request_key(
        "m", requests[-1].messages, sampling
    )
    result = run(server, requests, tmp_path / "j.jsonl")
    texts = [result.outcomes[r.key].text for r in requests]
    assert texts == [
        "reply to: plain",
        "reply to: flaky {fault:500:2}",
        "",
        "reply to: empty twice {fault:empty:2}",
        "reply to: plain",
    ]
    assert all(result.outcomes[r.key].status == SUCCESS for r in requests)
    attempts = collections.Counter(r.prompt for r in server.log)
    assert attempts["flaky {fault:500:2}"] == 3 and attempts["nothing {fault:empty}"] == 1
    assert attempts["empty twice {fault:empty:2}"] == 3
    before = len(server.log)
    assert run(server, requests, tmp_path / "j.jsonl").reused == len(requests) and len(server.log) == before


def test_refusals_by_status_are_permanent_and_not_sent_again(server, tmp_path):
    requests = requests_for(["bad {fault:400}", "ok"])
    first = run(server, requests, tmp_path / "j.jsonl")
    assert first.outcomes[requests[0].key].permanent
    server.clear()
    second = run(server, requests, tmp_path / "j.jsonl")
    assert second.sent == 0 and server.log == [] and second.outcomes == first.outcomes


def test_a_bad_key_stops_the_run_and_never_reaches_a_reason_or_the_journal(server, tmp_path):
    requests = requests_for([f"p{i} {{fault:401}}" for i in range(50)])
    result = run(server, requests, tmp_path / "j.jsonl", limits=Limits(concurrency=4, timeout=0.5))
    assert result.stopped_by == "HTTP 401: Incorrect API key provided: ***"
    assert result.sent <= 4 and result.not_sent == 50 - result.sent
    failed = [o for o in result.outcomes.values() if o.status == FAILURE]
    assert failed and all(not o.permanent for o in failed)  # fix the key and run again: they are sent
    assert KEY not in (tmp_path / "j.jsonl").read_text() and KEY not in result.summary()
    assert KEY not in repr(ClientConfig(KEY, server.url))


def test_when_every_request_is_refused_the_run_stops_early(server, tmp_path):
    requests = requests_for([f"p{i} {{fault:400}}" for i in range(40)])
    result = run(server, requests, tmp_path / "j.jsonl", limits=Limits(concurrency=2, timeout=0.5))
    assert result.stopped_by == "the first 10 requests failed (last: HTTP 400: prompt is too long for this model)"
    assert 10 <= result.sent <= 12 and result.failures == {"http_400": result.sent}
    assert len(server.log) == result.sent


# ------------------------------------------------------------------ never paying twice


def test_a_rerun_with_the_same_journal_sends_nothing(server, tmp_path):
    requests = requests_for([f"product {i}" for i in range(40)] + ["product 3"])  # a duplicate is sent once
    first = run(server, requests, tmp_path / "j.jsonl")
    assert first.sent == 40 and len(server.log) == 40
    server.clear()
    second = run(server, requests, tmp_path / "j.jsonl")
    assert server.log == [] and second.sent == 0 and second.reused == 40
    assert second.outcomes == first.outcomes


RUN_IN_CHILD = """
import sys
from shoptune.llm_client import ClientConfig, Limits, Request, RetryPolicy, run_requests
url, journal, n, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sampling = {"temperature": 0.0, "max_tokens": 16}  # as requests_for
requests = [Request("m", [{"role": "user", "content": f"product {i}"}], sampling) for i in range(n)]
limits = Limits(concurrency=concurrency, timeout=5)
run_requests(requests, ClientConfig("sk-child", url), journal, limits=limits, progress=False)
"""


def interrupted_child(server, journal: Path, n: int, concurrency: int, lines: int, sig: int) -> int:
    """Run RUN_IN_CHILD, send it `sig` once the journal has `lines` lines; its exit status."""
    child = subprocess.Popen(
        [sys.executable, "-c", RUN_IN_CHILD, server.url, str(journal), str(n), str(concurrency)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not journal.exists() or journal.read_bytes().count(b"\n") < lines):
        time.sleep(0.01)
    child.send_signal(sig)
    status = child.wait(timeout=30)
    time.sleep(0.2)  # requests the child wrote before it ended may still be read by the server
    return status


def test_killed_mid_run_a_rerun_sends_only_unfinished_requests(server, tmp_path):
    server.latency = 0.02
    journal = tmp_path / "j.jsonl"
    n = 200
    assert interrupted_child(server, journal, n, 4, lines=40, sig=signal.SIGKILL) == -signal.SIGKILL
    lines = journal.read_bytes().splitlines()
    assert 40 <= len(lines) < n, "the child was not killed mid-run"
    finished = {json.loads(line)["key"] for line in lines}
    with journal.open("ab") as torn:  # and a write cut short by the crash
        torn.write(b'{"key": "' + next(iter(finished)).encode() + b'", "status": "succ')

    requests = requests_for([f"product {i}" for i in range(n)])
    first_run = list(server.log)
    server.clear()
    result = run(server, requests, journal)
    prompt_of = {r.key: r.messages[0]["content"] for r in requests}
    resent = set(server.prompts())
    assert not resent & {prompt_of[key] for key in finished}  # nothing that had finished is sent again
    assert result.reused == len(finished) and result.sent == n - len(finished) == len(server.log)
    assert all(result.outcomes[r.key].status == SUCCESS for r in requests)
    assert len(first_run) >= len(finished)
    with Journal(journal) as reread:  # the torn tail was cut before the rerun appended
        assert reread.repaired_bytes == 0 and len(reread) == n


def test_cancelling_journals_what_finished_and_what_was_in_flight(server, tmp_path):
    server.latency = 0.05
    requests = requests_for([f"product {i}" for i in range(200)])
    journal = tmp_path / "j.jsonl"

    async def cancel_midway():
        client = openai.AsyncOpenAI(base_url=server.url, api_key=KEY)
        task = asyncio.create_task(run_requests_async(requests, client, journal, limits=Limits(concurrency=8)))
        while not journal.exists() or journal.read_bytes().count(b"\n") < 30:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await client.close()

    asyncio.run(cancel_midway())
    with Journal(journal) as reread:
        journaled = {r.messages[0]["content"] for r in requests if r.key in reread}
    assert 30 <= len(journaled) < 200
    assert journaled == set(completed(server))  # every answer received was journaled, in flight included


def test_ctrl_c_journals_what_finished_and_what_was_in_flight(server, tmp_path):
    server.latency = 0.05
    journal = tmp_path / "j.jsonl"
    status = interrupted_child(server, journal, 200, 8, lines=30, sig=signal.SIGINT)
    assert status in (-signal.SIGINT, 130)  # KeyboardInterrupt, after the drain
    with Journal(journal) as reread:
        journaled = {
            r.messages[0]["content"] for r in requests_for([f"product {i}" for i in range(200)]) if r.key in reread
        }
    assert 30 <= len(journaled) < 200
    assert journaled == set(completed(server))


# ------------------------------------------------------------------ budget


def test_max_requests_stops_cleanly_and_the_rest_follow(server, tmp_path):
    requests = requests_for([f"product {i}" for i in range(30)])
    result = run(server, requests, tmp_path / "j.jsonl", budget=Budget(max_requests=10))
    assert (result.sent, result.succeeded, result.not_sent, result.stopped_by) == (10, 10, 20, "max_requests")
    assert sum(o.status == NOT_SENT for o in result.outcomes.values()) == 20
    server.clear()
    rest = run(server, requests, tmp_path / "j.jsonl")
    assert rest.sent == 20 and rest.stopped_by is None and len(server.log) == 20


def test_cost_comes_from_usage_and_max_cost_is_never_passed(server, tmp_path):
    prices = {"m": (2.0, 8.0)}
    requests = requests_for([f"product number {i}" for i in range(50)], max_tokens=100)
    unlimited = run(server, requests[:5], tmp_path / "a.jsonl", budget=Budget(prices=prices))
    expected = sum(
        (o.usage["prompt_tokens"] * 2.0 + o.usage["completion_tokens"] * 8.0) / 1e6 for o in unlimited.outcomes.values()
    )
    assert unlimited.cost == pytest.approx(expected) and unlimited.cost > 0
    assert unlimited.prompt_tokens == sum(o.usage["prompt_tokens"] for o in unlimited.outcomes.values())

    # a request's worst case: ~10 prompt + 100 output tokens, $0.00082; its real cost ~$0.00007
    budget = Budget(max_cost=0.003, prices=prices)
    result = run(server, requests, tmp_path / "b.jsonl", budget=budget, limits=Limits(concurrency=4, timeout=0.5))
    assert result.stopped_by == "max_cost" and 10 < result.sent < 50
    assert 0.003 - 2 * 0.00082 < result.cost <= 0.003 and result.not_sent == 50 - result.sent
    assert all(o.status == SUCCESS for o in result.outcomes.values() if o.status != NOT_SENT)
    with pytest.raises(UserError, match="max_cost needs a price for every model; none for m"):
        run(server, requests, tmp_path / "c.jsonl", budget=Budget(max_cost=1.0))


# ------------------------------------------------------------------ rates, clients, progress


def test_requests_per_minute_is_kept(server, tmp_path):
    requests = requests_for([f"product {i}" for i in range(30)])
    start = time.monotonic()
    run(server, requests, tmp_path / "j.jsonl", limits=Limits(concurrency=30, requests_per_minute=1200, timeout=1))
    assert time.monotonic() - start >= 0.45  # 20 a second, 20 at once: the last 10 wait 0.05 s each
    times = sorted(r.time for r in server.log)
    # as the server saw them too: beyond the first second's burst (20 and the overdraw of the bucket,
    # which the server may see bunched as its connections open), one every 0.05 s
    assert times[-1] - times[-6] >= 0.2


def test_tokens_per_minute_is_kept_with_estimates_corrected_by_usage(server, tmp_path):
    # 158 tokens estimated (412 bytes / 3 + max_tokens 20), ~205 used: the server echoes the prompt
    requests = requests_for([f"product {i} " + "x" * 400 for i in range(20)], max_tokens=20)
    start = time.monotonic()
    limits = Limits(concurrency=20, tokens_per_minute=120_000, timeout=2)  # 2000 a second, holds 2000
    result = run(server, requests, tmp_path / "j.jsonl", limits=limits)
    elapsed = time.monotonic() - start
    used = result.prompt_tokens + result.completion_tokens
    assert used > 20 * 158 and elapsed >= 0.9 * (used - 2000) / 2000  # paced by the usage, not the estimate


def test_azure_client_and_a_prepared_client(server, tmp_path):
    requests = requests_for(["azure"])
    azure = ClientConfig(KEY, server.url.removesuffix("/v1"), api_version="2024-06-01")
    result = run_requests(requests, azure, tmp_path / "a.jsonl", progress=False)
    assert result.outcomes[requests[0].key].text == "reply to: azure"

    async def prepared():
        client = openai.AsyncOpenAI(base_url=server.url, api_key=KEY, max_retries=5)
        try:
            return await run_requests_async(requests, client, tmp_path / "b.jsonl", retry=RetryPolicy(attempts=1))
        finally:
            await client.close()

    server.clear()
    requests = requests_for(["flaky {fault:500:1}"])
    result = asyncio.run(prepared())
    assert result.outcomes[requests[0].key].failure == "http_500"  # the client's own 5 retries were turned off
    assert len(server.log) == 1


def test_one_progress_line_and_no_log_line_per_request(server, tmp_path, caplog, capsys):
    requests = requests_for([f"product {i}" for i in range(60)])
    with caplog.at_level(logging.DEBUG, logger="llm_client"), caplog.at_level(logging.INFO):
        run_requests(requests, ClientConfig(KEY, server.url), tmp_path / "j.jsonl", progress=True)
    assert len(caplog.records) < 5
    assert "60/60" in capsys.readouterr().err


def test_settings_are_checked_in_one_line(server, tmp_path):
    with pytest.raises(UserError, match="concurrency must be at least 1, not 0"):
        run(server, requests_for(["x"]), tmp_path / "j.jsonl", limits=Limits(concurrency=0))
    with pytest.raises(UserError, match="streaming is not supported"):
        run(server, [Request("m", [{"role": "user", "content": "x"}], {"stream": True})], tmp_path / "j.jsonl")
    assert server.log == []
