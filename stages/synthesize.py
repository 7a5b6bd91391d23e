"""synthesize: product catalog -> raw LLM generations, a reply of several questions per product.

Recipe (4th place, multilingual track): each product's title and attributes go to an
LLM with ShopBench development examples as few-shot context; the LLM writes
`questions_per_product` multiple-choice questions of `options_per_question` options,
one correct, each in the form
    The product '<full name>' appears on an e-commerce website. <question>
    0. <option>
    1. <option>
    Answer: <number>
Backends: `openai` (any OpenAI-compatible API: OpenAI, Azure OpenAI, a vLLM server;
the key comes from the environment variable named by `api_key_env`) and `offline`
(questions built from the product's own attributes, distractors drawn from other
products: no network, deterministic).

The openai backend sends one request per product through shoptune.llm_client (adaptive
concurrency, rate limits, retries, a budget: params timeout, requests_per_minute,
tokens_per_minute, max_retries, max_cost, max_requests, prices). Every finished request is
journaled in runs/<profile>/.checkpoints/synthesize/journal.jsonl, by a key hashing the whole
request: a rerun (after a crash, a kill, a budget stop) sends only the requests without a final
outcome, and a change of prompt, model or sampling sends new ones. Outputs: generations.jsonl
(products with a reply, catalog order; a reply cut by max_tokens is kept, finish_reason "length"),
failures.jsonl (the others, with why), stats.json. The stage fails (exit 2, one line, outputs
written) when the run stopped early or more than max_failed_fraction of the products failed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from shoptune import UserError, params
from shoptune.artifacts import read_jsonl, write_json, write_jsonl
from shoptune.catalog import Product, read_catalog
from shoptune.journal import NOT_SENT, SUCCESS
from shoptune.llm_client import (
    Budget,
    ClientConfig,
    Limits,
    Request,
    RetryPolicy,
    run_requests,
    run_requests_async,
)

if TYPE_CHECKING:
    from shoptune.llm_client import RunResult
from shoptune.profile import SynthesizeParams
from shoptune.workspace import checkpoints_dir, entrypoint, stage_dir

log = logging.getLogger("synthesize")


ITEM_OPENING = "The product '{title}' appears on an e-commerce website."
QUESTION_BY_ATTRIBUTE = {
    "brand": "Which brand makes this product?",
    "color": "What is the color of this product?",
    "size": "What size is this product?",
    "model": "What is the model of this product?",
    "material": "What material is this product made of?",
    "author": "Who is the author of this product?",
}


def format_item(title: str, question: str, options: list[str], answer: int) -> str:
    lines = [f"{ITEM_OPENING.format(title=title)} {question}"]
    lines += [f"{i}. {option}" for i, option in enumerate(options)]
    lines.append(f"Answer: {answer}")
    return "\n".join(lines)


# ------------------------------------------------------------------ offline backend


def offline_writer(products: list[Product], p: SynthesizeParams) -> Callable[[Product], str]:
    """Questions from the product's attributes; wrong options are other products' values."""
    values: dict[tuple[str, str], list[str]] = {}  # (attribute, locale) -> distinct values
    for product in products:
        for name, value in product.attributes.items():
            known = values.setdefault((name, product.locale), [])
            if value not in known:
                known.append(value)

    def write(product: Product) -> str:
        rng = random.Random(f"{p.seed}:{product.locale}:{product.id}")
        items = []
        wrong = p.options_per_question - 1
        for name, value in product.attributes.items():
            # wrong options from the same locale first, then from the others
            local = [v for v in values[(name, product.locale)] if v.casefold() != value.casefold()]
            foreign = [
                v
                for (a, loc), vs in values.items()
                if a == name and loc != product.locale
                for v in vs
                if v.casefold() != value.casefold() and v not in local
            ]
            picked = rng.sample(local, min(wrong, len(local)))
            if len(picked) < wrong:
                if len(foreign) < wrong - len(picked):
                    continue
                picked += rng.sample(foreign, wrong - len(picked))
            options = [*picked, value]
            rng.shuffle(options)
            items.append(format_item(product.title, QUESTION_BY_ATTRIBUTE[name], options, options.index(value)))
            if len(items) == p.questions_per_product:
                break
        return "\n\n".join(items)

    return write


# ------------------------------------------------------------------ openai backend


def instructions(p: SynthesizeParams) -> str:
    return (
        "You write multiple-choice questions about products of an online shop, in the style of the "
        "examples. For the product you are given, write "
        f"{p.questions_per_product} questions about its attributes, each with {p.options_per_question} "
        "options of which exactly one is correct. Write each question in this form, and separate "
        "questions by a blank line:\n"
        f"{ITEM_OPENING} <question>\n0. <option>\n1. <option>\n...\nAnswer: <number of the correct option>\n"
        "Use the product's full name as given, and the product's language for the options."
    )


def fewshot_text(rows: list[dict], path: str) -> str:
    examples = []
    for number, row in enumerate(rows, 1):
        if "input_field" not in row or "output_field" not in row:
            raise UserError(f"{path}: row {number}: a few-shot example needs input_field and output_field")
        examples.append(f"{row['input_field'].rstrip()} {row['output_field']}")
    return "Examples:\n\n" + "\n\n".join(examples)


AZURE_SCOPE = "https://cognitiveservices.azure.com/.default"


def azure_auth(p: SynthesizeParams) -> dict:
    """AzureOpenAI's (or AsyncAzureOpenAI's) credential: the key if its variable is set, else a
    Microsoft Entra ID (Azure AD) token from azure-identity's DefaultAzureCredential."""
    key = os.environ.get(p.api_key_env)
    if key:
        return {"api_key": key}
    try:
        from azure.core.exceptions import ClientAuthenticationError
        from azure.identity import DefaultAzureCredential, get_bearer_token_provider
    except ImportError:
        raise UserError(
            f"environment variable {p.api_key_env} is not set (params: synthesize.api_key_env): set it to the "
            "Azure OpenAI key, or install azure-identity to sign in with Microsoft Entra ID instead"
        ) from None
    provider = get_bearer_token_provider(DefaultAzureCredential(), AZURE_SCOPE)

    def token() -> str:
        try:
            return provider()
        except ClientAuthenticationError as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(
                f"{p.api_key_env} is not set and Microsoft Entra ID sign-in failed ({first}); "
                "sign in (az login) or set the key"
            ) from None

    return {"azure_ad_token_provider": token}


def product_request(product: Product, system: str, p: SynthesizeParams) -> Request:
    """The chat completion asked for one product; its key (a hash of all of it) names it in the journal."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": product.card()}]
    sampling = {"temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_tokens}
    return Request(p.model, messages, sampling)


def api_key(p: SynthesizeParams) -> str:
    key = os.environ.get(p.api_key_env)
    if not key:
        raise UserError(f"environment variable {p.api_key_env} is not set (params: synthesize.api_key_env)")
    return key


def send_requests(requests: list[Request], journal: Path, p: SynthesizeParams) -> RunResult:
    """Every request through shoptune.llm_client: retried, rate-limited, journaled, within the budget."""
    if not 0 <= p.max_failed_fraction <= 1:
        raise UserError(f"synthesize.max_failed_fraction: expected a number in [0, 1], got {p.max_failed_fraction}")
    limits = Limits(
        concurrency=p.concurrency,
        requests_per_minute=p.requests_per_minute,
        tokens_per_minute=p.tokens_per_minute,
        timeout=p.timeout,
    )
    budget = budget_of(p)
    retry = RetryPolicy(attempts=p.max_retries + 1)
    settings = {"limits": limits, "retry": retry, "budget": budget, "description": "synthesize"}
    if not p.api_version:
        return run_requests(requests, ClientConfig(api_key(p), p.base_url), journal, **settings)

    import openai

    async def on_azure() -> RunResult:  # the client is made in the event loop that uses it
        client = openai.AsyncAzureOpenAI(
            azure_endpoint=p.base_url, api_version=p.api_version, max_retries=0, **azure_auth(p)
        )
        try:
            return await run_requests_async(requests, client, journal, **settings)
        finally:
            await client.close()

    return asyncio.run(on_azure())


def budget_of(p: SynthesizeParams) -> Budget:
    prices = {}
    for model, price in p.prices.items():
        if len(price) != 2:
            raise UserError(f"synthesize.prices.{model}: expected [input $/1M tokens, output $/1M tokens]")
        prices[model] = (price[0], price[1])
    return Budget(max_cost=p.max_cost, max_requests=p.max_requests, prices=prices)


def move_old_journals(folder: Path) -> None:
    """Journals of the format before shoptune.llm_client (replies-<fingerprint>.jsonl) are not read: set aside."""
    for old in sorted(folder.glob("replies-*.jsonl")):
        old.rename(old.with_name(old.name + ".old"))
        log.info("%s: a journal of the previous format, not reused: moved to %s.old", old, old.name)


# ------------------------------------------------------------------ the recipe


def synthesize(profile: str) -> None:
    p = params.load(profile, "synthesize", SynthesizeParams)  # values checked too (params.check_synthesize)
    products = read_catalog(p.catalog, p.products_per_locale, p.seed)[: p.max_products]
    folder = stage_dir(profile, "synthesize")
    if p.backend == "offline":
        write = offline_writer(products, p)
        rows = [row(product, p, write(product)) for product in products]
        write_jsonl(folder / "generations.jsonl", rows)
        write_jsonl(folder / "failures.jsonl", [])  # none: the outputs are those of the openai backend
        write_json(folder / "stats.json", base_stats(rows, p))
        log.info("wrote %d replies to %s", len(rows), folder / "generations.jsonl")
        return
    if p.backend != "openai":
        raise UserError(f"params.yaml: profiles.{profile}.synthesize.backend: {p.backend!r} is not openai or offline")

    system = instructions(p) + "\n\n" + fewshot_text(read_jsonl(p.fewshot), p.fewshot)
    requests = [product_request(product, system, p) for product in products]
    checkpoints = checkpoints_dir(profile, "synthesize")
    move_old_journals(checkpoints)
    result = send_requests(requests, checkpoints / "journal.jsonl", p)
    log.info("synthesize: %s", result.summary())

    rows, failures = [], []
    for product, request in zip(products, requests, strict=True):
        outcome = result.outcomes[request.key]
        if outcome.status == SUCCESS:
            rows.append({**row(product, p, outcome.text or ""), "finish_reason": outcome.finish_reason})
            continue
        if outcome.status == NOT_SENT:
            kind, reason = "not_sent", f"not sent: the run stopped ({result.stopped_by})"
        else:
            kind, reason = outcome.failure, outcome.reason
        failures.append(
            {
                "product_id": product.id,
                "locale": product.locale,
                "failure": kind,
                "reason": reason,
                "attempts": outcome.attempts,
                "finish_reason": outcome.finish_reason,
            }
        )
    outcomes = [result.outcomes[r.key] for r in requests]
    usage = [o.usage or {} for o in outcomes]
    prompt_tokens = sum(u.get("prompt_tokens", 0) for u in usage)
    completion_tokens = sum(u.get("completion_tokens", 0) for u in usage)
    budget = budget_of(p)
    cost = sum(budget.cost(p.model, u.get("prompt_tokens", 0), u.get("completion_tokens", 0)) for u in usage)
    stats = {
        **base_stats(rows, p),
        "failed_products": len(failures),
        "failures": dict(sorted(collections.Counter(f["failure"] for f in failures).items())),
        "finish_reasons": dict(sorted(collections.Counter(r["finish_reason"] for r in rows).items())),
        "cut_by_max_tokens": sum(1 for r in rows if r["finish_reason"] == "length"),
        "prompt_tokens": prompt_tokens,  # of every product's request, this run's and the journal's
        "completion_tokens": completion_tokens,
        "cost": round(cost, 6),
        "requests_sent": result.sent,  # this run
        "requests_reused": result.reused,  # answered by the journal, not sent
        "retries": result.retries,
        "retries_by_reason": dict(sorted(result.retried.items())),
        "stopped_by": result.stopped_by,
    }
    write_jsonl(folder / "generations.jsonl", rows)
    write_jsonl(folder / "failures.jsonl", failures)
    write_json(folder / "stats.json", stats)
    log.info("wrote %d replies to %s, %d failures", len(rows), folder / "generations.jsonl", len(failures))

    by_kind = ", ".join(f"{kind} {n}" for kind, n in collections.Counter(f["failure"] for f in failures).most_common())
    if result.stopped_by is not None:
        raise UserError(
            f"the run stopped ({result.stopped_by}): {len(rows)} of {len(products)} products have a reply, "
            f"{len(failures)} not ({by_kind}); outputs written, see {folder / 'failures.jsonl'}; "
            "run again to send the rest"
        )
    if failures and rows == [] and all(f["failure"] == "connection" for f in failures):
        raise UserError(f"cannot reach the API at {p.base_url} (every request failed to connect)")
    if len(failures) > p.max_failed_fraction * len(products):
        raise UserError(
            f"{len(failures)} of {len(products)} products failed ({by_kind}), more than max_failed_fraction "
            f"{p.max_failed_fraction}; outputs written, see {folder / 'failures.jsonl'}; "
            "run again to retry those not refused for good"
        )


def row(product: Product, p: SynthesizeParams, reply: str) -> dict:
    return {
        "product_id": product.id,
        "locale": product.locale,
        "title": product.title,
        "backend": p.backend,
        "model": p.model,
        "reply": reply,
    }


def base_stats(rows: list[dict], p: SynthesizeParams) -> dict:
    return {
        "products": len(rows),
        "backend": p.backend,
        "model": p.model,
        "empty_replies": sum(1 for r in rows if not r["reply"].strip()),
    }


if __name__ == "__main__":
    entrypoint(synthesize)
