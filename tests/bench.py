"""Benchmarks (make bench): throughput and memory of the stages' hot paths, on this machine.

    python -m tests.bench [clean|scoring|pad ...]     (all of them by default)

Results go to runs/bench/results.json (those of the benches run replace theirs). Timings
are not asserted anywhere; compare runs on the same machine. The pad bench writes two
checkpoints of Qwen2-72B-shaped layers (1.6 and 4.8 GB) and, one at a time, their copies:
about 10 GB free on the temporary folder's disk.
"""

from __future__ import annotations

import json
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shoptune import runner, shopbench  # noqa: E402
from shoptune.families.family import parse_item, write_item  # noqa: E402


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def bench_clean(n: int = 20000) -> dict:
    opening = "The product 'Product {}' appears on an e-commerce website. What color is it?"
    items = [write_item(opening.format(i), ["red", "blue", "green"], i % 3) for i in range(n)]
    seconds, _ = timed(lambda: [parse_item(text, "multiple-choice", 2, 10) for text in items])
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


# Qwen2-72B's MLP: hidden 8192, intermediate 29568 (-> 29696 for AWQ groups of 128 x TP 4), bf16.
HIDDEN, INTERMEDIATE = 8192, 29568


def write_bench_model(folder: Path, layers: int) -> tuple[int, int]:
    """A bf16 checkpoint of Qwen2-72B-shaped layers, written by numpy a window at a time (the
    builder's memory stays small): per layer one shard of gate/up_proj and one of down_proj,
    o_proj and the norms, and an index. (bytes, shards)."""
    import numpy as np

    from shoptune.checkpoint import lay_out

    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 16, 32 << 20, dtype=np.uint16) & 0xBFFF  # finite bf16: exponent < 128
    pool = memoryview(bits).cast("B")
    folder.mkdir(parents=True)
    weight_map, total, shards = {}, 0, 2 * layers
    for layer in range(layers):
        p = f"model.layers.{layer}."
        contents = [
            {p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN)},
            {
                p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
                p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                p + "input_layernorm.weight": (HIDDEN,),
                p + "post_attention_layernorm.weight": (HIDDEN,),
            },
        ]
        for part, tensors in enumerate(contents):
            name = f"model-{2 * layer + part + 1:05d}-of-{shards:05d}.safetensors"
            header, placed = lay_out([(t, "BF16", shape) for t, shape in tensors.items()], {"format": "pt"})
            with open(folder / name, "wb") as out:
                out.write(header)
                for tensor in placed:
                    for start in range(0, tensor.nbytes, len(pool)):
                        out.write(pool[: min(len(pool), tensor.nbytes - start)])
                    total += tensor.nbytes
            weight_map.update(dict.fromkeys(tensors, name))
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": HIDDEN}
    config |= {"intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total, shards


def run_measured(command: list[str]) -> tuple[float, int, subprocess.CompletedProcess]:
    """(seconds, peak RSS in kB, the finished process). The peak from /usr/bin/time where there is
    one, else the largest of this process's children so far (an upper bound)."""
    subprocess.run(["sync"], check=True)  # each run starts with nothing left to write back
    timer = ["/usr/bin/time", "-f", "peak_rss_kb=%M"] if Path("/usr/bin/time").is_file() else []
    start = time.perf_counter()
    result = subprocess.run(timer + command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    peaks = [int(line.split("=")[1]) for line in result.stderr.splitlines() if line.startswith("peak_rss_kb=")]
    return seconds, peaks[-1] if peaks else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, result


def bench_pad(layer_counts: tuple[int, ...] = (1, 3), repetitions: int = 2) -> dict:
    """`cp -r MODEL COPY` against `python -m stages.pad MODEL OUT --group-size 128 --tensor-parallel-size 4`
    on Qwen2-72B-shaped checkpoints of two sizes, alternating, each output deleted once measured."""
    python = str(runner.local_python("quant"))
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-pad-") as folder:
        for layers in layer_counts:
            model, out = Path(folder) / f"model-{layers}", Path(folder) / "out"
            size, shards = write_bench_model(model, layers)
            commands = {
                "cp": ["cp", "-r", str(model), str(out)],
                "pad": [python, "-m", "stages.pad", str(model), str(out), "--group-size", "128"]
                + ["--tensor-parallel-size", "4"],
            }
            run_measured(commands["cp"])  # untimed: the first write after the build is an outlier, whoever does it
            shutil.rmtree(out)
            seconds: dict[str, list[float]] = {"cp": [], "pad": []}
            peaks = []
            for _ in range(repetitions):
                for tool, command in commands.items():
                    elapsed, peak, result = run_measured(command)
                    seconds[tool].append(elapsed)
                    if tool == "pad":
                        peaks.append(peak)
                        report = json.loads(result.stdout)
                    shutil.rmtree(out)
            shutil.rmtree(model)
            cp, pad = statistics.median(seconds["cp"]), statistics.median(seconds["pad"])
            results[f"{layers}_layers"] = {
                "layers": layers,
                "hidden": HIDDEN,
                "intermediate": INTERMEDIATE,
                "padded_intermediate": report["padded_intermediate_size"],
                "dtype": "BF16",
                "model_gb": round(size / 1e9, 2),
                "shards": shards,
                "cp_seconds": round(cp, 2),
                "pad_seconds": round(pad, 2),
                "pad_over_cp": round(pad / cp, 2),
                "pad_gb_per_second": round(size / 1e9 / pad, 2),
                "pad_peak_rss_mb": round(max(peaks) / 1024, 1),
                "bytes_verified": report["bytes_verified"],
                "runs": {tool: [round(s, 2) for s in times] for tool, times in seconds.items()},
            }
    return results


def bench_llm() -> dict:
    """The synthesis client against a 200 ms server (tests/bench_llm.py), beside a minimal asyncio client."""
    from tests.bench_llm import bench_llm_client

    return bench_llm_client()


BENCHES = {"clean": bench_clean, "scoring": bench_scoring, "pad": bench_pad, "llm": bench_llm}


def main(names: list[str]) -> None:
    """Run the benches named (all by default); their results replace theirs in runs/bench/results.json."""
    unknown = set(names) - set(BENCHES)
    if unknown:
        raise SystemExit(f"unknown bench(es) {', '.join(sorted(unknown))}; choose from {', '.join(BENCHES)}")
    out = ROOT / "runs" / "bench" / "results.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    for name in names or BENCHES:
        results[name] = BENCHES[name]()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
