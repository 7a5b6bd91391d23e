"""Prompt-side logic of the infer stage (the generation itself runs in the DVC end-to-end test)."""

import pytest

from shoptune import UserError
from stages.infer import digit_token_ids, option_numbers


def test_option_numbers_come_from_the_question():
    question = "Which one?\n0. red\n1. blue\n2) green\nAnswer:"
    assert option_numbers(question) == ["0", "1", "2"]
    assert option_numbers("Pick the best one. 12 options in 2024") == [str(d) for d in range(10)]


class CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_digits_must_be_single_tokens():
    assert digit_token_ids(CharTokenizer(), ["0", "3"]) == [48, 51]
    with pytest.raises(UserError, match="splits the digit '10' into 2 tokens"):
        digit_token_ids(CharTokenizer(), ["10"])


def test_long_prompts_are_cut_from_the_left_keeping_bos():
    from stages.infer import fit_to_context

    assert fit_to_context([1, 2, 3], 5, None) == [1, 2, 3]
    assert fit_to_context([1, 2, 3, 4, 5, 6], 4, None) == [3, 4, 5, 6]  # the end holds options and instruction
    assert fit_to_context([9, 2, 3, 4, 5, 6], 4, 9) == [9, 4, 5, 6]
    assert fit_to_context([2, 3, 4, 5, 6], 4, 9) == [3, 4, 5, 6]


NO_CUDA_BEFORE_VLLM = """
import sys
from pathlib import Path
import torch

def guard(*args, **kwargs):
    if "vllm" not in sys.modules:
        raise SystemExit("CUDA touched before vLLM was imported")
    return False

torch.cuda.is_available = guard
torch.cuda.init = guard
torch.cuda.device_count = lambda: guard() or 0
torch.cuda.is_bf16_supported = guard
from shoptune.profile import InferParams, Sampling
from stages.infer import generate_vllm

s = Sampling(1, 0.0, 1.0, -1)
p = InferParams("vllm", "padded", "q", 2, "float32", 1, 64, 0.3, 0, False, s, s)
try:
    generate_vllm(Path(sys.argv[1]), False, ["q"], [True], [None], p)
except Exception as err:  # no model there: vLLM refuses it, after its import
    print("vLLM reached:", type(err).__name__)
"""


def test_the_vllm_backend_touches_no_cuda_before_vllm_is_imported(stage_python, tmp_path):
    """vLLM forks its engine and tensor-parallel workers; a CUDA driver initialized in the parent
    first (torch.cuda.is_available() does that in torch 2.13) makes them fail on a GPU host."""
    import subprocess

    from tests.conftest import ROOT

    result = subprocess.run(
        [stage_python("infer"), "-c", NO_CUDA_BEFORE_VLLM, str(tmp_path / "no-model")],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "CUDA touched before vLLM" not in result.stderr + result.stdout
    assert "vLLM reached:" in result.stdout, result.stderr[-2000:]
