"""HF directory -> GGUF for each family, on tiny random models built in-process (no network).

Checked on fresh random weights each session: the MLX student on the converted GGUF gives the log-probs
mlx-lm gives on the HF directory itself (catches q/k permutation and rope-layout mistakes), llama.cpp on the
same GGUF agrees with the MLX student, and llama.cpp tokenizes like the HF tokenizer.
"""

import json
import random

import mlx.core as mx
import numpy as np
import pytest

from pudl.convert import hf_to_gguf, is_hub_id
from pudl.errors import UserError
from pudl.models import Tokenizer, load_student, resolve_model_path
from pudl.prompts import Prompt, chat_messages
from tests.hf_tiny import write_tiny_hf

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}  # small: the tiny head's frequencies span all three bands
FAMILIES = {
    "llama": {"rope_scaling": LLAMA3_SCALING},
    "mistral": {"head_dim": 32},  # head_dim != hidden / heads, as in Mistral-Nemo
    "qwen2": {},
    "qwen3": {"head_dim": 32, "tie": False},
}
TEXTS = ["What is 12+30? It's   42.\n\nDon't panic!", "naïve café — ünïcödé ✓ 日本", "  leading\tspaces\r\n x"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    seed = random.randrange(1 << 30)
    return {fam: write_tiny_hf(root / fam, fam, seed=seed + i, **kw) for i, (fam, kw) in enumerate(FAMILIES.items())}


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-cache")


def llama_cpp_logprobs(path, tokens):
    """llama.cpp next-token log-probs with exact attention (float32 KV cache, no flash attention)."""
    import llama_cpp

    from pudl.llamacpp import open_llama

    llm = open_llama(path, n_ctx=256, logits_all=True, n_threads=1, type_k=llama_cpp.GGML_TYPE_F32,
                     type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False)
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], np.float64)
    llm.close()
    return _log_softmax(logits)


def _log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def student_logprobs(student, tokens):
    logits = student.model(mx.array([tokens])).astype(mx.float32)
    return _log_softmax(np.array(logits, np.float64)[0])


def hf_logprobs(src, tokens):
    """mlx-lm's own model on the HF directory: the reference the converted GGUF must reproduce."""
    from mlx_lm.utils import load_model

    model, _ = load_model(src)
    return _log_softmax(np.array(model(mx.array([tokens])).astype(mx.float32), np.float64)[0])


def chat_tokens(tok):
    return tok.chat_tokens(chat_messages(Prompt("x", "What is the capital of France? Reply with one word.",
                                                system="You are a helpful assistant."))) + tok.answer_tokens("Paris")


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_conversion_matches_hf_and_llama_cpp(family, hf_dirs, gguf_cache):
    src = hf_dirs[family]
    path = hf_to_gguf(src, "f32", gguf_cache)
    tok = Tokenizer(path)
    tokens = chat_tokens(tok)
    student = load_student(path, 4, 8.0, ["q_proj", "k_proj"])
    got = student_logprobs(student, tokens)
    assert np.abs(got - hf_logprobs(src, tokens)).max() < 1e-3
    assert np.abs(got - llama_cpp_logprobs(path, tokens)).max() < 1e-3
    # the rope layout is load-bearing: the other one is far off
    for layer in student.model.model.layers:
        layer.self_attn.rope.traditional = not layer.self_attn.rope.traditional
    assert np.abs(student_logprobs(student, tokens) - got).mean() > 0.05


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_and_special_tokens_match_hf(family, hf_dirs, gguf_cache):
    from tokenizers import Tokenizer as HFTokenizer

    src = hf_dirs[family]
    tok = Tokenizer(hf_to_gguf(src, "f32", gguf_cache))
    hf = HFTokenizer.from_file(str(src / "tokenizer.json"))
    rendered = tok.render(chat_messages(Prompt("x", TEXTS[0])))
    for text in TEXTS + [rendered]:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(tok.encode(text, special=False)) == text
    config = json.loads((src / "tokenizer_config.json").read_text())
    assert tok.token_text(tok.eos_id) == config["eos_token"]
    assert rendered.startswith(config["bos_token"] or "<|im_start|>")  # the GGUF carries the chat template


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_quantized_conversion(family, hf_dirs, gguf_cache):
    src = hf_dirs[family]
    errors = {}
    for quant in ("q8_0", "q4_0"):
        path = hf_to_gguf(src, quant, gguf_cache)
        tok = Tokenizer(path)
        tokens = chat_tokens(tok)
        got = student_logprobs(load_student(path, 4, 8.0, ["q_proj"]), tokens)
        errors[quant] = np.abs(got - hf_logprobs(src, tokens)).mean()
        # llama.cpp's quantized kernels also round activations to 8 bits (measured 0.03-0.11 mean |dlogp|;
        # pudl's sampler dequantizes to float32 on the CPU and then matches to ~1e-5)
        lcpp = llama_cpp_logprobs(path, tokens)
        assert np.abs(got - lcpp).mean() < 0.3
        assert (got.argmax(-1) == lcpp.argmax(-1)).mean() > 0.8
        assert path.stat().st_size < hf_to_gguf(src, "f32", gguf_cache).stat().st_size / 3
    # weight rounding alone (the student dequantizes exactly); random tiny models amplify it: measured mean
    # |dlogp| 0.03-0.13 at q8_0 and 0.4-1.7 at q4_0 over 3 seeds x 4 families
    assert errors["q8_0"] < 0.3 and errors["q8_0"] < errors["q4_0"] / 3


def test_conversion_is_cached_by_content(hf_dirs, tmp_path):
    src = hf_dirs["qwen2"]
    first = hf_to_gguf(src, "q8_0", tmp_path)
    stamp = first.stat().st_mtime_ns
    assert hf_to_gguf(src, "q8_0", tmp_path) == first and first.stat().st_mtime_ns == stamp  # reused, not rewritten
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in src.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(config))
    assert hf_to_gguf(copy, "q8_0", tmp_path) != first  # other content, other file
    assert not list(tmp_path.glob("*.tmp"))


def test_resolve_model_path_converts_a_directory(hf_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("PUDL_CACHE_DIR", str(tmp_path / "c"))
    path = resolve_model_path(str(hf_dirs["mistral"]), "q4_0")
    assert path.parent == tmp_path / "c" and path.name.endswith("-q4_0.gguf")
    with pytest.raises(UserError, match="student.quant"):
        resolve_model_path(str(hf_dirs["mistral"]), "q5_k")


def _fake_hub_cache(cache, repo_id, src):
    """The layout huggingface_hub's cache has after a download: refs/main -> snapshots/<commit>/files."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())


def test_hub_id_offline(hf_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("PUDL_CACHE_DIR", str(tmp_path / "gguf"))
    with pytest.raises(UserError, match="hf download tiny-org/Tiny-Qwen3"):
        resolve_model_path("tiny-org/Tiny-Qwen3")
    _fake_hub_cache(tmp_path / "hub", "tiny-org/Tiny-Qwen3", hf_dirs["qwen3"])
    path = resolve_model_path("tiny-org/Tiny-Qwen3", "f32")
    assert path.parent == tmp_path / "gguf" and path.name.startswith("tiny-org--Tiny-Qwen3-")
    tok = Tokenizer(path)
    assert tok.encode(TEXTS[0]) == Tokenizer(hf_to_gguf(hf_dirs["qwen3"], "f32", tmp_path)).encode(TEXTS[0])


def test_unsupported_inputs_are_user_errors(hf_dirs, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in hf_dirs["llama"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(UserError, match="model_type 'gpt_neox' is not supported"):
        hf_to_gguf(bad, "f32", tmp_path / "c")
    (bad / "config.json").write_text(json.dumps(config))
    tok = json.loads((bad / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UserError, match="pre-tokenizer"):
        hf_to_gguf(bad, "f32", tmp_path / "c")
    (bad / "model.safetensors").unlink()
    with pytest.raises(UserError, match="safetensors"):
        hf_to_gguf(bad, "f32", tmp_path / "c")
    assert not list(tmp_path.rglob("*.gguf"))  # nothing half-written is left for a later run to pick up


def test_recipe_accepts_hub_ids_without_network_and_rejects_missing_paths(tmp_path):
    from pudl.recipe import parse_recipe

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    recipe_path = str(tmp_path / "r.toml")
    r = parse_recipe({"data": {"prompts": "p.jsonl"}, "student": {"model": "Qwen/Qwen2.5-0.5B-Instruct",
                                                                   "quant": "q4_0"}}, recipe_path)
    assert (r.student.model, r.student.quant) == ("Qwen/Qwen2.5-0.5B-Instruct", "q4_0")
    assert parse_recipe({"data": {"prompts": "p.jsonl"}}, recipe_path).student.quant == "q8_0"
    for missing in ("./models/missing.gguf", "missing.gguf", "../x/y"):
        with pytest.raises(UserError, match="student.model: file not found"):
            parse_recipe({"data": {"prompts": "p.jsonl"}, "student": {"model": missing}}, recipe_path)
    with pytest.raises(UserError, match="student.quant"):
        parse_recipe({"data": {"prompts": "p.jsonl"}, "student": {"quant": "q3"}}, recipe_path)
    assert is_hub_id("meta-llama/Llama-3.2-1B-Instruct") and not is_hub_id("a/b.gguf") and not is_hub_id("x")


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"  # GPT-2's, as written
GPT2_SPLIT = {"type": "Split", "pattern": {"Regex": GPT2_REGEX}, "behavior": "Isolated", "invert": False}
DIGITS = {"type": "Digits", "individual_digits": True}


@pytest.mark.parametrize("name,steps", [
    ("gpt-2", [{**BYTE_LEVEL, "use_regex": True}]),
    ("gpt-2", [GPT2_SPLIT, BYTE_LEVEL]),
    ("smollm", [DIGITS, {**BYTE_LEVEL, "use_regex": True}]),
    ("smollm", [DIGITS, GPT2_SPLIT, BYTE_LEVEL]),  # SmolLM2's tokenizer.json as pudl.hfdir writes it
])
def test_other_byte_level_pre_tokenizers(name, steps, hf_dirs, tmp_path):
    import gguf
    from tokenizers import Tokenizer as HFTokenizer

    src = tmp_path / "src"
    src.mkdir()
    for f in hf_dirs["qwen2"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    tok_json = json.loads((src / "tokenizer.json").read_text())
    tok_json["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": steps}
    (src / "tokenizer.json").write_text(json.dumps(tok_json))
    path = hf_to_gguf(src, "f32", tmp_path / "c")
    assert gguf.GGUFReader(str(path)).fields["tokenizer.ggml.pre"].contents() == name
    tok, hf = Tokenizer(path), HFTokenizer.from_file(str(src / "tokenizer.json"))
    for text in TEXTS + ["x = 1234567 + 89;  it's 2024's"]:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids, text


def test_student_dequantizes_exactly(tiny_gguf):
    """The MLX student's float weights are the GGUF's Q4_1/Q8_0 values exactly (what llama.cpp computes with)."""
    import gguf

    from pudl.models import GGUF_TO_MLX, load_gguf_weights

    weights, _, _ = load_gguf_weights(tiny_gguf, dequantize=True)
    reader = gguf.GGUFReader(str(tiny_gguf))
    checked = 0
    for t in reader.tensors:
        if t.tensor_type.name not in ("Q4_1", "Q8_0"):
            continue
        parts = t.name.split(".")
        key = ("blk.{}." + parts[2]) if parts[0] == "blk" else parts[0]
        mlx_name = GGUF_TO_MLX[key].format(parts[1] if parts[0] == "blk" else "") + ".weight"
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(weights[mlx_name].shape)
        assert np.array_equal(np.array(weights[mlx_name]), ref.astype(np.float32)), t.name
        checked += 1
    assert checked >= 8


@pytest.mark.integration
def test_smollm2_round_trip_through_an_hf_directory(smollm2, tmp_path):
    """A real tokenizer and real weights: SmolLM2's GGUF -> HF dir (pudl.hfdir) -> pudl.convert -> same model."""
    hfdir = pytest.importorskip("pudl.hfdir")
    src = hfdir.write_hf_dir(smollm2, tmp_path / "hf")
    path = hf_to_gguf(src, "f32", tmp_path / "c")
    tok, ref_tok = Tokenizer(path), Tokenizer(smollm2)
    messages = chat_messages(Prompt("x", TEXTS[0], system="Be brief."))
    assert tok.render(messages) == ref_tok.render(messages)
    for text in TEXTS + [ref_tok.render(messages)]:
        assert tok.encode(text) == ref_tok.encode(text), text
    tokens = ref_tok.chat_tokens(messages) + ref_tok.answer_tokens("The answer is 42.")
    got = student_logprobs(load_student(path, 4, 8.0, ["q_proj"]), tokens)
    assert np.abs(got - student_logprobs(load_student(smollm2, 4, 8.0, ["q_proj"]), tokens)).max() < 1e-4
    assert np.abs(got - llama_cpp_logprobs(path, tokens)).max() < 1e-3


def test_bfloat16_checkpoint_and_unset_tie_flag(hf_dirs, tmp_path):
    """bf16 safetensors convert to exactly their float values; without tie_word_embeddings, lm_head decides."""
    from pudl.models import load_gguf_weights

    src = tmp_path / "bf16"
    src.mkdir()
    for f in hf_dirs["qwen3"].iterdir():
        if f.suffix != ".safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    tensors = mx.load(str(hf_dirs["qwen3"] / "model.safetensors"))
    mx.save_safetensors(str(src / "model.safetensors"), {k: v.astype(mx.bfloat16) for k, v in tensors.items()})
    config = json.loads((src / "config.json").read_text())
    del config["tie_word_embeddings"]  # qwen3 here has its own lm_head
    (src / "config.json").write_text(json.dumps(config))
    weights, _, _ = load_gguf_weights(hf_to_gguf(src, "f32", tmp_path / "c"), dequantize=True)
    assert "lm_head.weight" in weights
    for name in ("lm_head.weight", "model.layers.1.self_attn.k_norm.weight", "model.layers.0.mlp.up_proj.weight"):
        want = np.array(tensors[name].astype(mx.bfloat16).astype(mx.float32))
        assert np.array_equal(np.array(weights[name]), want), name
