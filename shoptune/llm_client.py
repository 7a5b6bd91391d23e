"""Sending many completion requests to an OpenAI-compatible API without losing or paying twice.

    requests = [Request(model, messages, {"temperature": 0.7, "max_tokens": 512}) for ...]
    result = run_requests(requests, ClientConfig(api_key, base_url), journal_path,
                          limits=Limits(concurrency=32, requests_per_minute=500),
                          budget=Budget(max_cost=20, prices={model: (0.15, 0.60)}))
    result.outcomes[request.key]   # Outcome: success (text, finish_reason, usage), failure (reason), not_sent

Every request ends as an Outcome; only wrong settings (UserError, before anything is sent) and bugs
raise. Attempts go out over one AsyncOpenAI (or AsyncAzureOpenAI) client per endpoint (one, or several
serving the same model: shoptune.llm_endpoints chooses the one with the most room, fails over from one
that is down, and the window and the rate buckets below are each endpoint's own) with its own retries
off, when all of these allow it (Run.next_attempt): a dispatcher loop starts them, and a task whose
attempt ended starts the next one itself when it may go at once (no round through the dispatcher):
  * the window: attempts in flight < the adaptive limit (at most `Limits.concurrency`,
    shoptune.llm_rate_limits.AdaptiveWindow): when a quarter of the last max(limit, 16) answers, and
    at least 5, are 429s the limit halves and, if the 429 carries Retry-After, all sending pauses that
    long; answers to attempts started before that do not count; each `limit` answers without a
    halving add 1/16 of the ceiling (at least 1: half to full in 8 rounds). Stray 429s (an overloaded
    replica, 5 % of answers) are only retried; a rate limit really hit answers most requests with
    429s and halves the window within one round trip.
  * the rate buckets: requests and tokens per minute, token buckets holding one second of either.
    Tokens are estimated before sending (UTF-8 bytes of the messages / 3, plus max_tokens), then
    corrected by the answer's usage.
  * the budget: `max_requests` new requests in this run; `max_cost` dollars: spent so far plus the
    worst case (estimated prompt, max_tokens of output) of every request started and not finished.
    A new request that could pass max_cost waits for those in flight; with none left the run stops.
    Requests already started still finish (their retries included); result.stopped_by says why.
Retries wait 2^(n-1) x `backoff` (capped at `max_backoff`, equal jitter), or the Retry-After asked
for if longer, holding no slot of the window.

Each attempt is judged:
  retried    429, 408, 409, 5xx, timeout (each attempt is cut at `Limits.timeout`), connection errors,
             a body that is not JSON or not a completion, an empty reply (unless Request.empty_is_answer)
  permanent  other 4xx (400, 413, 422: content filter, prompt too long), a refusal (message.refusal),
             finish_reason "content_filter": journaled as final, never sent again. When the first 10
             requests to finish all failed, the settings are wrong (a sampling parameter the model
             refuses): no new request is sent.
  stop       401, 403, 404 (key, permission, model or deployment): every request would fail the same
             way; no new request is sent, and the failures are journaled as not final (with several
             endpoints: that endpoint leaves the run, its request is retried on another)
  success    any other answer with text; finish_reason "length" is a success (counted; the caller decides)
After `RetryPolicy.attempts` attempts a request fails with its last reason, journaled as not final:
the next run sends it again.

Never paying twice: requests with a final outcome in the journal (shoptune.journal) are not sent;
each request is journaled (one write()) the moment it finishes, and the journal is fsync'd every
half second from a worker thread: group commit, one fsync for every line since the last, the event
loop never waiting for the disk. Nothing is reported before its fsync: the progress bar counts the
requests whose line is on disk, and the run returns after a last fsync. Cancellation (Ctrl-C) stops
sending, lets the attempts in flight finish and journals them, then raises; a second Ctrl-C drops
them.

CPU per request: requests go through client.post("/chat/completions") (a text completion's through
"/completions", shoptune.llm_requests): the SDK's own request, errors and ChatCompletion (Completion),
without create()'s parameter transformation (measured: 1.5 -> 1.15 ms of client CPU per request).
Progress: one tqdm line (requests journaled and fsync'd, rate, ETA, in flight/window, retries,
tokens, cost) redrawn twice a second, off when stderr is not a terminal; no line is logged per
request (httpx2's INFO line per request is silenced unless its logger's level was set). The API
key is never logged, journaled or put in a reason: reasons are scrubbed of it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import heapq
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import openai
from openai.types import Completion
from openai.types.chat import ChatCompletion

from shoptune import UserError
from shoptune.journal import FAILURE, NOT_SENT, SUCCESS, Journal, Outcome
from shoptune.llm_budget import Budget
from shoptune.llm_endpoints import Endpoint, EndpointStats, choose
from shoptune.llm_rate_limits import AdaptiveWindow, Limits, TokenBucket  # noqa: F401 (the API of this module)
from shoptune.llm_requests import Request
from shoptune.llm_verdicts import RetryPolicy, Verdict, judge_completion, judge_error

SYNC_INTERVAL = 0.5  # seconds between fsyncs of the journal
ALL_REFUSED = 10  # this many permanent failures and no success yet: the settings are wrong, stop


# ------------------------------------------------------------------ settings and result


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Where to send: an OpenAI-compatible endpoint, or Azure OpenAI when `api_version` is set
    (`base_url` is then the resource endpoint and each request's model the deployment name)."""

    api_key: str = dataclasses.field(repr=False)
    base_url: str | None = None
    api_version: str | None = None
    model: str | None = None  # the name this endpoint serves the requests' model under (an Azure deployment)


@dataclasses.dataclass
class RunResult:
    """Per request key its Outcome (journaled earlier, finished now, or not_sent), and this run's totals."""

    outcomes: dict[str, Outcome]
    sent: int = 0  # requests sent in this run (first attempts)
    attempts: int = 0  # HTTP attempts in this run
    reused: int = 0  # requests answered by the journal, not sent
    not_sent: int = 0  # requests left unsent because the run stopped
    succeeded: int = 0  # requests finished in this run, by status
    failed: int = 0
    failures: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # kind -> requests
    retried: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # kind -> retries
    finish_reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    stopped_by: str | None = None  # "max_cost", "max_requests", "HTTP 401: ...", or None: every request finished
    seconds: float = 0.0
    smallest_window: int = 0  # the adaptive window's lowest limit: below Limits.concurrency after 429s
    endpoints: dict[str, EndpointStats] = dataclasses.field(default_factory=dict)  # base_url -> what it did

    @property
    def retries(self) -> int:
        return self.attempts - self.sent

    def summary(self) -> str:
        parts = [
            f"{self.sent} sent, {self.reused} from the journal, {self.succeeded} succeeded, {self.failed} failed",
            f"{self.retries} retries",
            f"{self.prompt_tokens}+{self.completion_tokens} tokens, ${self.cost:.4f}",
            f"{self.seconds:.1f} s",
        ]
        if self.failures:
            parts.append("failures: " + ", ".join(f"{k} {v}" for k, v in self.failures.most_common()))
        if self.finish_reasons.get("length"):
            parts.append(f"{self.finish_reasons['length']} cut by max_tokens")
        if self.stopped_by:
            parts.append(f"stopped by {self.stopped_by}, {self.not_sent} not sent")
        return "; ".join(parts)


# ------------------------------------------------------------------ the run


class Pending:
    """A request being worked on in this run."""

    __slots__ = (
        "request",
        "attempts",
        "prompt_tokens",
        "completion_tokens",
        "estimate",
        "worst_cost",
        "verdict",
        "endpoint",
    )

    def __init__(self, request: Request, budget: Budget):
        self.request = request
        self.attempts = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        prompt, output = request.estimate()
        self.estimate = prompt + output
        self.worst_cost = budget.cost(request.model, prompt, output)
        self.verdict: Verdict | None = None
        self.endpoint: Endpoint | None = None  # where its last attempt went


class Run:
    """One run of run_requests: the dispatcher, the attempts and the bookkeeping."""

    def __init__(self, requests, journal: Journal, limits: Limits, retry: RetryPolicy, budget: Budget, secrets):
        self.journal, self.limits, self.retry, self.budget = journal, limits, retry, budget
        self.secrets = [secret for secret in secrets if secret]  # scrubbed from every reason
        self.result = RunResult(outcomes={})
        self.fresh: collections.deque[Pending] = collections.deque()
        for request in requests:
            if request.key in self.result.outcomes:  # the same request twice: sent once
                continue
            known = journal.final(request.key)
            if known is not None:
                self.result.outcomes[request.key] = known
                self.result.reused += 1
            else:
                self.result.outcomes[request.key] = Outcome(request.key, NOT_SENT)
                self.fresh.append(Pending(request, budget))
        self.waiting: list[tuple[float, int, Pending]] = []  # retries: (when, sequence, pending)
        self.sequence = 0
        self.in_flight: set[asyncio.Task] = set()
        self.endpoints: list[Endpoint] = []
        self.committed = 0.0  # the worst-case cost of requests started and not finished
        self.open = 0  # requests started and not finished (in flight or waiting for a retry)
        self.halted = False  # cancelled or stopped by an error status: no attempt is started any more
        self.cancelled = False
        self.crash: BaseException | None = None
        self.wake: asyncio.Event | None = None
        self.journaled_before = journal.appended  # lines of earlier runs through this Journal object

    # ---------------------------------------------------------------- dispatcher

    @property
    def capacity(self) -> int:
        return sum(e.window.limit for e in self.endpoints if not e.out)

    async def run(self, apis: list[tuple[str, object, str | None]]) -> RunResult:
        """Send over `apis`: (name, client, model name or None) per endpoint."""
        now = time.monotonic()
        self.endpoints = [
            Endpoint(name, api, model, self.limits, now, alone=len(apis) == 1) for name, api, model in apis
        ]
        self.wake = asyncio.Event()
        start = time.monotonic()
        syncer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="journal-sync")
        keep_synced = asyncio.get_running_loop().create_task(self.keep_synced(syncer))
        try:
            await self.dispatch()
        except asyncio.CancelledError:
            self.halted = self.cancelled = True
            self.result.stopped_by = "cancelled"
            if self.in_flight:  # the attempts in flight are paid for: wait for them and journal them
                await asyncio.wait(self.in_flight)
            raise
        finally:
            self.result.seconds = time.monotonic() - start
            self.result.smallest_window = min(e.window.smallest for e in self.endpoints)
            self.result.endpoints = {e.name: e.stats for e in self.endpoints}
            for task in self.in_flight:
                task.cancel()
            keep_synced.cancel()
            syncer.shutdown(wait=True)  # an fsync under way ends before the journal can be closed
            self.journal.sync()
        self.result.not_sent = sum(1 for o in self.result.outcomes.values() if o.status == NOT_SENT)
        return self.result

    async def dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.crash is not None:
                raise self.crash
            pending, delay = self.next_attempt(time.monotonic())
            if pending is not None:
                task = loop.create_task(self.attempts_from(pending))
                self.in_flight.add(task)
                continue
            if delay == math.inf and not self.in_flight:
                return
            self.wake.clear()
            timer = loop.call_later(delay, self.wake.set) if delay != math.inf else None
            await self.wake.wait()
            if timer is not None:
                timer.cancel()

    def next_attempt(self, now: float) -> tuple[Pending | None, float]:
        """The attempt to start now (its endpoint chosen: pending.endpoint), or how long to wait (inf:
        until an attempt finishes)."""
        if self.halted:
            return None, math.inf
        if self.waiting and self.waiting[0][0] <= now:
            pending, retrying = self.waiting[0][2], True
        elif self.fresh and self.result.stopped_by is None:
            pending, retrying = self.fresh[0], False
            stop = self.budget.stop(self.result.sent, self.result.cost, self.committed, pending.worst_cost)
            if stop == "max_cost" and self.open:  # wait: what is in flight may cost less than feared
                return None, (self.waiting[0][0] - now) if self.waiting else math.inf
            if stop:
                self.result.stopped_by = stop
                return None, 0.0
        else:
            return None, (self.waiting[0][0] - now) if self.waiting else math.inf
        endpoint, delay = choose(self.endpoints, now, avoid=pending.endpoint if retrying else None)
        if endpoint is None:
            if retrying or not self.waiting:
                return None, delay
            return None, min(delay, max(0.0, self.waiting[0][0] - now))
        if retrying:
            heapq.heappop(self.waiting)
        else:
            self.fresh.popleft()
            self.result.sent += 1
            self.open += 1
            self.committed += pending.worst_cost
        endpoint.take(pending.estimate, now)
        pending.endpoint = endpoint
        pending.attempts += 1
        self.result.attempts += 1
        return pending, 0.0

    # ---------------------------------------------------------------- one attempt

    async def attempts_from(self, pending: Pending) -> None:
        """Make `pending`'s attempt, then, as long as one may start at once, the next attempt in the same
        task: a slot freed is filled without a round through the dispatcher (two turns of the event loop
        fewer per attempt). The dispatcher is woken when this task ends, or when the window has room for
        more attempts than are in flight (it grew, or this task found nothing to start)."""
        task = asyncio.current_task()
        try:
            while pending is not None:
                started = time.monotonic()
                verdict = await self.send(pending)
                self.settle(pending, verdict, started)
                self.in_flight.discard(task)  # not in flight while choosing the next attempt: next_attempt counts slots
                pending = None if self.crash is not None else self.next_attempt(time.monotonic())[0]
                if pending is not None:
                    self.in_flight.add(task)
                    if len(self.in_flight) < self.capacity:
                        self.wake.set()
        except BaseException as err:  # a bug: the dispatcher re-raises it
            if self.crash is None and not isinstance(err, asyncio.CancelledError):
                self.crash = err
        finally:
            self.in_flight.discard(task)
            self.wake.set()

    async def keep_synced(self, syncer: concurrent.futures.Executor) -> None:
        """fsync the journal every SYNC_INTERVAL seconds, in a worker thread: the loop never waits for the disk."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SYNC_INTERVAL)
            try:
                await loop.run_in_executor(syncer, self.journal.sync)
            except UserError as err:  # the disk failed: stop like a bug would, in one line
                self.crash = err
                self.wake.set()
                return

    async def send(self, pending: Pending) -> Verdict:
        request, endpoint = pending.request, pending.endpoint
        model = endpoint.model or request.model
        if request.prompt is None:
            body, answer = {"model": model, "messages": list(request.messages)}, ChatCompletion
        else:
            body, answer = {"model": model, "prompt": request.prompt}, Completion
        body.update((k, v) for k, v in request.sampling.items() if v is not None)
        try:
            async with asyncio.timeout(self.limits.timeout):
                # client.post, not chat.completions.create: the same request, response and errors
                # without create()'s parameter transformation (a quarter of the client's CPU per request)
                completion = await endpoint.api.post(request.endpoint, body=body, cast_to=answer)
        except Exception as err:
            verdict = judge_error(err, self.limits.timeout)
            if verdict is None:
                raise
            if endpoint.token_bucket and verdict.kind.startswith("http_"):
                endpoint.token_bucket.give_back(pending.estimate)  # refused: no token was used
            return verdict
        usage = getattr(completion, "usage", None)
        prompt = getattr(usage, "prompt_tokens", None) or 0
        output = getattr(usage, "completion_tokens", None) or 0
        if usage is not None:
            self.count_usage(pending, prompt, output)
        return judge_completion(completion, request.empty_is_answer)

    def count_usage(self, pending: Pending, prompt: int, output: int) -> None:
        pending.prompt_tokens += prompt
        pending.completion_tokens += output
        self.result.prompt_tokens += prompt
        self.result.completion_tokens += output
        self.result.cost += self.budget.cost(pending.request.model, prompt, output)
        if pending.endpoint.token_bucket:  # correct the estimate taken before sending
            pending.endpoint.token_bucket.give_back(pending.estimate - (prompt + output))

    def settle(self, pending: Pending, verdict: Verdict, started: float) -> None:
        now = time.monotonic()
        pending.endpoint.settle(verdict.kind, verdict.retry_after, started, now)
        if verdict.reason:
            for secret in self.secrets:
                verdict.reason = verdict.reason.replace(secret, "***")
        pending.verdict = verdict
        if verdict.action == "stop" and not pending.endpoint.out:
            pending.endpoint.stats.out = verdict.reason  # this endpoint: the key, the deployment, the model
        if verdict.action == "stop" and any(not e.out for e in self.endpoints):
            verdict = dataclasses.replace(verdict, action="retry")  # another endpoint may answer it
            pending.verdict = verdict
        if verdict.action == "stop":
            if self.result.stopped_by is None:
                self.result.stopped_by = verdict.reason
            self.halted = True
            self.finish(pending, permanent=False)
            while self.waiting:  # their next attempt would get the same answer
                self.finish(heapq.heappop(self.waiting)[2], permanent=False)
        elif verdict.action == "retry" and pending.attempts < self.retry.attempts and not self.halted:
            self.result.retried[verdict.kind] += 1
            delay = self.retry.wait(pending.attempts, verdict.retry_after)
            self.sequence += 1
            heapq.heappush(self.waiting, (now + delay, self.sequence, pending))
        elif verdict.action == "retry" and self.cancelled:
            self.open -= 1
            self.committed -= pending.worst_cost  # cancelled before its retry: not finished, not journaled
        else:
            self.finish(pending, permanent=verdict.action == "done")

    def finish(self, pending: Pending, permanent: bool) -> None:
        verdict, request = pending.verdict, pending.request
        usage = None
        if pending.prompt_tokens or pending.completion_tokens:
            usage = {"prompt_tokens": pending.prompt_tokens, "completion_tokens": pending.completion_tokens}
        if verdict.kind == SUCCESS:
            outcome = Outcome(
                request.key, SUCCESS, verdict.text, verdict.finish_reason, usage, attempts=pending.attempts
            )
            self.result.succeeded += 1
            self.result.finish_reasons[verdict.finish_reason] += 1
        else:
            outcome = Outcome(
                request.key,
                FAILURE,
                usage=usage,
                attempts=pending.attempts,
                failure=verdict.kind,
                reason=verdict.reason,
                permanent=permanent,
            )
            self.result.failed += 1
            self.result.failures[verdict.kind] += 1
        self.open -= 1
        self.committed -= pending.worst_cost
        self.journal.append(outcome)
        self.result.outcomes[request.key] = outcome
        if permanent and not self.result.succeeded and self.result.failed == ALL_REFUSED:
            if self.result.stopped_by is None:  # every request is refused: the settings are wrong
                self.result.stopped_by = f"the first {ALL_REFUSED} requests failed (last: {verdict.reason})"

    # ---------------------------------------------------------------- progress

    async def show_progress(self, bar) -> None:
        shown = 0
        while True:
            await asyncio.sleep(0.5)
            done = self.journal.durable - self.journaled_before  # finished, journaled and fsync'd
            r = self.result
            bar.set_postfix_str(
                f"in flight {len(self.in_flight)}/{self.capacity}, retries {r.retries}, failed {r.failed}, "
                f"tokens {r.prompt_tokens + r.completion_tokens}, ${r.cost:.2f}",
                refresh=False,
            )
            bar.update(done - shown)
            shown = done


def make_client(config: ClientConfig, limits: Limits):
    import httpx2

    if config.api_version and not config.base_url:
        raise UserError("Azure OpenAI (api_version set) needs base_url: the resource endpoint")
    pool = httpx2.Limits(max_connections=2 * limits.concurrency + 16, max_keepalive_connections=limits.concurrency + 16)
    http = openai.DefaultAsyncHttpxClient(limits=pool)
    if config.api_version:
        return openai.AsyncAzureOpenAI(
            azure_endpoint=config.base_url,
            api_version=config.api_version,
            api_key=config.api_key,
            max_retries=0,
            timeout=limits.timeout,
            http_client=http,
        )
    return openai.AsyncOpenAI(
        base_url=config.base_url, api_key=config.api_key, max_retries=0, timeout=limits.timeout, http_client=http
    )


def check_settings(requests: Sequence[Request], limits: Limits, retry: RetryPolicy, budget: Budget) -> None:
    if limits.concurrency < 1:
        raise UserError(f"concurrency must be at least 1, not {limits.concurrency}")
    if limits.timeout <= 0:
        raise UserError(f"the request timeout must be positive, not {limits.timeout}")
    if retry.attempts < 1:
        raise UserError(f"attempts must be at least 1, not {retry.attempts}")
    if any("stream" in r.sampling for r in requests):
        raise UserError("streaming is not supported: remove `stream` from the sampling parameters")
    for name in ("requests_per_minute", "tokens_per_minute"):
        value = getattr(limits, name)
        if value is not None and value <= 0:
            raise UserError(f"{name} must be positive, not {value}")
    if budget.max_cost is not None:
        unpriced = sorted({r.model for r in requests} - set(budget.prices))
        if unpriced:
            raise UserError(f"max_cost needs a price for every model; none for {', '.join(unpriced)}")


async def run_requests_async(
    requests: Sequence[Request],
    client: openai.AsyncOpenAI | ClientConfig | Sequence[openai.AsyncOpenAI | ClientConfig],
    journal: str | Path | Journal,
    *,
    limits: Limits | None = None,
    retry: RetryPolicy | None = None,
    budget: Budget | None = None,
    progress: bool | None = None,
    description: str = "requests",
) -> RunResult:
    """Send every request whose key has no final outcome in the journal; see the module docstring.

    `client`: an endpoint, or a list of them (shoptune.llm_endpoints), each a ClientConfig (a client
    is made, used and closed here) or a prepared AsyncOpenAI / AsyncAzureOpenAI (used through a copy
    with its own retries off and `limits.timeout`; not closed). `limits` hold for each endpoint.
    `journal`: a path (opened and closed here) or an open Journal. `progress`: None shows the bar
    only on a terminal."""
    limits, retry, budget = limits or Limits(), retry or RetryPolicy(), budget or Budget()
    check_settings(requests, limits, retry, budget)
    clients = list(client) if isinstance(client, Sequence) else [client]
    if not clients:
        raise UserError("no endpoint to send to")
    if logging.getLogger("httpx2").level == logging.NOTSET:
        logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per request otherwise
    made, apis, secrets = [], [], []
    for each in clients:
        if isinstance(each, ClientConfig):
            api = make_client(each, limits)
            made.append(api)
            secrets.append(each.api_key)
            name, model = each.base_url or "https://api.openai.com/v1", each.model
        else:
            secrets.append(each.api_key if isinstance(getattr(each, "api_key", None), str) else None)
            api = each.with_options(max_retries=0, timeout=limits.timeout)
            name, model = str(each.base_url), None
        if any(name == known for known, _, _ in apis):
            raise UserError(f"the endpoint {name} is named twice")
        apis.append((name, api, model))
    opened = None
    try:
        if not isinstance(journal, Journal):
            journal = opened = Journal(journal, sync_interval=None)  # fsync'd by the run, from a worker thread
        run = Run(requests, journal, limits, retry, budget, secrets)
        from tqdm import tqdm

        disable = None if progress is None else not progress  # None: only on a terminal
        bar = tqdm(total=len(run.fresh), desc=description, unit="req", mininterval=0.5, disable=disable)
        ticker = asyncio.get_running_loop().create_task(run.show_progress(bar)) if not bar.disable else None
        try:
            return await run.run(apis)
        finally:
            if ticker is not None:
                ticker.cancel()
                bar.n = run.result.succeeded + run.result.failed
                bar.refresh()
            bar.close()
    finally:
        for api in made:
            await api.close()
        if opened is not None:
            opened.close()


def run_requests(
    requests: Sequence[Request],
    client: openai.AsyncOpenAI | ClientConfig | Sequence[ClientConfig],
    journal: str | Path | Journal,
    *,
    limits: Limits | None = None,
    retry: RetryPolicy | None = None,
    budget: Budget | None = None,
    progress: bool | None = None,
    description: str = "requests",
) -> RunResult:
    """run_requests_async in a new event loop (the stages' entry point). Pass ClientConfigs here:
    a prepared async client is bound to the event loop it was first used in."""
    return asyncio.run(
        run_requests_async(
            requests,
            client,
            journal,
            limits=limits,
            retry=retry,
            budget=budget,
            progress=progress,
            description=description,
        )
    )
