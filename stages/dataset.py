"""dataset: accepted items -> ECInstruct rows, merged with extra files, decontaminated, split; a dataset card.

Synthetic items become ECInstruct rows of their family's task; every *.jsonl file in the folder
`extra` (ECInstruct or ShopBench rows) is merged in. Extra rows that overlap an evaluation question
of the profile (the same n-gram rule as clean's, clean.ngram and clean.max_eval_overlap) are left
out, and counted. Rows that carry their own split keep it ("test" rows are left out of training);
the rest are split at random (seeded) by `val_fraction`.

The dataset card (card.json, a DVC metric): rows per split by task (family), locale and source;
clean's rejects per reason; synthesis failures per reason and replies cut by max_tokens.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path

from shoptune import UserError, params
from shoptune.artifacts import read_jsonl, write_json, write_jsonl
from shoptune.ecinstruct import from_item, read_rows
from shoptune.profile import CleanParams, DatasetParams
from shoptune.quality import Overlap, evaluation_questions
from shoptune.workspace import entrypoint, stage_dir

log = logging.getLogger("dataset")
SYNTHETIC = "synthetic"


def dataset(profile: str) -> None:
    p = params.load(profile, "dataset", DatasetParams)
    if not 0 <= p.val_fraction < 1:
        raise UserError(f"params.yaml: profiles.{profile}.dataset.val_fraction must be in [0, 1)")
    items = read_jsonl(stage_dir(profile, "clean") / "accepted.jsonl")
    rows = [(from_item(item, p.setting), SYNTHETIC, item["locale"]) for item in items]

    if p.extra and not Path(p.extra).is_dir():
        raise UserError(f"params.yaml: profiles.{profile}.dataset.extra: {p.extra} is not a folder")
    c = params.load(profile, "clean", CleanParams)
    contamination = Overlap(evaluation_questions(profile), c.ngram)
    decontaminated = Counter()
    for path in sorted(Path(p.extra).glob("*.jsonl")) if p.extra else []:
        extra = read_rows(path)
        kept = [row for row in extra if contamination.share(row_text(row)) <= c.max_eval_overlap]
        decontaminated[path.name] = len(extra) - len(kept)
        log.info(
            "merging %d rows from %s (%d overlap evaluation questions: left out)",
            len(kept),
            path,
            len(extra) - len(kept),
        )
        rows += [(row, path.name, "") for row in kept]

    rng = random.Random(p.seed)
    train, val, left_out = [], [], 0
    card = {"train": Counter(), "val": Counter()}
    for row, source, locale in rows:
        split = row["split"] or ("val" if rng.random() < p.val_fraction else "train")
        split = {"validation": "val", "dev": "val"}.get(split, split)
        if split not in ("train", "val"):
            left_out += 1
            continue
        (train if split == "train" else val).append(row | {"split": split})
        card[split].update([("task", row["task"]), ("locale", locale or "(none)"), ("source", source)])
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
            "left_out_overlapping_evaluation": sum(decontaminated.values()),
            "train_by_task": dict(sorted(Counter(r["task"] for r in train).items())),
        },
    )
    write_json(folder / "card.json", dataset_card(profile, card, decontaminated))
    log.info("%d train rows, %d val rows (%d test rows left out)", len(train), len(val), left_out)


def row_text(row: dict) -> str:
    options = row["options"] if isinstance(row["options"], str) else "\n".join(map(str, row["options"]))
    return "\n".join(part for part in (row["instruction"], row["input"], options) if part)


def dataset_card(profile: str, card: dict, decontaminated: Counter) -> dict:
    """Rows per split by task, locale and source; clean's rejects and synthesis's failures per reason."""
    counts = json.loads((stage_dir(profile, "clean") / "counts.json").read_text())
    failures = read_jsonl(stage_dir(profile, "synthesize") / "failures.jsonl")
    synthesis = json.loads((stage_dir(profile, "synthesize") / "stats.json").read_text())

    def by(split: str, key: str) -> dict:
        return dict(sorted((value, n) for (k, value), n in card[split].items() if k == key))

    return {
        "rows": {split: sum(n for (k, _), n in card[split].items() if k == "source") for split in card},
        **{f"{split}_by_{key}": by(split, key) for split in card for key in ("task", "locale", "source")},
        "extra_rows_overlapping_evaluation": dict(sorted(decontaminated.items())),
        "items_accepted_by_family": counts["accepted_by_family"],
        "items_rejected_by_reason": counts["reject_reasons"],
        "synthesis_failures_by_reason": dict(sorted(Counter(f["failure"] for f in failures).items())),
        "replies_cut_by_max_tokens": synthesis.get("cut_by_max_tokens", 0),  # kept: clean judged their items
    }


if __name__ == "__main__":
    entrypoint(dataset)
