"""The judged comparison: a teacher endpoint says which of two replies to a held-out prompt is better.

For each held-out prompt the trained student's greedy reply is compared with the base student's (`vs_before`)
and with the teacher's own reference answer (`vs_teacher`). Each pair is asked in both orders, A/B then B/A,
so a judge that prefers a position favours neither side. The prompt is `JUDGE_TEMPLATE`, fixed (changing it
changes every key); the judge's reply must be A, B or tie (`parse_verdict`), anything else is `invalid` and
counts in no rate. Two identical replies are a tie without asking. Every verdict is committed to the run's
cache under `judgment_key` (judge, template, prompt, the two replies in order) as it arrives, so no pair is
ever asked twice, also after a kill -9. Rates are over valid verdicts, with a 95 % Wilson score interval on
the win rate (each order counted as one verdict: the two orders of a prompt are not independent, so the
interval is narrower than it should be by up to a factor sqrt(2)). docs/method.md lists the judge's biases.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pudl.cache import fingerprint
from pudl.prompts import Prompt
from pudl.teachers import ask_all

JUDGE_TEMPLATE = """Two replies to the same request follow. Decide which reply answers the request better: more \
helpful, more correct, and closer to what was asked.

Request:
{request}

Reply A:
{a}

Reply B:
{b}

Which reply is better? Answer with exactly one word: A, B, or tie."""

COMPARISONS = {"vs_before": "the base student's reply", "vs_teacher": "the teacher's reference answer"}
VERDICTS = ("A", "B", "tie", "invalid")


@dataclass(frozen=True)
class Job:
    """One question to the judge: `first` says which side is reply A ('after' or 'other')."""

    key: str
    prompt: Prompt
    comparison: str
    first: str
    a: str
    b: str


def parse_verdict(text: str) -> str:
    """A, B or tie from the judge's reply (case, quotes, markup and a trailing period ignored); else invalid."""
    words = re.findall(r"[A-Za-z]+", text)
    if not words:
        return "invalid"
    first = words[0].lower()
    if first in ("reply", "answer", "verdict") and len(words) > 1:  # "Reply A", "Answer: B"
        first = words[1].lower()
    return {"a": "A", "b": "B", "tie": "tie"}.get(first, "invalid")


def request_text(prompt: Prompt) -> str:
    """The request as the judge sees it: the prompt's own system text (if any) above the user text."""
    return f"{prompt.system}\n\n{prompt.prompt}" if prompt.system else prompt.prompt


def messages(job: Job) -> list[dict]:
    """The one user turn the judge is sent for `job`."""
    return [{"role": "user", "content": JUDGE_TEMPLATE.format(request=request_text(job.prompt), a=job.a, b=job.b)}]


def judgment_key(judge: str, prompt: Prompt, a: str, b: str) -> str:
    """The cache key of one verdict: the same judge on the same two replies in the same order is asked once."""
    return fingerprint("judge", judge, JUDGE_TEMPLATE, request_text(prompt), a, b)


def plan(judge: str, prompts: list[Prompt], after: dict[str, str], before: dict[str, str],
         references: dict[str, str]) -> list[Job]:
    """Both orders of each comparison that has its two replies: after vs before, after vs the teacher."""
    jobs = []
    for p in prompts:
        if p.id not in after:
            continue
        for comparison, others in (("vs_before", before), ("vs_teacher", references)):
            if p.id not in others:
                continue
            mine, other = after[p.id], others[p.id]
            for first, a, b in (("after", mine, other), ("other", other, mine)):
                jobs.append(Job(judgment_key(judge, p, a, b), p, comparison, first, a, b))
    return jobs


def judge_all(cache, judge, jobs: list[Job], workers: int = 1, on_job=None) -> dict[str, str]:
    """Verdicts for `jobs` (key -> verdict): from the cache, a tie for identical replies, else asked now and
    committed one by one with its cost. A request that fails after the judge's retries is left out (counted
    `missing`) and asked again by the next run."""
    verdicts = cache.judgments()
    todo, seen = [], set()
    for job in jobs:
        if job.key in verdicts:
            continue
        if job.a.strip() == job.b.strip():
            verdicts[job.key] = "tie"
        elif job.key not in seen:
            seen.add(job.key)
            todo.append(job)
    for job, reply in ask_all(lambda j: judge.complete(messages(j)), todo, workers):
        if isinstance(reply, Exception):
            cache.spend("judge", job.prompt.id, reply)
        else:
            verdict = parse_verdict(reply.text)
            cache.put_judgment(job.key, job.prompt.id, job.comparison, job.first, verdict, reply.text, judge.name,
                               spent=reply)
            verdicts[job.key] = verdict
        if on_job:
            on_job(job)
    return verdicts


def outcome(job: Job, verdict: str) -> str:
    """win / loss / tie / invalid for the trained student's reply."""
    if verdict in ("tie", "invalid"):
        return verdict
    after_is_a = job.first == "after"
    return "win" if (verdict == "A") == after_is_a else "loss"


def wilson(successes: int, n: int, z: float = 1.959964) -> list[float] | None:
    """The Wilson score interval for a proportion (95 % at the default z); None for n = 0."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def rates(jobs: list[Job], verdicts: dict[str, str]) -> dict:
    """Per comparison: win / tie / loss rates over valid verdicts, n (valid), invalid, missing, ci95 of the win
    rate (Wilson); as summary.json's `judge` (`win_rate_vs_before`, `win_rate_vs_teacher`)."""
    out: dict = {}
    for comparison in COMPARISONS:
        mine = [j for j in jobs if j.comparison == comparison]
        counts = {"win": 0, "tie": 0, "loss": 0, "invalid": 0, "missing": 0}
        for job in mine:
            counts[outcome(job, verdicts[job.key]) if job.key in verdicts else "missing"] += 1
        n = counts["win"] + counts["tie"] + counts["loss"]
        rate = (lambda k: counts[k] / n) if n else (lambda k: None)
        out[f"win_rate_{comparison}"] = {
            "win_rate": rate("win"), "tie_rate": rate("tie"), "loss_rate": rate("loss"), "n": n,
            "prompts": len({j.prompt.id for j in mine}), "invalid": counts["invalid"], "missing": counts["missing"],
            "ci95": wilson(counts["win"], n), "interval": "wilson"}
    out["template"] = "pudl.judge.JUDGE_TEMPLATE"
    return out
