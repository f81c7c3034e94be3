"""Ranked candidates -> what the trainer consumes: DPO pairs or listwise groups, as padded batches.

Candidates keep their sampled token ids; only the anchor (teacher text) is tokenised. Reference log-probs
come from the cache (computed once, adapter disabled); the sampler's log-probs are GRPO's behaviour policy.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np

from pudl.domain import ANCHOR_BEHAVIOUR_IDX, ANCHOR_IDX, Candidate, Group, Pair, TrainJob
from pudl.kernels import grpo_advantages
from pudl.losses import TrainBatch
from pudl.prompts import Prompt, chat_messages
from pudl.sequences import aligned, pack


# Batch widths are rounded up so the compiled training step sees few distinct shapes; completions are short
# (a few tokens in the benchmark's pairs), so they round to a finer step than the contexts.
PAD_MULTIPLE, COMPLETION_MULTIPLE = 16, 8


class Completions:
    """Token ids of prompt contexts and of completions (candidates as sampled, the anchor tokenised once)."""

    def __init__(self, prompts: dict[str, Prompt], anchors: dict[str, str], candidates: dict[str, list[Candidate]],
                 tokenizer):
        self.prompts, self.anchors, self.candidates, self.tokenizer = prompts, anchors, candidates, tokenizer
        self._contexts: dict[str, list[int]] = {}
        self._anchor_ids: dict[str, list[int]] = {}

    def context(self, prompt_id: str) -> list[int]:
        if prompt_id not in self._contexts:
            self._contexts[prompt_id] = self.tokenizer.chat_tokens(chat_messages(self.prompts[prompt_id]))
        return self._contexts[prompt_id]

    def completion(self, prompt_id: str, idx: int) -> list[int]:
        if idx == ANCHOR_IDX:
            if prompt_id not in self._anchor_ids:
                self._anchor_ids[prompt_id] = self.tokenizer.answer_tokens(self.anchors[prompt_id])
            return self._anchor_ids[prompt_id]
        return list(self.candidates[prompt_id][idx].token_ids)

    def sequence(self, prompt_id: str, idx: int) -> tuple[list[int], list[int]]:
        return self.context(prompt_id), self.completion(prompt_id, idx)



def behaviour(comp: Completions, refs: dict, prompt_id: str, idx: int) -> np.ndarray:
    """GRPO's behaviour log-probs: the sampler's for a candidate; for the anchor (never sampled), its log-probs
    under the policy that sampled this round, computed in MLX when the round's preferences were made."""
    if idx == ANCHOR_IDX:
        return refs[(prompt_id, ANCHOR_BEHAVIOUR_IDX)]
    return comp.candidates[prompt_id][idx].logprobs


def anchor_on_top(candidate_scores, min_gap: float = 1e-6) -> float:
    """The labelled positive's place in a ranked group: above every unlabeled candidate, as far above the best as
    the best is above the worst (at least `min_gap`), so its margin follows the scale of the group's scores."""
    best, worst = max(candidate_scores), min(candidate_scores)
    return float(best + max(best - worst, min_gap))


def make_groups(prompts: list[Prompt], scores: dict[str, list[float]], anchor_scores: dict[str, float],
                include_anchor: bool, anchor: str = "scored", min_gap: float = 1e-6) -> list[Group]:
    """Listwise groups: every candidate of a prompt (+ the anchor: by its own score, or on top when `anchor` is
    "top"); groups of < 2 skipped."""
    groups = []
    for p in prompts:
        if p.id not in scores:
            continue
        members, values = list(range(len(scores[p.id]))), list(scores[p.id])
        if include_anchor and p.id in anchor_scores:
            members.append(ANCHOR_IDX)
            values.append(anchor_on_top(values, min_gap) if anchor == "top" and values else anchor_scores[p.id])
        if len(members) >= 2:
            groups.append(Group(p.id, tuple(members), tuple(values)))
    return groups


def needed_references(algo: str, pairs: list[Pair], groups: list[Group]) -> list[tuple[str, int]]:
    """The (prompt, member) sequences whose reference log-probs the objective needs."""
    keys = [(p.prompt_id, i) for p in pairs for i in (p.chosen_idx, p.rejected_idx)] if algo == "dpo" else \
        [(g.prompt_id, m) for g in groups for m in g.members]
    return list(dict.fromkeys(keys))


def _pack(comp: Completions, keys: list[tuple[str, int]]):
    return pack([comp.sequence(*k) for k in keys], multiple=PAD_MULTIPLE, completion_multiple=COMPLETION_MULTIPLE)


def _anchor_flags(keys: list[tuple[str, int]]) -> mx.array:
    return mx.array(np.array([idx == ANCHOR_IDX for _, idx in keys], np.float32))


def _fits(seqs, max_len: int) -> bool:
    return max(len(c) + len(y) for c, y in seqs) <= max_len


def _epochs(items: list, cfg, seed: int, epochs: int | None = None):
    """Batches of item indices: a fresh seeded shuffle per epoch."""
    rng = np.random.default_rng(seed)
    for _ in range(cfg.epochs if epochs is None else epochs):
        order = rng.permutation(len(items)).tolist()
        for start in range(0, len(order), cfg.batch_size):
            yield [items[i] for i in order[start : start + cfg.batch_size]]


def _rank_slices(items: list, cfg, seed: int, shard: tuple[int, int]):
    """(this rank's slice of every global batch, its weight) for shard = (rank, size): a global batch is
    size x cfg.batch_size items of the one seeded order, cut into `size` near-equal consecutive slices. A rank
    whose slice of a short last batch is empty gets the batch's first item with weight 0 (every rank must run
    every step). With shard (0, 1) these are exactly the batches of a single process."""
    rank, size = shard
    if size > 1:
        cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size * size)
    for chunk in _epochs(items, cfg, seed):
        mine = chunk[rank * len(chunk) // size : (rank + 1) * len(chunk) // size]
        yield (mine, len(mine)) if mine else (chunk[:1], 0)


def dpo_batches(pairs: list[Pair], refs: dict, comp: Completions, cfg, seed: int,
                shard: tuple[int, int] = (0, 1)) -> tuple[list[TrainBatch], int]:
    """Pair batches laid out [chosen0, rejected0, chosen1, ...] with cached reference sequence log-probs
    (this rank's slices when `shard` = (rank, size) of a distributed run)."""
    usable = [p for p in pairs if _fits([comp.sequence(p.prompt_id, i) for i in (p.chosen_idx, p.rejected_idx)],
                                        cfg.max_seq_len)]
    batches = []
    for chunk, weight in _rank_slices(usable, cfg, seed, shard):
        keys = [(p.prompt_id, i) for p in chunk for i in (p.chosen_idx, p.rejected_idx)]
        ref = np.array([refs[k].sum(dtype=np.float64) for k in keys], np.float32)
        extras = {"ref_logps": mx.array(ref), "is_anchor": _anchor_flags(keys)}
        batches.append(TrainBatch(_pack(comp, keys), extras, weight))
    return batches, len(pairs) - len(usable)


def group_batches(groups: list[Group], refs: dict, comp: Completions, cfg, seed: int,
                  shard: tuple[int, int] = (0, 1)) -> tuple[list[TrainBatch], int]:
    """Group batches: members laid out group-major, with slot indices mapping them onto a [G, K] grid
    (this rank's slices when `shard` = (rank, size) of a distributed run)."""
    usable = [g for g in groups if _fits([comp.sequence(g.prompt_id, m) for m in g.members], cfg.max_seq_len)]
    batches = []
    for chunk, weight in _rank_slices(usable, cfg, seed, shard):
        keys = [(g.prompt_id, m) for g in chunk for m in g.members]
        width = max(len(g.members) for g in chunk)
        slots = np.full((len(chunk), width), len(keys), np.int32)  # padding points past the end
        scores = np.zeros((len(chunk), width), np.float32)
        valid = np.zeros((len(chunk), width), np.float32)
        n = 0
        for row, g in enumerate(chunk):
            k = len(g.members)
            slots[row, :k], scores[row, :k], valid[row, :k] = np.arange(n, n + k), g.scores, 1.0
            n += k
        seqs = _pack(comp, keys)
        extras = {
            "ref_logps": mx.array(np.array([refs[k].sum(dtype=np.float64) for k in keys], np.float32)),
            "slots": mx.array(slots), "scores": mx.array(scores), "group_mask": mx.array(valid),
            "is_anchor": _anchor_flags(keys),
        }
        if cfg.algo == "grpo":
            adv = np.array(grpo_advantages(mx.array(scores), mx.array(valid), scale_by_std=cfg.scale_by_std))
            extras["advantages"] = mx.array(adv[valid > 0])  # group-major = sequence order
            extras["ref_tokens"] = aligned(seqs, [refs[k] for k in keys])
            extras["old_tokens"] = aligned(seqs, [behaviour(comp, refs, *k) for k in keys])
        batches.append(TrainBatch(seqs, extras, weight))
    return batches, len(groups) - len(usable)


def sft_batches(prompt_ids: list[str], comp: Completions, cfg, seed: int,
                epochs: int | None = None) -> tuple[list[TrainBatch], int]:
    """Batches of (prompt, anchor) sequences for supervised fine-tuning: needs no sampled candidate."""
    usable = [pid for pid in prompt_ids if _fits([comp.sequence(pid, ANCHOR_IDX)], cfg.max_seq_len)]
    batches = []
    for chunk in _epochs(usable, cfg, seed, epochs):
        keys = [(pid, ANCHOR_IDX) for pid in chunk]
        seqs = _pack(comp, keys)
        batches.append(TrainBatch(seqs, {"is_anchor": _anchor_flags(keys)}, len(chunk)))
    return batches, len(prompt_ids) - len(usable)


def training_batches(job: TrainJob, shard: tuple[int, int], tokenizer) -> tuple[list[TrainBatch], int]:
    """The job's (batches, skipped items) for its algo; this rank's slices when `shard` = (rank, size)."""
    comp = Completions(job.prompts, job.anchors, job.candidates, tokenizer)
    if job.algo == "sft":
        return sft_batches(list(job.prompts), comp, job.cfg, job.seed, job.epochs)
    if job.algo == "dpo":
        return dpo_batches(job.pairs, job.refs, comp, job.cfg, job.seed, shard)
    return group_batches(job.groups, job.refs, comp, job.cfg, job.seed, shard)
