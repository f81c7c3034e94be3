"""Anchor-conditioned self-ranking by the student itself, and the preferences a ranking yields.

Every candidate is scored with its prompt as context, in MLX, on the exact weights being trained:
- `anchor-likelihood`: mean token log-prob of the candidate when the anchor is shown in the user turn as a
  reference answer;
- `anchor-gain`: that minus the mean token log-prob of the candidate without the anchor (how much seeing
  the labelled positive makes the candidate more likely).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pudl.cache import ANCHOR_IDX, Candidate, Pair
from pudl.prompts import Prompt, chat_messages
from pudl.sequences import sequence_logprobs

REFERENCE_TEMPLATE = "{prompt}\n\nA reference answer to this request is:\n{anchor}"


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


def score_groups(student, tokenizer, groups: list[tuple[Prompt, str, list[Candidate]]],
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


def rank(scores: np.ndarray) -> np.ndarray:
    """Rank 0 = best; ties keep candidate order (stable), so equal scores get distinct but arbitrary ranks."""
    order = np.argsort(-scores, kind="stable")
    ranks = np.empty(len(scores), np.int64)
    ranks[order] = np.arange(len(scores))
    return ranks


def is_empty(candidate: Candidate) -> bool:
    return not candidate.text.strip()


def group_status(scores: np.ndarray, candidates: list[Candidate], min_gap: float) -> str:
    """Why a group can or cannot give a candidate-vs-candidate pair: ok | single | all-empty | all-equal."""
    usable = [i for i, c in enumerate(candidates) if not is_empty(c)]
    if len(candidates) < 2:
        return "single"
    if not usable:
        return "all-empty"
    texts = {candidates[i].text.strip() for i in range(len(candidates))}
    if len(texts) == 1 or float(scores.max() - scores.min()) < min_gap:
        return "all-equal"
    return "ok"


def make_pairs(prompt_id: str, anchor: str, candidates: list[Candidate], scores: np.ndarray,
               mode: str, min_gap: float) -> list[Pair]:
    """Pairwise preferences from one ranked group.

    best-vs-worst: the best non-empty candidate over the worst candidate (skipped when their scores tie);
    anchor-vs-worst: the anchor (the labelled positive) over the worst candidate (skipped when that candidate
    already says what the anchor says); both: both of these.
    """
    pairs = []
    worst = int(np.argsort(scores, kind="stable")[0])
    if mode in ("best-vs-worst", "both") and group_status(scores, candidates, min_gap) == "ok":
        usable = [i for i, c in enumerate(candidates) if not is_empty(c)]
        best = max(usable, key=lambda i: (scores[i], -i))
        gap = float(scores[best] - scores[worst])
        if best != worst and gap >= min_gap:
            pairs.append(Pair(prompt_id, "best-vs-worst", best, worst, gap))
    if mode in ("anchor-vs-worst", "both") and candidates:
        if candidates[worst].text.strip().lower() != anchor.strip().lower():
            pairs.append(Pair(prompt_id, "anchor-vs-worst", ANCHOR_IDX, worst, None))
    return pairs


def roc_auc(scores, labels) -> float:
    """Probability that a random positive outscores a random negative (ties count half); nan if one class."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)
