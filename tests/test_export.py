"""pudl export / pudl cache export on a small run built here: a tiny GGUF, a random trained-looking LoRA, a cache."""

from __future__ import annotations

import json
import random

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from pudl.errors import UserError
from pudl.export import export_run, read_lora
from pudl.hfdir import GGUFModel, write_hf_dir
from tests.test_hfdir import gguf_layout_reference, log_softmax

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture(scope="module")
def run_dir(tiny_gguf, tmp_path_factory):
    """round-1/adapter.safetensors + adapter.gguf of a LoRA with random non-zero A and B, and a small cache."""
    from pudl import adapters
    from pudl.domain import ANCHOR_IDX, Candidate, Pair
    from pudl.cache import Cache
    from pudl.models import load_student
    from pudl.prompts import Prompt

    run = tmp_path_factory.mktemp("run")
    rank, alpha = random.choice([2, 4]), random.choice([4.0, 8.0, 3.0])
    student = load_student(tiny_gguf, rank, alpha, TARGETS, seed=random.randrange(1 << 20), dequantize=True)
    rng = np.random.default_rng()
    state = {k: mx.array(rng.standard_normal(v.shape).astype(np.float32) * 0.2)
             for k, v in student.lora_state().items()}
    student.load_lora_state(state)
    (run / "round-1").mkdir()
    adapters.save_adapter(student, run / "round-1" / "adapter.safetensors")
    adapters.write_gguf_lora(student, run / "adapter.gguf")

    cache = Cache(run / "cache.sqlite")
    prompts = [Prompt(id=f"p{i}", prompt=f"question {i}?", system="Be brief." if i == 0 else None, answer=str(i))
               for i in range(3)]
    cache.put_prompts(prompts)
    for p in prompts:
        cache.put_anchor(p.id, f"anchor {p.id}", "test")
        texts = [f"{p.id} candidate {k} {rng.integers(1000)}" for k in range(3)]
        cache.put_candidates(1, [Candidate(p.id, k, t, np.arange(3, dtype=np.int32), np.zeros(3, np.float32), "stop")
                                 for k, t in enumerate(texts)])
        scores = rng.standard_normal(3).tolist()
        ranks = np.argsort(np.argsort(-np.array(scores))).tolist()
        cache.put_scores(1, p.id, "anchor-likelihood", scores, ranks, "ok", anchor_score=1.0)
        best, worst = int(np.argmin(ranks)), int(np.argmax(ranks))
        cache.put_pairs(1, [Pair(p.id, "anchor-vs-worst", ANCHOR_IDX, worst, None),
                            Pair(p.id, "best-vs-worst", best, worst, scores[best] - scores[worst])])
    cache.close()
    return run, student


@pytest.fixture(scope="module")
def hf_base(tiny_gguf, tmp_path_factory):
    return write_hf_dir(tiny_gguf, tmp_path_factory.mktemp("hfbase") / "base")


def _reference_deltas(student) -> dict:
    """GGUF name -> alpha/r · (A B)ᵀ in float64, from the student's own LoRA layers (GGUF row order)."""
    out = {}
    for name, layer in student.lora_layers.items():
        a, b = np.array(layer.lora_a, np.float64), np.array(layer.lora_b, np.float64)
        out[name + ".weight"] = (student.lora_alpha / student.lora_rank) * (a @ b).T
    return out


def _tokens(tiny_gguf) -> mx.array:
    from pudl.models import Tokenizer

    text = " ".join(random.choice(["alpha", "beta", "7", "?", "The", "cat"]) for _ in range(8))
    return mx.array([Tokenizer(tiny_gguf).chat_tokens([{"role": "user", "content": text}])])


def test_mlx_adapter_loads_in_mlx_lm(run_dir, hf_base, tiny_gguf, tmp_path):
    import mlx_lm

    run, student = run_dir
    info = export_run(run, "mlx", tmp_path / "mlx", base=str(tiny_gguf), hf_base=hf_base)
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert config["lora_parameters"]["scale"] == pytest.approx(student.lora_alpha / student.lora_rank)
    assert info["hf_base"] == str(hf_base.resolve())
    model, _ = mlx_lm.load(str(hf_base), adapter_path=str(tmp_path / "mlx"))
    x = _tokens(tiny_gguf)
    got = log_softmax(model(x))
    hf_config = json.loads((hf_base / "config.json").read_text())
    want = log_softmax(gguf_layout_reference(tiny_gguf, hf_config, _reference_deltas(student))(x))
    base = log_softmax(gguf_layout_reference(tiny_gguf, hf_config)(x))
    assert np.abs(want - base).max() > 0.1  # the adapter changes the model, so the match below means something
    np.testing.assert_allclose(got, want, atol=5e-4)
    # and pudl's student with the adapter on (float16-rounded dequantization: looser)
    assert np.array_equal(got.argmax(-1), log_softmax(student.model(x)).argmax(-1))


def test_peft_adapter_reproduces_effective_weights(run_dir, hf_base, tiny_gguf, tmp_path):
    import mlx_lm
    from mlx.utils import tree_flatten

    run, student = run_dir
    export_run(run, "peft", tmp_path / "peft", base=str(tiny_gguf), hf_base=hf_base)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == student.lora_rank
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    tensors = mx.load(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    # merge W + (lora_alpha / r) B A into the Hugging Face base and run it: it must be the student with adapter
    model, _ = mlx_lm.load(str(hf_base))
    params = dict(tree_flatten(model.parameters()))
    scale = config["lora_alpha"] / config["r"]
    merged = []
    for key, a in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        path = key[len("base_model.model."): -len(".lora_A.weight")]
        b = np.array(tensors[key.replace("lora_A", "lora_B")], np.float64)
        w = np.array(params[path + ".weight"], np.float64) + scale * b @ np.array(a, np.float64)
        merged.append((path + ".weight", mx.array(w.astype(np.float32))))
    assert len(merged) == len(student.lora_layers)
    model.load_weights(merged, strict=False)
    x = _tokens(tiny_gguf)
    want = gguf_layout_reference(tiny_gguf, json.loads((hf_base / "config.json").read_text()),
                                 _reference_deltas(student))(x)
    np.testing.assert_allclose(log_softmax(model(x)), log_softmax(want), atol=5e-4)


def _llama_logits(path, tokens, lora=None) -> np.ndarray:
    from pudl.llamacpp import open_llama

    kwargs = {"lora_path": str(lora)} if lora else {}
    llm = open_llama(path, n_ctx=256, n_threads=1, logits_all=True, **kwargs)
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], np.float64)
    llm.close()
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def test_gguf_lora_and_fused(run_dir, tiny_gguf, tmp_path):
    run, student = run_dir
    export_run(run, "gguf-lora", tmp_path / "lora.gguf", base=str(tiny_gguf))
    lora = read_lora(tmp_path / "lora.gguf")
    original = read_lora(run / "round-1" / "adapter.safetensors")
    assert (lora.rank, lora.alpha) == (original.rank, original.alpha)
    for k, v in original.state.items():
        np.testing.assert_array_equal(lora.state[k], v)
    # f32 fused: every merged weight is base + alpha/r · (A B)ᵀ (float64 reference), others untouched
    export_run(run, "gguf-fused", tmp_path / "fused32.gguf", base=str(tiny_gguf), quant="f32")
    fused, base = GGUFModel(tmp_path / "fused32.gguf"), GGUFModel(tiny_gguf)
    deltas = _reference_deltas(student)
    for name in base.tensors:
        np.testing.assert_allclose(fused.tensor(name), base.tensor(name) + deltas.get(name, 0.0), atol=1e-5)
    assert fused.get("tokenizer.chat_template") == base.get("tokenizer.chat_template")
    assert fused.get("tokenizer.ggml.tokens") == base.get("tokenizer.ggml.tokens")
    # llama.cpp runs the fused f32 GGUF as the float64-merged reference; base + exported LoRA and the q8_0
    # fused GGUF agree with it up to their quantization (Q4_1/Q8_0 weights, Q8 activations in llama.cpp)
    x = _tokens(tiny_gguf)
    tokens = x[0].tolist()
    reference = log_softmax(gguf_layout_reference(tiny_gguf, {**_tiny_config(base)}, deltas)(x))[0]
    fused32 = _llama_logits(tmp_path / "fused32.gguf", tokens)
    with_lora = _llama_logits(tiny_gguf, tokens, tmp_path / "lora.gguf")
    plain = _llama_logits(tiny_gguf, tokens)
    export_run(run, "gguf-fused", tmp_path / "fused8.gguf", base=str(tiny_gguf))
    assert GGUFModel(tmp_path / "fused8.gguf").tensors["blk.0.attn_q.weight"][1].name == "Q8_0"
    fused8 = _llama_logits(tmp_path / "fused8.gguf", tokens)
    effect = np.abs(reference - plain).max()
    assert effect > 0.5  # the adapter matters, so agreeing below means something
    # (the tiny random model's logits span ~30 nats, so llama.cpp's float16 KV cache alone moves them ~0.2)
    np.testing.assert_allclose(fused32, reference, atol=0.02 * effect)
    for quantized in (with_lora, fused8):
        assert np.abs(quantized - reference).max() < 0.25 * effect
        assert (quantized.argmax(-1) == reference.argmax(-1)).mean() >= 0.7


def _tiny_config(model: GGUFModel) -> dict:
    from pudl.hfdir import hf_config

    return hf_config(model, {"model.embed_tokens.weight": np.zeros(model.tensors["token_embd.weight"][0])})


def test_errors(run_dir, tiny_gguf, tmp_path):
    run, _ = run_dir
    with pytest.raises(UserError, match="run directory not found"):
        export_run(tmp_path / "nope", "mlx", tmp_path / "o", base=str(tiny_gguf))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no adapter yet"):
        export_run(tmp_path / "empty", "peft", tmp_path / "o", base=str(tiny_gguf))
    with pytest.raises(UserError, match="unknown format"):
        export_run(run, "onnx", tmp_path / "o", base=str(tiny_gguf))
    (tmp_path / "exists").mkdir()
    with pytest.raises(UserError, match="--force"):
        export_run(run, "gguf-lora", tmp_path / "exists", base=str(tiny_gguf))
    with pytest.raises(UserError, match="summary.json"):
        export_run(run, "gguf-lora", tmp_path / "o")


def test_adapter_for_another_model(run_dir, smollm2, tmp_path):
    with pytest.raises(UserError, match="does not fit"):  # the tiny model's LoRA on the real 135M model
        export_run(run_dir[0], "gguf-lora", tmp_path / "o.gguf", base=str(smollm2))


def test_cli_export_and_errors(run_dir, tiny_gguf, tmp_path):
    from pudl.cli import main

    out = tmp_path / "cli-fused.gguf"
    result = CliRunner().invoke(main, ["export", str(run_dir[0]), "--to", "gguf-fused", "--out", str(out),
                                       "--base", str(tiny_gguf), "--quant", "q4_0"])
    assert result.exit_code == 0, result.output
    assert f"FROM {out.resolve()}" in result.output
    assert GGUFModel(out).tensors["blk.0.ffn_down.weight"][1].name == "Q4_0"
    again = CliRunner().invoke(main, ["export", str(run_dir[0]), "--to", "gguf-fused", "--out", str(out),
                                      "--base", str(tiny_gguf)])
    assert again.exit_code == 2 and "--force" in again.output and len(again.output.strip().splitlines()) == 1


def test_cache_export_pairs(run_dir, tmp_path):
    from pudl.cache import Cache
    from pudl.cli import main

    run, _ = run_dir
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(main, ["cache", "export", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cache = Cache(run / "cache.sqlite")
    pairs, candidates, anchors = cache.pairs(1), cache.candidates(1), cache.anchors()
    cache.close()
    assert len(rows) == len(pairs)
    for row, pair in zip(rows, pairs):
        chosen = anchors[pair.prompt_id] if pair.chosen_idx == -1 else candidates[pair.prompt_id][pair.chosen_idx].text
        assert row["chosen"] == [{"role": "assistant", "content": chosen}]
        assert row["rejected"][0]["content"] == candidates[pair.prompt_id][pair.rejected_idx].text
        assert row["prompt"][-1] == {"role": "user", "content": f"question {pair.prompt_id[1:]}?"}
        assert row["chosen_is_anchor"] == (pair.chosen_idx == -1)
    assert rows[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    text = tmp_path / "text.jsonl"
    assert CliRunner().invoke(main, ["cache", "export", str(run), "--out", str(text), "--style", "text"]).exit_code == 0
    first = json.loads(text.read_text().splitlines()[0])
    assert first["system"] == "Be brief." and isinstance(first["chosen"], str)


def test_cache_export_listwise_and_errors(run_dir, tmp_path):
    from pudl.cache import Cache
    from pudl.cli import main

    run, _ = run_dir
    out = tmp_path / "list.jsonl"
    assert CliRunner().invoke(main, ["cache", "export", str(run), "--out", str(out), "--listwise",
                                     "--style", "text"]).exit_code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cache = Cache(run / "cache.sqlite")
    scores, candidates = cache.scores(1, "anchor-likelihood"), cache.candidates(1)
    cache.close()
    assert len(rows) == 3
    for row in rows:
        items = row["candidates"]
        assert sum(i["is_anchor"] for i in items) == 1
        scored = [i for i in items if not i["is_anchor"]]
        assert sorted(i["rank"] for i in scored) == list(range(len(scores[row["id"]])))
        by_text = {c.text: s for c, s in zip(candidates[row["id"]], scores[row["id"]])}
        for i in scored:
            assert i["score"] == pytest.approx(by_text[i["text"]])
        best = min(scored, key=lambda i: i["rank"])
        assert best["score"] == max(scores[row["id"]])
    bad = CliRunner().invoke(main, ["cache", "export", str(run), "--out", str(tmp_path / "x.jsonl"), "--round", "7"])
    assert bad.exit_code == 2 and "--round 7" in bad.output
    missing = CliRunner().invoke(main, ["cache", "export", str(tmp_path), "--out", str(tmp_path / "y.jsonl")])
    assert missing.exit_code == 2 and "no cache.sqlite" in missing.output
