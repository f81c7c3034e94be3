"""How well a scorer's ranking agrees with answer correctness: ROC AUC, Spearman, best-vs-worst picks.

Computed for the report (ranker vs verifier) on prompts that carry a reference answer; the verifier is the
task suite's strict / lenient match (`pudl.tasks`).
"""

from __future__ import annotations

import numpy as np

from pudl.errors import UserError
from pudl.prompts import Prompt
from pudl.tasks import family_of, lenient_match, strict_match


def roc_auc(scores, labels) -> float:
    """Probability that a random positive outscores a random negative (ties count half); nan if one class."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def average_ranks(x) -> np.ndarray:
    """Ranks 1..n of x ascending, ties sharing the mean of the ranks they span."""
    x = np.asarray(x, float)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks); nan when either side is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def family_or_other(prompt_id: str) -> str:
    """The task-suite family of a prompt id, or "other" for a prompt that is not from the suite."""
    try:
        return family_of(prompt_id)
    except UserError:
        return "other"


def _agreement(rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> dict:
    """Order-consistency figures over (prompt id, scores, strict, lenient) groups."""
    scores = np.concatenate([r[1] for r in rows])
    strict = np.concatenate([r[2] for r in rows])
    lenient = np.concatenate([r[3] for r in rows])
    graded = strict.astype(float) + lenient  # 0 wrong, 1 answer inside a longer reply, 2 exact answer
    within, hits, mixed = [], 0, 0
    for _, s, st, le in rows:
        g = st.astype(float) + le
        if g.min() != g.max():
            within.append(spearman(s, g))
        if le.any() and not le.all():
            mixed += 1
            hits += bool(le[int(np.argmax(s))] and not le[int(np.argmin(s))])
    nan = float("nan")
    return {"auc": roc_auc(scores, lenient), "auc_strict": roc_auc(scores, strict),
            "spearman": spearman(scores, graded),
            "spearman_within": float(np.nanmean(within)) if within and not np.all(np.isnan(within)) else nan,
            "candidates": len(scores), "correct_fraction": float(lenient.mean()),
            "strict_fraction": float(strict.mean()), "mixed_groups": mixed,
            "best_vs_worst_correct": hits / mixed if mixed else nan}


def order_consistency(prompts: list[Prompt], candidates: dict, scores: dict[str, dict[str, list[float]]]) -> dict:
    """How well each scorer orders sampled candidates by verifier correctness, overall and per task family.

    Per scorer: auc / auc_strict = P(a lenient- / strict-correct candidate outscores an incorrect one), pooled
    over prompts; spearman = rank correlation of the scores with graded correctness (0 wrong, 1 lenient only,
    2 strict), pooled; spearman_within = its mean within the groups whose correctness varies (what ranking a
    group needs: scales may differ across prompts); best_vs_worst_correct = in groups mixing lenient-correct and
    incorrect candidates, how often the best-scored is correct and the worst is not. Prompts without an answer
    are skipped."""
    out = {}
    for scorer, by_prompt in scores.items():
        rows = []
        for p in prompts:
            if p.answer is None or p.id not in by_prompt or p.id not in candidates:
                continue
            texts = [c.text for c in candidates[p.id]]
            rows.append((p.id, np.asarray(by_prompt[p.id], float), np.array([strict_match(t, p.answer) for t in texts]),
                         np.array([lenient_match(t, p.answer) for t in texts])))
        if not rows:
            continue
        families: dict[str, list] = {}
        for r in rows:
            families.setdefault(family_or_other(r[0]), []).append(r)
        out[scorer] = {**_agreement(rows), "by_family": {f: _agreement(v) for f, v in sorted(families.items())}}
    return out
