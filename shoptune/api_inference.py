"""The openai inference backend: ShopBench questions answered by a model behind an OpenAI-compatible
API (OpenAI, Azure OpenAI, a vLLM server), through the client that synthesis uses
(shoptune/llm_connection.py): the same limits, retries, budget and journal, so an interrupted run
resumes where it stopped and no question is paid for twice.

How a prompt format reaches the API:
    chat          the chat-completions endpoint: the system prompt and the question as messages,
                  in the served model's own template
    raw, alpaca   the completions endpoint: the prompt text exactly as the local backends give it
                  (a vLLM server, or OpenAI's instruct models)
Sampling: the multiple-choice or the other settings (max_new_tokens, temperature, top_p); a seed only
when sampling (temperature > 0). A self-hosted server (base_url set, no api_version) also gets
top_k and the answer constraints as vLLM's structured outputs (a regular expression: one option
number, or the number list); OpenAI and Azure OpenAI take neither (params refuse the constraints).
infer.api.base_url may list several endpoints (shoptune/llm_endpoints.py).

Long prompts: with a tokenizer in infer.model (the served model's folder), a prompt longer than
max_model_len minus the answer's tokens is cut from the left as the local backends cut it (a text
prompt is then sent as token ids; a chat question loses the start of its text). With no local copy
(infer.model: models/remote) nothing is cut: the API refuses an over-long prompt (HTTP 400), and the
question counts as failed.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from shoptune import UserError
from shoptune.answer_constraints import AnswerConstraint
from shoptune.inference import fit_to_context
from shoptune.journal import SUCCESS
from shoptune.llm_connection import is_self_hosted, send_requests
from shoptune.llm_requests import Request
from shoptune.profile import InferParams, Sampling
from shoptune.prompts import chat_messages, inference_prompt
from shoptune.shopbench import Question

log = logging.getLogger("infer")
SECTION = "infer.api"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class ApiBackend:
    """Answers over the API; `.failures` (kind -> questions) and `.usage` after answer()."""

    def __init__(self, model_dir: Path, p: InferParams, journal: Path | None):
        self.p, self.api = p, p.api
        self.self_hosted = is_self_hosted(self.api)
        self.journal = journal
        self.seeding = "per request (sampled answers)"
        self.tokenizer = None
        if any((model_dir / name).is_file() for name in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.failures: dict[str, int] = {}
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
        self.endpoints: dict[str, dict] = {}  # this run's attempts per endpoint, with several

    def prompt(self, question: Question, fmt: str) -> str | list[dict]:
        """What the API is sent: messages (chat), or the prompt text (raw, alpaca)."""
        if fmt == "chat":
            return chat_messages(question)
        return inference_prompt(question, fmt, self.tokenizer)

    def sampling(self, s: Sampling, constraint: AnswerConstraint | None) -> dict:
        sampling = {"max_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p}
        if s.temperature > 0:
            sampling["seed"] = self.p.seed
        if self.self_hosted:
            if s.top_k > 0:
                sampling["top_k"] = s.top_k
            if constraint is not None:
                pattern = constraint.pattern or "(" + "|".join(constraint.digits) + ")"
                sampling["structured_outputs"] = {"regex": pattern}
        return sampling

    def fit(self, prompt: str | list[dict], limit: int) -> tuple[str | list[int] | list[dict], bool]:
        """The prompt cut from the left to `limit` tokens (with a tokenizer), and whether it was cut."""
        tokenizer = self.tokenizer
        if tokenizer is None:
            return prompt, False
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt)
            fitted = fit_to_context(ids, limit, tokenizer.bos_token_id)
            return (prompt, False) if len(fitted) == len(ids) else (fitted, True)
        if not getattr(tokenizer, "chat_template", None):
            return prompt, False
        messages, cut = [dict(m) for m in prompt], False
        for _ in range(4):  # re-encoding a cut text can shift a token or two: measure again
            # measured as the local backends measure a chat prompt: its text, encoded
            total = len(
                tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
            )
            if total <= limit:
                break
            user = tokenizer.encode(messages[-1]["content"], add_special_tokens=False)
            messages[-1]["content"] = tokenizer.decode(user[total - limit :])
            cut = True
        return messages, cut

    def answer(
        self, prompts: list, choice: list[bool], constraints: list[AnswerConstraint | None]
    ) -> tuple[list[str], int]:
        """Answers ("" for a question left unanswered, counted in .failures) and prompts cut."""
        p, requests, cut = self.p, [], 0
        for prompt, is_choice, constraint in zip(prompts, choice, constraints, strict=True):
            s = p.multiple_choice if is_choice else p.other
            fitted, was_cut = self.fit(prompt, p.max_model_len - s.max_new_tokens)
            cut += was_cut
            sampling = self.sampling(s, constraint)
            if isinstance(fitted, list) and fitted and isinstance(fitted[0], dict):
                requests.append(Request(self.api.model, fitted, sampling, empty_is_answer=True))
            else:
                requests.append(Request(self.api.model, [], sampling, prompt=fitted, empty_is_answer=True))
        if not self.self_hosted and any(s.top_k > 0 for s in (p.multiple_choice, p.other)):
            log.info("top_k is not sent: OpenAI and Azure OpenAI do not take it")
        result = self.send(requests)
        if len(result.endpoints) > 1:
            self.endpoints = {name: e.as_dict() for name, e in result.endpoints.items()}
        answers = []
        for request in requests:
            outcome = result.outcomes[request.key]
            if outcome.status == SUCCESS:
                answers.append(outcome.text or "")
                for key in self.usage:
                    self.usage[key] += (outcome.usage or {}).get(key, 0)
            else:
                kind = outcome.failure or outcome.status
                self.failures[kind] = self.failures.get(kind, 0) + 1
                answers.append("")
        failed = sum(self.failures.values())
        log.info(
            "%d answers: %d sent in this run, %d from the journal, %d failed",
            len(answers),
            result.sent,
            result.reused,
            failed,
        )
        if result.stopped_by or failed > self.api.max_failed_fraction * len(requests):
            why = f"stopped by {result.stopped_by}" if result.stopped_by else f"{failed} of {len(requests)} failed"
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.failures.items()))
            raise UserError(
                f"{SECTION}: {why} ({kinds or 'none sent'}; max_failed_fraction "
                f"{self.api.max_failed_fraction}); nothing written: the answers so far are journaled, "
                "run the stage again to resume"
            )
        return answers, cut

    def send(self, requests: list[Request]):
        if self.journal is not None:
            return send_requests(requests, self.journal, self.api, SECTION)
        with tempfile.TemporaryDirectory() as folder:  # a harness's batch: nothing to resume
            return send_requests(requests, Path(folder) / "journal.jsonl", self.api, SECTION)
