"""Prompt formats (shoptune/prompts.py) with the real Qwen2 tokenizer and chat template, in the train
environment: for every format, a question's training text is its inference prompt followed by the answer
and the end of the turn, so what the model learns is what it is later asked."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
from shoptune.ecinstruct import from_shopbench
from shoptune.prompts import FORMATS, inference_prompt, training_text
from shoptune.shopbench import Question
from stages.tiny_model import qwen2_tokenizer

tokenizer = qwen2_tokenizer()
rows = [
    {"input_field": "Which colour is it?\\n0. red\\n1. blue\\nAnswer:", "output_field": 1,
     "task_type": "multiple-choice"},
    {"input_field": "Write a title for a blue mug.", "output_field": "Blue Mug", "task_type": "generation"},
]
out = {}
for fmt in FORMATS:
    for row in rows:
        choice = row["task_type"] == "multiple-choice"
        question = Question(row["input_field"], row["output_field"], "t", row["task_type"], "accuracy", "", choice)
        out[f"{fmt}:{row['task_type']}"] = {
            "prompt": inference_prompt(question, fmt, tokenizer),
            "training": training_text(from_shopbench(row | {"task_name": "t"}), fmt, tokenizer),
        }
tokenizer.chat_template = None
try:
    inference_prompt(question, "chat", tokenizer)
except Exception as err:
    out["no_template"] = f"{type(err).__name__}: {err}"
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def formats(stage_python):
    result = subprocess.run(
        [stage_python("train"), "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("fmt", ["raw", "chat", "alpaca"])
@pytest.mark.parametrize(("task_type", "answer"), [("multiple-choice", "1"), ("generation", "Blue Mug")])
def test_a_training_text_is_the_inference_prompt_then_the_answer(formats, fmt, task_type, answer):
    case = formats[f"{fmt}:{task_type}"]
    end = {"raw": "<|im_end|>", "alpaca": "<|im_end|>", "chat": "<|im_end|>\n"}[fmt]
    assert case["training"] == case["prompt"] + answer + end


def test_each_format_reads_as_it_should(formats):
    system = "You are a helpful online shopping assistant."
    raw, chat, alpaca = (formats[f"{fmt}:generation"]["prompt"] for fmt in ("raw", "chat", "alpaca"))
    assert raw.startswith(system) and raw.endswith("Do not give explanation only Answer. \nOutput:\n")
    assert chat.startswith(f"<|im_start|>system\n{system}") and chat.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWrite a title for a blue mug.Do not give" in chat
    assert alpaca.startswith("Below is an instruction") and alpaca.endswith("### Response:\n")
    assert formats["raw:multiple-choice"]["prompt"].endswith("1. blue\nAnswer:")  # no suffix for a choice


def test_chat_needs_a_chat_template(formats):
    assert formats["no_template"].startswith("UserError: ") and "no chat template" in formats["no_template"]
