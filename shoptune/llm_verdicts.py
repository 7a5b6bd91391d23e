"""The verdict on one attempt at the chat-completions API: an SDK or HTTP error, or the completion
it answered with, judged success, permanent failure, retry or stop, with a reason of one line; and
the retry policy: how many attempts, how long to wait before the next."""

from __future__ import annotations

import dataclasses
import email.utils
import json
import random
import time
from collections.abc import Mapping
from typing import Any

import openai
from openai.types import Completion

from shoptune.journal import SUCCESS

STOP_STATUSES = (401, 403, 404)
RETRY_STATUSES = (408, 409, 429)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # per request, the first included
    backoff: float = 0.5  # seconds before the first retry (at most; equal jitter)
    max_backoff: float = 60.0
    max_retry_after: float = 600.0  # a longer Retry-After is cut to this

    def wait(self, attempts: int, retry_after: float | None) -> float:
        """Seconds before the next attempt, after `attempts`: 2^(attempts-1) x backoff, capped at
        max_backoff, equal jitter; the Retry-After asked for (cut to max_retry_after) if longer."""
        cap = min(self.max_backoff, self.backoff * 2 ** (attempts - 1))
        delay = random.uniform(cap / 2, cap)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after))
        return delay


@dataclasses.dataclass
class Verdict:
    kind: str  # "success", or a failure kind: "http_429", "timeout", "refusal", ...
    action: str  # "done" (success or permanent failure), "retry", "stop"
    reason: str | None = None
    text: str | None = None
    finish_reason: str | None = None
    retry_after: float | None = None


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Retry-After-Ms, or Retry-After in seconds or as an HTTP date."""
    try:
        if "retry-after-ms" in headers:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def status_message(err: openai.APIStatusError) -> str:
    body = err.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return err.message


def judge_error(err: BaseException, timeout: float) -> Verdict | None:
    """The verdict on an attempt that raised, or None for an error this module does not know (a bug)."""
    if isinstance(err, openai.APIStatusError):
        status = err.status_code
        reason = f"HTTP {status}: {one_line(status_message(err))}"
        if status in RETRY_STATUSES or status >= 500:
            return Verdict(f"http_{status}", "retry", reason, retry_after=retry_after_seconds(err.response.headers))
        return Verdict(f"http_{status}", "stop" if status in STOP_STATUSES else "done", reason)
    if isinstance(err, TimeoutError | openai.APITimeoutError):
        return Verdict("timeout", "retry", f"no answer within {timeout:g} s")
    if isinstance(err, openai.APIConnectionError):
        cause = err.__cause__
        detail = f" ({type(cause).__name__}: {one_line(str(cause), 120)})" if cause and str(cause) else ""
        return Verdict("connection", "retry", f"connection error{detail}")
    if isinstance(err, json.JSONDecodeError | openai.APIResponseValidationError):
        return Verdict("invalid_response", "retry", f"invalid response body ({one_line(str(err), 120)})")
    return None


def judge_completion(completion: Any, empty_is_answer: bool = False) -> Verdict:
    """The verdict on an attempt answered with status 200: a chat completion (the choice's message)
    or a text completion (the choice's text)."""
    choices = getattr(completion, "choices", None)
    if not isinstance(choices, list) or not choices:
        return Verdict("invalid_response", "retry", "invalid response body (no choices)")
    choice = choices[0]
    finish_reason = getattr(choice, "finish_reason", None)
    if finish_reason == "content_filter":
        return Verdict("content_filter", "done", "the content filter stopped the reply")
    if isinstance(completion, Completion):
        text = getattr(choice, "text", None)
        if not isinstance(text, str):
            return Verdict("invalid_response", "retry", "invalid response body (no text)")
    else:
        message = getattr(choice, "message", None)
        refusal = getattr(message, "refusal", None)
        if refusal:
            return Verdict("refusal", "done", f"refusal: {one_line(refusal)}")
        text = getattr(message, "content", None)
        if not isinstance(text, str):
            if message is None or text is not None:
                return Verdict("invalid_response", "retry", "invalid response body (no message content)")
            text = ""
    if not text.strip() and finish_reason != "length" and not empty_is_answer:
        return Verdict("empty_reply", "retry", f"empty reply (finish_reason {finish_reason})")
    return Verdict(SUCCESS, "done", text=text, finish_reason=finish_reason or "stop")
