"""synthesize: product catalog -> raw replies of task families, one request per (family, product).

Recipe (4th place, multilingual track): each product's title and attributes go to an LLM with
ShopBench development examples as few-shot context, and the LLM writes questions in ShopBench form
(for the attribute task: 5 questions per product, 3 options each, one correct). Here each task family
(shoptune/families: tasks 1-8 and 11 of the recipe, and the multilingual 16-18) is a template: its
prompt, few-shot rows, answer format and checks. params `families` names which ones, how many items
each, and for which locales; `fewshot` rows whose task_name is a family's replace its own examples.

Backends: `openai` (any OpenAI-compatible API: OpenAI, Azure OpenAI, a vLLM server; the key comes
from the environment variable named by `api_key_env`) and `offline` (the families that can be made
from the catalog alone: no network, deterministic).

The openai backend sends one request per job through shoptune.llm_client (adaptive
concurrency, rate limits, retries, a budget: params timeout, requests_per_minute,
tokens_per_minute, max_retries, max_cost, max_requests, prices). Every finished request is
journaled in runs/<profile>/.checkpoints/synthesize/journal.jsonl, by a key hashing the whole
request: a rerun (after a crash, a kill, a budget stop) sends only the requests without a final
outcome, and a change of prompt, model or sampling sends new ones. Outputs: generations.jsonl
(jobs with a reply, in family then catalog order; a reply cut by max_tokens is kept, finish_reason
"length"), failures.jsonl (the others, with why), stats.json. The stage fails (exit 2, one line,
outputs written) when the run stopped early or more than max_failed_fraction of the jobs failed.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from shoptune import UserError, params
from shoptune.artifacts import read_jsonl, write_json, write_jsonl
from shoptune.catalog import read_catalog
from shoptune.families import FAMILIES
from shoptune.families.family import Family, Job, Settings, system_prompt
from shoptune.journal import NOT_SENT, SUCCESS
from shoptune.llm_client import Request
from shoptune.llm_connection import budget_of, endpoints, send_requests

if TYPE_CHECKING:
    pass
from shoptune.profile import SynthesizeParams
from shoptune.workspace import checkpoints_dir, entrypoint, stage_dir

log = logging.getLogger("synthesize")


# ------------------------------------------------------------------ families and their jobs


def family_jobs(products, p: SynthesizeParams) -> list[tuple[Family, Settings, list[Job]]]:
    """Each family of params (in task order), its settings, and its jobs over the sampled products."""
    chosen = []
    for family in FAMILIES.values():
        if family.name in p.families:
            fp = p.families[family.name]
            settings = Settings(items=fp.items, options=p.options_per_question)
            mine = [product for product in products if fp.locales is None or product.locale in fp.locales]
            jobs = family.jobs(mine, settings, p.seed)
            log.info("%s (task %d): %d requests over %d products", family.name, family.task, len(jobs), len(mine))
            chosen.append((family, settings, jobs))
    return chosen


def fewshot_rows(path: str) -> dict[str, list[dict]]:
    """{family: ShopBench rows} from the few-shot file, matched by task_name (the family's name or
    task<N>); rows of other tasks are counted and left out."""
    by_task = {name: name for name in FAMILIES} | {f"task{f.task}": f.name for f in FAMILIES.values()}
    rows: dict[str, list[dict]] = {}
    others = collections.Counter()
    for number, row in enumerate(read_jsonl(path), 1):
        if "input_field" not in row or "output_field" not in row:
            raise UserError(f"{path}: row {number}: a few-shot example needs input_field and output_field")
        name = by_task.get(str(row.get("task_name", "")))
        if name is None:
            others[str(row.get("task_name", ""))] += 1
        else:
            rows.setdefault(name, []).append(row)
    if others:
        log.info("%s: %d rows name no family (%s): not used", path, others.total(), ", ".join(sorted(others)))
    return rows


def request_of(job: Job, family: Family, settings: Settings, system: str, p: SynthesizeParams) -> Request:
    """The chat completion asked for one job; its key (a hash of all of it) names it in the journal."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": family.prompt(job, settings)}]
    sampling = {"temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_tokens}
    return Request(p.model, messages, sampling)


def move_old_journals(folder: Path) -> None:
    """Journals of the format before shoptune.llm_client (replies-<fingerprint>.jsonl) are not read: set aside."""
    for old in sorted(folder.glob("replies-*.jsonl")):
        old.rename(old.with_name(old.name + ".old"))
        log.info("%s: a journal of the previous format, not reused: moved to %s.old", old, old.name)


# ------------------------------------------------------------------ the recipe


def synthesize(profile: str) -> None:
    p = params.load(profile, "synthesize", SynthesizeParams)  # values checked too (params.check_synthesize)
    products = read_catalog(p.catalog, p.products_per_locale, p.seed)[: p.max_products]
    families = family_jobs(products, p)
    jobs = [(family, job) for family, _, its_jobs in families for job in its_jobs]
    folder = stage_dir(profile, "synthesize")
    if p.backend == "offline":
        rows, skipped = [], collections.Counter()
        for family, settings, its_jobs in families:
            replies = family.offline_replies(its_jobs, products, settings, p.seed)
            rows += [row(job, p, replies[job.id]) for job in its_jobs if job.id in replies]
            skipped[family.name] = sum(1 for job in its_jobs if job.id not in replies)
        write_jsonl(folder / "generations.jsonl", rows)
        write_jsonl(folder / "failures.jsonl", [])  # none: the outputs are those of the openai backend
        stats = {**base_stats(rows, p), "jobs_without_offline_reply": dict(sorted(skipped.items()))}
        write_json(folder / "stats.json", stats)
        log.info("wrote %d replies to %s", len(rows), folder / "generations.jsonl")
        return
    if p.backend != "openai":
        raise UserError(f"params.yaml: profiles.{profile}.synthesize.backend: {p.backend!r} is not openai or offline")

    examples = fewshot_rows(p.fewshot)
    requests = []
    for family, settings, its_jobs in families:
        system = system_prompt(family, settings, examples.get(family.name) or list(family.fewshot))
        requests += [request_of(job, family, settings, system, p) for job in its_jobs]
    checkpoints = checkpoints_dir(profile, "synthesize")
    move_old_journals(checkpoints)
    result = send_requests(requests, checkpoints / "journal.jsonl", p, "synthesize")
    log.info("synthesize: %s", result.summary())

    rows, failures = [], []
    for (_, job), request in zip(jobs, requests, strict=True):
        outcome = result.outcomes[request.key]
        if outcome.status == SUCCESS:
            rows.append({**row(job, p, outcome.text or ""), "finish_reason": outcome.finish_reason})
            continue
        if outcome.status == NOT_SENT:
            kind, reason = "not_sent", f"not sent: the run stopped ({result.stopped_by})"
        else:
            kind, reason = outcome.failure, outcome.reason
        failures.append(
            {
                "family": job.family,
                "job": job.id,
                "product_id": job.product.id,
                "locale": job.product.locale,
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
    budget = budget_of(p, "synthesize")
    cost = sum(budget.cost(p.model, u.get("prompt_tokens", 0), u.get("completion_tokens", 0)) for u in usage)
    stats = {
        **base_stats(rows, p),
        "failed_requests": len(failures),
        "failures": dict(sorted(collections.Counter(f["failure"] for f in failures).items())),
        "finish_reasons": dict(sorted(collections.Counter(r["finish_reason"] for r in rows).items())),
        "cut_by_max_tokens": sum(1 for r in rows if r["finish_reason"] == "length"),
        "prompt_tokens": prompt_tokens,  # of every job's request, this run's and the journal's
        "completion_tokens": completion_tokens,
        "cost": round(cost, 6),
        "requests_sent": result.sent,  # this run
        "requests_reused": result.reused,  # answered by the journal, not sent
        "retries": result.retries,
        "retries_by_reason": dict(sorted(result.retried.items())),
        "stopped_by": result.stopped_by,
    }
    if len(result.endpoints) > 1:  # this run's attempts per endpoint (shoptune/llm_endpoints.py)
        stats["endpoints"] = {name: e.as_dict() for name, e in result.endpoints.items()}
    write_jsonl(folder / "generations.jsonl", rows)
    write_jsonl(folder / "failures.jsonl", failures)
    write_json(folder / "stats.json", stats)
    log.info("wrote %d replies to %s, %d failures", len(rows), folder / "generations.jsonl", len(failures))

    by_kind = ", ".join(f"{kind} {n}" for kind, n in collections.Counter(f["failure"] for f in failures).most_common())
    if result.stopped_by is not None:
        raise UserError(
            f"the run stopped ({result.stopped_by}): {len(rows)} of {len(jobs)} requests have a reply, "
            f"{len(failures)} not ({by_kind}); outputs written, see {folder / 'failures.jsonl'}; "
            "run again to send the rest"
        )
    if failures and rows == [] and all(f["failure"] == "connection" for f in failures):
        where = ", ".join(e.base_url or "OpenAI" for e in endpoints(p))
        raise UserError(f"cannot reach the API at {where} (every request failed to connect)")
    if len(failures) > p.max_failed_fraction * len(jobs):
        raise UserError(
            f"{len(failures)} of {len(jobs)} requests failed ({by_kind}), more than max_failed_fraction "
            f"{p.max_failed_fraction}; outputs written, see {folder / 'failures.jsonl'}; "
            "run again to retry those not refused for good"
        )


def row(job: Job, p: SynthesizeParams, reply: str) -> dict:
    return {
        "family": job.family,
        "job": job.id,
        "product_id": job.product.id,
        "locale": job.product.locale,
        "title": job.product.title,
        "attributes": job.product.attributes,  # what clean checks items against
        "context": job.context,
        "backend": p.backend,
        "model": p.model,
        "reply": reply,
    }


def base_stats(rows: list[dict], p: SynthesizeParams) -> dict:
    return {
        "replies": len(rows),
        "replies_by_family": dict(sorted(collections.Counter(r["family"] for r in rows).items())),
        "backend": p.backend,
        "model": p.model,
        "empty_replies": sum(1 for r in rows if not r["reply"].strip()),
    }


if __name__ == "__main__":
    entrypoint(synthesize)
