"""Context + completion token sequences -> padded MLX batches -> per-token log-probs of the completion.

Token ids come from the sampler or the tokenizer as they are (never re-tokenised from decoded text).
Batches are right-padded: with a causal mask the padding never influences a real position.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_lm.models.cache import KVCache, make_prompt_cache

from pudl.kernels import token_logprobs


@dataclass(frozen=True)
class SeqBatch:
    inputs: mx.array  # int32 [B, T]: tokens[:-1]
    targets: mx.array  # int32 [B, T]: tokens[1:]
    mask: mx.array  # float32 [B, T]: 1 where the target is a completion token

    @property
    def n_tokens(self) -> int:
        return int(self.inputs.size)


def pack(sequences: list[tuple[list[int], list[int]]], multiple: int = 1) -> SeqBatch:
    """Pack (context ids, completion ids) pairs into one right-padded batch (width rounded up to `multiple`)."""
    width = max(len(c) + len(y) for c, y in sequences) - 1
    width = -(-width // multiple) * multiple
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
    """Per-token log-probs of each sequence's completion (no gradient).

    Sequences that share a context (a prompt's K candidates) decode the context once and reuse its KV cache
    for all their completions, batched up to `batch_size` at a time.
    """
    student.set_adapter(adapter)
    try:
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(sequences)
        by_context: dict[tuple, list[int]] = {}
        for i, (context, _) in enumerate(sequences):
            by_context.setdefault(tuple(context), []).append(i)
        for context, members in by_context.items():
            states, last = _prefix(student, list(context))
            members.sort(key=lambda i: len(sequences[i][1]))
            for start in range(0, len(members), batch_size):
                idx = members[start : start + batch_size]
                logps = _completions_after_prefix(student, states, last, [list(sequences[i][1]) for i in idx])
                for row, i in enumerate(idx):
                    out[i] = logps[row][: len(sequences[i][1])]
        return out
    finally:
        student.set_adapter(True)


def _prefix(student, context: list[int]):
    """Decode a context once: its per-layer (keys, values) and the hidden state after its last token."""
    caches = make_prompt_cache(student.model)
    hidden = student.model.model(mx.array([context], mx.int32), cache=caches)
    states = [c.keys_and_values() for c in caches]
    last = hidden[:, -1:, :]
    mx.eval(states, last)
    return states, last


def _completions_after_prefix(student, states, last, completions: list[list[int]]) -> np.ndarray:
    """Token log-probs [n, max_len] of completions that all continue the same decoded prefix."""
    n, width = len(completions), max(len(c) for c in completions)
    targets = np.zeros((n, width), np.int32)
    mask = np.zeros((n, width), np.float32)
    for row, c in enumerate(completions):
        targets[row, : len(c)], mask[row, : len(c)] = c, 1.0
    hidden = mx.repeat(last, n, axis=0)  # predicts each completion's first token
    if width > 1:
        caches = []
        for keys, values in states:
            cache = KVCache()
            cache.state = (mx.repeat(keys, n, axis=0), mx.repeat(values, n, axis=0), keys.shape[2])
            caches.append(cache)
        rest = student.model.model(mx.array(targets[:, :-1]), cache=caches)
        hidden = mx.concatenate([hidden, rest], axis=1)
    logps = token_logprobs(hidden, student.head_weight, mx.array(targets), mx.array(mask))
    return np.array(logps)


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
