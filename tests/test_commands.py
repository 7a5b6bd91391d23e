"""The commands a user types: make help, the direct tools' --help, and a failed environment
build that names the package and leaves the previous outputs in place."""

from __future__ import annotations

import os
import re
import subprocess

from tests.conftest import ROOT, SHARED, copy_repository, git_repository, shoptune


def make(*args: str, cwd=ROOT, check=True):
    result = subprocess.run(
        ["make", "--no-print-directory", *args], cwd=cwd, env={**os.environ, **SHARED}, capture_output=True, text=True
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_make_help_lists_every_target_and_the_stage_targets():
    listed = make("help").stdout
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"^([a-z-]+):.*## ", makefile, re.MULTILINE):
        assert re.search(rf"^{target}\s", listed, re.MULTILINE), target
    stages = re.search(r"^STAGES := (.*)$", makefile, re.MULTILINE).group(1).split()
    assert all(stage in listed for stage in [*stages, "clean-stage"])


def test_the_direct_tools_print_their_options():
    evaluate = shoptune("evaluate", "--help")
    assert evaluate.returncode == 0 and "--out" in evaluate.stdout and "--embedding-model" in evaluate.stdout
    pad = shoptune("pad", "--help")
    assert pad.returncode == 0 and "--group-size" in pad.stdout and "--tensor-parallel-size" in pad.stdout


def test_a_failed_environment_build_names_the_package_and_keeps_the_outputs(tmp_path):
    folder = git_repository(copy_repository(tmp_path / "shoptune"))
    make("clean-stage", "PROFILE=demo", cwd=folder)
    accepted = folder / "runs/demo/clean/accepted.jsonl"
    before = accepted.read_bytes()
    lock = folder / "docker/data/lock-cpu.txt"
    text = lock.read_text()
    tqdm = text.index("tqdm==4.67.1")
    lock.write_text(text[:tqdm] + re.sub(r"sha256:[0-9a-f]{64}", "sha256:" + "0" * 64, text[tqdm:], count=2))
    params = folder / "params.yaml"
    params.write_text(params.read_text().replace("      min_options: 2\n", "      min_options: 3\n", 1))
    result = make("clean-stage", "PROFILE=demo", cwd=folder, check=False)
    assert result.returncode != 0
    assert "shoptune: error: downloading failed: tqdm==4.67.1: THESE PACKAGES DO NOT MATCH THE HASHES" in result.stderr
    assert accepted.read_bytes() == before
