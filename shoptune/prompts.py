"""Prompt formats: how a question reaches the model, in training (finetune) and in inference (infer).

    raw     the recipe's inference prompt: the system prompt, a blank line, the question, and for
            questions that are not multiple choice "Do not give explanation only Answer. \\nOutput:\\n"
    chat    the model's own chat template: the system prompt as the system message, the question
            (with the same suffix) as the user message; the answer is the assistant's turn
    alpaca  the recipe's training template: "### Instruction:", "### Input:", "### Options:",
            "### Response:"

The recipe trained with alpaca and inferred with raw. A training text is the prompt followed by the
answer and the end of the turn (EOS for raw and alpaca, the template's own end for chat), so the
model learns where to stop; an inference prompt ends where the answer begins.
"""

from __future__ import annotations

from pathlib import Path

from shoptune import UserError, params
from shoptune.ecinstruct import ALPACA_TEMPLATE, alpaca_prompt, options_text
from shoptune.profile import FinetuneParams, InferParams
from shoptune.shopbench import NON_CHOICE_SUFFIX, SYSTEM_PROMPT, Question, prompt_for

FORMATS = ("raw", "chat", "alpaca")
ANSWER = "Answer:"


def inference_format(profile: str, p: InferParams, params_file: Path = params.PARAMS_FILE) -> str:
    """The profile's inference prompt format: infer.prompt_format, else (null) finetune's."""
    fmt = p.prompt_format or params.load(profile, "finetune", FinetuneParams, params_file).prompt_format
    check_format(fmt, f"{params_file}: profiles.{profile}.infer.prompt_format")
    return fmt


def check_format(name: str, where: str) -> None:
    if name not in FORMATS:
        raise UserError(f"{where}: {name!r} is not a prompt format ({', '.join(FORMATS)})")


def _chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{getattr(tokenizer, 'name_or_path', 'the model')}: its tokenizer has no chat template; "
            "use prompt_format raw or alpaca"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _user_text(question: str, multiple_choice: bool) -> str:
    return question if multiple_choice else question + NON_CHOICE_SUFFIX


# ------------------------------------------------------------------ inference


def chat_messages(question: Question) -> list[dict]:
    """The chat format's messages: the system prompt, the question (its suffix added) as the user's turn."""
    user = _user_text(question.input_field, question.is_multiple_choice)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def inference_prompt(question: Question, fmt: str, tokenizer) -> str:
    """The text the model continues to answer `question`."""
    if fmt == "raw":
        return prompt_for(question)
    if fmt == "chat":
        return _chat(tokenizer, chat_messages(question), add_generation_prompt=True)
    if fmt == "alpaca":  # a ShopBench question is a whole instruction, as ecinstruct.from_shopbench makes it
        return ALPACA_TEMPLATE.format(instruction=question.input_field, input="", options="", output="")
    raise UserError(f"{fmt!r} is not a prompt format ({', '.join(FORMATS)})")


# ------------------------------------------------------------------ training


def row_question(row: dict) -> str:
    """An ECInstruct row's instruction, input and options as one question text."""
    return "\n".join(part for part in (row["instruction"], row["input"], options_text(row["options"])) if part)


def training_text(row: dict, fmt: str, tokenizer) -> str:
    """An ECInstruct row as one training text: the prompt in `fmt`, the answer, the end of the turn."""
    output, eos = str(row["output"]), tokenizer.eos_token
    if fmt == "alpaca":
        return alpaca_prompt(row, eos)
    question = row_question(row)
    # multiple choice: options of its own, or a ShopBench question (merged as a whole) ending in "Answer:"
    multiple_choice = bool(row["options"]) or question.rstrip().endswith(ANSWER)
    user = _user_text(question, multiple_choice)
    if fmt == "raw":  # a multiple-choice question ends in "Answer:" as ShopBench's do
        if multiple_choice:
            user = user.rstrip() if user.rstrip().endswith(ANSWER) else f"{user}\n{ANSWER}"
        return f"{SYSTEM_PROMPT}\n\n{user}{output}{eos}"
    if fmt == "chat":
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user},
            {"role": "assistant", "content": output},
        ]
        return _chat(tokenizer, messages, add_generation_prompt=False)
    raise UserError(f"{fmt!r} is not a prompt format ({', '.join(FORMATS)})")
