"""The built-in task suite: fixed split, reference answers, strict/lenient scoring, shipped files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pudl.errors import UserError
from pudl.prompts import Prompt, load_prompts
from pudl.tasks import (
    FAMILIES,
    NEW_TASK_FAMILIES,
    SHIPPED,
    SPLITS,
    SPLITS_FILE,
    family_of,
    heldout_split,
    heldout_suite,
    lenient_match,
    main,
    normalize_reply,
    questions,
    split_of,
    strict_match,
    task_suite,
    wordings,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "recipes" / "data"
TRAIN, EVAL = task_suite("train"), task_suite("eval")
INSTRUCTIONS = ("Reply with one word.", "Answer with one word only.", "Respond with a single word.",
                "Reply with just one word, nothing else.", "Reply with only the number.",
                "Give only the number.", "Answer with just the number.",
                "Respond with the number only, no words.", "Reply with only that word.")


def _dump(prompts: list[Prompt]) -> str:
    return json.dumps([[p.id, p.prompt, p.system, p.answer] for p in prompts])


def test_deterministic_within_and_across_processes():
    assert task_suite("train") == TRAIN and task_suite("eval") == EVAL
    assert task_suite("train") is not task_suite("train")  # callers may mutate their copy
    code = ("import json; from pudl.tasks import task_suite; "
            "print(json.dumps([[p.id, p.prompt, p.system, p.answer] "
            "for s in ('train', 'eval') for p in task_suite(s)]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _dump(TRAIN + EVAL)


def test_sizes_families_and_ids():
    assert 160 <= len(TRAIN) <= 240 and 60 <= len(EVAL) <= 100
    for split in (TRAIN, EVAL):
        counts = Counter(family_of(p.id) for p in split)
        assert set(counts) == set(FAMILIES) and min(counts.values()) >= 10
    ids = [p.id for p in TRAIN + EVAL]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z]+-\d{3}", i) for i in ids)
    assert all(p.system is None for p in TRAIN + EVAL)


def test_no_prompt_shared_between_train_and_eval():
    train_prompts = {p.prompt for p in TRAIN}
    assert len(train_prompts) == len(TRAIN) and len({p.prompt for p in EVAL}) == len(EVAL)
    assert not train_prompts & {p.prompt for p in EVAL}


def _facts(split: list[Prompt], family: str) -> set:
    items = [p for p in split if family_of(p.id) == family]
    if family == "capitals":
        return {p.answer for p in items}
    if family == "antonyms":
        return {w for p in items for w in (re.search(r"'(\w+)'", p.prompt).group(1), p.answer)}
    if family == "arithmetic":
        return {frozenset(map(int, re.findall(r"\d+", p.prompt))) for p in items}
    if family == "units":
        return {int(re.search(r"\d+", p.prompt).group()) for p in items}
    return {p.prompt.split("?")[0].split(".")[0] for p in items}  # format: the question itself


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_facts_are_not_in_train(family):
    assert not _facts(TRAIN, family) & _facts(EVAL, family)


def test_every_item_has_a_format_instruction_and_a_one_token_answer():
    for p in TRAIN + EVAL:
        instruction = next((i for i in INSTRUCTIONS if p.prompt.endswith(" " + i)), None)
        assert instruction, p
        assert re.fullmatch(r"[A-Za-z]+|\d+", p.answer), p
        assert ("number" in instruction) == p.answer.isdigit(), p


UNIT_FACTORS = {("meters", "centimeters"): 100, ("kilograms", "grams"): 1000, ("hours", "minutes"): 60,
                ("minutes", "seconds"): 60, ("days", "hours"): 24, ("weeks", "days"): 7,
                ("kilometers", "meters"): 1000, ("years", "months"): 12}


def test_answers_are_correct():
    for p in TRAIN + EVAL:
        if m := re.match(r"(?:What is|Calculate) (\d+) (\+|-|plus|minus) (\d+)", p.prompt):
            a, op, b = int(m[1]), m[2], int(m[3])
            assert int(p.answer) == (a + b if op in ("+", "plus") else a - b) >= 0, p
        elif m := re.match(r"Which number is larger, (\d+) or (\d+)", p.prompt):
            assert int(p.answer) == max(int(m[1]), int(m[2])), p
        elif family_of(p.id) == "units":
            n = int(re.search(r"\d+", p.prompt).group())
            words = set(re.findall(r"[a-z]+", p.prompt))
            (factor,) = [f for pair, f in UNIT_FACTORS.items() if set(pair) <= words]
            assert int(p.answer) == n * factor, p
    assert any(p.answer == "Paris" and " France" in p.prompt for p in TRAIN + EVAL)
    assert any(p.answer == "cold" and "'hot'" in p.prompt for p in TRAIN + EVAL)


@pytest.mark.parametrize("answer", sorted({p.answer for p in TRAIN + EVAL}))
def test_every_answer_matches_itself_and_decorated_variants(answer):
    for reply in (answer, f"**{answer}**.", f" '{answer}' ", f"{answer.lower()}!", f"{answer.upper()}",
                  f'"{answer}"', f"`{answer}`", f"\n{answer}.\n", f"\u201c{answer}\u201d", f"*{answer}?*"):
        assert strict_match(reply, answer), reply
        assert lenient_match(reply, answer), reply


@pytest.mark.parametrize("reply, answer, strict, lenient", [
    ("The capital of France is Paris.", "Paris", False, True),
    ("Paris, France", "Paris", False, True),
    ("Parisian food", "Paris", False, False),
    ("168", "68", False, False),
    ("The answer is 68.", "68", False, True),
    ("68.", "68", True, True),
    ("68 + 1 = 69", "68", False, True),
    ("0.68", "68", False, False),
    ("1,068", "68", False, False),
    ("-68", "68", False, False),
    ("68.5", "68", False, False),
    ("(68)", "68", False, True),
    ("6,000", "6000", False, False),
    ("COLD", "cold", True, True),
    ("Cold!", "cold", True, True),
    ("coldness", "cold", False, False),
    ("The opposite of hot is cold.", "cold", False, True),
    ("not cold-blooded", "cold", False, True),  # a hyphen separates words
    ("_cold_", "cold", False, True),  # markdown italics: lenient only (strict strips * and ` only)
    ("cold\u00a0", "cold", True, True),
    ("Paris is the answer. Paris.", "Paris", False, True),
    ("", "Paris", False, False),
    ("Paris", "", False, False),
    ("New   York", "New York", False, True),  # multi-word answers: any whitespace between words
    ("new york!", "New York", True, True),
    ("Newark", "New York", False, False),
])
def test_strict_and_lenient(reply, answer, strict, lenient):
    assert strict_match(reply, answer) is strict
    assert lenient_match(reply, answer) is lenient


def test_normalize_reply():
    assert normalize_reply('  **"Paris"**.  ') == "Paris"
    assert normalize_reply("Paris?!") == "Paris"
    assert normalize_reply("`68`.") == "68"
    assert normalize_reply("St. Louis") == "St. Louis"  # only trailing punctuation goes
    assert normalize_reply("...") == ""


def test_family_of_and_bad_input():
    assert family_of("capitals-017") == "capitals"
    assert [family_of(p.id) for p in TRAIN[: len(FAMILIES)]] == list(FAMILIES)  # round-robin
    for bad in ("line3", "cities-001", ""):
        with pytest.raises(UserError):
            family_of(bad)
    with pytest.raises(UserError):
        task_suite("test")


@pytest.mark.parametrize("split", ["train", "eval"])
def test_shipped_files_equal_generator_output(split, tmp_path):
    shipped = DATA / f"tasks-{split}.jsonl"
    expected = task_suite(split)[: SHIPPED[split]]
    assert load_prompts(shipped) == expected
    write_jsonl(expected, tmp_path / "x.jsonl")
    assert shipped.read_bytes() == (tmp_path / "x.jsonl").read_bytes()
    counts = Counter(family_of(p.id) for p in expected)
    assert set(counts) == set(FAMILIES) and max(counts.values()) - min(counts.values()) <= 1


def test_write_entry_point(tmp_path, capsys):
    main(["--write", str(tmp_path / "out")])
    for name in ("tasks-train.jsonl", "tasks-eval.jsonl", SPLITS_FILE):
        assert (tmp_path / "out" / name).read_bytes() == (DATA / name).read_bytes()
    out = capsys.readouterr().out
    assert "train: " in out and "held-out new-task: 40 items" in out


def test_write_jsonl_rows(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl([Prompt(id="a-001", prompt="Q? Reply with one word.", answer="Yes")], path)
    assert [json.loads(l) for l in path.read_text().splitlines()] == [
        {"id": "a-001", "prompt": "Q? Reply with one word.", "answer": "Yes"}]


# held-out splits ----------------------------------------------------------------------------------
SPLIT_ITEMS = {s: heldout_split(s) for s in SPLITS}
TRAINING_TEXT = [p.prompt for p in TRAIN]


def _template_regex(template: str) -> re.Pattern:
    """A template ("What is {} plus {}?") as a regex matching the start of a prompt built from it."""
    parts = re.split(r"\{[^}]*\}", template)
    return re.compile(".+?".join(map(re.escape, parts)))


def test_split_ids_sizes_and_order():
    assert [len(v) for v in SPLIT_ITEMS.values()] == [40, 40, 40]
    assert heldout_suite() == [p for s in SPLITS for p in SPLIT_ITEMS[s]]
    for split, items in SPLIT_ITEMS.items():
        assert all(split_of(p.id) == split for p in items)
        assert all(re.fullmatch(rf"{split}/[a-z]+-\d{{3}}", p.id) for p in items)
        assert all(re.fullmatch(r"[A-Za-z]+|\d+", p.answer) for p in items)
    new_task = Counter(family_of(p.id) for p in SPLIT_ITEMS["new-task"])
    assert new_task == {f: 10 for f in NEW_TASK_FAMILIES} and not set(NEW_TASK_FAMILIES) & set(FAMILIES)
    ids = [p.id for p in heldout_suite()]
    assert len(ids) == len(set(ids))
    with pytest.raises(UserError, match="unknown held-out split"):
        heldout_split("eval")


def test_in_distribution_is_the_shipped_eval_file():
    shipped = load_prompts(DATA / "tasks-eval.jsonl")
    assert [(f"in-distribution/{p.id}", p.prompt, p.answer) for p in shipped] == [
        (p.id, p.prompt, p.answer) for p in SPLIT_ITEMS["in-distribution"]]


def test_new_wording_asks_the_same_facts_in_unseen_words():
    twins = dict(zip((p.id.partition("/")[2] for p in SPLIT_ITEMS["in-distribution"]), SPLIT_ITEMS["in-distribution"]))
    used = set()
    for p in SPLIT_ITEMS["new-wording"]:
        twin = twins[p.id.partition("/")[2]]  # the same number: the same fact
        family = family_of(p.id)
        assert p.answer == twin.answer and family == family_of(twin.id) and p.prompt != twin.prompt
        train_words, eval_words = wordings(family)
        train_questions, eval_questions = questions(family)
        (instruction,) = [w for w in eval_words if p.prompt.endswith(" " + w)]
        used.add(instruction)
        assert not any(w in p.prompt for w in train_words), p
        assert not any(_template_regex(q).match(p.prompt) for q in train_questions), p
        assert any(_template_regex(q).match(p.prompt) for q in eval_questions), p
        # the fact itself is in the prompt: the country, the word, the numbers of the in-distribution twin
        fact = set(re.findall(r"\d+|[A-Z][a-z]+|'[a-z-]+'", twin.prompt)) - set(re.findall(r"[A-Z][a-z]+", " ".join(
            train_words + train_questions)))
        assert all(f.strip("'") in p.prompt for f in fact), (p, fact)
    assert len(used) >= 24  # the split shows many different instructions, not a few


@pytest.mark.parametrize("family", FAMILIES)
def test_wordings_training_and_evaluation_only(family):
    train_words, eval_words = wordings(family)
    train_questions, eval_questions = questions(family)
    assert len(set(train_words)) + len(set(eval_words)) >= 12 and len(set(eval_words)) >= 8
    assert not set(train_words) & set(eval_words) and not set(train_questions) & set(eval_questions)
    every_prompt = [p.prompt for p in TRAIN + EVAL]
    for w in eval_words:  # never seen in training (nor in today's eval split)
        assert not any(w in text for text in every_prompt), w
    for q in eval_questions:
        assert not any(_template_regex(q).match(text) for text in every_prompt), q
    for p in TRAIN:  # the training split uses training wordings only
        if family_of(p.id) == family:
            assert any(p.prompt.endswith(" " + w) for w in set(train_words) & set(INSTRUCTIONS)), p
            assert any(_template_regex(q).match(p.prompt) for q in train_questions), p


def test_evaluation_only_wordings_name_the_kind_of_answer():
    kinds = {"capitals": "Name the city.", "arithmetic": "State the result as a numeral.",
             "units": "State the amount as a numeral.", "antonyms": "Name the opposite.", "format": "Name it."}
    for family, wording in kinds.items():
        assert wording in wordings(family)[1]
    with pytest.raises(UserError, match="unknown task family"):
        wordings("plurals")


PLURALS = {"mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "goose": "geese",
           "leaf": "leaves", "knife": "knives", "city": "cities", "box": "boxes", "baby": "babies"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def test_new_task_answers_and_training_instructions():
    capitals = {p.answer: re.search(r"capital (?:city )?of (.+?)[?.]", p.prompt)[1]
                for p in TRAIN + EVAL if family_of(p.id) == "capitals"}
    for p in SPLIT_ITEMS["new-task"]:
        family = family_of(p.id)
        assert any(p.prompt.endswith(" " + i) for i in INSTRUCTIONS), p  # only the task is new, not the wording
        assert p.prompt not in TRAINING_TEXT
        if family == "multiplication":
            a, b = map(int, re.findall(r"\d+", p.prompt))
            assert int(p.answer) == a * b and min(a, b) <= 9, p
        elif family == "previous":
            names = DAYS if " day " in p.prompt else MONTHS
            (name,) = [n for n in names if n in p.prompt]
            assert " before " in p.prompt and p.answer == names[names.index(name) - 1], p
        elif family == "plurals":
            (word,) = re.findall(r"'(\w+)'", p.prompt)
            assert p.answer == PLURALS[word], p
        else:
            (capital,) = [c for c in capitals if re.search(rf"\b{c}\b", p.prompt)]
            assert capitals[capital] == p.answer, p
    assert {p.answer for p in SPLIT_ITEMS["new-task"] if family_of(p.id) == "previous"} >= {"December", "Sunday"}


def test_split_of_and_family_of_with_prefixes():
    assert split_of("new-task/plurals-003") == "new-task" and family_of("new-task/plurals-003") == "plurals"
    assert split_of("new-wording/capitals-032") == "new-wording"
    assert family_of("in-distribution/capitals-032") == "capitals"
    for plain in ("capitals-032", "line3", "other/capitals-001", "/capitals-001", ""):
        assert split_of(plain) is None
    for bad in ("other/capitals-001", "new-task/", "new-task/cities-001", "capitals-", "capitals-x1"):
        with pytest.raises(UserError):
            family_of(bad)


def test_shipped_splits_file_equals_generator_output(tmp_path):
    shipped = DATA / SPLITS_FILE
    assert load_prompts(shipped) == heldout_suite()
    write_jsonl(heldout_suite(), tmp_path / "x.jsonl")
    assert shipped.read_bytes() == (tmp_path / "x.jsonl").read_bytes()


def test_splits_deterministic_across_processes():
    code = ("import json; from pudl.tasks import heldout_suite; "
            "print(json.dumps([[p.id, p.prompt, p.answer] for p in heldout_suite()]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "4242"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [[p.id, p.prompt, p.answer] for p in heldout_suite()]
