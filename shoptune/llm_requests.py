"""A completion request and its key: the sha256 of its canonical JSON, by which the journal
(shoptune.journal) remembers each request's outcome across runs. A request is a chat completion
(`messages`), or a text completion (`prompt`: a text or token ids, the /completions endpoint of a vLLM
server or of OpenAI's instruct models) that continues a prompt exactly as written."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any


def canonical(value: Any) -> Any:
    """JSON-ready and normalised: mapping keys sorted by json.dumps, whole floats as ints, None values dropped."""
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def request_key(
    model: str,
    messages: Sequence[Mapping[str, Any]],
    sampling: Mapping[str, Any],
    prompt: str | list[int] | None = None,
) -> str:
    """sha256 of a canonical JSON of (model, messages, sampling[, prompt]): the same inputs give the same key."""
    fields = [model, list(messages), dict(sampling)] + ([{"prompt": prompt}] if prompt is not None else [])
    text = json.dumps(canonical(fields), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)
class Request:
    """One chat completion, or with `prompt` one text completion (messages empty): `sampling` holds the
    other arguments of create() (temperature, max_tokens, top_p...). `empty_is_answer`: an empty reply
    is a success (a model's answer may be nothing), not retried; it is no part of the key. Requests are
    equal, and hash, by key."""

    model: str
    messages: Sequence[Mapping[str, Any]]
    sampling: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    prompt: str | list[int] | None = None
    empty_is_answer: bool = False
    key: str = dataclasses.field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "key", request_key(self.model, self.messages, self.sampling, self.prompt))

    @property
    def endpoint(self) -> str:
        return "/chat/completions" if self.prompt is None else "/completions"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Request) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def estimate(self) -> tuple[int, int]:
        """(prompt tokens, most output tokens), before sending: UTF-8 bytes / 3 is an overestimate for
        most languages; without max_tokens the output is counted as 0."""
        size = sum(len(str(m.get("content") or "").encode()) + 12 for m in self.messages)
        if isinstance(self.prompt, str):
            size += len(self.prompt.encode())
        elif self.prompt is not None:  # token ids: 3 "bytes" each, one token
            size += 3 * len(self.prompt)
        output = self.sampling.get("max_completion_tokens") or self.sampling.get("max_tokens") or 0
        return math.ceil(size / 3), int(output)
