"""Held-out evaluation per split (ids <split>/<family>-<n>) and retention of what the base student knew."""

from __future__ import annotations

import json
import math
import re

import pytest

from pudl.errors import UserError
from pudl.evaluate import retention, split_accuracies


def row(pid: str, strict: bool, lenient: bool, reply: str = "x") -> dict:
    return {"id": pid, "reply": reply, "strict": strict, "lenient": lenient}


def test_split_accuracies_per_split_in_order():
    rows = [row("new-task/plurals-000", True, True), row("in-distribution/capitals-032", False, True),
            row("new-task/countries-001", False, False), row("in-distribution/units-048", False, False),
            row("new-task/plurals-001", False, True), {"id": "new-task/previous-000", "reply": "?"},  # no answer
            row("capitals-000", True, True), row("line7", True, True)]  # no split: counted in none
    out = split_accuracies(rows)
    assert list(out) == ["in-distribution", "new-task"]  # only the splits present, in SPLITS order
    assert out["in-distribution"] == {"n": 2, "strict_accuracy": 0.0, "lenient_accuracy": 0.5,
                                      "strict_by_family": {"capitals": 0.0, "units": 0.0}}
    task = out["new-task"]
    assert task["n"] == 4 and task["strict_accuracy"] == pytest.approx(1 / 3)
    assert task["lenient_accuracy"] == pytest.approx(2 / 3)
    assert task["strict_by_family"] == {"countries": 0.0, "plurals": 0.5}
    assert split_accuracies([row("capitals-000", True, True), row("x/capitals-001", True, True)]) == {}
    only_unjudged = split_accuracies([{"id": "new-wording/capitals-032", "reply": "Paris"}])
    assert only_unjudged == {"new-wording": {"n": 1}}


def test_retention_counts_what_the_base_knew():
    before = {"replies": [row("in-distribution/capitals-032", False, True), row("in-distribution/units-048", True, True),
                          row("in-distribution/antonyms-043", False, False),
                          row("new-wording/capitals-032", False, True), row("new-wording/units-048", False, True),
                          row("new-wording/antonyms-043", False, True),
                          row("new-task/plurals-000", False, False), row("new-task/countries-000", False, False),
                          {"id": "new-task/previous-000", "reply": "?"}]}
    after = {"replies": [row("in-distribution/capitals-032", True, True), row("in-distribution/units-048", True, True),
                         row("in-distribution/antonyms-043", True, True),  # newly right: not retention
                         row("new-wording/capitals-032", True, False), row("new-wording/units-048", False, False),
                         row("new-wording/antonyms-043", True, True),
                         row("new-task/plurals-000", True, True), row("new-task/countries-000", False, False),
                         {"id": "new-task/previous-000", "reply": "?"}]}
    out = retention(before, after)
    assert out == {"overall": {"right_before": 5, "kept": 3, "retention": 0.6},
                   "in-distribution": {"right_before": 2, "kept": 2, "retention": 1.0},
                   "new-wording": {"right_before": 3, "kept": 1, "retention": pytest.approx(1 / 3)},
                   "new-task": {"right_before": 0, "kept": 0, "retention": None}}
    text = json.dumps(out, allow_nan=False)  # strict JSON: the base knew nothing of new-task -> null, not NaN
    assert '"new-task": {"right_before": 0, "kept": 0, "retention": null}' in text
    assert list(retention(before, before)) == ["overall", "in-distribution", "new-wording", "new-task"]
    assert retention(before, before)["overall"]["retention"] == 1.0


def test_retention_without_splits_and_errors():
    before = {"replies": [row("a", False, True), row("b", False, False)]}
    assert retention(before, {"replies": [row("b", True, True), row("a", False, False)]}) == {
        "overall": {"right_before": 1, "kept": 0, "retention": 0.0}}
    assert retention({"replies": [row("a", False, False)]}, {"replies": [row("a", True, True)]}) == {
        "overall": {"right_before": 0, "kept": 0, "retention": None}}
    with pytest.raises(UserError, match=r"1 prompt\(s\) evaluated before training were not evaluated after "
                                        r"\(first: a\)"):
        retention(before, {"replies": [row("b", True, True)]})
    with pytest.raises(UserError, match="the after evaluation has no replies"):
        retention(before, {"n": 2, "strict_accuracy": 0.5})


def test_evaluate_reports_splits_with_real_llama_cpp(tiny_gguf):
    """A real greedy evaluation of the tiny random model: answers are then set to a word of each reply (or to one
    it lacks), so each split's accuracies are known; the split figures must equal the rows they come from."""
    from pudl.evaluate import evaluate
    from pudl.models import Tokenizer
    from pudl.prompts import Prompt
    from pudl.sampler import Sampler

    ids = ["in-distribution/capitals-032", "in-distribution/units-048", "new-wording/capitals-032",
           "new-task/plurals-000", "new-task/countries-001", "new-task/previous-002"]
    prompts = [Prompt(id=pid, prompt=f"Question {i}: say something.") for i, pid in enumerate(ids)]
    tokenizer = Tokenizer(tiny_gguf)
    sampler = Sampler(tiny_gguf, tokenizer, None, n_ctx=256, threads=1)
    try:
        first = evaluate(prompts, sampler, max_tokens=8)
        assert "strict_accuracy" not in first  # no answers: nothing to judge, only counted per split
        assert first["splits"] == {"in-distribution": {"n": 2}, "new-wording": {"n": 1}, "new-task": {"n": 3}}
        words = {r["id"]: re.findall(r"[A-Za-z]+", r["reply"]) for r in first["replies"]}
        impossible = {ids[0], ids[2], ids[3]}  # a word no reply holds; the others get a word their reply holds
        answered = [Prompt(id=p.id, prompt=p.prompt,
                           answer=words[p.id][0] if words[p.id] and p.id not in impossible else "Zzqxv")
                    for p in prompts]
        second = evaluate(answered, sampler, max_tokens=8)
        plain = evaluate([Prompt(id=f"line{i}", prompt=p.prompt, answer=p.answer)
                          for i, p in enumerate(answered)], sampler, max_tokens=8)
    finally:
        sampler.close()
    assert [r["reply"] for r in second["replies"]] == [r["reply"] for r in first["replies"]]  # greedy
    assert "splits" not in plain  # ids without a split: the result looks as it always did
    rows = {r["id"]: r for r in second["replies"]}
    assert list(second["splits"]) == ["in-distribution", "new-wording", "new-task"]
    for split, figures in second["splits"].items():
        mine = [rows[pid] for pid in ids if pid.startswith(split + "/")]
        assert figures["n"] == len(mine)
        assert figures["lenient_accuracy"] == pytest.approx(sum(r["lenient"] for r in mine) / len(mine))
        assert figures["strict_accuracy"] == pytest.approx(sum(r["strict"] for r in mine) / len(mine))
    assert second["splits"]["new-wording"]["lenient_accuracy"] == 0.0  # its one prompt got the impossible word
    assert not any(rows[pid]["lenient"] for pid in impossible)
    assert all(rows[pid]["lenient"] for pid in ids if pid not in impossible and words[pid])
    assert not any(isinstance(v, float) and math.isnan(v) for s in second["splits"].values()
                   for v in s.values() if not isinstance(v, dict))
