"""Context + completion token sequences -> prefix-shared MLX batches -> per-token log-probs of the completion.

Token ids come from the sampler or the tokenizer as they are (never re-tokenised from decoded text).

Sequences that share a context (a pair's chosen and rejected, a prompt's K candidates) run that context through
the model once: a batch holds each distinct context once, left-padded, and the completions, right-padded; the
completions attend to their context's keys/values (per layer) and to themselves. The LM head only ever sees
completion positions. Training and scoring both go through `shared_hidden`, so what the trainer optimises is
exactly what the scorer and the reference pass compute. In the demo, contexts are ~70 % of a sequence's tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from pudl.kernels import token_logprobs


@dataclass(frozen=True)
class SeqBatch:
    contexts: mx.array  # int32 [P, C]: the distinct contexts, left-padded with 0
    context_mask: mx.array  # float32 [P, C]: 1 at real context tokens
    owner: mx.array  # int32 [N]: each sequence's context row
    targets: mx.array  # int32 [N, L]: completion tokens, right-padded
    mask: mx.array  # float32 [N, L]: 1 at real completion tokens
    n_tokens: int = 0  # context + completion tokens of the N sequences, as if each ran on its own

    @property
    def arrays(self) -> tuple[mx.array, ...]:
        return self.contexts, self.context_mask, self.owner, self.targets, self.mask


def _round_up(n: int, multiple: int) -> int:
    return -(-max(n, 1) // multiple) * multiple


def pack(sequences: list[tuple[list[int], list[int]]], multiple: int = 1,
         completion_multiple: int | None = None) -> SeqBatch:
    """Pack (context ids, completion ids) pairs into one prefix-shared batch: the context width rounded up to
    `multiple`, the completion width to `completion_multiple` (default: the same). Every context needs at least
    one token (the chat template's)."""
    rows: dict[tuple, int] = {}
    owner = [rows.setdefault(tuple(c), len(rows)) for c, _ in sequences]
    if any(len(c) == 0 for c in rows):
        raise ValueError("pack: a context needs at least one token")
    width_c = _round_up(max(len(c) for c in rows), multiple)
    width_y = _round_up(max(len(y) for _, y in sequences), completion_multiple or multiple)
    contexts = np.zeros((len(rows), width_c), np.int32)
    context_mask = np.zeros((len(rows), width_c), np.float32)
    for context, row in rows.items():
        contexts[row, width_c - len(context) :] = context
        context_mask[row, width_c - len(context) :] = 1.0
    targets = np.zeros((len(sequences), width_y), np.int32)
    mask = np.zeros((len(sequences), width_y), np.float32)
    for i, (_, completion) in enumerate(sequences):
        targets[i, : len(completion)], mask[i, : len(completion)] = completion, 1.0
    n_tokens = sum(len(c) + len(y) for c, y in sequences)
    return SeqBatch(mx.array(contexts), mx.array(context_mask), mx.array(np.array(owner, np.int32)),
                    mx.array(targets), mx.array(mask), n_tokens)


class _KeepKV:
    """Context pass of one layer: rope from position 0, keys/values kept for the completions."""

    offset = 0

    def update_and_fetch(self, keys, values):
        self.keys, self.values = keys, values
        return keys, values


class _AfterContext:
    """Completion pass of one layer: positions continue after the context; keys/values = its context's + own."""

    def __init__(self, keys: mx.array, values: mx.array):
        self.keys, self.values, self.offset = keys, values, keys.shape[2]

    def update_and_fetch(self, keys, values):
        return mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)


def _context_layer(layer, hidden, mask):
    kv = _KeepKV()
    return layer(hidden, mask, kv), kv.keys, kv.values


def _completion_layer(layer, hidden, mask, keys, values):
    return layer(hidden, mask, _AfterContext(keys, values))


def _recomputed(layer, fn):
    """`fn(layer, *arrays)` whose intermediates are not kept for the backward pass but recomputed there (gradient
    checkpointing): only the layer's inputs stay alive. The trainable parameters are passed in explicitly so
    their gradients flow through the checkpoint."""
    def run(params, *arrays):
        layer.update(params)
        return fn(layer, *arrays)

    checkpointed = mx.checkpoint(run)
    return lambda *arrays: checkpointed(layer.trainable_parameters(), *arrays)


def shared_hidden(student, contexts, context_mask, owner, targets, recompute: bool = False) -> mx.array:
    """Final normed hidden states [N, L, H]; position j predicts completion token j (`targets[:, j]`).

    Left padding keeps every context's last token in the last column, and a row's positions are shifted by
    its padding alike, so rope's relative angles are those of the sequence alone; padded keys are masked
    out (a padded query attends to itself only, so nothing is ever 0/0). `recompute` (training): each layer's
    activations are recomputed in the backward pass instead of kept (less memory, one more forward)."""
    inner = student.model.model
    if any(getattr(layer, "use_sliding", False) for layer in inner.layers):
        raise ValueError("shared_hidden: sliding-window attention is not supported")
    wrap = _recomputed if recompute else (lambda layer, fn: functools.partial(fn, layer))
    width_c, width_y = contexts.shape[1], targets.shape[1]
    valid = context_mask > 0
    causal = mx.tril(mx.ones((width_c, width_c), mx.bool_))
    mask = ((causal[None] & valid[:, None, :]) | mx.eye(width_c, dtype=mx.bool_)[None])[:, None]
    hidden = inner.embed_tokens(contexts)
    kept = []
    for layer in inner.layers:
        hidden, keys, values = wrap(layer, _context_layer)(hidden, mask)
        kept.append((keys, values))
    first = inner.norm(hidden[:, -1:, :])[owner]  # [N, 1, H]: predicts each completion's first token
    if width_y == 1:
        return first
    n, rest = targets.shape[0], width_y - 1
    own = mx.tril(mx.ones((rest, rest), mx.bool_))
    mask = mx.concatenate([mx.broadcast_to(valid[owner][:, None, :], (n, rest, width_c)),
                           mx.broadcast_to(own[None], (n, rest, rest))], axis=2)[:, None]
    hidden = inner.embed_tokens(targets[:, :-1])
    for layer, (keys, values) in zip(inner.layers, kept):
        hidden = wrap(layer, _completion_layer)(hidden, mask, keys[owner], values[owner])
    return mx.concatenate([first, inner.norm(hidden)], axis=1)


def token_logprobs_of(student, contexts, context_mask, owner, targets, mask, grad_ready: bool = False,
                      recompute: bool = False) -> mx.array:
    """log p(completion token) [N, L], zero where the mask is zero. `grad_ready` (training): the head kernel
    prepares the hidden states' gradient in its forward pass (no second pass over the vocabulary in the
    backward; an extra matmul when no gradient is taken, so scoring leaves it off)."""
    hidden = shared_hidden(student, contexts, context_mask, owner, targets, recompute)
    return token_logprobs(hidden, student.head_weight, targets, mask, grad_ready=grad_ready)


def batch_token_logprobs(student, batch: SeqBatch, grad_ready: bool = False, recompute: bool = False) -> mx.array:
    return token_logprobs_of(student, *batch.arrays, grad_ready=grad_ready, recompute=recompute)


def completion_logprobs(student, sequences, batch_size: int = 8, adapter: bool = True) -> list[np.ndarray]:
    """Per-token log-probs of each sequence's completion (no gradient), up to `batch_size` distinct contexts
    (with all their sequences) per forward pass; contexts with similar completion lengths go together."""
    student.set_adapter(adapter)
    try:
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(sequences)
        by_context: dict[tuple, list[int]] = {}
        for i, (context, _) in enumerate(sequences):
            by_context.setdefault(tuple(context), []).append(i)
        groups = sorted(by_context.values(), key=lambda members: max(len(sequences[i][1]) for i in members))
        for start in range(0, len(groups), batch_size):
            idx = [i for members in groups[start : start + batch_size] for i in members]
            logps = np.array(batch_token_logprobs(student, pack([sequences[i] for i in idx])))
            for row, i in enumerate(idx):
                out[i] = logps[row][: len(sequences[i][1])]
        return out
    finally:
        student.set_adapter(True)


def sequence_logprobs(student, sequences, batch_size: int = 8, adapter: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Summed completion log-prob and completion length of each sequence (no gradient)."""
    tokens = completion_logprobs(student, sequences, batch_size, adapter)
    return (np.array([t.sum(dtype=np.float64) for t in tokens]), np.array([len(t) for t in tokens], np.int64))


def aligned(batch: SeqBatch, per_sequence: list[np.ndarray]) -> mx.array:
    """Place each sequence's per-completion-token values at its mask positions of `batch` ([N, L], 0 elsewhere)."""
    mask = np.array(batch.mask) > 0
    out = np.zeros(mask.shape, np.float32)
    for row, values in enumerate(per_sequence):
        out[row][mask[row]] = values
    return mx.array(out)
