"""Held-out evaluation: greedy replies from llama.cpp (with the adapter) and the anchor score from MLX.

- strict / lenient accuracy: the task suite's definitions (`pudl.tasks`), on prompts that carry an answer;
- anchor_score: mean per-token log-prob the student gives the anchor (the labelled positive) after the
  prompt: how much the policy has moved toward the teacher's answer. The anchor is the cached teacher
  anchor when there is one, else the prompt's reference answer.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from pudl.agreement import family_or_other, order_consistency
from pudl.prompts import Prompt, chat_messages
from pudl.sequences import sequence_logprobs
from pudl.tasks import lenient_match, strict_match


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
    sampler.generate([(p, 0) for p in prompts], 1, 0.0, max_tokens, 0, 1.0, 0.0, done)
    rows, by_family = [], defaultdict(list)
    for p in prompts:
        reply = replies[p.id]
        row = {"id": p.id, "reply": reply}
        if p.answer is not None:
            row["strict"], row["lenient"] = strict_match(reply, p.answer), lenient_match(reply, p.answer)
            by_family[family_or_other(p.id)].append(row["strict"])
        rows.append(row)
    result: dict = {"n": len(prompts)}
    judged = [r for r in rows if "strict" in r]
    if judged:
        result["strict_accuracy"] = float(np.mean([r["strict"] for r in judged]))
        result["lenient_accuracy"] = float(np.mean([r["lenient"] for r in judged]))
        result["strict_by_family"] = {f: float(np.mean(v)) for f, v in sorted(by_family.items())}
    anchors = {**{p.id: p.answer for p in prompts if p.answer is not None}, **(anchors or {})}
    with_anchor = [p for p in prompts if p.id in anchors]
    if student is not None and with_anchor:
        result["anchor_score"] = float(np.mean(anchor_scores(student, tokenizer, with_anchor, anchors)))
    result["replies"] = rows
    return result


def ranker_agreement(prompts: list[Prompt], candidates: dict, scores: dict[str, dict[str, list[float]]]) -> dict:
    """How well each scorer's ranking agrees with answer correctness, overall and per task family
    (`pudl.agreement.order_consistency`: ROC AUC lenient/strict, Spearman, best-vs-worst picks)."""
    return order_consistency(prompts, candidates, scores)
