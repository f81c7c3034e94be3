"""Hugging Face model directory -> GGUF (quantized, with tokenizer and chat template), written once and cached.

The GGUF stays pudl's single source of weights: llama.cpp samples from it and the MLX student loads it. Families:
llama and mistral (GGUF arch `llama`: q/k rows permuted for llama.cpp's interleaved rope, like llama.cpp's own
converter), qwen2 (q/k/v biases) and qwen3 (per-head q/k RMS norms); both qwen archs keep HF's NEOX rope layout.
Tokenizers: byte-level BPE `tokenizer.json` whose pre-tokenizer llama.cpp knows (llama-3, qwen2, gpt-2, smollm).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from pudl.errors import UserError

CONVERTER_VERSION = 1  # part of the cache key: bump when the written GGUF changes
QUANTS = ("q8_0", "q4_0", "f16", "f32")
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # HF model_type -> GGUF arch
BLOCK = 32  # Q8_0 / Q4_0 block size along a row

# HF parameter name (without .weight/.bias; {} = layer) -> GGUF tensor name
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")

# tokenizer.json Split regexes -> llama.cpp pre-tokenizer names (the same regex on both sides)
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = _LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"  # ByteLevel's own
SPLIT_PRE = {_LLAMA3_RE: "llama-bpe", _QWEN2_RE: "qwen2", _GPT2_RE: "gpt-2"}
SOURCE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json")


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def default_cache_dir() -> Path:
    """Where converted GGUFs live: $PUDL_CACHE_DIR, else ~/.cache/pudl/gguf."""
    env = os.environ.get("PUDL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pudl" / "gguf"


def _source_files(src: Path) -> list[Path]:
    for name in ("config.json", "tokenizer.json"):
        if not (src / name).is_file():
            raise UserError(f"student.model: {src} has no {name} (a Hugging Face model directory needs "
                            "config.json, tokenizer.json and *.safetensors)")
    weights = sorted(src.glob("*.safetensors"))
    if not weights:
        raise UserError(f"student.model: {src} has no *.safetensors weights (.bin checkpoints are not read)")
    return [src / n for n in SOURCE_FILES if (src / n).is_file()] + weights


def _file_sha256(path: Path, memo: dict) -> str:
    """sha256 of a file's content, remembered in `memo` under its resolved path, size and mtime (a multi-GB
    checkpoint is hashed once, not at every run)."""
    real = path.resolve()
    st = real.stat()
    key = str(real)
    if memo.get(key, [None])[:2] == [st.st_size, st.st_mtime_ns]:
        return memo[key][2]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    memo[key] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
    return memo[key][2]


def source_hash(src: Path, quant: str, memo: dict | None = None) -> str:
    """sha256 over the directory's model files (names and contents), the quantization and the converter version."""
    memo = {} if memo is None else memo
    h = hashlib.sha256(f"pudl-convert/{CONVERTER_VERSION}/{quant}".encode())
    for path in _source_files(src):
        h.update(f"{path.name}\0{_file_sha256(path, memo)}\0".encode())
    return h.hexdigest()


def _load_memo(path: Path) -> dict:
    try:
        memo = json.loads(path.read_text())
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_memo(path: Path, memo: dict):
    try:
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, path)
    except OSError:
        pass  # only a speed-up: the next run hashes again


def hf_to_gguf(src: Path, quant: str = "q8_0", cache_dir: Path | None = None, name: str | None = None) -> Path:
    """The cached GGUF of HF directory `src` at `quant`, converting it first if this content was never converted
    (`name`: the file's readable prefix, default the directory's name)."""
    if quant not in QUANTS:
        raise UserError(f"student.quant: {quant!r} is not one of {', '.join(QUANTS)}")
    src = Path(src)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    name = re.sub(r"[^\w.-]", "_", name or src.name)
    memo_path = cache_dir / "hashes.json"
    memo = _load_memo(memo_path)
    out = cache_dir / f"{name}-{source_hash(src, quant, memo)[:16]}-{quant}.gguf"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the GGUF cache {cache_dir} ({e}); set PUDL_CACHE_DIR") from None
    _save_memo(memo_path, memo)
    if out.is_file():
        return out
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    try:
        write_gguf(src, tmp, quant)
        os.replace(tmp, out)  # a crash mid-write never leaves a truncated GGUF under the final name
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"student.model: cannot read {path} ({e})") from None


def _rope_theta(config: dict) -> float:
    nested = config.get("rope_parameters") or {}  # transformers >= 5 nests rope settings here
    return float(config.get("rope_theta") or nested.get("rope_theta") or 10000.0)


def _rope_scaling(config: dict) -> dict | None:
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return None
    if kind != "llama3":
        raise UserError(f"student.model: rope scaling {kind!r} is not supported (default and llama3 are)")
    return scaling


def llama3_rope_factors(scaling: dict, base: float, dims: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3's rope scaling (llama.cpp's `rope_freqs` tensor)."""
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old = float(scaling.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    out = []
    for wavelen in 2 * math.pi / freqs:
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def permute_for_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's half-split rope rows -> llama.cpp's interleaved pairs, per head (rows of q_proj / k_proj, or a bias)."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name: str) -> str | None:
    stem, _, suffix = hf_name.rpartition(".")
    if stem in _GLOBAL:
        return f"{_GLOBAL[stem]}.{suffix}"
    m = _LAYER_RE.fullmatch(stem)
    if m and m.group(2) in _LAYER:
        return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.{suffix}"
    if stem.endswith("rotary_emb") or hf_name.endswith("rotary_emb.inv_freq"):
        return None  # recomputed by both runtimes
    raise UserError(f"student.model: unexpected tensor {hf_name!r} (not a llama/mistral/qwen2/qwen3 checkpoint?)")


def _hf_tensors(src: Path):
    """(name, float32 numpy array) for every tensor of the directory's safetensors, one at a time (bf16 too)."""
    import mlx.core as mx

    for path in sorted(src.glob("*.safetensors")):
        try:
            tensors = mx.load(str(path))
        except Exception as e:
            raise UserError(f"student.model: cannot read {path} ({e})") from None
        for name in sorted(tensors):
            yield name, np.array(tensors.pop(name).astype(mx.float32))


def _tensor_names(src: Path) -> list[str]:
    """Tensor names of the directory's safetensors files, from their JSON headers (no data read)."""
    names = []
    for path in sorted(src.glob("*.safetensors")):
        with open(path, "rb") as f:
            try:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            except ValueError:
                continue  # _hf_tensors reports the unreadable file
        names += [k for k in header if k != "__metadata__"]
    return names


def _progress(items, total: int, what: str):
    """`items`, with a transient rich progress bar on a terminal (conversion takes a while for real models)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as progress:
        task = progress.add_task(what, total=total)
        for item in items:
            yield item
            progress.advance(task)


def _write_tensor(writer, name: str, data: np.ndarray, quant: str):
    import gguf
    from gguf import GGMLQuantizationType as Q

    if data.ndim == 1 or quant == "f32":  # norms and biases stay float32, as llama.cpp's converter keeps them
        writer.add_tensor(name, np.ascontiguousarray(data, np.float32))
        return
    if quant in ("q8_0", "q4_0") and data.shape[-1] % BLOCK == 0:
        qtype = Q.Q8_0 if quant == "q8_0" else Q.Q4_0
        writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(data, np.float32), qtype), raw_dtype=qtype)
        return
    writer.add_tensor(name, np.ascontiguousarray(data, np.float16))  # f16, or rows that are not whole blocks


def write_gguf(src: Path, out: Path, quant: str):
    """Convert HF directory `src` into GGUF file `out` (see the module doc for what is supported)."""
    import gguf

    _source_files(src)
    config = _read_json(src / "config.json")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise UserError(f"student.model: {src}: model_type {model_type!r} is not supported "
                        f"(supported: {', '.join(FAMILIES)})")
    arch = FAMILIES[model_type]
    hidden, n_heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    head_dim = int(config.get("head_dim") or hidden // n_heads)
    n_layers = int(config["num_hidden_layers"])
    theta = _rope_theta(config)
    scaling = _rope_scaling(config)
    names = _tensor_names(src)
    tie = config.get("tie_word_embeddings")  # unset: tied exactly when the checkpoint has no lm_head
    tie = "lm_head.weight" not in names if tie is None else bool(tie)
    ftype = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
             "f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32}[quant]

    w = gguf.GGUFWriter(str(out), arch=arch)
    w.add_name(src.name)
    w.add_context_length(int(config.get("max_position_embeddings") or 4096))
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(ftype)
    n_vocab = _write_tokenizer(w, src, config)
    if scaling is not None:
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(scaling, theta, head_dim))

    seen = set()
    for hf_name, data in _progress(_hf_tensors(src), len(names), f"converting {src.name} to GGUF {quant}"):
        name = _gguf_name(hf_name)
        if name is None or (tie and name.startswith("output.")):
            continue
        if arch == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
            data = permute_for_llama_cpp(data, n_heads if ".attn_q." in name else n_kv)
        if name.startswith(("token_embd.", "output.")) and data.shape[0] < n_vocab:
            data = np.concatenate([data, np.zeros((n_vocab - data.shape[0], data.shape[1]), data.dtype)])
        _write_tensor(w, name, data, quant)
        seen.add(name)
    if "token_embd.weight" not in seen:
        raise UserError(f"student.model: {src} has no model.embed_tokens.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _pre_tokenizer(tok: dict, path: Path) -> str:
    """llama.cpp's name for the tokenizer.json pre-tokenizer (llama.cpp reimplements each one by name)."""
    pre = tok.get("pre_tokenizer") or {}
    steps = []
    for step in pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]:
        kind = step.get("type")
        if kind == "ByteLevel" and step.get("use_regex", True):  # = the GPT-2 split, then bytes
            steps += [("Split", _GPT2_RE), ("ByteLevel", None)]
        elif kind == "Split":
            steps.append(("Split", step.get("pattern", {}).get("Regex")))
        elif kind == "Digits":
            steps.append(("Digits", bool(step.get("individual_digits"))))
        else:
            steps.append((kind, None))
    if steps[-1:] == [("ByteLevel", None)]:
        body = steps[:-1]
        if len(body) == 1 and body[0][0] == "Split" and body[0][1] in SPLIT_PRE:
            return SPLIT_PRE[body[0][1]]
        if body == [("Digits", True), ("Split", _GPT2_RE)]:
            return "smollm"
    kinds = " + ".join(str(k) for k, _ in steps) or "none"
    raise UserError(f"student.model: {path}: this pre-tokenizer ({kinds}) is not one pudl can map to llama.cpp; "
                    "convert with llama.cpp's convert_hf_to_gguf.py and use the .gguf")


def _token_content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(src: Path, tok_config: dict) -> str | None:
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    if not template and (src / "chat_template.jinja").is_file():
        template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    if not template and (src / "chat_template.json").is_file():
        template = _read_json(src / "chat_template.json").get("chat_template")
    return template or None


def _write_tokenizer(w, src: Path, config: dict) -> int:
    """Byte-level BPE vocabulary, merges, token types, special ids and chat template; returns the vocab size."""
    import gguf

    tok = _read_json(src / "tokenizer.json")
    tok_config = _read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    model = tok.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError(f"student.model: {src / 'tokenizer.json'}: only byte-level BPE tokenizers are converted; "
                        "convert with llama.cpp's convert_hf_to_gguf.py and use the .gguf")
    pre = _pre_tokenizer(tok, src / "tokenizer.json")
    added = tok.get("added_tokens", [])
    ids = list(model["vocab"].values()) + [a["id"] for a in added]
    n_vocab = max(int(config.get("vocab_size") or 0), max(ids) + 1)
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]  # embedding rows past the tokenizer are padding
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in model["vocab"].items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for a in added:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)

    index = {t: i for i, t in enumerate(tokens)}

    def special_id(key: str) -> int | None:
        text = _token_content(tok_config.get(f"{key}_token"))
        if text in index:
            return index[text]
        value = config.get(f"{key}_token_id")
        return value[0] if isinstance(value, list) and value else value if isinstance(value, int) else None

    bos, eos, pad = special_id("bos"), special_id("eos"), special_id("pad")
    if eos is None:
        raise UserError(f"student.model: {src}: no eos_token in tokenizer_config.json nor eos_token_id in config.json")
    if bos is not None:
        w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    if pad is not None:
        w.add_pad_token_id(pad)
    w.add_add_bos_token(bool(tok_config.get("add_bos_token", _post_processor_adds_bos(tok))))
    template = _chat_template(src, tok_config)
    if template:
        w.add_chat_template(template)
    return n_vocab


def _post_processor_adds_bos(tok: dict) -> bool:
    """Whether tokenizer.json's post-processor puts a special token before the text (Llama 3's <|begin_of_text|>)."""
    post = tok.get("post_processor") or {}
    steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            return "SpecialToken" in step["single"][0]
    return False


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[\w]")


def is_hub_id(model: str) -> bool:
    """Whether `model` reads as a Hugging Face hub id ("owner/name"), not as a file path."""
    return bool(_HUB_ID.fullmatch(model)) and not model.endswith(".gguf") and ".." not in model


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot directory of hub model `repo_id` (huggingface_hub's cache; downloads unless offline)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise UserError(f"student.model: {repo_id!r} is a hub id and needs huggingface_hub "
                        "(pip install huggingface-hub)") from None
    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
    # Read the environment now, not at huggingface_hub's import: a caller may set it after importing pudl.
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    cache = os.environ.get("HF_HUB_CACHE") or (os.environ.get("HF_HOME") and str(Path(os.environ["HF_HOME"]) / "hub"))
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache or None,
                                      local_files_only=offline))
    except LocalEntryNotFoundError:
        raise UserError(f"student.model: {repo_id!r} is not in the Hugging Face cache and this machine is offline "
                        f"(HF_HUB_OFFLINE or no network); fetch it once with `hf download {repo_id}` (older "
                        "huggingface_hub: `huggingface-cli download`) or point student.model at a local directory "
                        "or .gguf") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"student.model: cannot fetch {repo_id!r} from the Hugging Face hub ({first}); check the id, "
                        f"or download it with `hf download {repo_id}`") from None
