"""A ShopBench submission: the competition's model interface around this project's inference.

The KDD Cup 2024 harness (the starter kit's local_evaluation.py) groups the questions by task
type and calls, batch after batch,
    model.get_batch_size() -> int                     (1 to 16)
    model.batch_predict({"prompt": [...]}, is_multiple_choice) -> list[str]
with the bare questions (input_field) only. ShopBenchModel answers them as the infer stage does:
the recipe's prompt, the multiple-choice or the other sampling, and the answer constraints of the
task type that the prompt's wording gives (shoptune/task_types.py), with the same backends
(shoptune/inference.py), loaded once.

    from shoptune.submission import ShopBenchModel
    model = ShopBenchModel.from_profile("demo")   # runs/demo/pad/model with params.yaml's infer settings
    model = ShopBenchModel(model_dir, infer_params, quantized=True)

With the vllm backend, build it under `if __name__ == "__main__":` (vLLM starts worker processes).
"""

from __future__ import annotations

from pathlib import Path

from shoptune import params
from shoptune.answer_constraints import constraint_for
from shoptune.inference import model_folder, open_backend, serves_awq
from shoptune.profile import InferParams
from shoptune.prompts import inference_format
from shoptune.shopbench import Question
from shoptune.task_types import infer_task_type

HARNESS_MAX_BATCH = 16  # the starter kit's bound on get_batch_size()


class ShopBenchModel:
    def __init__(
        self, model_dir: str | Path, p: InferParams, quantized: bool = False, prompt_format: str | None = None
    ):
        self.p, self.prompt_format = p, prompt_format or p.prompt_format or "raw"
        self.backend = open_backend(p.backend, Path(model_dir), quantized, p)

    @classmethod
    def from_profile(cls, profile: str, params_file: Path = params.PARAMS_FILE) -> ShopBenchModel:
        """The model the profile's infer stage answers with (infer.model), with its infer settings."""
        p = params.load(profile, "infer", InferParams, params_file)
        fmt = inference_format(profile, p, params_file)
        return cls(model_folder(profile, p), p, quantized=serves_awq(profile, p), prompt_format=fmt)

    def get_batch_size(self) -> int:
        return max(1, min(self.p.batch_size, HARNESS_MAX_BATCH))

    def batch_predict(self, batch: dict, is_multiple_choice: bool) -> list[str]:
        """One answer per prompt of batch["prompt"]: a digit for multiple choice, comma-separated
        numbers for ranking and retrieval, free text for entities and generation."""
        questions = [
            Question(prompt, None, "", infer_task_type(prompt, is_multiple_choice), "", "", is_multiple_choice)
            for prompt in batch["prompt"]
        ]
        constraints = [
            constraint_for(q.task_type, q.input_field, self.p.constrain_choices, self.p.constrain_number_lists)
            for q in questions
        ]
        choice = [is_multiple_choice] * len(questions)
        prompts = [self.backend.prompt(q, self.prompt_format) for q in questions]
        answers, _ = self.backend.answer(prompts, choice, constraints)
        return answers
