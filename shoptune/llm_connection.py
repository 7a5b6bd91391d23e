"""A connection to an OpenAI-compatible API from params: OpenAI, Azure OpenAI (api_version set: a key, or
Microsoft Entra ID sign-in through azure-identity), a vLLM server; the limits, retries and budget of
shoptune.llm_client. Shared by synthesis and by API-backed inference, whose params sections carry the same
keys (model, base_url, api_key_env, api_version, concurrency, timeout, max_retries, requests_per_minute,
tokens_per_minute, max_cost, max_requests, prices); `section` names the params section in messages.

base_url is one endpoint, or a list of them (shoptune/llm_endpoints.py: a vLLM server per node,
Azure deployments in several regions), each a URL or {base_url, api_key_env, model} where its key
or its name for the model differs; the limits hold for each endpoint, the budget for the run.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from shoptune import UserError
from shoptune.llm_client import (
    Budget,
    ClientConfig,
    Limits,
    Request,
    RetryPolicy,
    RunResult,
    run_requests,
    run_requests_async,
)
from shoptune.profile import endpoints, is_self_hosted  # noqa: F401 (is_self_hosted: for the stages)

AZURE_SCOPE = "https://cognitiveservices.azure.com/.default"
log = logging.getLogger("llm")


def azure_auth(key_env: str, section: str) -> dict:
    """AzureOpenAI's (or AsyncAzureOpenAI's) credential: the key if its variable is set, else a
    Microsoft Entra ID (Azure AD) token from azure-identity's DefaultAzureCredential."""
    key = os.environ.get(key_env)
    if key:
        return {"api_key": key}
    try:
        from azure.core.exceptions import ClientAuthenticationError
        from azure.identity import DefaultAzureCredential, get_bearer_token_provider
    except ImportError:
        raise UserError(
            f"environment variable {key_env} is not set (params: {section}.api_key_env): set it to the "
            "Azure OpenAI key, or install azure-identity to sign in with Microsoft Entra ID instead"
        ) from None
    provider = get_bearer_token_provider(DefaultAzureCredential(), AZURE_SCOPE)

    def token() -> str:
        try:
            return provider()
        except ClientAuthenticationError as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(
                f"{key_env} is not set and Microsoft Entra ID sign-in failed ({first}); "
                "sign in (az login) or set the key"
            ) from None

    return {"azure_ad_token_provider": token}


def api_key(key_env: str, section: str) -> str:
    key = os.environ.get(key_env)
    if not key:
        raise UserError(f"environment variable {key_env} is not set (params: {section}.api_key_env)")
    return key


def send_requests(requests: list[Request], journal: Path, p, section: str) -> RunResult:
    """Every request through shoptune.llm_client: retried, rate-limited, journaled, within the budget,
    spread over the endpoints."""
    limits = Limits(
        concurrency=p.concurrency,
        requests_per_minute=p.requests_per_minute,
        tokens_per_minute=p.tokens_per_minute,
        timeout=p.timeout,
    )
    budget = budget_of(p, section)
    retry = RetryPolicy(attempts=p.max_retries + 1)
    settings = {"limits": limits, "retry": retry, "budget": budget, "description": section}
    if not p.api_version:
        configs = [ClientConfig(api_key(e.api_key_env, section), e.base_url, model=e.model) for e in endpoints(p)]
        result = run_requests(requests, configs, journal, **settings)
        log_endpoints(result, section)
        return result

    import openai

    async def on_azure() -> RunResult:  # the clients are made in the event loop that uses them
        clients = [
            openai.AsyncAzureOpenAI(
                azure_endpoint=e.base_url,
                api_version=p.api_version,
                max_retries=0,  # the deployment: each request's model (the endpoint's name for it)
                **azure_auth(e.api_key_env, section),
            )
            for e in endpoints(p)
        ]
        try:
            return await run_requests_async(requests, clients, journal, **settings)
        finally:
            for client in clients:
                await client.close()

    result = asyncio.run(on_azure())
    log_endpoints(result, section)
    return result


def log_endpoints(result: RunResult, section: str) -> None:
    if len(result.endpoints) < 2:
        return
    for name, stats in result.endpoints.items():
        numbers = stats.as_dict()
        log.info(
            "%s: endpoint %s: %d attempts, %d succeeded, failures %s, mean latency %s s, marked down %d times%s",
            section,
            name,
            numbers["attempts"],
            numbers["succeeded"],
            numbers["failures"] or "none",
            numbers["mean_latency_s"],
            numbers["marked_down"],
            f", out: {numbers['out']}" if numbers["out"] else "",
        )


def budget_of(p, section: str) -> Budget:
    prices = {}
    for model, price in p.prices.items():
        if len(price) != 2:
            raise UserError(f"{section}.prices.{model}: expected [input $/1M tokens, output $/1M tokens]")
        prices[model] = (price[0], price[1])
    return Budget(max_cost=p.max_cost, max_requests=p.max_requests, prices=prices)
