"""Several endpoints serving one model (a vLLM server per GPU node, Azure deployments in several
regions): each with its own limits, the attempts spread by free capacity, and the ones that are down
left alone for a while.

Each endpoint has the run's Limits to itself: its adaptive window (attempts in flight, halved on 429s),
its requests and tokens per minute (a deployment's quota is its own). An attempt goes to the endpoint
with the most room in its window (ties: the one used least so far), among those whose rate buckets
allow it now; a retry goes elsewhere when another endpoint has room (failover).

Down (with more than one endpoint; alone, an endpoint's failures are only retried): DOWN_AFTER
failures in a row that say nothing came back from the endpoint (connection errors, timeouts, 5xx) mark
it down for COOL_OFF[0] seconds, doubling while it stays down (at most COOL_OFF[1]); any other answer
marks it up. A stop answer (401, 403, 404: key, permission, model or
deployment) puts it out of the run; the run stops only when every endpoint is out.
"""

from __future__ import annotations

import collections
import dataclasses
import math

from shoptune.llm_rate_limits import AdaptiveWindow, Limits, TokenBucket

DOWN_AFTER = 3
COOL_OFF = (2.0, 60.0)
UNREACHABLE = ("connection", "timeout")  # verdict kinds with no answer from the endpoint (and http_5xx)


@dataclasses.dataclass
class EndpointStats:
    """What one endpoint did in a run (no part of any hashed output: counts depend on timing)."""

    attempts: int = 0
    succeeded: int = 0
    failures: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # kind -> attempts
    seconds: float = 0.0  # summed over the attempts it answered (status 200 or an error status)
    answered: int = 0
    marked_down: int = 0
    out: str | None = None  # why it left the run (a stop answer)

    def as_dict(self) -> dict:
        return {
            "attempts": self.attempts,
            "succeeded": self.succeeded,
            "failures": dict(self.failures.most_common()),
            "mean_latency_s": round(self.seconds / self.answered, 3) if self.answered else None,
            "marked_down": self.marked_down,
            "out": self.out,
        }


class Endpoint:
    """One API endpoint in a run: its client, the model name it serves the requests under, its
    window, rate buckets and health."""

    def __init__(self, name: str, api, model: str | None, limits: Limits, now: float, alone: bool = False):
        self.name, self.api, self.model = name, api, model
        self.alone = alone  # the only endpoint: never marked down
        self.window = AdaptiveWindow(limits.concurrency, limits.adaptive)
        self.request_bucket = TokenBucket(limits.requests_per_minute, now) if limits.requests_per_minute else None
        self.token_bucket = TokenBucket(limits.tokens_per_minute, now) if limits.tokens_per_minute else None
        self.in_flight = 0
        self.failing = 0  # unreachable answers in a row
        self.down_until = 0.0
        self.cool_off = COOL_OFF[0]
        self.stats = EndpointStats()

    @property
    def out(self) -> bool:
        return self.stats.out is not None

    def room(self, now: float) -> int:
        """Attempts it may take now: 0 when out, down, paused after a 429 with Retry-After, or full."""
        if self.out or now < self.down_until or now < self.window.paused_until:
            return 0
        return max(0, self.window.limit - self.in_flight)

    def wait(self, now: float) -> float:
        """Seconds until it may take an attempt, as far as time decides (inf: out, or a finish frees it)."""
        if self.out:
            return math.inf
        if self.in_flight >= self.window.limit and now >= max(self.down_until, self.window.paused_until):
            return math.inf
        rates = max(
            self.request_bucket.delay(now) if self.request_bucket else 0.0,
            self.token_bucket.delay(now) if self.token_bucket else 0.0,
        )
        return max(self.down_until - now, self.window.paused_until - now, rates, 0.0)

    def take(self, tokens: float, now: float) -> None:
        if self.request_bucket:
            self.request_bucket.take(1, now)
        if self.token_bucket:
            self.token_bucket.take(tokens, now)
        self.in_flight += 1
        self.stats.attempts += 1

    def settle(self, kind: str, retry_after: float | None, started: float, now: float) -> None:
        """An attempt it took ended with a verdict of `kind`."""
        self.in_flight -= 1
        unreachable = kind in UNREACHABLE or (kind.startswith("http_5"))
        if kind not in UNREACHABLE:
            self.window.answered(started, kind == "http_429", retry_after, now)
            self.stats.answered += 1
            self.stats.seconds += now - started
        if kind == "success":
            self.stats.succeeded += 1
        else:
            self.stats.failures[kind] += 1
        if not unreachable:
            self.failing, self.cool_off = 0, COOL_OFF[0]
            return
        self.failing += 1
        if self.failing >= DOWN_AFTER and now >= self.down_until and not self.alone:
            self.down_until = now + self.cool_off
            self.cool_off = min(COOL_OFF[1], 2 * self.cool_off)
            self.stats.marked_down += 1


def choose(endpoints: list[Endpoint], now: float, avoid: Endpoint | None = None) -> tuple[Endpoint | None, float]:
    """The endpoint for the next attempt, or how long to wait for one (inf: until an attempt ends).
    `avoid`: the endpoint a retry failed on, taken only when no other has room."""
    ready = [e for e in endpoints if e.room(now) > 0 and e.wait(now) == 0.0]
    if ready:
        others = [e for e in ready if e is not avoid] or ready
        return max(others, key=lambda e: (e.room(now), -e.stats.attempts)), 0.0
    return None, min((e.wait(now) for e in endpoints), default=math.inf)
