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

The run resumes: finished replies are appended to a journal under runs/<profile>/.checkpoints
and skipped on restart; the output is written once, complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from shoptune import UserError, params
from shoptune.artifacts import dumps, read_jsonl, write_json, write_jsonl
from shoptune.catalog import Product, read_catalog
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


def openai_writer(fewshot: str, p: SynthesizeParams) -> Callable[[Product], str]:
    import openai

    if p.api_version:  # Azure OpenAI: base_url is the resource endpoint, model the deployment name
        client = openai.AzureOpenAI(
            azure_endpoint=p.base_url, api_version=p.api_version, max_retries=p.max_retries, **azure_auth(p)
        )
    else:
        key = os.environ.get(p.api_key_env)
        if not key:
            raise UserError(f"environment variable {p.api_key_env} is not set (params: synthesize.api_key_env)")
        client = openai.OpenAI(base_url=p.base_url, api_key=key, max_retries=p.max_retries)
    system = instructions(p) + "\n\n" + fewshot

    def write(product: Product) -> str:
        try:
            response = client.chat.completions.create(
                model=p.model,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": product.card()}],
                temperature=p.temperature,
                max_tokens=p.max_tokens,
                top_p=p.top_p,
                frequency_penalty=0,
                presence_penalty=0,
            )
        except (
            openai.AuthenticationError,
            openai.PermissionDeniedError,
            openai.NotFoundError,
            openai.BadRequestError,
        ) as err:
            raise UserError(f"the API refused the request ({type(err).__name__}: {err.message})") from None
        except openai.APIConnectionError:
            raise UserError(f"cannot reach the API at {client.base_url} (after {p.max_retries} retries)") from None
        return response.choices[0].message.content or ""

    return write


# ------------------------------------------------------------------ the recipe


def synthesize(profile: str) -> None:
    p = params.load(profile, "synthesize", SynthesizeParams)  # values checked too (params.check_synthesize)
    products = read_catalog(p.catalog, p.products_per_locale, p.seed)[: p.max_products]
    if p.backend == "offline":
        write = offline_writer(products, p)
    elif p.backend == "openai":
        write = openai_writer(fewshot_text(read_jsonl(p.fewshot), p.fewshot), p)
    else:
        raise UserError(f"params.yaml: profiles.{profile}.synthesize.backend: {p.backend!r} is not openai or offline")

    # Journal of finished replies; it is only reused for the same settings.
    settings = {k: v for k, v in dataclasses.asdict(p).items() if k not in ("concurrency", "max_retries")}
    fingerprint = hashlib.sha256(dumps(settings).encode()).hexdigest()[:16]
    journal = checkpoints_dir(profile, "synthesize") / f"replies-{fingerprint}.jsonl"
    done = {(r["locale"], r["product_id"]): r for r in _read_journal(journal)}
    todo = [x for x in products if (x.locale, x.id) not in done]
    if done:
        log.info("resuming: %d of %d products already have a reply", len(products) - len(todo), len(products))

    journal.parent.mkdir(parents=True, exist_ok=True)
    pool = ThreadPoolExecutor(max(1, p.concurrency))
    try:
        with journal.open("a", encoding="utf-8") as out:
            futures = {pool.submit(write, product): product for product in todo}
            for future in tqdm(as_completed(futures), total=len(futures), desc="synthesize", unit="product"):
                product = futures[future]
                row = {
                    "product_id": product.id,
                    "locale": product.locale,
                    "title": product.title,
                    "backend": p.backend,
                    "model": p.model,
                    "reply": future.result(),
                }
                out.write(dumps(row) + "\n")
                out.flush()
                done[(product.locale, product.id)] = row
    finally:  # on an error or Ctrl-C, drop the requests not yet sent; the journal keeps the rest
        pool.shutdown(wait=True, cancel_futures=True)

    folder = stage_dir(profile, "synthesize")
    rows = [done[(x.locale, x.id)] for x in products]
    write_jsonl(folder / "generations.jsonl", rows)
    write_json(
        folder / "stats.json",
        {
            "products": len(rows),
            "backend": p.backend,
            "model": p.model,
            "empty_replies": sum(1 for r in rows if not r["reply"].strip()),
        },
    )
    journal.unlink()
    log.info("wrote %d replies to %s", len(rows), folder / "generations.jsonl")


def _read_journal(path: Path) -> list[dict]:
    """Finished replies; a last line cut short by a crash is dropped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


if __name__ == "__main__":
    entrypoint(synthesize)
