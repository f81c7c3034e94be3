"""Context + completion token sequences -> padded MLX batches -> per-token log-probs of the completion.

Token ids come from the sampler or the tokenizer as they are (never re-tokenised from decoded text).
Batches are right-padded: with a causal mask the padding never influences a real position.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from pudl.kernels import token_logprobs


@dataclass(frozen=True)
class SeqBatch:
    inputs: mx.array  # int32 [B, T]: tokens[:-1]
    targets: mx.array  # int32 [B, T]: tokens[1:]
    mask: mx.array  # float32 [B, T]: 1 where the target is a completion token

    @property
    def n_tokens(self) -> int:
        return int(self.inputs.size)


def pack(sequences: list[tuple[list[int], list[int]]]) -> SeqBatch:
    """Pack (context ids, completion ids) pairs into one right-padded batch."""
    width = max(len(c) + len(y) for c, y in sequences) - 1
    inputs = np.zeros((len(sequences), width), np.int32)
    targets = np.zeros((len(sequences), width), np.int32)
    mask = np.zeros((len(sequences), width), np.float32)
    for i, (context, completion) in enumerate(sequences):
        tokens = np.asarray(list(context) + list(completion), np.int32)
        n = len(tokens) - 1
        inputs[i, :n], targets[i, :n] = tokens[:-1], tokens[1:]
        mask[i, len(context) - 1 : n] = 1.0
    return SeqBatch(mx.array(inputs), mx.array(targets), mx.array(mask))


def batch_token_logprobs(student, batch: SeqBatch) -> mx.array:
    """log p(target) at every position [B, T], zero where the mask is zero."""
    hidden = student.hidden(batch.inputs)
    return token_logprobs(hidden, student.head_weight, batch.targets, batch.mask)


def completion_logprobs(student, sequences, batch_size: int = 8, adapter: bool = True) -> list[np.ndarray]:
    """Per-token log-probs of each sequence's completion (no gradient), batched by similar length."""
    student.set_adapter(adapter)
    try:
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(sequences)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = pack([sequences[i] for i in idx])
            logps = batch_token_logprobs(student, batch)
            mx.eval(logps)
            logps, mask = np.array(logps), np.array(batch.mask) > 0
            for row, i in enumerate(idx):
                out[i] = logps[row][mask[row]].astype(np.float32)
        return out
    finally:
        student.set_adapter(True)


def sequence_logprobs(student, sequences, batch_size: int = 8, adapter: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Summed completion log-prob and completion length of each sequence (no gradient)."""
    tokens = completion_logprobs(student, sequences, batch_size, adapter)
    return (np.array([t.sum(dtype=np.float64) for t in tokens]), np.array([len(t) for t in tokens], np.int64))


def aligned(batch: SeqBatch, per_sequence: list[np.ndarray]) -> mx.array:
    """Place each sequence's per-completion-token values at its mask positions of `batch` ([B, T], 0 elsewhere)."""
    mask = np.array(batch.mask) > 0
    out = np.zeros(mask.shape, np.float32)
    for row, values in enumerate(per_sequence):
        out[row][mask[row]] = values
    return mx.array(out)
