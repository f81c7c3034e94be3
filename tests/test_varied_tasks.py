"""The varied-wording training file and the validation slice (pudl.tasks.varied_split)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from pudl.errors import UserError
from pudl.prompts import load_prompts
from pudl.tasks import (
    FAMILIES,
    SHIPPED,
    VARIED,
    family_of,
    heldout_suite,
    questions,
    task_suite,
    varied_split,
    wordings,
    write_jsonl,
)

DATA = Path(__file__).resolve().parent.parent / "recipes" / "data"


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{[^}]*\}", template)
    return re.compile(".+?".join(map(re.escape, parts)))


@pytest.mark.parametrize("name", list(VARIED))
def test_shipped_varied_files_equal_generator_output(name, tmp_path):
    shipped = DATA / VARIED[name]
    assert load_prompts(shipped) == varied_split(name)
    write_jsonl(varied_split(name), tmp_path / "x.jsonl")
    assert shipped.read_bytes() == (tmp_path / "x.jsonl").read_bytes()


@pytest.mark.parametrize("name", list(VARIED))
def test_varied_prompts_use_training_wordings_only(name):
    prompts = varied_split(name)
    used = set()
    for p in prompts:
        family = family_of(p.id)
        train_words, eval_words = wordings(family)
        train_questions, eval_questions = questions(family)
        assert any(p.prompt.endswith(" " + w) for w in train_words), p
        assert not any(w in p.prompt for w in eval_words), p
        assert any(_template_regex(q).match(p.prompt) for q in train_questions), p
        assert not any(_template_regex(q).match(p.prompt) for q in eval_questions), p
        used.update(w for w in train_words if p.prompt.endswith(" " + w))
    # the point of the file: more than the four instructions task_suite uses
    assert len(used) > 12


def test_train_varied_is_the_shipped_training_facts_reworded():
    shipped = task_suite("train")[: SHIPPED["train"]]
    varied = varied_split("train-varied")
    assert [(p.id, p.answer) for p in varied] == [(p.id, p.answer) for p in shipped]
    changed = sum(a.prompt != b.prompt for a, b in zip(varied, shipped))
    assert changed >= len(shipped) // 2


def test_valid_slice_is_disjoint_from_training_and_held_out():
    valid = varied_split("valid")
    assert len(valid) == 40 and Counter(family_of(p.id) for p in valid) == {f: 8 for f in FAMILIES}
    train_ids = {p.id for p in task_suite("train")[: SHIPPED["train"]]}
    assert all(p.id.startswith("valid/") and p.id.partition("/")[2] not in train_ids for p in valid)
    held = {p.prompt for p in heldout_suite()} | {p.prompt for p in task_suite("train")[: SHIPPED["train"]]}
    assert not held & {p.prompt for p in valid}
    with pytest.raises(UserError, match="unknown varied split"):
        varied_split("test")
