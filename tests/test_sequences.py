"""Scoring with a shared, cached context gives the same log-probs as scoring each full sequence."""

import mlx.core as mx
import numpy as np

from pudl.models import load_student
from pudl.sequences import batch_token_logprobs, completion_logprobs, pack, sequence_logprobs


def test_shared_prefix_matches_full_sequences(tiny_gguf):
    student = load_student(tiny_gguf, 4, 8.0, ["q_proj", "v_proj", "up_proj"])
    for layer in student.lora_layers.values():
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    rng = np.random.default_rng()
    contexts = [[int(x) for x in rng.integers(0, 49152, rng.integers(1, 30))] for _ in range(3)]
    seqs = [(contexts[i % 3], [int(x) for x in rng.integers(0, 49152, rng.integers(1, 12))]) for i in range(13)]
    for adapter in (True, False):
        fast = completion_logprobs(student, seqs, batch_size=3, adapter=adapter)
        student.set_adapter(adapter)
        for (context, completion), got in zip(seqs, fast):
            batch = pack([(context, completion)])
            full = np.array(batch_token_logprobs(student, batch))[0][np.array(batch.mask)[0] > 0]
            assert len(got) == len(completion) and np.abs(got - full).max() < 1e-4
        student.set_adapter(True)
    sums, counts = sequence_logprobs(student, seqs)
    assert counts.tolist() == [len(y) for _, y in seqs]
    assert np.allclose(sums, [t.sum() for t in completion_logprobs(student, seqs)], atol=1e-4)
