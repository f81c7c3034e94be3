"""The batched llama.cpp sampler: the sequential sampler's candidates, many prompts per decode, LoRA applied."""

import mlx.core as mx
import numpy as np
import pytest

from pudl.adapters import write_gguf_lora
from pudl.models import Tokenizer, load_student
from pudl.prompts import Prompt, chat_messages
from pudl.domain import SamplingParams
from pudl.sampler import FLOAT_COPY_SHARE, Sampler, SequentialSampler, float_copy_fits
from pudl.sampling import log_softmax, prompt_seed, token_logprobs
from pudl.sequences import batch_token_logprobs, pack

PROMPTS = [
    Prompt("short", "Hi."),
    Prompt("long", "Write a short poem about the sea, the wind and the sailors who cross it at night, in four lines."),
    Prompt("system", "Name a color.", system="You answer with one word."),
    Prompt("mid", "What is 2 + 2? Answer with just the number."),
]
NEAR_TIE = 0.05  # where batched arithmetic may flip the argmax: the two tokens' log-probs must be this close


@pytest.fixture(scope="module")
def tok(tiny_gguf_f32):
    return Tokenizer(tiny_gguf_f32)


@pytest.fixture(scope="module", params=["unified", "streams"])
def layout(request):
    """Both KV-cache layouts of the batched sampler (kv_cache="auto" picks unified for these small jobs)."""
    return request.param


@pytest.fixture(scope="module")
def batched(tiny_gguf_f32, tok, layout):
    s = Sampler(tiny_gguf_f32, tok, n_ctx=256, threads=1, kv_cache=layout)
    yield s
    s.close()


@pytest.fixture(scope="module")
def sequential(tiny_gguf_f32, tok):
    s = SequentialSampler(tiny_gguf_f32, tok, n_ctx=256, threads=1)
    yield s
    s.close()


def generate(sampler, prompts, k, temperature, max_tokens, seed=0, **kw):
    """{prompt id: candidates} plus the order in which prompts were handed over."""
    out, order = {}, []

    def on_prompt(p, cands):
        order.append(p.id)
        out[p.id] = cands

    sampler.generate([(p, prompt_seed(seed, 0, p.id)) for p in prompts],
                     SamplingParams(k, temperature, max_tokens, **kw), on_prompt)
    return out, order


def assert_same_tokens(a, b, logp_tol=1e-3):
    """Same token ids and log-probs, except that a near-tie may flip the token at one step (then stop comparing)."""
    n = min(len(a.token_ids), len(b.token_ids))
    for i in range(n):
        assert abs(a.logprobs[i] - b.logprobs[i]) < (NEAR_TIE if a.token_ids[i] != b.token_ids[i] else logp_tol)
        if a.token_ids[i] != b.token_ids[i]:
            return
    assert a.token_ids.tolist() == b.token_ids.tolist() and a.finish == b.finish and a.text == b.text


def test_greedy_batched_equals_sequential_with_prompts_of_different_lengths(batched, sequential, tok):
    assert len({len(tok.chat_tokens(chat_messages(p))) for p in PROMPTS}) == len(PROMPTS)
    got, order = generate(batched, PROMPTS, k=2, temperature=0.0, max_tokens=12)
    assert sorted(order) == sorted(p.id for p in PROMPTS)
    for p in PROMPTS:
        ref = sequential.sample(p, SamplingParams(1, 0.0, 12), 0)[0]
        assert [c.idx for c in got[p.id]] == [0, 1]
        for c in got[p.id]:
            assert c.prompt_id == p.id and len(c.token_ids) == len(c.logprobs) <= 12
            assert (c.finish == "stop") == (int(c.token_ids[-1]) in batched.eog)  # a random model may stop
            assert_same_tokens(c, ref)


def test_quantized_gguf_kept_quantized_equals_sequential(tiny_gguf):
    # One candidate of one prompt: the same batches as the sequential sampler, so the same arithmetic (with more
    # tokens a batch, llama.cpp's quantized kernels round differently, and its 8-bit activations amplify that).
    tok = Tokenizer(tiny_gguf)
    b = Sampler(tiny_gguf, tok, n_ctx=256, threads=1, float_weights=False)
    s = SequentialSampler(tiny_gguf, tok, n_ctx=256, threads=1)
    try:
        for p in PROMPTS[:3]:
            ref = s.sample(p, SamplingParams(1, 0.0, 10), 0)[0]
            assert_same_tokens(b.sample(p, SamplingParams(1, 0.0, 10), 0)[0], ref)
    finally:
        b.close()
        s.close()


def test_seeded_candidates_differ_reproduce_and_match_the_sequential_streams(batched, sequential):
    kw = dict(k=4, temperature=1.0, max_tokens=10)
    first, _ = generate(batched, PROMPTS, seed=7, **kw)
    again, _ = generate(batched, PROMPTS[::-1], seed=7, **kw)  # order and batch mates do not matter
    other, _ = generate(batched, PROMPTS, seed=8, **kw)
    for p in PROMPTS:
        ids = [c.token_ids.tolist() for c in first[p.id]]
        assert len({tuple(x) for x in ids}) > 1
        # Other batch mates change llama.cpp's arithmetic in the last bits: at temperature 1 a random model's
        # distribution is nearly flat, so a draw may land on the neighbouring token (a near-tie), then stop there.
        for a, b in zip(first[p.id], again[p.id], strict=True):
            assert_same_tokens(a, b)
        assert ids != [c.token_ids.tolist() for c in other[p.id]]
        # Candidate idx draws from its own stream, so the sequential sampler samples the same candidates.
        for b, s in zip(first[p.id], sequential.sample(p, SamplingParams(4, 1.0, 10), prompt_seed(7, 0, p.id))):
            assert_same_tokens(b, s)


def test_stops_early_while_others_run_to_max_tokens_and_hands_over_each_prompt_when_done(tiny_gguf_f32, tok,
                                                                                          layout):
    s = Sampler(tiny_gguf_f32, tok, n_ctx=256, threads=1, sequences=5, kv_cache=layout)  # two prompts of K=2 at once
    eog = s.eog
    try:
        greedy, _ = generate(s, PROMPTS, k=2, temperature=0.0, max_tokens=8)
        short = greedy["short"][0].token_ids.tolist()
        others = {t for p in PROMPTS[1:] for t in greedy[p.id][0].token_ids.tolist()}
        # "short" ends at the first of its tokens that no other prompt's reply holds (a random model's replies vary)
        at = next((i for i in range(1, 7) if short[i] not in others and short[i] not in short[:i]), None)
        if at is None:
            pytest.skip("this random model's replies share every token")
        stop = short[at]
        s.eog = eog | {stop}
        got, order = generate(s, PROMPTS, k=2, temperature=0.0, max_tokens=8)
    finally:
        s.eog = eog
        s.close()
    assert order[0] == "short"  # handed over as soon as finished, while the others still run
    for c in got["short"]:
        assert c.finish == "stop" and c.token_ids.tolist() == short[: at + 1]
        assert c.text == tok.decode(c.token_ids[:-1])
    for p in PROMPTS[1:]:
        for c in got[p.id]:  # the freed cells and sequence ids did not disturb them
            assert c.finish == "length" and len(c.token_ids) == 8
            assert_same_tokens(c, greedy[p.id][0])


def test_prompts_queue_for_the_cache_and_sequence_ids(tiny_gguf_f32, tok, batched, layout):
    narrow = Sampler(tiny_gguf_f32, tok, n_ctx=256, threads=1, sequences=2, kv_cache=layout)  # one prompt at a time
    try:
        got, order = generate(narrow, PROMPTS, k=2, temperature=1.0, max_tokens=6, seed=3)
    finally:
        narrow.close()
    wide, _ = generate(batched, PROMPTS, k=2, temperature=1.0, max_tokens=6, seed=3)
    assert order == [p.id for p in PROMPTS]
    for p in PROMPTS:
        for a, b in zip(got[p.id], wide[p.id]):
            assert_same_tokens(a, b)


def test_sample_all_uses_the_recipe_settings_and_per_prompt_seeds(batched):
    from pudl.recipe import SampleConfig

    cfg = SampleConfig(k=3, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, max_tokens=5)
    seen = []
    batched.sample_all(PROMPTS[:2], SamplingParams.of(cfg), seed=11, round_=2, on_prompt=lambda p, c: seen.append((p.id, c)))
    assert sorted(pid for pid, _ in seen) == ["long", "short"]
    for pid, cands in seen:
        p = next(x for x in PROMPTS if x.id == pid)
        ref = batched.sample(p, SamplingParams(3, 0.8, 5, top_k=20, top_p=0.9, min_p=0.05), prompt_seed(11, 2, pid))
        for a, b in zip(cands, ref, strict=True):
            assert_same_tokens(a, b)


def test_logprobs_match_mlx_policy(batched, tok, tiny_gguf_f32):
    got, _ = generate(batched, PROMPTS, k=2, temperature=1.0, max_tokens=10, seed=5)
    student = load_student(tiny_gguf_f32, 4, 8.0, ["q_proj"])
    for p in PROMPTS:
        context = tok.chat_tokens(chat_messages(p))
        batch = pack([(context, list(c.token_ids)) for c in got[p.id]])
        mlx = np.array(batch_token_logprobs(student, batch))
        for i, c in enumerate(got[p.id]):
            assert np.abs(mlx[i][np.array(batch.mask)[i] > 0] - c.logprobs).max() < 0.01


def float32_copy(src, dst):
    """The GGUF with every tensor dequantized to float32 by gguf-py (independently of llama.cpp)."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), arch="llama")
    for f in reader.fields.values():
        if not f.name.startswith("GGUF.") and f.name not in ("general.architecture", "general.file_type"):
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, dequantize(t.data, t.tensor_type).astype(np.float32).reshape(t.shape[::-1].tolist()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_float32_copy_only_when_it_is_a_small_share_of_ram():
    ram = 16 * 2**30
    limit = int(FLOAT_COPY_SHARE * ram) // 4  # the most parameters whose float32 copy fits
    assert float_copy_fits(limit, ram) and not float_copy_fits(limit + 1, ram)
    assert float_copy_fits(135_000_000, ram)  # SmolLM2-135M: 0.5 GB
    assert not float_copy_fits(3_090_000_000, ram)  # a 3B student: 12 GB, kept quantized
    assert float_copy_fits(1, None)  # reads this machine's RAM


def test_auto_kv_cache_turns_to_streams_for_large_jobs_with_the_same_candidates(tiny_gguf_f32, tok, monkeypatch):
    import pudl.sampler

    s = Sampler(tiny_gguf_f32, tok, n_ctx=256, threads=1)  # kv_cache="auto"
    try:
        small, _ = generate(s, PROMPTS, k=3, temperature=1.0, max_tokens=8, seed=2)
        assert not s.streams  # 4 prompts x (prompt + 3 x 8 cells): far below STREAMS_ABOVE_CELLS
        monkeypatch.setattr(pudl.sampler, "STREAMS_ABOVE_CELLS", 64)
        generate(s, PROMPTS, k=3, temperature=1.0, max_tokens=8, seed=2)
        assert not s.streams  # short replies: 5 streams of 256 cells would be > 2x the unified cache
        monkeypatch.setattr(pudl.sampler, "STREAMS_MEMORY_RATIO", 100.0)
        monkeypatch.setattr(pudl.sampler, "STREAMS_RAM_SHARE", 1e-9)  # streams would not fit the RAM share
        generate(s, PROMPTS, k=3, temperature=1.0, max_tokens=8, seed=2)
        assert not s.streams
        monkeypatch.setattr(pudl.sampler, "STREAMS_RAM_SHARE", 1 / 16)
        large, _ = generate(s, PROMPTS, k=3, temperature=1.0, max_tokens=8, seed=2)
        assert s.streams
    finally:
        s.close()
    for p in PROMPTS:
        for a, b in zip(small[p.id], large[p.id], strict=True):
            assert_same_tokens(a, b)
    with pytest.raises(ValueError):
        Sampler(tiny_gguf_f32, tok, kv_cache="paged")


def test_recipe_sets_the_live_sequences_of_the_run_sampler(tiny_gguf, tmp_path):
    from pudl.recipe import load_recipe
    from tests import recipe_files

    path = recipe_files.write_recipe(tmp_path, {"run": {"out": tmp_path / "run"}, "student": {"model": tiny_gguf,
                                                "threads": 1}, "sample": {"k": 3, "sequences": 7, "kv_cache": "streams"}})
    (tmp_path / "run").mkdir()
    from pudl.runtime import Runtime

    sampler = Runtime(load_recipe(path)).sampler(None)
    try:
        assert sampler.sequences == 7 and sampler.kv_cache == "streams"
    finally:
        sampler.close()


def test_recipe_can_choose_the_sequential_fallback_and_it_samples_the_same_candidates(tiny_gguf_f32, tmp_path,
                                                                                        batched):
    from pudl.recipe import load_recipe
    from tests import recipe_files

    path = recipe_files.write_recipe(tmp_path, {"run": {"out": tmp_path / "run"}, "student": {
        "model": tiny_gguf_f32, "threads": 1, "n_ctx": 256}, "sample": {"backend": "llamacpp-sequential"}})
    (tmp_path / "run").mkdir()
    from pudl.runtime import Runtime

    sampler = Runtime(load_recipe(path)).sampler(None)
    try:
        assert isinstance(sampler, SequentialSampler)
        got, _ = generate(sampler, PROMPTS[:2], k=3, temperature=1.0, max_tokens=8, seed=5)
    finally:
        sampler.close()
    ref, _ = generate(batched, PROMPTS[:2], k=3, temperature=1.0, max_tokens=8, seed=5)
    for p in PROMPTS[:2]:
        for a, b in zip(got[p.id], ref[p.id], strict=True):
            assert_same_tokens(a, b)


def test_quantized_gguf_is_sampled_in_float32_from_its_exact_weights(tiny_gguf, tmp_path):
    tok = Tokenizer(tiny_gguf)
    s = Sampler(tiny_gguf, tok, n_ctx=256, threads=1)  # on the CPU: dequantized to float32 by llama.cpp
    try:
        got, _ = generate(s, PROMPTS, k=2, temperature=1.0, max_tokens=10, seed=1)
    finally:
        s.close()
    student = load_student(float32_copy(tiny_gguf, tmp_path / "f32.gguf"), 4, 8.0, ["q_proj"])
    for p in PROMPTS:
        batch = pack([(tok.chat_tokens(chat_messages(p)), list(c.token_ids)) for c in got[p.id]])
        mlx = np.array(batch_token_logprobs(student, batch))
        for i, c in enumerate(got[p.id]):
            assert np.abs(mlx[i][np.array(batch.mask)[i] > 0] - c.logprobs).max() < 1e-3


def test_lora_changes_batched_output_like_sequential_and_mlx(tiny_gguf_f32, tok, batched, tmp_path):
    student = load_student(tiny_gguf_f32, 4, 8.0, ["q_proj", "v_proj", "down_proj"], seed=1)
    for layer in student.lora_layers.values():
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.3
    path = tmp_path / "lora.gguf"
    write_gguf_lora(student, path)
    with_lora = Sampler(tiny_gguf_f32, tok, adapter_path=path, n_ctx=256, threads=1)
    seq_lora = SequentialSampler(tiny_gguf_f32, tok, adapter_path=path, n_ctx=256, threads=1)
    try:
        got, _ = generate(with_lora, PROMPTS, k=2, temperature=0.0, max_tokens=10)
        refs = {p.id: seq_lora.sample(p, SamplingParams(1, 0.0, 10), 0)[0] for p in PROMPTS}
    finally:
        with_lora.close()
        seq_lora.close()
    base, _ = generate(batched, PROMPTS, k=1, temperature=0.0, max_tokens=10)
    assert any(got[p.id][0].token_ids.tolist() != base[p.id][0].token_ids.tolist() for p in PROMPTS)
    for p in PROMPTS:
        assert_same_tokens(got[p.id][0], refs[p.id])
        batch = pack([(tok.chat_tokens(chat_messages(p)), list(got[p.id][0].token_ids))])
        mlx = np.array(batch_token_logprobs(student, batch))[0][np.array(batch.mask)[0] > 0]
        assert np.abs(mlx - got[p.id][0].logprobs).max() < 1e-3  # the LoRA llama.cpp applies is MLX's


def test_vectorised_logprobs_are_log_softmax():
    logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32) * 5
    tokens = np.array([0, 17, 49])
    expected = [log_softmax(row)[t] for row, t in zip(logits, tokens)]
    assert np.allclose(token_logprobs(logits, tokens), expected, atol=1e-6)


@pytest.mark.integration
def test_smollm2_batched_candidates_match_mlx(smollm2):
    tok = Tokenizer(smollm2)
    s = Sampler(smollm2, tok, n_ctx=512)
    try:
        got, _ = generate(s, PROMPTS[:2], k=2, temperature=0.9, max_tokens=8, seed=0, top_k=40, top_p=0.95)
    finally:
        s.close()
    student = load_student(smollm2, 8, 16.0, ["q_proj"])
    for p in PROMPTS[:2]:
        batch = pack([(tok.chat_tokens(chat_messages(p)), list(c.token_ids)) for c in got[p.id]])
        mlx = np.array(batch_token_logprobs(student, batch))
        for i, c in enumerate(got[p.id]):
            assert np.abs(mlx[i][np.array(batch.mask)[i] > 0] - c.logprobs).max() < 0.1


def test_an_exception_inside_the_with_block_closes_the_sampler(tiny_gguf_f32):
    tok = Tokenizer(tiny_gguf_f32)
    with pytest.raises(ZeroDivisionError):
        with Sampler(tiny_gguf_f32, tok, n_ctx=256, threads=1) as s:
            assert s.model is not None
            _ = 1 / 0
    assert s.model is None and s.ctx is None  # model and context freed
