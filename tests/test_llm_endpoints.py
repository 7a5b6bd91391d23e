"""Several endpoints behind one run (shoptune/llm_endpoints.py), against real local HTTP servers
(tests/llm_server.py): attempts spread by free capacity, a server stopped mid-run loses nothing and
nothing is paid twice, an endpoint refusing the key leaves the run to the others; base_url as a list
in params; each endpoint's key reaches only the stage that uses it."""

from __future__ import annotations

import collections
import threading
import time

import pytest

from shoptune import UserError, params
from shoptune.journal import SUCCESS
from shoptune.llm_client import ClientConfig, Limits, Request, RetryPolicy, run_requests
from shoptune.llm_endpoints import DOWN_AFTER
from shoptune.profile import EndpointParams, SynthesizeParams
from tests.conftest import ROOT
from tests.llm_server import LLMServer

KEY = "sk-test-endpoints"
RETRY = RetryPolicy(attempts=8, backoff=0.01, max_backoff=0.05)


def requests_for(count: int) -> list[Request]:
    return [Request("m", [{"role": "user", "content": f"product {i}"}], {"max_tokens": 8}) for i in range(count)]


def run(servers, requests, journal, concurrency=4, **settings):
    configs = [ClientConfig(KEY, server.url) for server in servers]
    limits = Limits(concurrency=concurrency, timeout=2)
    return run_requests(requests, configs, journal, limits=limits, retry=RETRY, progress=False, **settings)


def stop_when(server: LLMServer, answered: int) -> threading.Thread:
    """Stop `server` (its connections dropped, its port closed) once it has answered `answered` requests."""

    def watch():
        while len(server.answered) < answered:
            time.sleep(0.005)
        server.stop()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_server_stopped_mid_run_loses_nothing_and_is_paid_for_nothing_twice(tmp_path):
    requests = requests_for(300)
    with LLMServer(latency=0.01) as a, LLMServer(latency=0.01) as b:
        watcher = stop_when(b, 60)
        result = run([a, b], requests, tmp_path / "journal.jsonl")
        watcher.join(timeout=10)
        answered = collections.Counter(a.answered + b.answered)
        stats = {name: s.as_dict() for name, s in result.endpoints.items()}
        print(f"\nfailover: {stats}; {result.summary()}")
        # every request answered once, by one of the two; the journal has them all
        assert result.succeeded == 300 and result.failed == 0 and result.stopped_by is None
        assert all(result.outcomes[r.key].status == SUCCESS for r in requests)
        assert set(answered) == {f"product {i}" for i in range(300)} and max(answered.values()) == 1
        assert stats[a.url]["succeeded"] + stats[b.url]["succeeded"] == 300
        assert stats[b.url]["succeeded"] == len(b.answered) >= 60 and stats[a.url]["succeeded"] == len(a.answered)
        # the stopped server was tried, marked down, and the others retried elsewhere
        assert stats[b.url]["failures"].get("connection", 0) >= DOWN_AFTER and stats[b.url]["marked_down"] >= 1
        assert stats[a.url]["failures"] == {} and result.retried["connection"] >= DOWN_AFTER
        # a second run sends nothing: every answer is in the journal
        before = len(a.log)
        again = run([a], requests, tmp_path / "journal.jsonl")
        assert again.reused == 300 and again.sent == 0 and len(a.log) == before


def test_attempts_go_where_there_is_room(tmp_path):
    """A slow endpoint keeps its window full; the fast one, with room sooner, takes most attempts."""
    with LLMServer(latency=0.005) as fast, LLMServer(latency=0.2) as slow:
        result = run([fast, slow], requests_for(120), tmp_path / "journal.jsonl")
        assert result.succeeded == 120
        counts = {name: s.succeeded for name, s in result.endpoints.items()}
        print(f"\nspread: {counts}")
        assert counts[fast.url] >= 0.8 * 120 and counts[slow.url] >= 1


def test_an_endpoint_that_refuses_the_key_leaves_the_run_to_the_others(tmp_path):
    with LLMServer(latency=0.005) as good, LLMServer(latency=0.005, fault_rates={"401": 1.0}) as refusing:
        result = run([refusing, good], requests_for(40), tmp_path / "journal.jsonl")
        stats = result.endpoints
        assert result.succeeded == 40 and result.stopped_by is None
        assert stats[refusing.url].out.startswith("HTTP 401") and KEY not in stats[refusing.url].out
        assert stats[refusing.url].succeeded == 0 and stats[good.url].succeeded == 40


def test_when_every_endpoint_refuses_the_run_stops(tmp_path):
    with LLMServer(fault_rates={"401": 1.0}) as one, LLMServer(fault_rates={"401": 1.0}) as two:
        result = run([one, two], requests_for(20), tmp_path / "journal.jsonl")
        assert result.succeeded == 0 and result.stopped_by.startswith("HTTP 401")
        assert all(s.out for s in result.endpoints.values())


def test_the_same_endpoint_twice_is_refused(tmp_path):
    with LLMServer() as server, pytest.raises(UserError, match="named twice"):
        run([server, server], requests_for(2), tmp_path / "journal.jsonl")


# ------------------------------------------------------------------ params, keys


def write_params(tmp_path, base_url: str):
    text = (ROOT / "params.yaml").read_text()
    start = text.index("  demo:")
    demo = text[start:].replace("      backend: offline", "      backend: openai", 1)
    demo = demo.replace("      base_url: null\n", f"      base_url: {base_url}\n", 1)
    demo = demo.replace("        product_attribute_choice: {items: 5}   # task 5\n", "", 1)
    demo = demo.replace("        cross_lingual_matching: {items: 1}", "        product_attribute_choice: {items: 5}", 1)
    path = tmp_path / "params.yaml"
    path.write_text(text[:start] + demo)
    return path


def test_base_url_takes_a_list_of_endpoints(tmp_path):
    from shoptune.llm_connection import endpoints

    listed = "['http://node-1:8000/v1', {base_url: 'http://node-2:8000/v1', api_key_env: NODE2_KEY, model: m2}]"
    p = params.load("demo", "synthesize", SynthesizeParams, write_params(tmp_path, listed))
    assert endpoints(p) == [
        EndpointParams("http://node-1:8000/v1", "OPENAI_API_KEY", None),
        EndpointParams("http://node-2:8000/v1", "NODE2_KEY", "m2"),
    ]


@pytest.mark.parametrize(
    "base_url, message",
    [
        ("[]", r"profiles.demo.synthesize.base_url: no endpoint in the list"),
        ("['http://a/v1', 'http://a/v1']", r"synthesize.base_url: http://a/v1 is named twice"),
        ("[{url: 'http://a/v1'}]", r"synthesize.base_url\[0\].url: unknown key"),
        ("['http://a/v1', '']", r"synthesize.base_url\[1\]: an empty URL"),
    ],
)
def test_a_bad_endpoint_list_names_the_key(tmp_path, base_url, message):
    with pytest.raises(UserError, match=message) as err:
        params.load_profile("demo", write_params(tmp_path, base_url))
    assert "\n" not in str(err.value)


def test_each_endpoint_key_reaches_only_its_stage(monkeypatch, tmp_path):
    from shoptune import runner

    listed = "['http://node-1:8000/v1', {base_url: 'http://node-2:8000/v1', api_key_env: NODE2_KEY}]"
    profile = params.load_profile("demo", write_params(tmp_path, listed))
    monkeypatch.setenv("NODE2_KEY", "secret-2")
    assert runner.passed_environment("synthesize", profile)["NODE2_KEY"] == "secret-2"
    assert "NODE2_KEY" not in runner.passed_environment("infer", profile)
    assert "NODE2_KEY" not in runner.passed_environment("evaluate", profile)
