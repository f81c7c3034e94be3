"""A tiny random-weight llama written as GGUF (SmolLM2's tokenizer, a few small layers) for unit tests.

llama.cpp and MLX both load it, so tests can compare them without the real 135M model's cost.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pudl.models import resolve_model_path


def write_tiny_gguf(path: Path, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    ffn: int = 128, quantize: bool = True) -> Path:
    """Write a tiny llama GGUF (Q4_1 blocks and a Q8_0 embedding when `quantize`, else F32)."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize as gquant

    source = gguf.GGUFReader(str(resolve_model_path("smollm2-135m")))
    rng = np.random.default_rng(seed)
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if quantize else gguf.LlamaFileType.ALL_F32)
    for field in source.fields.values():
        if field.name.startswith("tokenizer."):
            value = field.contents()
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(field.name, value, vtype, sub_type=sub)

    def add(name, shape, scale, qtype):
        x = (rng.standard_normal(shape) * scale).astype(np.float32)
        if quantize and qtype is not None:
            w.add_tensor(name, gquant(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, x)

    head_dim = hidden // heads
    add("token_embd.weight", (vocab, hidden), 0.5, Q.Q8_0)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        add(f"blk.{i}.attn_q.weight", (heads * head_dim, hidden), 0.2, Q.Q4_1)
        add(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden), 0.2, Q.Q4_1)
        add(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden), 0.2, Q.Q4_1)
        add(f"blk.{i}.attn_output.weight", (hidden, heads * head_dim), 0.2, Q.Q4_1)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        add(f"blk.{i}.ffn_gate.weight", (ffn, hidden), 0.2, Q.Q4_1)
        add(f"blk.{i}.ffn_up.weight", (ffn, hidden), 0.2, Q.Q4_1)
        add(f"blk.{i}.ffn_down.weight", (hidden, ffn), 0.2, Q.Q4_1)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
