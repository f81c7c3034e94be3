"""MLX student vs llama.cpp on the same GGUF: same next-token log-probs, same LoRA effect."""

import mlx.core as mx
import numpy as np
import pytest

from pudl.adapters import read_gguf_lora, write_gguf_lora
from pudl.models import Tokenizer, load_student
from pudl.prompts import Prompt, chat_messages

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_logprobs(path, tokens, lora=None):
    from pudl.llamacpp import open_llama

    kwargs = {"lora_path": str(lora)} if lora else {}
    llm = open_llama(path, n_ctx=256, logits_all=True, n_threads=2, **kwargs)
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], np.float64)
    llm.close()
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)


def mlx_logprobs(student, tokens):
    hidden = student.hidden(mx.array([tokens]))
    logits = (hidden @ student.head_weight.T).astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True), np.float64)[0]


def chat(tokenizer, text="What is the capital of France? Reply with one word."):
    return tokenizer.chat_tokens(chat_messages(Prompt("x", text)))


def test_tiny_f32_model_matches_llama_cpp_and_rope_layout_matters(tiny_gguf_f32):
    tok = Tokenizer(tiny_gguf_f32)
    tokens = chat(tok)
    student = load_student(tiny_gguf_f32, 4, 8.0, TARGETS)
    ref, got = llama_logprobs(tiny_gguf_f32, tokens), mlx_logprobs(student, tokens)
    assert np.abs(ref - got).mean() < 0.01  # llama.cpp keeps its KV cache in float16
    assert (ref.argmax(-1) == got.argmax(-1)).mean() > 0.95
    for layer in student.model.model.layers:
        layer.self_attn.rope.traditional = False  # the wrong layout for GGUF q/k rows
    assert np.abs(ref - mlx_logprobs(student, tokens)).mean() > 0.5


def test_tiny_quantized_model_matches_llama_cpp(tiny_gguf):
    tok = Tokenizer(tiny_gguf)
    tokens = chat(tok)
    student = load_student(tiny_gguf, 4, 8.0, TARGETS)
    ref, got = llama_logprobs(tiny_gguf, tokens), mlx_logprobs(student, tokens)
    # llama.cpp also quantizes activations to 8 bits inside its Q4_1 dot products (measured: ~0.1 nats mean)
    assert np.abs(ref - got).mean() < 0.25
    assert (ref.argmax(-1) == got.argmax(-1)).mean() > 0.85


def test_gguf_lora_changes_llama_cpp_like_it_changes_mlx(tiny_gguf_f32, tmp_path):
    tiny_gguf = tiny_gguf_f32
    tok = Tokenizer(tiny_gguf)
    tokens = chat(tok, "Name an animal.")
    student = load_student(tiny_gguf, 4, 8.0, TARGETS, seed=1)
    for layer in student.lora_layers.values():
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.2
    base_llama = llama_logprobs(tiny_gguf, tokens)
    with_lora = mlx_logprobs(student, tokens)
    path = tmp_path / "a.gguf"
    write_gguf_lora(student, path)
    lora_llama = llama_logprobs(tiny_gguf, tokens, lora=path)
    gap_base = np.abs(lora_llama - base_llama).mean()
    gap_mlx = np.abs(lora_llama - with_lora).mean()
    assert gap_base > 0.5 and gap_mlx < 0.2 * gap_base  # the adapter matters, and llama.cpp applies it as MLX does
    student.set_adapter(False)
    assert np.abs(mlx_logprobs(student, tokens) - base_llama).mean() < 0.2 * gap_base  # disabled = base model


def test_gguf_lora_reads_back(tiny_gguf, tmp_path):
    student = load_student(tiny_gguf, 4, 8.0, ["q_proj", "down_proj"], seed=2)
    for layer in student.lora_layers.values():
        layer.lora_b = mx.random.normal(layer.lora_b.shape)
    write_gguf_lora(student, tmp_path / "a.gguf")
    lora = read_gguf_lora(tmp_path / "a.gguf")
    assert (lora.rank, lora.alpha, lora.targets) == (4, 8.0, ["down_proj", "q_proj"])
    for name, value in student.lora_state().items():
        assert np.array_equal(np.array(value), np.array(lora.state[name])), name


@pytest.mark.integration
def test_smollm2_mlx_matches_llama_cpp(smollm2):
    tok = Tokenizer(smollm2)
    tokens = chat(tok) + tok.answer_tokens("Paris")
    student = load_student(smollm2, 8, 16.0, TARGETS)
    ref, got = llama_logprobs(smollm2, tokens), mlx_logprobs(student, tokens)
    diff = np.abs(ref[:-1] - got[:-1])
    taken = np.abs(ref[np.arange(len(tokens) - 1), tokens[1:]] - got[np.arange(len(tokens) - 1), tokens[1:]])
    print(f"mean |dlogp| over vocab {diff.mean():.4f}; on the text's tokens mean {taken.mean():.3f} max {taken.max():.3f}")
    assert taken.mean() < 0.1 and taken.max() < 0.6
    assert (ref.argmax(-1) == got.argmax(-1)).mean() > 0.8


def test_quantized_weights_mode_matches_float32(tiny_gguf):
    """student.weights = "quantized" (base weights kept as in the GGUF, dequantized at each use) computes the same
    log-probs and LoRA gradients as dequantizing once, and really keeps the weights quantized."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from pudl.models import DequantizingLinear
    from pudl.sequences import batch_token_logprobs, pack

    targets = ["q_proj", "v_proj", "down_proj"]
    dense, lean = (load_student(tiny_gguf, 4, 8.0, targets, seed=3, weights=w) for w in ("float32", "quantized"))
    assert any(isinstance(m, DequantizingLinear) for _, m in lean.model.named_modules())
    assert not any(isinstance(m, DequantizingLinear) for _, m in dense.model.named_modules())
    dense_bytes, lean_bytes = (sum(v.nbytes for _, v in tree_flatten(s.model.model.layers[0].parameters()))
                               for s in (dense, lean))
    assert lean_bytes < dense_bytes / 2
    rng = np.random.default_rng()
    for layer_d, layer_l in zip(dense.lora_layers.values(), lean.lora_layers.values()):
        b = mx.array(rng.normal(size=layer_d.lora_b.shape).astype(np.float32) * 0.1)
        layer_d.lora_b, layer_l.lora_b = b, b
    seqs = [([int(x) for x in rng.integers(0, 200, 9)], [int(x) for x in rng.integers(0, 200, n)]) for n in (3, 5)]
    batch = pack(seqs)
    results = []
    for student in (dense, lean):
        def loss(_model, student=student):
            return batch_token_logprobs(student, batch, grad_ready=True).sum()
        value, grads = nn.value_and_grad(student.model, loss)(student.model)
        results.append((float(value), dict(tree_flatten(grads))))
    (v_d, g_d), (v_l, g_l) = results
    assert abs(v_d - v_l) <= 1e-5 * abs(v_d)
    assert g_d.keys() == g_l.keys() and g_d
    for key in g_d:
        ref = np.array(g_d[key])
        assert np.abs(np.array(g_l[key]) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), key
    with pytest.raises(Exception, match="student.weights"):
        load_student(tiny_gguf, 4, 8.0, targets, weights="int3")
