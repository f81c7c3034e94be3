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


def llama_quantize(src: Path, dst: Path, ftype: str, pure: bool = False, embedding_type: int = -1) -> Path:
    """`dst` = `src` quantized by llama.cpp (`llama_model_quantize`) to llama_ftype `ftype` ("Q4_K_M", "F32"...).

    The very-low-bit IQ types refuse to run without an importance matrix: they get a uniform one (all ones),
    which weighs every column alike, as quantizing without one does for the other types. `pure`: every 2-D
    tensor at the ftype's base type; `embedding_type`: a ggml type for token_embd (-1: llama.cpp's choice)."""
    import ctypes

    import llama_cpp

    from pudl.gguf_quants import read_header
    from pudl.llamacpp import quiet_stderr

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if ftype == "F32" else f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize, params.pure, params.nthread = True, pure, 2
    if embedding_type >= 0:  # the default (GGML_TYPE_COUNT) means llama.cpp's choice
        params.token_embedding_type = embedding_type
    keep = []  # the imatrix rows must outlive the call
    if ftype.startswith(("IQ1", "IQ2", "IQ3_XXS", "IQ3_XS", "Q2_K_S")):
        _, tensors = read_header(src)
        rows = [t for t in tensors if len(t.shape) == 2]
        entries = (llama_cpp.llama_model_imatrix_data * (len(rows) + 1))()  # ends with a NULL name
        for entry, t in zip(entries, rows):
            n = t.shape[-1]  # one importance per column (ggml's ne0)
            ones = (ctypes.c_float * n)(*([1.0] * n))
            keep.append(ones)
            entry.name, entry.data, entry.size = t.name.encode(), ctypes.cast(ones, ctypes.POINTER(ctypes.c_float)), n
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(entries)
    with quiet_stderr():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) failed with {rc}")
    return dst


def write_tiny_gemma3_gguf(path: Path, seed: int = 0, hidden: int = 256, layers: int = 6, heads: int = 4,
                           kv_heads: int = 1, head_dim: int = 64, ffn: int = 512, window: int = 8) -> Path:
    """A tiny random Gemma 3 (text) GGUF at F32, laid out as llama.cpp's converter writes one: norm weights stored
    as 1 + w, q/k rows unpermuted, tied head. SmolLM2's tokenizer (llama.cpp does not tie tokenizers to archs).
    With 6 layers the last one attends globally and the others in a `window`-token sliding window."""
    import gguf

    source = gguf.GGUFReader(str(resolve_model_path("smollm2-135m")))
    rng = np.random.default_rng(seed)
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    w = gguf.GGUFWriter(str(path), arch="gemma3")
    w.add_context_length(1024)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(window)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for field in source.fields.values():
        if field.name.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)

    def mat(name, shape, scale):
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    def norm(name, n):  # Gemma's (1 + w) scale, stored with the 1 added as llama.cpp's converter does
        w.add_tensor(name, (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32))

    mat("token_embd.weight", (vocab, hidden), 0.05)
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight", hidden)
        mat(f"blk.{i}.attn_q.weight", (heads * head_dim, hidden), 0.1)
        mat(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden), 0.1)
        mat(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden), 0.1)
        norm(f"blk.{i}.attn_q_norm.weight", head_dim)
        norm(f"blk.{i}.attn_k_norm.weight", head_dim)
        mat(f"blk.{i}.attn_output.weight", (hidden, heads * head_dim), 0.1)
        norm(f"blk.{i}.post_attention_norm.weight", hidden)
        norm(f"blk.{i}.ffn_norm.weight", hidden)
        mat(f"blk.{i}.ffn_gate.weight", (ffn, hidden), 0.1)
        mat(f"blk.{i}.ffn_up.weight", (ffn, hidden), 0.1)
        mat(f"blk.{i}.ffn_down.weight", (hidden, ffn), 0.1)
        norm(f"blk.{i}.post_ffw_norm.weight", hidden)
    norm("output_norm.weight", hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
