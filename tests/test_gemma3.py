"""Gemma 3 (text): mlx-lm's gemma3_text model on a GGUF, against llama.cpp on the same tiny random file.

Tolerance: llama.cpp computes GELU through float16 tables (ggml's GGML_GELU_FP16), so beside the float32
summation-order gap of the other archs (max < 1e-3, tests/test_quant_types.py) its MLP activations are rounded to
float16. Measured on this model: max 1.7e-3, mean 2.3e-4; rounding MLX's GELU input and output to float16 the
same way cuts the mean to 7e-5. Asserted: max < 5e-3, mean < 1e-3. The layouts the port must get right each
move the log-probs far more (checked below: all layers global instead of sliding 0.56 mean, norms without
Gemma's +1 more still).
"""

import mlx.core as mx
import numpy as np
import pytest

from pudl.adapters import write_gguf_lora
from pudl.models import Tokenizer, load_student
from pudl.prompts import Prompt, chat_messages
from tests.test_quant_types import TARGETS, llama_logprobs, llama_quantize, mlx_logprobs, check_against_llama_cpp
from tests.tiny_gguf import write_tiny_gemma3_gguf

MAX, MEAN = 5e-3, 1e-3


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return write_tiny_gemma3_gguf(tmp_path_factory.mktemp("gemma3") / "gemma3.gguf", seed=1)


@pytest.fixture(scope="module")
def tokens(gemma3):
    tok = Tokenizer(gemma3)
    prompt = chat_messages(Prompt("x", "Name three colours of the rainbow and explain why."))
    out = tok.chat_tokens(prompt) + tok.answer_tokens("Red, green and blue.")
    assert len(out) > 4 * 8  # several times the sliding window, so windowed and global layers differ
    return out


def gaps(a, b):
    return np.abs(a - b).max(), np.abs(a - b).mean()


def test_gemma3_matches_llama_cpp_and_the_layout_matters(gemma3, tokens):
    student = load_student(gemma3, 4, 8.0, TARGETS)
    assert student.args.tie_word_embeddings and "lm_head" not in student.model
    ref, got = llama_logprobs(gemma3, tokens), mlx_logprobs(student, tokens)
    worst, mean = gaps(ref, got)
    print(f"gemma3 vs llama.cpp: max {worst:.1e} mean {mean:.1e}")
    assert worst < MAX and mean < MEAN
    assert (ref.argmax(-1) == got.argmax(-1)).mean() > 0.9
    inner = student.model.model
    inner.sliding_window_pattern = 1  # every layer global: the wrong attention span for 5 of the 6
    assert gaps(ref, mlx_logprobs(student, tokens))[1] > 50 * MEAN
    inner.sliding_window_pattern = 6
    norm = inner.layers[0].post_feedforward_layernorm
    norm.weight = norm.weight + 1.0  # the GGUF's stored 1 + w read as w: Gemma's norm would add the 1 twice
    assert gaps(ref, mlx_logprobs(student, tokens))[1] > 50 * MEAN


def test_gemma3_training_path_sees_gemmas_forward(gemma3, tokens):
    # pudl.sequences runs embed_tokens -> layers -> norm itself: the sqrt(hidden) scale must be in embed_tokens.
    # Within one sliding window (8 tokens here) the causal mask it uses is Gemma's mask for every layer.
    from pudl.sequences import completion_logprobs

    student = load_student(gemma3, 4, 8.0, TARGETS)
    context, completion = tokens[:5], tokens[5:8]
    full = mlx_logprobs(student, context + completion)
    want = full[np.arange(len(context) - 1, len(context) + len(completion) - 1), completion]
    got = completion_logprobs(student, [(context, completion)])[0]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_gemma3_gguf_lora_names_are_llama_cpps(gemma3, tokens, tmp_path):
    student = load_student(gemma3, 4, 8.0, TARGETS, seed=1)
    for layer in student.lora_layers.values():
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.3
    write_gguf_lora(student, tmp_path / "a.gguf")
    base, lora = llama_logprobs(gemma3, tokens), llama_logprobs(gemma3, tokens, lora=tmp_path / "a.gguf")
    with_lora = mlx_logprobs(student, tokens)
    moved, apart = np.abs(lora - base).mean(), np.abs(lora - with_lora).mean()
    print(f"gemma3 LoRA moved llama.cpp by {moved:.3f} mean; llama.cpp vs MLX with it {apart:.1e}")
    assert moved > 0.5 and apart < 0.02 * moved  # llama.cpp applies every tensor as MLX does


def test_gemma3_on_a_k_quant(gemma3, tokens):
    path = llama_quantize(gemma3, gemma3.with_name("gemma3-Q4_K_M.gguf"), "Q4_K_M")
    check_against_llama_cpp(path, tokens, {"Q4_K"}, float_bound=MAX)
