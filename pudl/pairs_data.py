"""Preference pairs -> token sequences -> training batches for the one training loop."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from pudl.cache import ANCHOR_IDX, Candidate, Pair
from pudl.losses import TrainBatch
from pudl.prompts import Prompt, chat_messages
from pudl.sequences import pack


def pair_sequences(pairs: list[Pair], prompts: dict[str, Prompt], anchors: dict[str, str],
                   candidates: dict[str, list[Candidate]], tokenizer) -> list[tuple[tuple, tuple]]:
    """((context, chosen ids), (context, rejected ids)) per pair; candidates keep their sampled ids."""
    contexts: dict[str, list[int]] = {}
    out = []
    for p in pairs:
        if p.prompt_id not in contexts:
            contexts[p.prompt_id] = tokenizer.chat_tokens(chat_messages(prompts[p.prompt_id]))
        context = contexts[p.prompt_id]

        def completion(idx):
            if idx == ANCHOR_IDX:
                return tokenizer.answer_tokens(anchors[p.prompt_id])
            return list(candidates[p.prompt_id][idx].token_ids)

        out.append(((context, completion(p.chosen_idx)), (context, completion(p.rejected_idx))))
    return out


def dpo_batches(pairs: list[Pair], prompts, anchors, candidates, tokenizer, cfg, seed: int) -> tuple[list[TrainBatch], int]:
    """Epochs of shuffled pair batches laid out [chosen0, rejected0, ...] with cached reference log-probs."""
    sequences = pair_sequences(pairs, prompts, anchors, candidates, tokenizer)
    keep = [i for i, (c, r) in enumerate(sequences)
            if max(len(c[0]) + len(c[1]), len(r[0]) + len(r[1])) <= cfg.max_seq_len]
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(cfg.epochs):
        order = rng.permutation(keep).tolist()
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            seqs = [s for i in idx for s in sequences[i]]
            ref = [v for i in idx for v in (pairs[i].ref_chosen, pairs[i].ref_rejected)]
            batches.append(TrainBatch(pack(seqs), {"ref_logps": mx.array(np.array(ref, np.float32))}, len(idx)))
    return batches, len(pairs) - len(keep)
