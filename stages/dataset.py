"""dataset: accepted items -> ECInstruct rows, merged with extra files, split into train and val.

Synthetic items become multiple-choice ECInstruct rows; every *.jsonl file in the folder
`extra` (ECInstruct or ShopBench rows) is merged in. Rows that carry their own split keep it ("test"
rows are left out of training); the rest are split at random (seeded) by `val_fraction`.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path

from shoptune import UserError, params
from shoptune.artifacts import read_jsonl, write_json, write_jsonl
from shoptune.ecinstruct import from_item, read_rows
from shoptune.profile import DatasetParams
from shoptune.workspace import entrypoint, stage_dir

log = logging.getLogger("dataset")


def dataset(profile: str) -> None:
    p = params.load(profile, "dataset", DatasetParams)
    if not 0 <= p.val_fraction < 1:
        raise UserError(f"params.yaml: profiles.{profile}.dataset.val_fraction must be in [0, 1)")
    rows = [from_item(item, p.task, p.setting) for item in read_jsonl(stage_dir(profile, "clean") / "accepted.jsonl")]
    extra_files = sorted(Path(p.extra).glob("*.jsonl")) if p.extra else []
    if p.extra and not Path(p.extra).is_dir():
        raise UserError(f"params.yaml: profiles.{profile}.dataset.extra: {p.extra} is not a folder")
    for path in extra_files:
        extra = read_rows(path)
        log.info("merging %d rows from %s", len(extra), path)
        rows += extra

    rng = random.Random(p.seed)
    train, val, left_out = [], [], 0
    for row in rows:
        split = row["split"] or ("val" if rng.random() < p.val_fraction else "train")
        if split == "train":
            train.append(row | {"split": "train"})
        elif split in ("val", "validation", "dev"):
            val.append(row | {"split": "val"})
        else:
            left_out += 1
    rng.shuffle(train)
    if not train:
        raise UserError("dataset: no training rows (did clean accept any item?)")

    folder = stage_dir(profile, "dataset")
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "val.jsonl", val)
    write_json(
        folder / "stats.json",
        {
            "train": len(train),
            "val": len(val),
            "left_out_test_rows": left_out,
            "train_by_task": dict(sorted(Counter(r["task"] for r in train).items())),
        },
    )
    log.info("%d train rows, %d val rows (%d test rows left out)", len(train), len(val), left_out)


if __name__ == "__main__":
    entrypoint(dataset)
