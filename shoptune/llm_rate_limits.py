"""How fast requests go out: the settings (Limits), the token buckets for requests and tokens per
minute, and the adaptive window that halves the attempts in flight when 429s say a rate limit is hit
(the rules: shoptune.llm_client's docstring)."""

from __future__ import annotations

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


class AdaptiveWindow:
    """How many attempts may be in flight: halved when an epoch brings many 429s, +1 after an epoch without."""

    def __init__(self, ceiling: int, adaptive: bool):
        self.ceiling = ceiling
        self.limit = self.smallest = ceiling
        self.step = max(1, ceiling // 16)  # from half to full in 8 epochs
        self.adaptive = adaptive
        self.paused_until = 0.0
        self.epoch_start = -math.inf
        self.answers = 0
        self.rate_limited = 0

    def answered(self, started: float, rate_limited: bool, retry_after: float | None, now: float) -> None:
        if not self.adaptive or started < self.epoch_start:
            return  # an answer to an attempt sent before the last change says nothing about the new limit
        self.answers += 1
        self.rate_limited += rate_limited
        if self.rate_limited >= max(2, self.limit / 4):
            self.limit = max(1, self.limit // 2)
            self.smallest = min(self.smallest, self.limit)
            if retry_after:
                self.paused_until = max(self.paused_until, now + retry_after)
            self._new_epoch(now)
        elif self.answers >= self.limit:
            self.limit = min(self.ceiling, self.limit + self.step)
            self._new_epoch(now)

    def _new_epoch(self, now: float) -> None:
        self.epoch_start = now
        self.answers = self.rate_limited = 0
