"""The llama.cpp sampler: token ids and log-probs the MLX trainer agrees with, reproducible, K distinct."""

import numpy as np
import pytest

from pudl.models import Tokenizer, load_student
from pudl.prompts import Prompt, chat_messages
from pudl.domain import SamplingParams
from pudl.sampler import Sampler
from pudl.sampling import _top_candidates, draw, draw_rows, log_softmax, token_logprobs
from pudl.sequences import batch_token_logprobs, pack

PROMPT = Prompt("p", "Name a color. Reply with one word.")


@pytest.fixture(scope="module")
def tiny_sampler(tiny_gguf_f32):
    tok = Tokenizer(tiny_gguf_f32)
    s = Sampler(tiny_gguf_f32, tok, n_ctx=256, threads=2)
    yield s, tok
    s.close()


def test_greedy_candidates_are_identical_and_restart_from_the_prompt(tiny_sampler):
    s, _ = tiny_sampler
    a, b, c = s.sample(PROMPT, SamplingParams(3, 0.0, 12), 0)
    assert a.token_ids.tolist() == b.token_ids.tolist() == c.token_ids.tolist()
    assert len(a.token_ids) == len(a.logprobs) > 0


def test_seeded_sampling_is_reproducible_and_candidates_differ(tiny_sampler):
    s, _ = tiny_sampler
    first = s.sample(PROMPT, SamplingParams(4, 1.0, 12, top_k=0, top_p=1.0), 7)
    again = s.sample(PROMPT, SamplingParams(4, 1.0, 12, top_k=0, top_p=1.0), 7)
    assert [c.token_ids.tolist() for c in first] == [c.token_ids.tolist() for c in again]
    assert len({tuple(c.token_ids.tolist()) for c in first}) > 1


def test_sampler_logprobs_match_mlx_policy(tiny_sampler, tiny_gguf_f32):
    s, tok = tiny_sampler
    cands = s.sample(PROMPT, SamplingParams(2, 1.0, 10, top_k=0, top_p=1.0), 3)
    student = load_student(tiny_gguf_f32, 4, 8.0, ["q_proj"])
    context = tok.chat_tokens(chat_messages(PROMPT))
    batch = pack([(context, list(c.token_ids)) for c in cands])
    mlx = np.array(batch_token_logprobs(student, batch))
    for i, c in enumerate(cands):
        got = mlx[i][np.array(batch.mask)[i] > 0]
        assert np.abs(got - c.logprobs).max() < 0.05  # llama.cpp's KV cache is float16


def test_draw_truncation_rules():
    rng = np.random.default_rng()
    logits = np.array([5.0, 4.9, 1.0, 0.0, -3.0])
    assert draw(logits, SamplingParams(temperature=0.0), rng) == 0
    assert {draw(logits, SamplingParams(temperature=1.0, top_k=2), rng) for _ in range(200)} <= {0, 1}
    assert {draw(logits, SamplingParams(temperature=1.0, min_p=0.5), rng) for _ in range(200)} <= {0, 1}
    p = np.exp(log_softmax(logits))
    assert p[:2].sum() < 0.99 and {draw(logits, SamplingParams(temperature=1.0, top_p=0.5), rng) for _ in range(200)} == {0}
    assert len({draw(logits, SamplingParams(temperature=5.0), rng) for _ in range(400)}) == 5


def reference_draw(logits, temperature, rng, top_k, top_p, min_p):
    """The rule written plainly in float64: full sort, truncate, renormalise, `Generator.choice`."""
    order = np.argsort(-logits.astype(np.float64), kind="stable")
    if top_k:
        order = order[:top_k]
    z = logits[order].astype(np.float64) / temperature
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    keep = (np.cumsum(probs) - probs < top_p) & (probs >= min_p * probs[0])
    return int(order[keep][rng.choice(keep.sum(), p=probs[keep] / probs[keep].sum())])


@pytest.mark.parametrize("vocab", [7, 300, 49152])
def test_batched_draws_are_the_plain_rule_and_independent_of_batch_mates(vocab):
    rng = np.random.default_rng()
    n = 12
    logits = (rng.normal(size=(n, vocab)) * rng.uniform(0.5, 4.0, size=(n, 1))).astype(np.float32)
    seeds = rng.integers(2**32, size=n)
    for temperature, top_k, top_p, min_p in [(1.0, 0, 1.0, 0.0), (0.9, 5, 0.95, 0.05), (1.3, 40, 0.5, 0.0),
                                             (0.7, 3, 1.0, 0.2)]:
        rows = draw_rows(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p), [np.random.default_rng(s) for s in seeds])
        for i in range(n):  # one row alone, and the plain rule, draw the same token from the same stream
            alone = draw(logits[i], SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p), np.random.default_rng(seeds[i]))
            ref = reference_draw(logits[i], temperature, np.random.default_rng(seeds[i]), top_k, top_p, min_p)
            assert rows[i] == alone == ref
    assert draw_rows(logits, SamplingParams(temperature=0.0), [None] * n).tolist() == logits.argmax(axis=1).tolist()


def test_top_candidates_break_ties_by_token_id():
    logits = np.zeros((2, 1000), np.float32)
    logits[0, [900, 10, 500]] = 3.0  # three tied maxima
    logits[1, 999] = 1.0
    got = _top_candidates(logits, 4)
    assert got[0].tolist() == [10, 500, 900, 0] and got[1].tolist() == [999, 0, 1, 2]


def test_token_logprobs_over_a_full_vocabulary_match_float64():
    rng = np.random.default_rng()
    logits = (rng.normal(size=(6, 49152)) * 4).astype(np.float32)
    tokens = rng.integers(49152, size=6)
    expected = [log_softmax(row.astype(np.float64))[t] for row, t in zip(logits, tokens)]
    assert np.allclose(token_logprobs(logits, tokens), expected, rtol=0, atol=1e-5)
