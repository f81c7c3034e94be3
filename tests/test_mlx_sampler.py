"""sample.backend = "mlx": the MLX student samples like llama.cpp does, on tiny converted models (no network)."""

import random

import mlx.core as mx
import numpy as np
import pytest

from pudl.adapters import write_gguf_lora
from pudl.convert import hf_to_gguf
from pudl.mlx_sampler import MLXSampler
from pudl.models import Tokenizer, load_student
from pudl.prompts import Prompt, chat_messages
from pudl.recipe import SampleConfig
from pudl.domain import SamplingParams
from pudl.sampler import Sampler
from pudl.sampling import prompt_seed
from tests.hf_tiny import write_tiny_hf

PROMPTS = [Prompt("a", "What is the capital of France?"), Prompt("b", "Name an animal.", system="Be brief.")]
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def tiny(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    src = write_tiny_hf(root / "hf", request.param, seed=random.randrange(1 << 30))
    path = hf_to_gguf(src, "f32", root / "cache")
    return path, Tokenizer(path)


def _lp(student, context, ids):
    """The student's float64 log-probs of `ids` after `context` (temperature 1): an independent full forward."""
    logits = np.array(student.model(mx.array([context + ids])).astype(mx.float32), np.float64)[0]
    logits = logits[len(context) - 1 : -1]
    m = logits.max(-1, keepdims=True)
    lp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return lp[np.arange(len(ids)), ids]


def test_candidates_differ_are_seeded_and_carry_their_log_probs(tiny):
    path, tok = tiny
    student = load_student(path, 4, 8.0, TARGETS)
    sampler = MLXSampler(student, tok, n_ctx=256)
    cfg = SampleConfig(k=4, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=12)
    got = {}
    sampler.sample_all(PROMPTS, SamplingParams.of(cfg), 3, 1, lambda p, cands: got.__setitem__(p.id, cands))
    assert set(got) == {"a", "b"}
    for p in PROMPTS:
        cands = got[p.id]
        assert [c.idx for c in cands] == list(range(4))
        assert len({tuple(c.token_ids.tolist()) for c in cands}) > 1  # K candidates differ at temperature > 0
        context = tok.chat_tokens(chat_messages(p))
        for c in cands:
            assert c.finish in ("stop", "length") and (c.finish == "stop") == (int(c.token_ids[-1]) in sampler.eog)
            ref = _lp(student, context, c.token_ids.tolist())
            assert np.abs(ref - c.logprobs).max() < 1e-4
    again = sampler.sample(PROMPTS[0], SamplingParams(4, 1.0, 12), prompt_seed(3, 1, "a"))
    assert [c.token_ids.tolist() for c in again] == [c.token_ids.tolist() for c in got["a"]]  # seeded
    sampler.close()


def test_greedy_and_seeded_sampling_equal_llama_cpp_on_f32(tiny, tmp_path):
    path, tok = tiny
    student = load_student(path, 4, 8.0, TARGETS, seed=1)
    for layer in student.lora_layers.values():  # a LoRA that matters, given to both samplers as a GGUF file
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.3
    adapter = tmp_path / "a.gguf"
    write_gguf_lora(student, adapter)
    trained = {k: np.array(v) for k, v in student.lora_state().items()}
    greedy = {}
    for lora in (None, adapter):
        mlx, lcpp = MLXSampler(student, tok, lora, n_ctx=256), Sampler(path, tok, lora, n_ctx=256, threads=1)
        try:
            for temperature, k in ((0.0, 1), (0.8, 3)):
                a = mlx.sample(PROMPTS[0], SamplingParams(k, temperature, 16, top_k=40, top_p=0.95, min_p=0.05), 11)
                b = lcpp.sample(PROMPTS[0], SamplingParams(k, temperature, 16, top_k=40, top_p=0.95, min_p=0.05), 11)
                for x, y in zip(a, b):
                    assert x.token_ids.tolist() == y.token_ids.tolist()
                    assert np.abs(x.logprobs - y.logprobs).max() < 1e-3
                greedy.setdefault(lora, a[0].logprobs)
        finally:
            mlx.close()
            lcpp.close()
    assert not np.allclose(greedy[None][:3], greedy[adapter][:3], atol=1e-2)  # the adapter was applied
    # close() gives the student back its own LoRA, enabled
    assert all(np.array_equal(np.array(v), trained[k]) for k, v in student.lora_state().items())
    assert all(layer.enabled for layer in student.lora_layers.values())


def test_base_model_when_no_adapter(tiny):
    path, tok = tiny
    student = load_student(path, 4, 8.0, TARGETS, seed=2)
    for layer in student.lora_layers.values():
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.5
    with_lora = MLXSampler(student, tok, n_ctx=256)
    base = with_lora.sample(PROMPTS[1], SamplingParams(1, 0.0, 16), 0)[0]
    with_lora.close()
    lcpp = Sampler(path, tok, None, n_ctx=256, threads=1)
    ref = lcpp.sample(PROMPTS[1], SamplingParams(1, 0.0, 16), 0)[0]
    lcpp.close()
    assert base.token_ids.tolist() == ref.token_ids.tolist()  # adapter None = the base model, as with llama.cpp


@pytest.mark.integration
def test_smollm2_mlx_sampler_equals_llama_cpp_sampler(smollm2):
    """On the real Q4_1 model both samplers compute with the same float32 weights: same candidates."""
    tok = Tokenizer(smollm2)
    student = load_student(smollm2, 8, 16.0, TARGETS)
    mlx, lcpp = MLXSampler(student, tok, n_ctx=512), Sampler(smollm2, tok, n_ctx=512, threads=2)
    try:
        for temperature, k in ((0.0, 1), (0.9, 3)):
            a = mlx.sample(PROMPTS[0], SamplingParams(k, temperature, 16, top_k=40, top_p=0.95, min_p=0.05), 5)
            b = lcpp.sample(PROMPTS[0], SamplingParams(k, temperature, 16, top_k=40, top_p=0.95, min_p=0.05), 5)
            for x, y in zip(a, b):
                assert x.token_ids.tolist() == y.token_ids.tolist()
                assert np.abs(x.logprobs - y.logprobs).max() < 1e-3
    finally:
        mlx.close()
        lcpp.close()


def test_prompts_batched_together_sample_as_alone(tiny):
    """Left-padded prompts in one batch give each prompt the candidates it gets alone, and llama.cpp's."""
    path, tok = tiny
    student = load_student(path, 4, 8.0, TARGETS)
    prompts = PROMPTS + [Prompt("c", "Say something quite a bit longer about the quick brown fox and the dog.")]
    cfg = SampleConfig(k=3, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, max_tokens=10)
    results = []
    for make in (lambda: MLXSampler(student, tok, n_ctx=256, rows=32),  # all three prompts in one batch
                 lambda: MLXSampler(student, tok, n_ctx=256, rows=1),  # one prompt at a time
                 lambda: Sampler(path, tok, n_ctx=256, threads=1)):
        sampler, got = make(), {}
        sampler.sample_all(prompts, SamplingParams.of(cfg), 9, 2, lambda p, cands: got.__setitem__(p.id, cands))
        sampler.close()
        results.append(got)
    batched, alone, lcpp = results
    for p in prompts:
        for a, b, c in zip(batched[p.id], alone[p.id], lcpp[p.id]):
            assert a.token_ids.tolist() == b.token_ids.tolist() == c.token_ids.tolist()
            assert np.abs(a.logprobs - b.logprobs).max() < 1e-4 and np.abs(a.logprobs - c.logprobs).max() < 1e-3
