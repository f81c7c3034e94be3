"""Anchor-conditioned self-ranking: the student scores its own candidates with the anchor in context.

Every candidate is scored with its prompt as context, in MLX, on the exact weights being trained:
- `anchor-likelihood`: mean token log-prob of the candidate when the anchor is shown in the user turn as a
  reference answer;
- `anchor-gain`: that minus the mean token log-prob of the candidate without the anchor (how much seeing
  the labelled positive makes the candidate more likely);
- `judge`: the student is asked to rate the candidate against the anchor from 1 to 5; the score is the expected
  rating under its next-token probabilities over the five digit tokens (renormalised over them);
- `chrf`: character n-gram F-score (n = 1..6, beta = 2) of the candidate against the anchor: a lexical
  baseline that needs no model.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from pudl.domain import Candidate
from pudl.prompts import Prompt, chat_messages
from pudl.sequences import pack, sequence_logprobs, shared_hidden

REFERENCE_TEMPLATE = "{prompt}\n\nA reference answer to this request is:\n{anchor}"
# The instruction comes first and the candidate last, so one prompt's judge contexts share a long token prefix
# that is decoded once (its KV cache reused by every candidate).
JUDGE_TEMPLATE = ("Rate from 1 (not at all) to 5 (exactly the same) how much the candidate answer says the same as "
                  "the reference answer. Reply with one digit.\n\nQuestion: {prompt}\n\nReference answer: {anchor}"
                  "\n\nCandidate answer: {candidate}")
RATINGS = ("1", "2", "3", "4", "5")
LIKELIHOOD_SCORERS = ("anchor-likelihood", "anchor-gain")  # computed together (one MLX pass, two contexts)


def anchored_messages(prompt: Prompt, anchor: str) -> list[dict]:
    """The scoring context: the prompt with the anchor shown as a reference answer."""
    return chat_messages(prompt, REFERENCE_TEMPLATE.format(prompt=prompt.prompt, anchor=anchor))


@dataclass(frozen=True)
class GroupScores:
    """Both scorers' values for one prompt's candidates, and for its anchor scored the same way."""

    likelihood: np.ndarray  # mean log-prob with the anchor in context, [K]
    plain: np.ndarray  # mean log-prob without it, [K]
    anchor_likelihood: float
    anchor_plain: float

    def by(self, scorer: str) -> np.ndarray:
        if scorer == "anchor-likelihood":
            return self.likelihood
        if scorer == "anchor-gain":
            return self.likelihood - self.plain
        raise ValueError(scorer)

    def anchor_by(self, scorer: str) -> float:
        if scorer == "anchor-likelihood":
            return self.anchor_likelihood
        if scorer == "anchor-gain":
            return self.anchor_likelihood - self.anchor_plain
        raise ValueError(scorer)


def likelihood_scores(student, tokenizer, groups: list[tuple[Prompt, str, list[Candidate]]],
                      batch_size: int = 8) -> list[GroupScores]:
    """Score every candidate (and the anchor itself) of several prompts with and without the anchor."""
    sequences = []
    for prompt, anchor, candidates in groups:
        with_anchor = tokenizer.chat_tokens(anchored_messages(prompt, anchor))
        plain = tokenizer.chat_tokens(chat_messages(prompt))
        for ids in [list(c.token_ids) for c in candidates] + [tokenizer.answer_tokens(anchor)]:
            sequences += [(with_anchor, ids), (plain, ids)]
    sums, counts = sequence_logprobs(student, sequences, batch_size=batch_size)
    means = sums / np.maximum(counts, 1)
    out, start = [], 0
    for _, _, candidates in groups:
        block = means[start : start + 2 * (len(candidates) + 1)]
        out.append(GroupScores(likelihood=block[0:-2:2].copy(), plain=block[1:-2:2].copy(),
                               anchor_likelihood=float(block[-2]), anchor_plain=float(block[-1])))
        start += len(block)
    return out


def rating_token_ids(tokenizer) -> list[int]:
    """The token id of each rating digit; each must be a single token for its probability to be read off."""
    ids = [tokenizer.encode(r, special=False) for r in RATINGS]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"the tokenizer splits a rating digit into several tokens: {ids}")
    return [i[0] for i in ids]


def judge_scores(student, tokenizer, items: list[tuple[Prompt, str, str]], batch_size: int = 8) -> np.ndarray:
    """Expected 1..5 rating the student gives each (prompt, anchor, candidate text): sum_r r * p(r) with p the
    next-token distribution after the judge prompt, renormalised over the rating digits.

    Contexts of the same (prompt, anchor) share their token prefix: it is decoded once and its KV cache reused,
    only each candidate's remaining tokens run per candidate (same tokens as the full context: exact)."""
    if not items:
        return np.zeros(0)
    head = mx.take(student.head_weight, mx.array(rating_token_ids(tokenizer)), axis=0)  # [5, H]: rating rows
    values = mx.array(np.arange(1, len(RATINGS) + 1, dtype=np.float32))
    contexts = [tokenizer.chat_tokens(chat_messages(p, JUDGE_TEMPLATE.format(prompt=p.prompt, anchor=a, candidate=c)))
                for p, a, c in items]
    by_source: dict[tuple, list[int]] = {}
    for i, (p, a, _) in enumerate(items):
        by_source.setdefault((p.id, p.prompt, a), []).append(i)
    out = np.zeros(len(items))
    for members in by_source.values():
        shared = min(len(contexts[i]) for i in members) - 1  # every member keeps >= 1 token of its own
        first = contexts[members[0]]
        for i in members[1:]:
            shared = next((k for k in range(shared) if contexts[i][k] != first[k]), shared)
        keep = max(shared, 1)  # the part every member runs once (>= 1 token: a context is never empty)
        members = sorted(members, key=lambda i: len(contexts[i]))
        for start in range(0, len(members), batch_size):
            idx = members[start : start + batch_size]
            # A dummy target after each suffix: its position holds the hidden state after the suffix's last token.
            batch = pack([(contexts[i][:keep], contexts[i][keep:] + [0]) for i in idx])
            hidden = shared_hidden(student, *batch.arrays[:4])
            last = hidden[mx.arange(len(idx)), mx.array([len(contexts[i]) - keep for i in idx])]
            out[idx] = np.array(mx.softmax((last @ head.T).astype(mx.float32), axis=-1) @ values)
    return out


def _ngrams(text: str, n: int) -> Counter:
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def chrf(candidate: str, reference: str, max_n: int = 6, beta: float = 2.0) -> float:
    """Character n-gram F-score in [0, 1]: precision and recall averaged over the orders n = 1..max_n that
    both strings are long enough for (whitespace removed, as chrF does), combined with recall weighted beta."""
    hyp, ref = "".join(candidate.split()), "".join(reference.split())
    precisions, recalls = [], []
    for n in range(1, max_n + 1):
        h, r = _ngrams(hyp, n), _ngrams(ref, n)
        if not h or not r:
            break
        match = sum((h & r).values())
        precisions.append(match / sum(h.values()))
        recalls.append(match / sum(r.values()))
    if not precisions:
        return float(hyp == ref)  # two empty strings agree; one empty against text shares nothing
    p, r = float(np.mean(precisions)), float(np.mean(recalls))
    return 0.0 if p + r == 0 else (1 + beta**2) * p * r / (beta**2 * p + r)


def score_groups(student, tokenizer, groups: list[tuple[Prompt, str, list[Candidate]]],
                 scorers=("anchor-likelihood", "anchor-gain", "judge", "chrf"),
                 batch_size: int = 8) -> list[dict[str, tuple[np.ndarray, float]]]:
    """For each group, scorer -> (candidate scores [K], the anchor's own score), for the `scorers` asked for."""
    out: list[dict] = [{} for _ in groups]
    if any(s in LIKELIHOOD_SCORERS for s in scorers):
        for row, g in enumerate(likelihood_scores(student, tokenizer, groups, batch_size)):
            for s in LIKELIHOOD_SCORERS:
                if s in scorers:
                    out[row][s] = (g.by(s), g.anchor_by(s))
    if "judge" in scorers:
        items = [(p, a, text) for p, a, cands in groups for text in [c.text for c in cands] + [a]]
        values, start = judge_scores(student, tokenizer, items, batch_size), 0
        for row, (_, _, cands) in enumerate(groups):
            block = values[start : start + len(cands) + 1]
            out[row]["judge"] = (block[:-1].copy(), float(block[-1]))
            start += len(block)
    if "chrf" in scorers:
        for row, (_, a, cands) in enumerate(groups):
            out[row]["chrf"] = (np.array([chrf(c.text, a) for c in cands]), chrf(a, a))
    return out
