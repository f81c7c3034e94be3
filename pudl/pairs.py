"""A ranked group -> its preferences: ranks, why a group can or cannot give a pair, and the DPO pairs.

The anchor is the labelled positive; the candidates are unlabeled. `make_pairs` reads `rank.pairs`:
best-vs-worst among the candidates, anchor-vs-worst, or both.
"""

from __future__ import annotations

import numpy as np

from pudl.domain import ANCHOR_IDX, Candidate, Pair


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
               mode: str, min_gap: float, anchor_score: float | None = None, near_anchor: float = 0.0) -> list[Pair]:
    """Pairwise preferences from one ranked group.

    best-vs-worst: the best non-empty candidate over the worst candidate (skipped when their scores tie);
    anchor-vs-worst: the anchor (the labelled positive) over the worst candidate (skipped when that candidate
    already says what the anchor says); both: both of these.

    `near_anchor` > 0 reads the candidates as unlabeled, measured against the anchor's own score (same scorer,
    same context): a candidate within `near_anchor` of it is near-optimal, the others are not known to be.
    Only a near-optimal candidate may be chosen (best-vs-worst needs its best to be near the anchor), and a
    near-optimal candidate is never rejected (it may say what the anchor says).
    """
    pairs = []
    worst = int(np.argsort(scores, kind="stable")[0])
    gated = near_anchor > 0 and anchor_score is not None

    def near(i: int) -> bool:
        return bool(scores[i] >= anchor_score - near_anchor)

    if gated and near(worst):
        return []  # even the worst may be a positive: nothing here is known to be worse
    if mode in ("best-vs-worst", "both") and group_status(scores, candidates, min_gap) == "ok":
        usable = [i for i, c in enumerate(candidates) if not is_empty(c)]
        best = max(usable, key=lambda i: (scores[i], -i))
        gap = float(scores[best] - scores[worst])
        if best != worst and gap >= min_gap and (not gated or near(best)):
            pairs.append(Pair(prompt_id, "best-vs-worst", best, worst, gap))
    if mode in ("anchor-vs-worst", "both") and candidates:
        if candidates[worst].text.strip().lower() != anchor.strip().lower():
            pairs.append(Pair(prompt_id, "anchor-vs-worst", ANCHOR_IDX, worst, None))
    return pairs
