"""The synthesize stage's openai backend run as a program (python -m stages.synthesize) against a real local
HTTP server (tests/llm_server.py) with faults injected per product: every product ends in generations.jsonl or
failures.jsonl with its reason, the exit status follows max_failed_fraction, a rerun sends only what has no
final outcome in the journal (nothing, once all is done), a kill -9 loses nothing that finished, and
max_requests stops cleanly."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shoptune.artifacts import read_jsonl
from tests.llm_server import LLMServer

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-synthesize-0123"
PRODUCTS = 32  # the demo catalog, one request each (one family)
JOURNAL = Path("runs/t/.checkpoints/synthesize/journal.jsonl")
OUT = Path("runs/t/synthesize")


@pytest.fixture
def server():
    with LLMServer(latency=0.005, hang_seconds=3) as running:
        yield running


@pytest.fixture
def project(tmp_path, monkeypatch, server):
    """A scratch project: the demo data and the demo synthesize params, pointed at the server."""
    shutil.copytree(ROOT / "data" / "demo", tmp_path / "data" / "demo")
    demo = yaml.safe_load((ROOT / "params.yaml").read_text())["profiles"]["demo"]
    section = {
        **demo["synthesize"],
        "backend": "openai",
        "model": "m",
        "base_url": server.url,
        "api_key_env": "SHOP_KEY",
        "concurrency": 4,
        "max_retries": 2,
        "timeout": 1,
        "families": {"product_attribute_choice": {"items": 5}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"profiles": {"t": {"synthesize": section}}}))
    monkeypatch.chdir(tmp_path)

    def set_params(**values):
        data = yaml.safe_load(Path("params.yaml").read_text())
        data["profiles"]["t"]["synthesize"].update(values)
        Path("params.yaml").write_text(yaml.safe_dump(data))

    return set_params


def mark_titles(markers: dict[int, str]) -> list[str]:
    """Append fault markers to the prices of the catalog's products (by row: the price is in the request
    once, the title twice); "id:locale" of the products in order."""
    path = Path("data/demo/catalog.csv")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for number, marker in markers.items():
        rows[number]["price"] += f" {marker}"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return [f"{r['id']}:{r['locale']}" for r in rows]


def where(row: dict) -> str:
    return f"{row['product_id']}:{row['locale']}"


def start_stage() -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stages.synthesize", "--profile", "t"],
        env={**os.environ, "PYTHONPATH": str(ROOT), "SHOP_KEY": KEY},
        stderr=subprocess.PIPE,
        text=True,
    )


def run_stage() -> tuple[int, list[str]]:
    """Run the stage to its end: the exit status and the error lines of stderr."""
    child = start_stage()
    _, err = child.communicate(timeout=60)
    assert KEY not in err
    return child.returncode, [line for line in err.splitlines() if line.startswith("error:")]


def outputs() -> tuple[list[dict], list[dict], dict]:
    stats = json.loads((OUT / "stats.json").read_text())
    return read_jsonl(OUT / "generations.jsonl"), read_jsonl(OUT / "failures.jsonl"), stats


def test_every_product_ends_in_generations_or_failures_under_faults(project, server):
    ids = mark_titles(
        {
            0: "{fault:429:2}",
            1: "{fault:500:2}",
            2: "{fault:truncated:1}",
            3: "{fault:400}",  # refused for good
            4: "{fault:hang:1}",  # past the timeout once
            5: "{fault:length}",  # cut by max_tokens: kept
            6: "{fault:500}",  # fails every attempt
            7: "{fault:cut:1}",
        }
    )
    project(max_failed_fraction=0.05)  # 2 of 32 failures is more
    status, errors = run_stage()
    assert status == 2
    assert len(errors) == 1 and errors[0].startswith("error: 2 of 32 requests failed (")
    assert "http_400 1" in errors[0] and "http_500 1" in errors[0]
    generations, failures, stats = outputs()  # written all the same
    assert [where(r) for r in generations] == [i for i in ids if i not in (ids[3], ids[6])]  # catalog order
    assert [(where(f), f["failure"], f["attempts"]) for f in failures] == [
        (ids[3], "http_400", 1),
        (ids[6], "http_500", 3),
    ]
    assert all(f["reason"] and "finish_reason" in f for f in failures)
    assert next(r for r in generations if where(r) == ids[5])["finish_reason"] == "length"
    assert all(r["reply"].startswith("reply to: Title: ") for r in generations)
    assert stats["replies"] == 30 and stats["failed_requests"] == 2
    assert stats["failures"] == {"http_400": 1, "http_500": 1}
    assert stats["finish_reasons"] == {"length": 1, "stop": 29} and stats["cut_by_max_tokens"] == 1
    assert stats["requests_sent"] == PRODUCTS and stats["requests_reused"] == 0
    assert stats["retries"] == 2 + 2 + 1 + 1 + 2 + 1  # 429 x2, 500 x2, truncated, hang, 500 x2, cut
    assert set(stats["retries_by_reason"]) >= {"http_429", "http_500", "timeout"}
    assert stats["prompt_tokens"] > 0 and stats["completion_tokens"] > 0 and stats["stopped_by"] is None

    server.clear()
    project(max_failed_fraction=0.05 * 1.5)  # within it now: exit 0; only the 500s' product is sent again
    status, errors = run_stage()
    assert (status, errors) == (0, [])
    assert len(server.prompts()) == 3 and len(set(server.prompts())) == 1 and "{fault:500}" in server.prompts()[0]
    generations, failures, stats = outputs()
    assert [where(f) for f in failures] == [ids[3], ids[6]]
    assert stats["requests_sent"] == 1 and stats["requests_reused"] == PRODUCTS - 1


def test_max_requests_stops_cleanly_and_reruns_send_only_the_rest(project, server):
    project(max_requests=10)
    status, errors = run_stage()
    assert status == 2
    assert len(errors) == 1 and errors[0].startswith("error: the run stopped (max_requests): 10 of 32 requests")
    generations, failures, stats = outputs()
    assert len(generations) == 10 and len(failures) == 22 and {f["failure"] for f in failures} == {"not_sent"}
    assert stats["stopped_by"] == "max_requests" and len(server.log) == 10

    server.clear()
    project(max_requests=None)
    assert run_stage() == (0, [])
    assert len(server.prompts()) == 22 and len(set(server.prompts())) == 22
    generations, failures, stats = outputs()
    assert len(generations) == PRODUCTS and failures == [] and stats["requests_reused"] == 10

    server.clear()
    first = (OUT / "generations.jsonl").read_bytes()
    assert run_stage() == (0, [])
    assert server.log == []  # every reply comes from the journal
    assert (OUT / "generations.jsonl").read_bytes() == first


def test_killed_mid_run_a_rerun_sends_only_unfinished_requests(project, server):
    server.latency = 0.1
    project(concurrency=2)
    child = start_stage()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not JOURNAL.exists() or JOURNAL.read_bytes().count(b"\n") < 6):
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    child.stderr.close()
    time.sleep(0.3)  # requests sent before the kill may still reach the server
    journaled = [json.loads(line) for line in JOURNAL.read_bytes().splitlines() if line.endswith(b"}")]
    assert 6 <= len(journaled) < PRODUCTS, "the stage was not killed mid-run"
    finished = {r["text"].removeprefix("reply to: ") for r in journaled}
    assert not OUT.joinpath("generations.jsonl").exists()

    server.clear()
    server.latency = 0.005
    assert run_stage() == (0, [])
    resent = server.prompts()
    assert len(resent) == len(set(resent)) == PRODUCTS - len(finished)
    assert not set(resent) & finished  # nothing finished is paid twice
    print(f"kill -9 (local): {PRODUCTS} requests, {len(finished)} journaled before the kill, {len(resent)} sent again")
    generations, failures, _ = outputs()
    assert len(generations) == PRODUCTS and failures == []
