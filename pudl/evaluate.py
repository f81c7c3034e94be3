"""Held-out evaluation: greedy replies from llama.cpp (with the adapter) and the anchor score from MLX.

- strict / lenient accuracy: the task suite's definitions (`pudl.tasks`), on prompts that carry an answer;
- anchor_score: mean per-token log-prob the student gives the anchor (the labelled positive) after the
  prompt: how much the policy has moved toward the teacher's answer. The anchor is the cached teacher
  anchor when there is one, else the prompt's reference answer;
- splits: the same accuracies per held-out split, for prompts whose id names one (`pudl.tasks.split_of`:
  "new-wording/capitals-032"); absent when none does;
- `retention(before, after)`: of what the base student answered right, the share the trained one still does;
- `reference_metrics(result, references)`: for prompts without an answer key, chrF and ROUGE-L of each reply
  against the teacher's reference answer (`pudl.scoring.chrf`; `rouge_l` here), per reply and their means.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

from pudl.agreement import family_or_other
from pudl.domain import SamplingParams
from pudl.errors import UserError
from pudl.prompts import Prompt, chat_messages
from pudl.scoring import chrf
from pudl.sequences import sequence_logprobs
from pudl.tasks import SPLITS, lenient_match, split_of, strict_match


def anchor_scores(student, tokenizer, prompts: list[Prompt], anchors: dict[str, str]) -> np.ndarray:
    """Mean token log-prob of each prompt's anchor under the student (adapter on)."""
    sequences = [(tokenizer.chat_tokens(chat_messages(p)), tokenizer.answer_tokens(anchors[p.id])) for p in prompts]
    sums, counts = sequence_logprobs(student, sequences)
    return sums / np.maximum(counts, 1)


def evaluate(prompts: list[Prompt], sampler, student=None, tokenizer=None, anchors: dict[str, str] | None = None,
             max_tokens: int = 32, on_prompt=None) -> dict:
    """Greedy replies to `prompts`, scored against their answers and (with a student) their anchors."""
    replies: dict[str, str] = {}

    def done(p: Prompt, candidates):
        replies[p.id] = candidates[0].text
        if on_prompt:
            on_prompt(p)

    # All prompts in one batched generation (greedy: the seed draws nothing).
    sampler.generate([(p, 0) for p in prompts], SamplingParams.greedy(max_tokens), done)
    rows = []
    for p in prompts:
        reply = replies[p.id]
        row = {"id": p.id, "reply": reply}
        if p.answer is not None:
            row["strict"], row["lenient"] = strict_match(reply, p.answer), lenient_match(reply, p.answer)
        rows.append(row)
    result = _accuracies(rows)
    splits = split_accuracies(rows)
    if splits:
        result["splits"] = splits
    anchors = {**{p.id: p.answer for p in prompts if p.answer is not None}, **(anchors or {})}
    with_anchor = [p for p in prompts if p.id in anchors]
    if student is not None and with_anchor:
        result["anchor_score"] = float(np.mean(anchor_scores(student, tokenizer, with_anchor, anchors)))
    result["replies"] = rows
    return result


def _accuracies(rows: list[dict]) -> dict:
    """n, and strict / lenient accuracy and strict accuracy per family over the rows that carry a verdict."""
    out: dict = {"n": len(rows)}
    judged = [r for r in rows if "strict" in r]
    if judged:
        by_family = defaultdict(list)
        for r in judged:
            by_family[family_or_other(r["id"])].append(r["strict"])
        out["strict_accuracy"] = float(np.mean([r["strict"] for r in judged]))
        out["lenient_accuracy"] = float(np.mean([r["lenient"] for r in judged]))
        out["strict_by_family"] = {f: float(np.mean(v)) for f, v in sorted(by_family.items())}
    return out


def split_accuracies(rows: list[dict]) -> dict:
    """Per held-out split named in the reply rows' ids, in `SPLITS` order: n and accuracies; {} when none."""
    by_split = defaultdict(list)
    for r in rows:
        split = split_of(r["id"])
        if split is not None:
            by_split[split].append(r)
    return {s: _accuracies(by_split[s]) for s in SPLITS if s in by_split}


def _lenient_by_id(result: dict, which: str) -> dict[str, bool]:
    """Reply id -> lenient verdict, for the rows of an evaluation that carry one."""
    rows = result.get("replies") if isinstance(result, dict) else None
    if not isinstance(rows, list):
        raise UserError(f"retention: the {which} evaluation has no replies (an eval-{which}.json holds them)")
    return {r["id"]: bool(r["lenient"]) for r in rows if "lenient" in r}


def retention(before: dict, after: dict) -> dict:
    """Overall and per held-out split: of the prompts the base student answered leniently right (`before`),
    how many the trained student still does (`after`). Each entry: {"right_before", "kept", "retention"};
    retention is kept / right_before, None when the base got none right (JSON null, never NaN)."""
    base, now = _lenient_by_id(before, "before"), _lenient_by_id(after, "after")
    missing = [pid for pid in base if pid not in now]
    if missing:
        raise UserError(f"retention: {len(missing)} prompt(s) evaluated before training were not evaluated after "
                        f"(first: {missing[0]}); evaluate both on the same prompts")
    groups: dict[str, list[str]] = {"overall": list(base)}
    for split in SPLITS:
        ids = [pid for pid in base if split_of(pid) == split]
        if ids:
            groups[split] = ids
    out = {}
    for name, ids in groups.items():
        was = [pid for pid in ids if base[pid]]
        kept = sum(now[pid] for pid in was)
        out[name] = {"right_before": len(was), "kept": kept, "retention": kept / len(was) if was else None}
    return out


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 1]: the longest common subsequence of lower-cased word tokens, as recall and precision
    against the reference, combined with equal weight; two empty texts agree, one empty shares nothing."""
    hyp, ref = re.findall(r"\w+", candidate.lower()), re.findall(r"\w+", reference.lower())
    if not hyp or not ref:
        return float(hyp == ref)
    previous = [0] * (len(ref) + 1)
    for h in hyp:  # one row of the LCS table at a time
        row = [0]
        for j, r in enumerate(ref):
            row.append(previous[j] + 1 if h == r else max(previous[j + 1], row[j]))
        previous = row
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def reference_metrics(result: dict, references: dict[str, str]) -> dict | None:
    """chrF and ROUGE-L of each reply in `result` against its prompt's teacher reference, written into the reply
    rows; the means and n over the replies that have one; None when none has."""
    rows = [r for r in result.get("replies", []) if r["id"] in references]
    for r in rows:
        r["chrf"] = chrf(r["reply"], references[r["id"]])
        r["rouge_l"] = rouge_l(r["reply"], references[r["id"]])
    if not rows:
        return None
    return {"n": len(rows), "chrf": float(np.mean([r["chrf"] for r in rows])),
            "rouge_l": float(np.mean([r["rouge_l"] for r in rows]))}
