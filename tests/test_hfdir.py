"""write_hf_dir: the Hugging Face directory computes what pudl's student computes and tokenizes like llama.cpp."""

from __future__ import annotations

import json
import random

import mlx.core as mx
import numpy as np
import pytest

from pudl.errors import UserError
from pudl.hfdir import GGUFModel, permute_rope, unpermute_rope, write_hf_dir

PIECES = ["Hello", " world", "!", " 12345", "3.14", "\n", "\n\n", "  ", "\t", "don't", " I'll", "日本語", "é",
          "🎉", "<|im_start|>", "<|im_end|>", "user", "  x  ", "ABC", "def(", ")", "...", "'s", "0", "Ünï"]


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12)))


def log_softmax(x: mx.array) -> np.ndarray:
    x = x.astype(mx.float32)
    return np.array(x - mx.logsumexp(x, axis=-1, keepdims=True))


@pytest.fixture(scope="module")
def hf_dir(tiny_gguf, tmp_path_factory):
    return write_hf_dir(tiny_gguf, tmp_path_factory.mktemp("hf") / "tiny-hf")


def test_unpermute_inverts_permute():
    rng = np.random.default_rng()
    heads, head_dim = int(rng.integers(1, 5)), 2 * int(rng.integers(2, 6))
    w = rng.standard_normal((heads * head_dim, 7)).astype(np.float32)
    assert np.array_equal(unpermute_rope(permute_rope(w, heads), heads), w)
    # llama.cpp rotates rows (2i, 2i+1) of a head together, Hugging Face rows (i, i + head_dim/2)
    gguf_rows = permute_rope(w, heads)
    half = head_dim // 2
    for h in range(heads):
        for i in range(half):
            assert np.array_equal(gguf_rows[h * head_dim + 2 * i], w[h * head_dim + i])
            assert np.array_equal(gguf_rows[h * head_dim + 2 * i + 1], w[h * head_dim + half + i])


def test_files_and_config(hf_dir, tiny_gguf):
    names = {p.name for p in hf_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "special_tokens_map.json"} <= names
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (64, 2, 2)
    assert config["tie_word_embeddings"] is True
    tok_config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in tok_config["chat_template"]
    with pytest.raises(UserError, match="not empty"):
        write_hf_dir(tiny_gguf, hf_dir)


def gguf_layout_reference(gguf_path, config: dict, deltas: dict | None = None):
    """The model pudl computes: exact float32 dequantized GGUF tensors in GGUF (rope-permuted) row order with
    llama.cpp's interleaved rope, independent of write_hf_dir's unpermuting; `deltas` (GGUF name -> [out, in]
    float64) are added to the weights first."""
    from mlx_lm.models import llama

    from pudl.models import _mlx_name

    deltas = deltas or {}
    weights = {_mlx_name(n): mx.array((w + deltas[n]).astype(np.float32) if n in deltas else w)
               for n, w in GGUFModel(gguf_path).float_tensors()}
    args = llama.ModelArgs(
        model_type="llama", hidden_size=config["hidden_size"], num_hidden_layers=config["num_hidden_layers"],
        intermediate_size=config["intermediate_size"], num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"], rms_norm_eps=config["rms_norm_eps"],
        vocab_size=config["vocab_size"], rope_theta=config["rope_theta"], rope_traditional=True,
        tie_word_embeddings=True)
    model = llama.Model(args)
    model.load_weights(list(weights.items()), strict=True)
    return model


def test_mlx_lm_load_matches_student(hf_dir, tiny_gguf):
    import mlx_lm

    from pudl.models import Tokenizer, load_student

    model, hf_tok = mlx_lm.load(str(hf_dir))
    ours = Tokenizer(tiny_gguf)
    ids = ours.chat_tokens([{"role": "user", "content": random_text(random.Random())}])
    x = mx.array([ids])
    got = log_softmax(model(x))
    reference = log_softmax(gguf_layout_reference(tiny_gguf, json.loads((hf_dir / "config.json").read_text()))(x))
    np.testing.assert_allclose(got, reference, atol=2e-4)
    # pudl's student itself (its MLX dequantization rounds weights through float16, hence the wider bound)
    student = load_student(tiny_gguf, 2, 4.0, ["q_proj"], dequantize=True)
    student.set_adapter(False)
    want = log_softmax(student.model(x))
    assert np.array_equal(got.argmax(-1), want.argmax(-1))
    np.testing.assert_allclose(got, want, atol=0.3)
    assert hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                      tokenize=False) == ours.render([{"role": "user", "content": "hi"}])


def test_tokenizer_matches_llama_cpp(hf_dir, tiny_gguf):
    from tokenizers import Tokenizer as HFTokenizer

    from pudl.models import Tokenizer

    hf = HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    ours = Tokenizer(tiny_gguf)
    rng = random.Random()
    for _ in range(40):
        text = random_text(rng)
        ids = ours.encode(text)
        assert hf.encode(text).ids == ids, text
        assert hf.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_other_pre_tokenizers_match_llama_cpp(pre, tiny_gguf, tmp_path):
    """The same vocabulary with another `tokenizer.ggml.pre`: llama.cpp switches regex, so must we."""
    import gguf
    from tokenizers import Tokenizer as HFTokenizer

    from pudl.hfdir import hf_tokenizer
    from pudl.llamacpp import open_llama

    path = tmp_path / f"vocab-{pre}.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    GGUFModel(tiny_gguf).copy_metadata(writer, replace={"tokenizer.ggml.pre": pre})
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    hf = HFTokenizer.from_str(json.dumps(hf_tokenizer(GGUFModel(path))))
    llm = open_llama(path, vocab_only=True)
    rng = random.Random()
    for text in [random_text(rng) for _ in range(30)] + ["x 1234567 y", "a\n\n\nb  c", "it's IT'S"]:
        assert hf.encode(text).ids == llm.tokenize(text.encode(), add_bos=False, special=True), text


def test_reader_agrees_with_gguf_package(tiny_gguf):
    import gguf

    ours, theirs = GGUFModel(tiny_gguf), gguf.GGUFReader(str(tiny_gguf))
    for field in theirs.fields.values():
        if not field.name.startswith("GGUF."):
            assert ours.get(field.name) == field.contents(), field.name
    for t in theirs.tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(ours.tensor(t.name), want.reshape(ours.tensors[t.name][0]))


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(UserError, match="cannot read"):
        write_hf_dir(bad, tmp_path / "out")


@pytest.mark.integration
def test_real_smollm2(smollm2, tmp_path):
    """The built-in SmolLM2: same next-token log-probs through mlx-lm and the same tokens as llama.cpp."""
    import mlx_lm

    from pudl.models import Tokenizer, load_student

    out = write_hf_dir(smollm2, tmp_path / "smollm2-hf")
    model, hf_tok = mlx_lm.load(str(out))
    ours = Tokenizer(smollm2)
    rng = random.Random()
    for _ in range(10):
        text = random_text(rng)
        assert hf_tok.encode(text) == ours.encode(text), text
    x = mx.array([ours.chat_tokens([{"role": "user", "content": "What is the capital of France?"}])])
    got = log_softmax(model(x))
    student = load_student(smollm2, 2, 4.0, ["q_proj"], dequantize=True)
    student.set_adapter(False)
    want = log_softmax(student.model(x))
    assert (got[0, -1].argmax() == want[0, -1].argmax())
    top = np.argsort(want[0, -1])[-20:]  # the float16 rounding in the student's weights moves far tails most
    np.testing.assert_allclose(got[0, -1, top], want[0, -1, top], atol=0.05)
