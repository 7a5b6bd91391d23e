"""Benchmarks (make bench): throughput and memory of the stages' hot paths, on this machine.

Results go to runs/bench/results.json. Timings are not asserted anywhere; compare runs
on the same machine.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shoptune import runner, shopbench  # noqa: E402
from stages import clean, synthesize  # noqa: E402

MAKE_MODEL = """
import json, sys, torch
from safetensors.torch import save_file
out, layers, hidden, inter = sys.argv[1], *map(int, sys.argv[2:5])
torch.manual_seed(0)
tensors = {"model.embed_tokens.weight": torch.randn(1024, hidden, dtype=torch.float16)}
for i in range(layers):
    p = f"model.layers.{i}.mlp."
    tensors[p + "gate_proj.weight"] = torch.randn(inter, hidden, dtype=torch.float16)
    tensors[p + "up_proj.weight"] = torch.randn(inter, hidden, dtype=torch.float16)
    tensors[p + "down_proj.weight"] = torch.randn(hidden, inter, dtype=torch.float16)
half = len(tensors) // 2
names = sorted(tensors)
save_file({k: tensors[k] for k in names[:half]}, out + "/model-00001-of-00002.safetensors", {"format": "pt"})
save_file({k: tensors[k] for k in names[half:]}, out + "/model-00002-of-00002.safetensors", {"format": "pt"})
json.dump({"intermediate_size": inter, "hidden_size": hidden, "model_type": "qwen2"}, open(out + "/config.json", "w"))
"""


PAD_WITH_PEAK = """
import resource, sys
from stages.pad import pad_model
from pathlib import Path
pad_model(Path(sys.argv[1]), Path(sys.argv[2]), 128, 4, False, 0.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def bench_clean(n: int = 20000) -> dict:
    items = [
        synthesize.format_item(f"Product {i}", "What color is it?", ["red", "blue", "green"], i % 3) for i in range(n)
    ]
    params = clean.CleanParams(2, 10)
    seconds, _ = timed(lambda: [clean.parse_item(text, params) for text in items])
    return {"items": n, "seconds": round(seconds, 3), "items_per_second": round(n / seconds)}


def bench_scoring(n: int = 20000) -> dict:
    rng = random.Random(0)
    cases = [
        ("ranking", "ndcg", [rng.random() * 3 for _ in range(5)], "3, 1, 2, 5, 4"),
        ("retrieval", "hit rate@3", [1, 4, 7], "4, 2, 9"),
        ("multiple-choice", "accuracy", 2, " 2"),
        ("named_entity_recognition", "micro f1", ["a", "b"], "['a', 'c']"),
    ]
    rows = [cases[i % len(cases)] for i in range(n)]
    questions = [
        shopbench.Question("q", truth, "t", kind, metric, "", kind == "multiple-choice")
        for kind, metric, truth, _ in rows
    ]

    def score():
        return [
            shopbench.score_parsed(q, shopbench.parse(q.task_type, r[3]), None, {})
            for q, r in zip(questions, rows, strict=True)
        ]

    seconds, _ = timed(score)
    return {"rows": n, "seconds": round(seconds, 3), "rows_per_second": round(n / seconds)}


def bench_pad(layers: int = 8, hidden: int = 1024, intermediate: int = 2752) -> dict:
    python = str(runner.local_python("quant"))
    with tempfile.TemporaryDirectory() as folder:
        model, out = Path(folder) / "model", Path(folder) / "padded"
        model.mkdir()
        subprocess.run([python, "-c", MAKE_MODEL, str(model), str(layers), str(hidden), str(intermediate)], check=True)
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        start = time.perf_counter()
        result = subprocess.run(
            [python, "-c", PAD_WITH_PEAK, str(model), str(out)], check=True, cwd=ROOT, capture_output=True, text=True
        )
        seconds = time.perf_counter() - start
        peak_kb = int(result.stdout.strip().splitlines()[-1])
    return {
        "layers": layers,
        "hidden": hidden,
        "intermediate": intermediate,
        "model_mb": round(size / 1e6, 1),
        "shards": 2,
        "seconds": round(seconds, 2),
        "mb_per_second": round(size / 1e6 / seconds, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
    }


def main() -> None:
    results = {"clean": bench_clean(), "scoring": bench_scoring(), "pad": bench_pad()}
    out = ROOT / "runs" / "bench" / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
