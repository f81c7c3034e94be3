"""Every tensor type llama.cpp writes: the MLX student computes with exactly llama.cpp's dequantized weights.

A tiny random llama (rows of 256, as K- and IQ-quants need) is quantized by llama.cpp's own quantizer to each
type (every tensor at that type, the embedding too), and dequantized back to F32 by llama.cpp too: the student's weights must equal those bit for bit, and its
next-token log-probs must match llama.cpp's on that F32 file to float32 rounding.

Tolerances. (1) Against llama.cpp on the F32 dequantization (float32 KV cache, no flash attention) both sides
compute with the same weights in float32, so only summation order differs: measured max 2e-4 to 7.5e-4 over
the whole vocabulary at every position (these random models' sharp logits amplify float32 rounding); asserted
< 2e-3, while a wrong layout moves the log-probs by > 0.05 mean (the weights themselves are compared bit for bit). (2) Against llama.cpp computing on the quantized file itself, llama.cpp
adds an error of its own: its quantized dot products round the activations to 8 bits (Q8_0 / Q8_K). That error
is measured in the test, per type, as llama.cpp's quantized-vs-F32 gap on the same weights, and the student may
be no further from llama.cpp's quantized log-probs than that gap plus the bound of (1).
"""

import mlx.core as mx
import numpy as np
import pytest

from pudl.adapters import write_gguf_lora
from pudl.errors import UserError
from pudl.gguf_quants import read_header
from pudl.models import Tokenizer, load_gguf_weights, load_student
from pudl.prompts import Prompt, chat_messages
from tests.tiny_gguf import llama_quantize

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FLOAT_BOUND = 2e-3  # (1) above

# ggml tensor type -> the llama_ftype whose `pure` quantization writes every 2-D weight at that type
PURE = {"BF16": "BF16", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0",
        "Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K",
        "IQ2_XXS": "IQ2_XXS", "IQ3_XXS": "IQ3_XXS", "IQ3_S": "IQ3_S", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS",
        "TQ1_0": "TQ1_0", "TQ2_0": "TQ2_0", "MXFP4": "MXFP4_MOE"}
# llama.cpp sets up these grids once per process (IQ1_S and IQ1_M share one) and searches them slowly: 4-11 s
# per file on a 2-core machine, so they run with the integration tests
SLOW = {"IQ1_S": "IQ1_S", "IQ1_M": "IQ1_M", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_M"}
TYPES = [*PURE, *(pytest.param(t, marks=pytest.mark.integration) for t in SLOW)]


@pytest.fixture(scope="module")
def f16(tmp_path_factory):
    """A tiny random llama (rows of 256; a 360-token BPE vocabulary, so every tensor quantizes and loads in
    milliseconds) as an F16 GGUF written by pudl's converter: q/k rows permuted for llama.cpp's rope."""
    from pudl.convert import hf_to_gguf
    from tests.hf_tiny import write_tiny_hf

    root = tmp_path_factory.mktemp("ktiny")
    src = write_tiny_hf(root / "llama", "llama", seed=3, hidden=256, layers=2, heads=4, kv_heads=2, ffn=512)
    return hf_to_gguf(src, "f16", root / "cache")


@pytest.fixture(scope="module")
def tokens(f16):
    tok = Tokenizer(f16)
    return tok.chat_tokens(chat_messages(Prompt("x", "Name three colours of the rainbow."))) + tok.answer_tokens("Red")


def llama_logprobs(path, tokens, lora=None):
    """llama.cpp's next-token log-probs at every position (float32 KV cache, no flash attention)."""
    from pudl.llamacpp import open_llama

    kwargs = {"lora_path": str(lora)} if lora else {}
    llm = open_llama(path, n_ctx=256, logits_all=True, n_threads=2, type_k=0, type_v=0, flash_attn=False, **kwargs)
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], np.float64)
    llm.close()
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def mlx_logprobs(student, tokens):
    logits = (student.hidden(mx.array([tokens])) @ student.head_weight.T).astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True), np.float64)[0]


def llama_f32_weights(path):
    """The file's tensors as llama.cpp itself dequantizes them (its quantizer writing F32), as the student names
    them (an all-F32 file is read by mx.load, with no decoding of pudl's)."""
    f32 = llama_quantize(path, path.with_suffix(".f32.gguf"), "F32")
    assert {t.type_name for t in read_header(f32)[1]} == {"F32"}
    return f32, {name: np.array(v) for name, v in load_gguf_weights(f32, dequantize=True)[0].items()}


def check_against_llama_cpp(path, tokens, types: set[str], float_bound: float = FLOAT_BOUND):
    """Weights bit-equal to llama.cpp's dequantization; log-probs within the derived bounds. Returns the figures."""
    _, infos = read_header(path)
    assert types <= {t.type_name for t in infos}  # the file holds what the test is about
    f32, want = llama_f32_weights(path)
    weights, _, _ = load_gguf_weights(path, dequantize=True)
    assert set(weights) == set(want)
    for name, value in weights.items():
        np.testing.assert_array_equal(np.array(value), want[name], err_msg=name)
    student = load_student(path, 4, 8.0, TARGETS)
    got, ref_f32, ref_q = mlx_logprobs(student, tokens), llama_logprobs(f32, tokens), llama_logprobs(path, tokens)
    vs_f32 = np.abs(got - ref_f32).max()
    llama_gap, vs_q = np.abs(ref_f32 - ref_q).mean(), np.abs(got - ref_q).mean()
    print(f"{sorted(types)}: vs llama.cpp F32 max {vs_f32:.1e}; vs llama.cpp quantized mean {vs_q:.2e} "
          f"(llama.cpp's own quantized-vs-F32 gap {llama_gap:.2e})")
    assert vs_f32 < float_bound
    assert vs_q <= llama_gap + float_bound
    return student


@pytest.mark.parametrize("ggml_type", TYPES)
def test_each_type_computes_with_llama_cpps_weights(f16, tokens, ggml_type):
    ftype = {**PURE, **SLOW}[ggml_type]
    path = llama_quantize(f16, f16.with_name(f"pure-{ggml_type}.gguf"), ftype, pure=True)
    check_against_llama_cpp(path, tokens, {ggml_type})


def test_f16_file_reads_through_mx_load(f16, tokens):
    _, infos = read_header(f16)
    assert {t.type_name for t in infos} == {"F32", "F16"}  # the mx.load path, no decoding of ours
    check_against_llama_cpp(f16, tokens, {"F16"})


@pytest.fixture(scope="module")
def q4_k_m(f16):
    """llama.cpp's Q4_K_M mix as it chooses it (Q4_K, Q6_K for some ffn_down/attn_v and the embedding)."""
    return llama_quantize(f16, f16.with_name("Q4_K_M.gguf"), "Q4_K_M")


def test_llama_cpp_mix_q4_k_m(q4_k_m, tokens):
    check_against_llama_cpp(q4_k_m, tokens, {"Q4_K", "Q6_K"})


def test_mixed_file_keeps_q4_0_quantized(f16, tokens):
    # llama.cpp's Q4_0 mix stores the embedding as Q6_K, which mx.load would round: the file is read by
    # pudl.gguf_quants, and its Q4_0 layers must still reach MLX as quantized blocks
    path = llama_quantize(f16, f16.with_name("Q4_0-mix.gguf"), "Q4_0")
    assert {t.type_name for t in read_header(path)[1]} == {"F32", "Q4_0", "Q6_K"}
    _, _, quant_bits = load_gguf_weights(path, dequantize=False)
    assert quant_bits and set(quant_bits.values()) == {4}
    quantized = load_student(path, 4, 8.0, TARGETS, weights="quantized")
    dense = load_student(path, 4, 8.0, TARGETS, weights="float32")
    assert np.abs(mlx_logprobs(quantized, tokens) - mlx_logprobs(dense, tokens)).max() < 1e-4


@pytest.mark.parametrize("ftype, bits", [("Q4_K_M", 4), ("Q5_K_M", 5), ("Q5_0", 5), ("Q5_1", 5)])
def test_affine_types_stay_quantized_with_llama_cpps_values(f16, tokens, ftype, bits):
    # Q4_K, Q5_K, Q5_0 and Q5_1 are affine in groups of 32 (scale * code + bias): kept as MLX 4/5-bit groups,
    # they dequantize to the bits gguf-py's decoder gives, and the "quantized" student computes as the float32 one
    path = llama_quantize(f16, f16.with_name(f"pure-{ftype}-packed.gguf"), ftype, pure=True)
    packed, _, quant_bits = load_gguf_weights(path, dequantize=False)
    dense = load_gguf_weights(path, dequantize=True)[0]
    assert len(quant_bits) == 14 and set(quant_bits.values()) == {bits}
    for module in quant_bits:
        w = mx.dequantize(packed[module + ".weight"], packed[module + ".scales"], packed[module + ".biases"],
                          group_size=32, bits=bits)
        np.testing.assert_array_equal(np.array(w), np.array(dense[module + ".weight"]), err_msg=module)
    quantized = load_student(path, 4, 8.0, TARGETS, weights="quantized")
    floats = load_student(path, 4, 8.0, TARGETS, weights="float32")
    assert np.abs(mlx_logprobs(quantized, tokens) - mlx_logprobs(floats, tokens)).max() < 1e-4


def test_a_type_gguf_py_cannot_decode_is_one_line_naming_it(f16):
    path = llama_quantize(f16, f16.with_name("Q1_0.gguf"), "Q1_0", pure=True)
    with pytest.raises(UserError, match=r"tensor \S+\.weight of .* has type Q1_0, which gguf-py") as e:
        load_gguf_weights(path, dequantize=True)
    assert "\n" not in str(e.value)


def test_trained_lora_on_q4_k_m_changes_llama_cpp_like_mlx(q4_k_m, tokens, tmp_path):
    from pudl.prefs import Completions, dpo_batches
    from pudl.domain import ANCHOR_IDX, Candidate, Pair
    from pudl.losses import LOSSES
    from pudl.recipe import TrainConfig
    from pudl.train import train

    tok = Tokenizer(q4_k_m)
    student = load_student(q4_k_m, 4, 8.0, TARGETS, seed=1)
    prompts = [Prompt(f"p{i}", f"Question number {i}?") for i in range(4)]
    anchors = {p.id: f"Answer {i}: blue" for i, p in enumerate(prompts)}
    rng = np.random.default_rng(0)
    cands = {p.id: [Candidate(p.id, 0, "", rng.integers(40, 300, 5).astype(np.int32), np.zeros(5, np.float32),
                              "length")] for p in prompts}
    comp = Completions({p.id: p for p in prompts}, anchors, cands, tok)
    pairs = [Pair(p.id, "anchor-vs-worst", ANCHOR_IDX, 0, None) for p in prompts]
    from pudl.prefs import needed_references
    from pudl.sequences import completion_logprobs

    keys = needed_references("dpo", pairs, [])
    refs = dict(zip(keys, completion_logprobs(student, [comp.sequence(*k) for k in keys], adapter=False)))
    cfg = TrainConfig(algo="dpo", learning_rate=5e-3, epochs=4, batch_size=2, beta=0.5)
    batches, skipped = dpo_batches(pairs, refs, comp, cfg, seed=0)
    assert skipped == 0
    before = llama_logprobs(q4_k_m, tokens)
    train(student, batches, LOSSES["dpo"], cfg, checkpoint_dir=tmp_path / "ckpt", fingerprint="q4km")
    write_gguf_lora(student, tmp_path / "lora.gguf")
    after, trained = llama_logprobs(q4_k_m, tokens, lora=tmp_path / "lora.gguf"), mlx_logprobs(student, tokens)
    student.set_adapter(False)
    base = mlx_logprobs(student, tokens)
    # the adapter's effect on each side (llama.cpp's own activation rounding cancels out of the difference)
    moved, apart = np.abs(after - before).mean(), np.abs((after - before) - (trained - base)).mean()
    print(f"LoRA moved llama.cpp's log-probs by {moved:.3f} mean; its effect differs from MLX's by {apart:.3f}")
    assert moved > 0.05 and apart < 0.25 * moved


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_other_archs_on_a_k_quant_mix(family, tmp_path):
    # the decoding is the same for every arch; what differs is the layout the student puts it in (qwen2's
    # biases and NEOX rope on unpermuted rows, qwen3's q/k norms), checked here on llama.cpp's Q4_K_M mix
    from pudl.convert import hf_to_gguf
    from tests.hf_tiny import write_tiny_hf

    src = write_tiny_hf(tmp_path / family, family, seed=5, hidden=256, layers=2, heads=4, kv_heads=2, ffn=512)
    f32 = hf_to_gguf(src, "f32", tmp_path / "cache")
    path = llama_quantize(f32, tmp_path / f"{family}-Q4_K_M.gguf", "Q4_K_M")
    tok = Tokenizer(path)
    tokens = tok.chat_tokens(chat_messages(Prompt("x", "Name three colours."))) + tok.answer_tokens("Red")
    check_against_llama_cpp(path, tokens, {"Q4_K"})
