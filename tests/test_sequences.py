"""The prefix-shared forward (each context once, completions attending to its keys/values) gives the same
log-probs and the same LoRA gradients as running every full sequence through the plain mlx-lm forward."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from pudl.models import load_student
from pudl.sequences import batch_token_logprobs, completion_logprobs, pack, sequence_logprobs


def _full_hidden(student, context, completion) -> mx.array:
    """The whole sequence through mlx-lm's own causal forward: hidden states predicting the completion."""
    return student.model.model(mx.array([list(context) + list(completion)]))[0, len(context) - 1 : -1]


def _full_logprobs(student, context, completion) -> mx.array:
    """Reference for gradients: full logits and log-softmax in MLX."""
    logits = _full_hidden(student, context, completion) @ student.head_weight.T
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return mx.take_along_axis(logp, mx.array(completion)[:, None], axis=1)[:, 0]


def _reference(student, context, completion) -> np.ndarray:
    """Reference for values: the head and log-softmax in float64 NumPy."""
    logits = np.array(_full_hidden(student, context, completion), np.float64) @ np.array(student.head_weight,
                                                                                        np.float64).T
    top = logits.max(axis=1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    return logp[np.arange(len(completion)), completion]


def _close(got, ref) -> bool:
    return bool(np.all(np.abs(got - ref) <= 1e-5 * np.abs(ref) + 1e-5))


@pytest.fixture
def student(tiny_gguf):
    student = load_student(tiny_gguf, 4, 8.0, ["q_proj", "k_proj", "v_proj", "up_proj"])
    for layer in student.lora_layers.values():
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    return student


def _sequences(rng, n_contexts=3, n=13, max_completion=12):
    contexts = [[int(x) for x in rng.integers(0, 49152, rng.integers(1, 30))] for _ in range(n_contexts)]
    return [(contexts[i % n_contexts], [int(x) for x in rng.integers(0, 49152, rng.integers(1, max_completion))])
            for i in range(n)]


def test_shared_prefix_matches_full_sequences(student):
    rng = np.random.default_rng()
    seqs = _sequences(rng)
    for adapter in (True, False):
        fast = completion_logprobs(student, seqs, batch_size=2, adapter=adapter)
        student.set_adapter(adapter)
        for (context, completion), got in zip(seqs, fast):
            assert len(got) == len(completion) and _close(got, _reference(student, context, completion))
        student.set_adapter(True)
    sums, counts = sequence_logprobs(student, seqs)
    assert counts.tolist() == [len(y) for _, y in seqs]
    assert np.allclose(sums, [t.sum() for t in completion_logprobs(student, seqs)], atol=1e-4)


def test_padded_batch_layout(student):
    rng = np.random.default_rng()
    seqs = _sequences(rng, n_contexts=2, n=5)
    batch = pack(seqs, multiple=16)
    assert batch.contexts.shape[0] == 2 and batch.contexts.shape[1] % 16 == 0 and batch.targets.shape[1] == 16
    assert batch.owner.tolist() == [i % 2 for i in range(5)]
    assert batch.n_tokens == sum(len(c) + len(y) for c, y in seqs)
    got = np.array(batch_token_logprobs(student, batch))
    for row, (context, completion) in enumerate(seqs):
        assert _close(got[row, : len(completion)], _reference(student, context, completion))
        assert (got[row, len(completion) :] == 0).all()
    with pytest.raises(ValueError, match="context"):
        pack([([], [1, 2])])


@pytest.mark.parametrize("recompute", [False, True])
def test_shared_prefix_gradients_match_full_sequences(student, recompute):
    """The LoRA gradients of a loss over the prefix-shared batch equal those over the full sequences, with and
    without recomputing the layers' activations in the backward pass (gradient checkpointing)."""
    rng = np.random.default_rng()
    seqs = _sequences(rng, n_contexts=2, n=6, max_completion=6)
    weights = [float(w) for w in rng.normal(size=len(seqs))]
    batch = pack(seqs, multiple=4)

    def shared_loss(_model):
        logps = batch_token_logprobs(student, batch, recompute=recompute)
        return (logps.sum(axis=1) * mx.array(weights)).sum()

    def full_loss(_model):
        return sum(w * _full_logprobs(student, c, y).sum() for w, (c, y) in zip(weights, seqs))

    _, g_shared = nn.value_and_grad(student.model, shared_loss)(student.model)
    _, g_full = nn.value_and_grad(student.model, full_loss)(student.model)
    flat_shared, flat_full = dict(tree_flatten(g_shared)), dict(tree_flatten(g_full))
    assert flat_shared.keys() == flat_full.keys() and len(flat_full) > 0
    for key, ref in flat_full.items():
        ref, got = np.array(ref, np.float64), np.array(flat_shared[key], np.float64)
        assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), key
