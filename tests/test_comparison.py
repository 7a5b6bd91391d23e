"""`shoptune compare`: profiles' headline scores side by side, as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import shoptune


def write_metrics(root: Path, profile: str, numbers: dict) -> None:
    folder = root / "runs" / profile / "evaluate"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(numbers))


def test_two_profiles_side_by_side_with_their_difference(tmp_path):
    write_metrics(tmp_path, "base", {"overall": 0.25, "choice": 0.5, "ner": 0.0})
    write_metrics(tmp_path, "tuned", {"overall": 0.3125, "choice": 0.625, "generation": 0.1})
    out = shoptune("compare", "base", "tuned", cwd=tmp_path).stdout.splitlines()
    assert out[0] == "|  | base | tuned | difference |"
    assert out[2] == "| overall | 0.2500 | 0.3125 | +0.0625 |"  # overall first, then by name
    assert "| choice | 0.5000 | 0.6250 | +0.1250 |" in out
    assert "| generation |  | 0.1000 |  |" in out and "| ner | 0.0000 |  |  |" in out


def test_a_profile_without_scores_is_one_line(tmp_path):
    write_metrics(tmp_path, "base", {"overall": 0.25})
    result = shoptune("compare", "base", "missing", cwd=tmp_path, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (
        "shoptune: error: runs/missing/evaluate/metrics.json: not there (run .venv/bin/dvc repro evaluate@missing)"
    )
