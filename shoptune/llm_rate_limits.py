"""How fast requests go out: the settings (Limits), the token buckets for requests and tokens per
minute, and the adaptive window that halves the attempts in flight when 429s say a rate limit is hit
(the rules: shoptune.llm_client's docstring)."""

from __future__ import annotations

import collections
import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Limits:
    concurrency: int = 16  # attempts in flight at most (the adaptive window's ceiling)
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    timeout: float = 120.0  # seconds per attempt, the whole attempt (connect, wait, read)
    adaptive: bool = True  # shrink the window on 429s (see shoptune.llm_client)


class TokenBucket:
    """`per_minute` units a minute, holding one second of them; a take may overdraw (one large
    request is not blocked forever), the next waits for the debt to be repaid."""

    def __init__(self, per_minute: float, now: float):
        self.rate = per_minute / 60
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.stamp = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def delay(self, now: float) -> float:
        """Seconds until a take is allowed."""
        self._refill(now)
        return 0.0 if self.level > 0 else (1e-6 - self.level) / self.rate

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def give_back(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)


MIN_SPAN = 16  # the 429s are counted among the last max(limit, MIN_SPAN) answers
MIN_429 = 5  # and the window halves on a quarter of them, at least MIN_429


class AdaptiveWindow:
    """How many attempts may be in flight (AIMD): halved when a quarter of the last answers, and at
    least MIN_429, are 429s; + ceiling/16 (at least 1) after each `limit` answers without halving.

    Random 429s (an overloaded replica: 5 % of the answers) almost never come 5 in 16 answers
    (P = 0.1 % per 16 answers; with 2 in 8, the rule before, 6 %: the window halved every few
    seconds at a concurrency of 8), while a rate limit really hit answers most attempts with a 429
    and halves the window within a round trip. Answers to attempts started before the last
    halving are not counted: they say nothing about the smaller window."""

    def __init__(self, ceiling: int, adaptive: bool):
        self.ceiling = ceiling
        self.limit = self.smallest = ceiling
        self.step = max(1, ceiling // 16)  # from half to full in 8 rounds
        self.adaptive = adaptive
        self.paused_until = 0.0
        self.epoch_start = -math.inf  # when the window last halved
        self.answers = 0  # answers counted since then
        self.since_change = 0  # answers counted since the window last changed
        self.recent_429: collections.deque[int] = collections.deque()  # the answer numbers of the 429s

    def answered(self, started: float, rate_limited: bool, retry_after: float | None, now: float) -> None:
        if not self.adaptive or started < self.epoch_start:
            return
        self.answers += 1
        span = max(self.limit, MIN_SPAN)
        if rate_limited:
            self.recent_429.append(self.answers)
        while self.recent_429 and self.recent_429[0] <= self.answers - span:
            self.recent_429.popleft()
        if len(self.recent_429) >= max(MIN_429, span / 4):
            self.limit = max(1, self.limit // 2)
            self.smallest = min(self.smallest, self.limit)
            if retry_after:
                self.paused_until = max(self.paused_until, now + retry_after)
            self.epoch_start = now
            self.answers = self.since_change = 0
            self.recent_429.clear()
            return
        self.since_change += 1
        if self.since_change >= self.limit and self.limit < self.ceiling:
            self.limit = min(self.ceiling, self.limit + self.step)
            self.since_change = 0
