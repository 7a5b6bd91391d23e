"""Where each profile's artifacts live, and how a stage module is started.

Every stage of profile P writes under runs/P/<stage>/; dvc.yaml names the same paths. The few
things a person compares runs by, the DVC metrics and plots, live in two folders of their own, one
file per profile, paths short enough for `dvc metrics show` to fit a terminal:
    metrics/P.json         the leaderboard's numbers: overall and each track (evaluate)
    plots/P-loss.svg       the training loss (finetune)
    plots/P-scores.svg     the score per task type (evaluate)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from shoptune import UserError

RUNS = Path("runs")
METRICS = Path("metrics")
PLOTS = Path("plots")


def stage_dir(profile: str, stage: str) -> Path:
    return RUNS / profile / stage


def metrics_file(profile: str) -> Path:
    return METRICS / f"{profile}.json"


def plot_file(profile: str, name: str) -> Path:
    return PLOTS / f"{profile}-{name}.svg"


def checkpoints_dir(profile: str, stage: str) -> Path:
    """Resumable state of a long stage, kept outside its DVC outputs (DVC clears those)."""
    return RUNS / profile / ".checkpoints" / stage


def report_errors(fn: Callable, *args):
    """Call fn(*args) as a program would: logging to stderr, a user mistake as one line, exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return fn(*args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def entrypoint(recipe: Callable[[str], object], argv: list[str] | None = None) -> None:
    """Run `recipe(profile)` as the program `python -m stages.<stage> --profile P`."""
    parser = argparse.ArgumentParser(prog=f"python -m {recipe.__module__}")
    parser.add_argument("--profile", required=True, help="a profile of params.yaml")
    args = parser.parse_args(argv)
    report_errors(recipe, args.profile)
