"""A Hugging Face model directory from a llama-family GGUF, so peers (transformers, TRL, PEFT, mlx-lm) load
the very model pudl trains.

Weights are dequantized to float (the GGUF's Q4/Q8 values exactly, not the original checkpoint). GGUF llama
q/k rows are permuted for llama.cpp's interleaved rope; here they are put back in Hugging Face order, where
the model uses the half-split rope, so both compute the same function. The tokenizer is rebuilt from the
GGUF's vocabulary and merges (byte-level BPE) with the pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np

from pudl.errors import UserError

# GGUF tensor stem -> Hugging Face llama parameter ({} = layer index)
GGUF_TO_HF = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "model.layers.{}.input_layernorm",
    "ffn_norm": "model.layers.{}.post_attention_layernorm",
    "attn_q": "model.layers.{}.self_attn.q_proj",
    "attn_k": "model.layers.{}.self_attn.k_proj",
    "attn_v": "model.layers.{}.self_attn.v_proj",
    "attn_output": "model.layers.{}.self_attn.o_proj",
    "ffn_gate": "model.layers.{}.mlp.gate_proj",
    "ffn_up": "model.layers.{}.mlp.up_proj",
    "ffn_down": "model.layers.{}.mlp.down_proj",
}

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), as Hugging Face `tokenizers` pre-tokenizers.
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
PRE_TOKENIZERS = {
    "smollm": [{"type": "Digits", "individual_digits": True}, _split(_GPT2_RE), _BYTE_LEVEL],
    "gpt-2": [_split(_GPT2_RE), _BYTE_LEVEL],
    "default": [_split(_GPT2_RE), _BYTE_LEVEL],
    "llama-bpe": [_split(_LLAMA3_RE), _BYTE_LEVEL],
    "qwen2": [_split(_QWEN2_RE), _BYTE_LEVEL],
}

TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4  # gguf TokenType values of added tokens


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY = 8, 9


class GGUFModel:
    """A llama GGUF: metadata (value and GGUF type per key) and tensors by name.

    Parsed here with `struct` rather than `gguf.GGUFReader`, which takes tens of seconds over a 49k-token
    vocabulary on a slow machine; tensor data is memory-mapped and dequantized with `gguf.quants`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._parse()
        except (OSError, ValueError, KeyError, struct.error, UnicodeDecodeError) as e:
            raise UserError(f"{self.path}: cannot read as GGUF ({e})") from None
        self.arch = self.get("general.architecture")
        if self.arch != "llama":
            raise UserError(f"{self.path}: architecture {self.arch!r} is not supported (llama family only)")

    def _parse(self):
        import gguf

        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = memoryview(self._map)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("no GGUF magic")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        pos = 24
        self.fields: dict[str, tuple] = {}  # key -> (value, gguf type, array item type or None)
        for _ in range(n_kv):
            key, pos = _read_str(buf, pos)
            (vtype,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            value, sub, pos = _read_value(buf, pos, vtype)
            self.fields[key] = (value, vtype, sub)
        infos = []
        for _ in range(n_tensors):
            name, pos = _read_str(buf, pos)
            (n_dims,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            dims, pos = struct.unpack_from(f"<{n_dims}Q", buf, pos), pos + 8 * n_dims
            qtype, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            infos.append((name, tuple(reversed(dims)), gguf.GGMLQuantizationType(qtype), offset))
        alignment = int(self.get("general.alignment", 32))
        start = pos + (-pos % alignment)
        self.tensors = {}  # name -> (numpy shape [.., rows, cols], quantization type, raw bytes)
        for name, shape, qtype, offset in infos:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            n_bytes = int(np.prod(shape)) // block * size
            raw = self._map[start + offset: start + offset + n_bytes]
            if len(raw) != n_bytes:
                raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")
            self.tensors[name] = (shape, qtype, raw)

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        return default if field is None else field[0]

    def hparam(self, key: str, default=None):
        return self.get(f"{self.arch}.{key}", default)

    def tensor(self, name: str) -> np.ndarray:
        """One tensor as float32 in numpy order ([out, in] for a linear weight), dequantized when quantized."""
        from gguf import GGML_QUANT_SIZES
        from gguf.quants import dequantize

        shape, qtype, raw = self.tensors[name]
        block, size = GGML_QUANT_SIZES[qtype]
        rows = raw.reshape(*shape[:-1], shape[-1] // block * size)
        return np.ascontiguousarray(dequantize(rows, qtype), dtype=np.float32).reshape(shape)

    def float_tensors(self, dtype=np.float32):
        """(GGUF name, dequantized array in numpy [out, in] order), one tensor at a time."""
        for name in self.tensors:
            yield name, self.tensor(name).astype(dtype, copy=False)


    def copy_metadata(self, writer, replace: dict | None = None, skip=()):
        """Add this file's metadata to a `gguf.GGUFWriter` (its own GGUF.* header keys and the architecture,
        which the writer sets, left out), with `replace` values (same GGUF type) and without keys in `skip`."""
        replace = replace or {}
        for key, (value, vtype, sub) in self.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture" or key in skip:
                continue
            writer.add_key_value(key, replace.get(key, value), vtype, sub_type=sub)


def _read_str(buf, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return bytes(buf[pos + 8: pos + 8 + n]).decode("utf-8"), pos + 8 + n


def _read_value(buf, pos: int, vtype: int):
    """(value, array item type or None, next position) of one metadata value."""
    if vtype == _STRING:
        value, pos = _read_str(buf, pos)
        return value, None, pos
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack_from(fmt, buf, pos)[0], None, pos + struct.calcsize(fmt)
    if vtype != _ARRAY:
        raise ValueError(f"unknown GGUF value type {vtype}")
    sub, n = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if sub in _NUMPY:
        items = np.frombuffer(buf, dtype=_NUMPY[sub], count=n, offset=pos)
        return items.tolist(), sub, pos + items.nbytes
    values = []
    for _ in range(n):
        value, _, pos = _read_value(buf, pos, sub)
        values.append(value)
    return values, sub, pos


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, rows (pairs interleaved) -> (first halves, second halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face q/k rows -> llama.cpp's interleaved order (the inverse of `unpermute_rope`)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk":
        key = ".".join(parts[2:])
        if key not in GGUF_TO_HF:
            raise UserError(f"GGUF tensor {gguf_name!r} has no Hugging Face llama equivalent")
        return GGUF_TO_HF[key].format(parts[1]) + "." + suffix
    if stem not in GGUF_TO_HF:
        raise UserError(f"GGUF tensor {gguf_name!r} has no Hugging Face llama equivalent")
    return GGUF_TO_HF[stem] + "." + suffix


def hf_weights(model: GGUFModel, dtype=np.float32) -> dict[str, np.ndarray]:
    """All weights dequantized, named and laid out as Hugging Face `LlamaForCausalLM` expects."""
    n_heads = int(model.hparam("attention.head_count"))
    n_kv = int(model.hparam("attention.head_count_kv", n_heads))
    out = {}
    for name, w in model.float_tensors(np.float32):
        if ".attn_q." in name:
            w = unpermute_rope(w, n_heads)
        elif ".attn_k." in name:
            w = unpermute_rope(w, n_kv)
        out[hf_name(name)] = w.astype(dtype)
    return out


def hf_config(model: GGUFModel, weights: dict, dtype_name: str = "float32") -> dict:
    """config.json of a `LlamaForCausalLM` with the GGUF's hyper-parameters."""
    h = model.hparam
    n_heads = int(h("attention.head_count"))
    hidden = int(h("embedding_length"))
    head_dim = int(h("rope.dimension_count", hidden // n_heads))
    if head_dim != int(h("attention.key_length", head_dim)):
        raise UserError(f"{model.path}: partial rope (rope dimension != head size) is not supported")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(h("feed_forward_length")),
        "num_hidden_layers": int(h("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(h("attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(h("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(h("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(h("context_length", 2048)),
        "vocab_size": int(weights["model.embed_tokens.weight"].shape[0]),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype_name,
        "bos_token_id": model.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": model.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": model.get("tokenizer.ggml.padding_token_id"),
    }
    if model.hparam("rope.scaling.type") not in (None, "none"):
        raise UserError(f"{model.path}: rope scaling {model.hparam('rope.scaling.type')!r} is not supported")
    return config


def hf_tokenizer(model: GGUFModel) -> dict:
    """tokenizer.json (Hugging Face `tokenizers`) rebuilt from the GGUF's byte-level BPE vocabulary and merges."""
    kind, pre = model.get("tokenizer.ggml.model"), model.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise UserError(f"{model.path}: tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' only)")
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"{model.path}: tokenizer pre-type {pre!r} is not supported "
                        f"(known: {', '.join(sorted(PRE_TOKENIZERS))})")
    tokens = model.get("tokenizer.ggml.tokens")
    types = model.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = model.get("tokenizer.ggml.merges") or []
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": types[i] != TOKEN_CONTROL, "special": types[i] == TOKEN_CONTROL}
        for i, tok in enumerate(tokens) if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    ]
    bos_id = model.get("tokenizer.ggml.bos_token_id")
    add_bos = bool(model.get("tokenizer.ggml.add_bos_token", False)) and bos_id is not None
    post = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    if add_bos:
        bos = tokens[bos_id]
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": PRE_TOKENIZERS[pre]},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in merges],
        },
    }


def _token(model: GGUFModel, key: str):
    idx = model.get(f"tokenizer.ggml.{key}_token_id")
    return None if idx is None else model.get("tokenizer.ggml.tokens")[idx]


def hf_tokenizer_config(model: GGUFModel) -> dict:
    """tokenizer_config.json: special tokens, chat template, BOS behaviour."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token(model, "bos"),
        "eos_token": _token(model, "eos"),
        "unk_token": _token(model, "unknown"),
        "pad_token": _token(model, "padding"),
        "add_bos_token": bool(model.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(model.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model.hparam("context_length", 2048)),
    }
    template = model.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return config


def write_hf_dir(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write a Hugging Face llama directory (model.safetensors, config.json, tokenizer files,
    generation_config.json) holding the GGUF's weights dequantized to `dtype` (float32 | float16 | bfloat16)."""
    out_dir = Path(out_dir)
    if dtype not in SAFETENSORS_DTYPES:
        raise UserError(f"dtype {dtype!r}: choose float32, float16 or bfloat16")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir}: already exists and is not empty (pass --force / overwrite=True)")
    model = GGUFModel(gguf_path)
    weights = hf_weights(model, np.float32)
    config = hf_config(model, weights, dtype)
    tokenizer, tokenizer_config = hf_tokenizer(model), hf_tokenizer_config(model)
    special = {k: tokenizer_config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")
               if tokenizer_config[k] is not None}
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors(weights, tmp / "model.safetensors", dtype)
    for name, obj in (("config.json", config), ("tokenizer.json", tokenizer),
                      ("tokenizer_config.json", tokenizer_config), ("special_tokens_map.json", special),
                      ("generation_config.json", generation)):
        (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _encode(w: np.ndarray, dtype: str) -> bytes:
    w = np.ascontiguousarray(w, np.float32)
    if dtype == "float32":
        return w.tobytes()
    if dtype == "float16":
        return w.astype(np.float16).tobytes()
    bits = w.view(np.uint32)  # numpy has no bfloat16: round to nearest even on the upper 16 bits
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).tobytes()


def save_safetensors(weights: dict[str, np.ndarray], path: Path, dtype: str = "float32", metadata: dict | None = None):
    """Write float tensors as a .safetensors file (the format torch, transformers and MLX read) in `dtype`.

    Written here rather than through a framework so the core needs neither torch nor the safetensors package.
    """
    import struct

    header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
    for name, w in weights.items():
        size = int(np.prod(w.shape)) * (4 if dtype == "float32" else 2)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(w.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for w in weights.values():
            f.write(_encode(w, dtype))
