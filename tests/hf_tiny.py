"""Tiny random-weight Hugging Face model directories (llama, mistral, qwen2, qwen3), built in-process for tests.

Each directory has what a hub checkpoint has: config.json, float32 model.safetensors, a byte-level BPE
tokenizer.json trained here with the `tokenizers` library (the family's real pre-tokenizer regex), and
tokenizer_config.json with the special tokens and a chat template. No network.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pudl.convert import _LLAMA3_RE, _QWEN2_RE

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
           "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")

# family -> (pre-tokenizer regex, special tokens, bos, eos, pad, chat template)
FAMILIES = {
    "llama": (_LLAMA3_RE, ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
              "<|begin_of_text|>", "<|eot_id|>", None, LLAMA3),
    "mistral": (_LLAMA3_RE, ["<unk>", "<s>", "</s>"], "<s>", "</s>", None, MISTRAL),
    "qwen2": (_QWEN2_RE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>",
              CHATML),
    "qwen3": (_QWEN2_RE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>",
              CHATML),
}
CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "Name an animal. The cat sat on the mat, and the dog didn't.",
    "Reply with one word. I'll answer: 12 + 30 = 42, and 7 x 6 = 42 too.",
    "The quick brown fox jumps over the lazy dog.\n\nNew paragraph, with    spaces and\ttabs.",
    "You are a helpful assistant. We're sure they've said it's fine.",
]


def train_tokenizer(family: str, vocab_size: int = 360):
    """A byte-level BPE tokenizers.Tokenizer with the family's pre-tokenizer and special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    regex, specials = FAMILIES[family][:2]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def write_tiny_hf(path: Path, family: str, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                  kv_heads: int = 2, ffn: int = 128, head_dim: int | None = None, tie: bool | None = None,
                  rope_scaling: dict | None = None, vocab_size: int | None = None) -> Path:
    """Write a tiny random `family` model as a Hugging Face directory at `path`; returns `path`."""
    import mlx.core as mx

    regex, specials, bos, eos, pad, template = FAMILIES[family]
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(family)
    tok.save(str(path / "tokenizer.json"))
    n_tok = tok.get_vocab_size()
    vocab = max(vocab_size or 0, (n_tok + 31) // 32 * 32 + 32)  # padded embedding rows, as real checkpoints have
    head_dim = head_dim or hidden // heads
    tie = (family in ("qwen2", "llama")) if tie is None else tie
    ids = tok.get_vocab()
    config = {
        "model_type": family, "architectures": ["X"], "hidden_size": hidden, "num_hidden_layers": layers,
        "intermediate_size": ffn, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-6, "vocab_size": vocab, "max_position_embeddings": 512, "rope_theta": 10000.0,
        "tie_word_embeddings": tie, "eos_token_id": ids[eos], "torch_dtype": "float32",
    }
    if bos:
        config["bos_token_id"] = ids[bos]
    if head_dim != hidden // heads or family == "qwen3":
        config["head_dim"] = head_dim
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    (path / "config.json").write_text(json.dumps(config, indent=1))
    tok_config = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "chat_template": template,
                  "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast",
                  "model_max_length": 512}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1))

    rng = np.random.default_rng(seed)

    def normal(shape, scale):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t = {"model.embed_tokens.weight": normal((vocab, hidden), 0.5), "model.norm.weight": norm(hidden)}
    if not tie:
        t["lm_head.weight"] = normal((vocab, hidden), 0.2)
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(hidden)
        t[p + "post_attention_layernorm.weight"] = norm(hidden)
        t[p + "self_attn.q_proj.weight"] = normal((heads * head_dim, hidden), 0.2)
        t[p + "self_attn.k_proj.weight"] = normal((kv_heads * head_dim, hidden), 0.2)
        t[p + "self_attn.v_proj.weight"] = normal((kv_heads * head_dim, hidden), 0.2)
        t[p + "self_attn.o_proj.weight"] = normal((hidden, heads * head_dim), 0.2)
        if family == "qwen2":
            for name, rows in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                t[p + f"self_attn.{name}_proj.bias"] = normal(rows * head_dim, 0.5)
        if family == "qwen3":
            t[p + "self_attn.q_norm.weight"] = norm(head_dim)
            t[p + "self_attn.k_norm.weight"] = norm(head_dim)
        t[p + "mlp.gate_proj.weight"] = normal((ffn, hidden), 0.2)
        t[p + "mlp.up_proj.weight"] = normal((ffn, hidden), 0.2)
        t[p + "mlp.down_proj.weight"] = normal((hidden, ffn), 0.2)
    mx.save_safetensors(str(path / "model.safetensors"), {k: mx.array(v) for k, v in t.items()},
                        metadata={"format": "pt"})
    return path


def measure(seeds: int = 3):
    """Print MLX-student vs llama.cpp and vs mlx-lm-on-HF log-prob gaps per family and quantization (docs/models.md)."""
    import tempfile

    from pudl.convert import hf_to_gguf
    from pudl.models import Tokenizer, load_student
    from tests.test_convert import FAMILIES as SHAPES
    from tests.test_convert import chat_tokens, hf_logprobs, llama_cpp_logprobs, student_logprobs

    root = Path(tempfile.mkdtemp())
    print("family seed quant | vs llama.cpp: mean max argmax-agree | vs HF (mlx-lm): mean max")
    for seed in range(seeds):
        for family, shape in SHAPES.items():
            src = write_tiny_hf(root / f"{family}{seed}", family, seed=seed, **shape)
            for quant in ("f32", "f16", "q8_0", "q4_0"):
                path = hf_to_gguf(src, quant, root / "cache")
                tokens = chat_tokens(Tokenizer(path))
                got = student_logprobs(load_student(path, 4, 8.0, ["q_proj"]), tokens)
                lcpp, hf = np.abs(got - llama_cpp_logprobs(path, tokens)), np.abs(got - hf_logprobs(src, tokens))
                agree = (got.argmax(-1) == llama_cpp_logprobs(path, tokens).argmax(-1)).mean()
                print(f"{family:8s} {seed} {quant:5s} | {lcpp.mean():.2e} {lcpp.max():.2e} {agree:.2f} | "
                      f"{hf.mean():.2e} {hf.max():.2e}", flush=True)


def measure_conversion(quants=("q8_0", "q4_0")):
    """Time hf_to_gguf on a random model with Qwen2.5-0.5B's shapes: first conversion and a cached lookup."""
    import shutil
    import tempfile
    import time

    from pudl.convert import hf_to_gguf

    root = Path(tempfile.mkdtemp())
    try:
        src = write_tiny_hf(root / "q05", "qwen2", hidden=896, layers=24, heads=14, kv_heads=2, ffn=4864,
                            vocab_size=151936)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e6
        print(f"safetensors {size:.0f} MB", flush=True)
        for quant in quants:
            t = time.time()
            path = hf_to_gguf(src, quant, root / "cache")
            first = time.time() - t
            t = time.time()
            hf_to_gguf(src, quant, root / "cache")
            print(f"{quant}: convert {first:.1f} s, cached lookup {time.time() - t:.2f} s, "
                  f"{path.stat().st_size / 1e6:.0f} MB", flush=True)
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    import sys

    measure_conversion() if sys.argv[1:] == ["convert"] else measure()
