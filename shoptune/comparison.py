"""Scores of several runs side by side: `shoptune compare PROFILE...` (for example a base model against
its finetuned self, or two prompt formats), from each profile's runs/<profile>/evaluate/metrics.json.

`dvc metrics show` and `dvc metrics diff` read overall and the tracks (metrics/<profile>.json); this
adds the task types, in one table a person reads: the headline numbers as rows and the profiles as
columns, with the difference of the last two.
"""

from __future__ import annotations

import json

from shoptune import UserError
from shoptune.workspace import stage_dir


def scores(profile: str) -> dict[str, float]:
    path = stage_dir(profile, "evaluate") / "metrics.json"
    if not path.is_file():
        raise UserError(f"{path}: not there (run .venv/bin/dvc repro evaluate@{profile})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a metrics file ({err})") from None
    return {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def table(profiles: list[str]) -> str:
    """A Markdown table: one row per headline number (overall first), one column per profile."""
    columns = [scores(profile) for profile in profiles]
    keys = sorted({k for c in columns for k in c}, key=lambda k: (k != "overall", k))
    header = ["", *profiles] + (["difference"] if len(profiles) > 1 else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in keys:
        cells = [f"{c[key]:.4f}" if key in c else "" for c in columns]
        if len(profiles) > 1:
            a, b = columns[-2].get(key), columns[-1].get(key)
            cells.append(f"{b - a:+.4f}" if a is not None and b is not None else "")
        lines.append("| " + " | ".join([key, *cells]) + " |")
    return "\n".join(lines)
