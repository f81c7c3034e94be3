"""The built-in task suite: short questions with a one-word or one-number reference answer.

Five families (`FAMILIES`): capitals, two-digit arithmetic, unit conversions, antonyms and
"format" (next day/month, number words to digits, larger of two numbers, repeat a word).
Every prompt ends with an explicit format instruction ("Reply with one word.", "Give only
the number.", ...), so a reply is judged both on the fact and on following the format.

The split is fixed, without randomness: every k-th listed fact (units: n = 3 and 7) goes to
eval, so eval holds countries, word pairs and number pairs that train never shows; numbers
and orderings come from SHA-256, identical on every machine. Each split lists its families
round-robin (capitals, arithmetic, units, antonyms, format, capitals, ...); ids number a
family's train items, then its eval items, so ids are unique across both splits.

Shipped subset rule: `recipes/data/tasks-train.jsonl` holds the FIRST 48 items of
`task_suite("train")` and `recipes/data/tasks-eval.jsonl` the FIRST 40 of
`task_suite("eval")`; thanks to the round-robin order that is 10/10/10/9/9 and 8 per family.
Regenerate both with `python -m pudl.tasks --write recipes/data` (a test checks they match).

Wordings. Each family has a question phrasing and a format instruction per item, drawn from
two disjoint sets (`wordings(family)`): training wordings (the only ones any training item
uses; `task_suite` uses the first four instructions of each kind) and evaluation-only
wordings, which no training prompt contains. Evaluation-only instructions include ones that
name the kind of answer instead of its length ("Name the city.", "State the result as a
numeral.").

Held-out splits (`heldout_split`, `SPLITS`), shipped together, 40 items each, in
`recipes/data/tasks-eval-splits.jsonl`:
  in-distribution - the shipped eval items exactly (new facts, training wordings);
  new-wording     - the same 40 facts and answers, each asked with an evaluation-only
                    question phrasing and instruction, so the two splits differ only in wording;
  new-task        - operations training never shows (`NEW_TASK_FAMILIES`: multiplication by a
                    one-digit number, the previous day/month, plurals, the country of a
                    capital), 10 each, with training instructions so that only the task is new.
Varied training wordings (`varied_split`, `VARIED`), for choosing recipe values without looking at
the held-out splits:
  train-varied - recipes/data/tasks-train-varied.jsonl: the shipped 48 training items (same ids and
                 answers), each asked with a question and instruction drawn by hash from the
                 family's whole training pool;
  valid        - recipes/data/tasks-valid.jsonl: 40 training-split items after the shipped 48 (8 per
                 family, ids `valid/<family>-<n>`), worded the same way: a validation slice.
A held-out prompt's id is `<split>/<family>-<number>`: `split_of` reads the split, `family_of`
the family ("new-wording/capitals-032" -> "new-wording", "capitals"); the number of an
in-distribution or new-wording item is that of the eval item it comes from, so ids ending
alike across those two splits are the same fact. Ids without a split prefix belong to no split.

Scoring (how results are compared):
  strict  - the reply, stripped of surrounding whitespace, quotes, `*`/backticks and
            trailing `.!?`, equals the answer, ignoring case;
  lenient - the answer occurs in the reply as a whole word, ignoring case
            ("68" in "The answer is 68." counts, "68" in "168" or "0.68" does not).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from functools import cache, partial
from pathlib import Path
from typing import NamedTuple

from pudl.errors import UserError
from pudl.prompts import Prompt

FAMILIES: tuple[str, ...] = ("capitals", "arithmetic", "units", "antonyms", "format")
NEW_TASK_FAMILIES: tuple[str, ...] = ("multiplication", "previous", "plurals", "countries")
SPLITS: tuple[str, ...] = ("in-distribution", "new-wording", "new-task")
SHIPPED: dict[str, int] = {"train": 48, "eval": 40}  # first N of each split, see docstring
SPLITS_FILE = "tasks-eval-splits.jsonl"
NEW_TASK_ITEMS = 10  # per new-task family
VARIED: dict[str, str] = {"train-varied": "tasks-train-varied.jsonl", "valid": "tasks-valid.jsonl"}
VALID_ITEMS = 40  # the validation slice: 8 per family

_WORD = ("Reply with one word.", "Answer with one word only.", "Respond with a single word.",
         "Reply with just one word, nothing else.")
_NUMBER = ("Reply with only the number.", "Give only the number.", "Answer with just the number.",
           "Respond with the number only, no words.")
_REPEAT_ONLY = "Reply with only that word."

# Format instructions per kind of answer: (training, evaluation-only). task_suite uses the first four
# training ones (the repeat task its one); the other training ones are there for training sets that vary
# the wording, so that the evaluation-only ones stay unseen whatever such a set draws.
_INSTRUCTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "city": (_WORD + ("Give just the name of the city.", "Answer with the city's name alone.",
                      "Reply with the name of the city and nothing else.", "The city's name only."),
             ("Name the city.", "Which city? Just the name.", "Only the city name, please.",
              "State the city and nothing more.", "Write just the capital's name.",
              "No sentence: the city alone.", "Say only which city.",
              "Just the name of the capital, no explanation.")),
    "result": (_NUMBER + ("Give the result as a number only.", "Answer with the number alone.",
                          "The number only, please.", "Reply with the result in digits."),
               ("State the result as a numeral.", "Write the result in digits, nothing else.",
                "Digits only.", "Just the result, no working.", "Answer in digits and nothing more.",
                "Only the final figure.", "No words: the numeral alone.", "Write the numeral and stop.")),
    "amount": (_NUMBER + ("Give the amount as a number only.", "Answer with the amount alone.",
                          "The number of units only.", "Reply with the count in digits."),
               ("State the amount as a numeral.", "Give the count in digits, nothing else.",
                "Digits only.", "Just the amount, no unit.", "Answer with the numeral and nothing more.",
                "Only the final figure.", "No words: the numeral alone.", "How many? Just the digits.")),
    "antonym": (_WORD + ("Give just the opposite word.", "Answer with the antonym alone.",
                         "Reply with the opposite and nothing else.", "The opposite word only."),
                ("Name the opposite.", "Which word? Just that word.", "Only the antonym, please.",
                 "State the opposite and nothing more.", "Write just the word that means the reverse.",
                 "No sentence: the antonym alone.", "Say only the opposite.",
                 "Just one antonym, no explanation.")),
    "name": (_WORD + ("Give just the name.", "Answer with the name alone.",
                      "Reply with the name and nothing else.", "The name only."),
             ("Name it.", "Which one? Only its name.", "Only its name, please.",
              "State the name and nothing more.", "Write that name alone.", "No sentence: the name by itself.",
              "Say only the name.", "The name, no explanation.")),
    "numeral": (_NUMBER + ("Give the number alone.", "Answer with the digits only.",
                           "The number, nothing more.", "Reply in digits."),
                ("State it as a numeral.", "Digits only.", "Write the numeral, nothing else.",
                 "Just the digits, please.", "No words: the numeral alone.", "Answer in digits and nothing more.",
                 "Only the figure itself.", "Which number? Just the digits.")),
    "copy": ((_REPEAT_ONLY, "Answer with that word alone.", "Give back just that word.",
              "Write that word and nothing else."),
             ("Say only the word itself.", "Nothing but the word, please.", "Just the word, no sentence.",
              "Write it once, on its own.")),
}
# Question phrasings per task: (training, evaluation-only); the training tuples are those task_suite uses.
_QUESTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "capitals": (("What is the capital of {}?", "Which city is the capital of {}?",
                  "Name the capital city of {}."),
                 ("Tell me the capital of {}.", "What city serves as the capital of {}?",
                  "Do you know the capital of {}?", "The capital of {} is called what?")),
    "plus": (("What is {} + {}?", "What is {} plus {}?", "Calculate {} + {}."),
             ("Add {} and {}.", "What is the sum of {} and {}?", "Work out {} + {}.",
              "How much is {} added to {}?")),
    "minus": (("What is {} - {}?", "What is {} minus {}?", "Calculate {} - {}."),
              ("Subtract {1} from {0}.", "What is {0} take away {1}?", "Work out {} - {}.",
               "What do you get if you take {1} away from {0}?")),
    "units": (("How many {t} are in {n} {f}?", "Convert {n} {f} to {t}.", "{n} {f} is how many {t}?"),
              ("What is {n} {f} in {t}?", "Express {n} {f} in {t}.", "Tell me how many {t} make up {n} {f}.",
               "{n} {f} equals how many {t}?")),
    "antonyms": (("What is the opposite of '{}'?", "Give the opposite of the word '{}'.",
                  "What word means the opposite of '{}'?"),
                 ("What is the antonym of '{}'?", 'Give me an antonym for "{}".',
                  "Which word means the reverse of {}?", "'{}' is the opposite of which word?")),
    "day": (("Which day comes after {}?",),
            ("What day follows {}?", "Name the day after {}.", "If today is {}, what day is tomorrow?",
             "The day after {} is which day?")),
    "month": (("Which month comes after {}?",),
              ("What month follows {}?", "Name the month after {}.", "If this month is {}, what is next month?",
               "The month after {} is which month?")),
    "digits": (("Write the number {} in digits.",),
               ("How is '{}' written as a numeral?", "Turn the words '{}' into a number.",
                "Write {} using digits.", "What number is '{}'?")),
    "larger": (("Which number is larger, {} or {}?",),
               ("Of {} and {}, which is bigger?", "Pick the greater number: {} or {}.",
                "{} or {}: which is more?", "Which is the bigger number, {} or {}?")),
    "repeat": (("Repeat this word exactly: '{}'.",),
               ("Say the word '{}' back to me.", "Echo this word: {}.", 'Copy the word "{}".',
                "Write the word '{}' again.")),
}
# Which instruction kinds and question tasks each family draws on (for `wordings`).
_FAMILY_WORDINGS = {"capitals": (("city",), ("capitals",)), "arithmetic": (("result",), ("plus", "minus")),
                    "units": (("amount",), ("units",)), "antonyms": (("antonym",), ("antonyms",)),
                    "format": (("name", "numeral", "copy"), ("day", "month", "digits", "larger", "repeat"))}
_NEW_TASK_QUESTIONS = {  # new-task families: training-style phrasings, since only the task should be new
    "multiplication": ("What is {} times {}?", "What is {} multiplied by {}?", "Calculate {} x {}."),
    "previous": ("Which {} comes before {}?",),
    "plurals": ("What is the plural of '{}'?", "Give the plural of the word '{}'.",
                "What word is the plural of '{}'?"),
    "countries": ("{} is the capital of which country?", "Which country has {} as its capital?",
                  "Name the country whose capital is {}."),
}
_PLURALS = (("mouse", "mice"), ("child", "children"), ("foot", "feet"), ("tooth", "teeth"),
            ("goose", "geese"), ("leaf", "leaves"), ("knife", "knives"), ("city", "cities"),
            ("box", "boxes"), ("baby", "babies"))

_CAPITALS = [  # (country as written in the question, capital); every 3rd goes to eval
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"),
    ("Greece", "Athens"), ("the United Kingdom", "London"), ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"),
    ("Hungary", "Budapest"), ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("South Korea", "Seoul"),
    ("Thailand", "Bangkok"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Cuba", "Havana"),
    ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("the Czech Republic", "Prague"),
    ("Switzerland", "Bern"), ("Chile", "Santiago"), ("Venezuela", "Caracas"),
    ("the Philippines", "Manila"), ("Indonesia", "Jakarta"), ("Vietnam", "Hanoi"),
    ("Saudi Arabia", "Riyadh"), ("Syria", "Damascus"), ("Lebanon", "Beirut"),
    ("Afghanistan", "Kabul"), ("Nepal", "Kathmandu"), ("Morocco", "Rabat"), ("Ghana", "Accra"),
    ("Qatar", "Doha"), ("Romania", "Bucharest"), ("Iceland", "Reykjavik"),
]
_UNITS = [  # (from, to, factor); eval uses n in {3, 7}, train the other n
    ("meters", "centimeters", 100), ("kilograms", "grams", 1000), ("hours", "minutes", 60),
    ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7),
    ("kilometers", "meters", 1000), ("years", "months", 12),
]
_ANTONYMS = [  # (word, opposite, 1 or 2 directions); a pair stays in one split; every 4th to eval
    ("hot", "cold", 2), ("up", "down", 2), ("big", "small", 1), ("fast", "slow", 2),
    ("happy", "sad", 2), ("day", "night", 2), ("tall", "short", 1), ("black", "white", 2),
    ("in", "out", 2), ("yes", "no", 2), ("heavy", "light", 1), ("wet", "dry", 2),
    ("early", "late", 2), ("rich", "poor", 2), ("left", "right", 1), ("full", "empty", 2),
    ("win", "lose", 2), ("push", "pull", 2), ("thick", "thin", 1), ("strong", "weak", 2),
    ("first", "last", 2), ("loud", "quiet", 2), ("true", "false", 2), ("top", "bottom", 2),
    ("north", "south", 2), ("east", "west", 2), ("above", "below", 2), ("high", "low", 2),
    ("inside", "outside", 2), ("buy", "sell", 2), ("asleep", "awake", 2), ("alive", "dead", 2),
]  # 1 direction where the reverse is ambiguous (small -> large/big, right -> wrong, light -> dark)
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")
_REPEAT = ("apple", "river", "garden", "window", "yellow", "pencil", "rabbit", "candle", "mountain")
_ONES = ("", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def _h(key: str) -> int:
    """A machine-independent pseudo-random integer for `key`."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def _pick(options: tuple[str, ...], key: str) -> str:
    """A phrasing chosen by hash, so it does not correlate with the split."""
    return options[_h(key) % len(options)]


def _split(items: list, every: int) -> tuple[list, list]:
    """Every `every`-th item (index every-1, 2*every-1, ...) to eval, the rest to train."""
    return ([x for i, x in enumerate(items) if i % every != every - 1],
            [x for i, x in enumerate(items) if i % every == every - 1])


def _two_digit_pairs(tag: str, n: int, distinct=lambda a, b: (a, b)) -> list[tuple[int, int]]:
    pairs, seen, k = [], set(), 0
    while len(pairs) < n:
        a, b = 10 + _h(f"{tag}:{k}:a") % 90, 10 + _h(f"{tag}:{k}:b") % 90
        k += 1
        if a != b and distinct(a, b) not in seen:
            seen.add(distinct(a, b))
            pairs.append((a, b))
    return pairs


def _in_words(n: int) -> str:
    return _ONES[n] if n < 20 else _TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else "")


class _Item(NamedTuple):
    """A suite item: its training-worded prompt, its answer, its n-th evaluation-only phrasing, and a phrasing
    drawn from the whole training pool by a key."""

    prompt: str
    answer: str
    reword: Callable[[int], str]
    vary: Callable[[str], str]


def _item(prompt: str, answer: str, task: str, kind: str, *args, **kwargs) -> _Item:
    """An item asked by `task`'s questions with `kind` instructions (args fill the question)."""
    return _Item(prompt, answer, partial(_reworded, task, kind, args, kwargs), partial(_varied, task, kind, args, kwargs))


def _varied(task: str, kind: str, args: tuple, kwargs: dict, key: str) -> str:
    """A training-pool phrasing picked by hash of `key`: any training question with any training instruction
    (the evaluation-only ones are never drawn)."""
    question = _pick(_QUESTIONS[task][0], f"q:{key}").format(*args, **kwargs)
    return f"{question} {_pick(_INSTRUCTIONS[kind][0], f'i:{key}')}"


def _reworded(task: str, kind: str, args: tuple, kwargs: dict, n: int) -> str:
    """The n-th evaluation-only phrasing: question and instruction in turn, so n = 0..7 meets every pairing once."""
    questions, instructions = _QUESTIONS[task][1], _INSTRUCTIONS[kind][1]
    return f"{questions[n % len(questions)].format(*args, **kwargs)} {instructions[n % len(instructions)]}"


def _capitals() -> tuple[list, list]:
    ask = _QUESTIONS["capitals"][0]
    items = [_item(f"{_pick(ask, c).format(c)} {_pick(_WORD, a)}", a, "capitals", "city", c) for c, a in _CAPITALS]
    return _split(items, 3)


def _arithmetic() -> tuple[list, list]:
    ask = {"+": ("plus", _QUESTIONS["plus"][0]), "-": ("minus", _QUESTIONS["minus"][0])}
    items = []
    for i, (a, b) in enumerate(_two_digit_pairs("arith", 64, lambda a, b: (min(a, b), max(a, b)))):
        op = "+-"[i // 4 % 2]  # blocks of 4, so eval (every 4th) alternates + and -
        a, b = (a, b) if op == "+" else (max(a, b), min(a, b))
        key = f"{a}{op}{b}"
        answer = str(a + b if op == "+" else a - b)
        task, questions = ask[op]
        items.append(_item(f"{_pick(questions, key).format(a, b)} {_pick(_NUMBER, key)}", answer,
                           task, "result", a, b))
    return _split(items, 4)


def _units() -> tuple[list, list]:
    ask = _QUESTIONS["units"][0]
    train, eval_ = [], []
    for f, t, factor in _UNITS:
        for n in range(2, 10):
            key = f"{n} {f} {t}"
            item = _item(f"{_pick(ask, key).format(n=n, f=f, t=t)} {_pick(_NUMBER, key)}", str(n * factor),
                         "units", "amount", n=n, f=f, t=t)
            (eval_ if n in (3, 7) else train).append(item)
    return train, eval_


def _antonyms() -> tuple[list, list]:
    ask = _QUESTIONS["antonyms"][0]
    groups = [[(a, b), (b, a)][:k] for a, b, k in _ANTONYMS]
    train, eval_ = _split(groups, 4)
    fmt = lambda gs: [_item(f"{_pick(ask, w).format(w)} {_pick(_WORD, o)}", o, "antonyms", "antonym", w)
                      for g in gs for w, o in g]
    return fmt(train), fmt(eval_)


def _format() -> tuple[list, list]:
    def seq(names, every, what):
        items = [_item(f"{_QUESTIONS[what][0][0].format(x)} {_pick(_WORD, x)}", names[(i + 1) % len(names)],
                       what, "name", x) for i, x in enumerate(names)]
        return _split(items, every)

    numbers = sorted({10 + _h(f"words:{k}") % 90 for k in range(40)}, key=lambda n: _h(f"w{n}"))[:17]
    words = [_item(f"{_QUESTIONS['digits'][0][0].format(_in_words(n))} {_pick(_NUMBER, str(n))}", str(n),
                   "digits", "numeral", _in_words(n)) for n in numbers]
    larger = [_item(f"{_QUESTIONS['larger'][0][0].format(a, b)} {_pick(_NUMBER, f'{a} {b}')}", str(max(a, b)),
                    "larger", "numeral", a, b) for a, b in _two_digit_pairs("larger", 11)]
    repeat = [_item(f"{_QUESTIONS['repeat'][0][0].format(w)} {_REPEAT_ONLY}", w, "repeat", "copy", w)
              for w in _REPEAT]
    parts = [seq(_DAYS, 3, "day"), seq(_MONTHS, 4, "month"), _split(words, 3),
             _split(larger, 3), _split(repeat, 3)]
    return [x for tr, _ in parts for x in tr], [x for _, ev in parts for x in ev]


@cache
def _built() -> tuple[dict[str, tuple[Prompt, ...]], dict[str, Callable[[int], str]], dict[str, Callable[[str], str]]]:
    """Both splits, families round-robin, each item's evaluation-only phrasings and training-pool phrasings by id."""
    builders = {"capitals": _capitals, "arithmetic": _arithmetic, "units": _units,
                "antonyms": _antonyms, "format": _format}
    per_split: dict[str, list[list[Prompt]]] = {"train": [], "eval": []}
    rewords: dict[str, Callable[[int], str]] = {}
    varies: dict[str, Callable[[str], str]] = {}
    for family in FAMILIES:
        train, eval_ = (sorted(items, key=lambda x: _h(x.prompt)) for items in builders[family]())
        for split, items, start in (("train", train, 0), ("eval", eval_, len(train))):
            prompts = [Prompt(id=f"{family}-{start + i:03d}", prompt=x.prompt, answer=x.answer)
                       for i, x in enumerate(items)]
            rewords.update((p.id, x.reword) for p, x in zip(prompts, items))
            varies.update((p.id, x.vary) for p, x in zip(prompts, items))
            per_split[split].append(prompts)
    suite = {split: tuple(p for rnd in _round_robin(fams) for p in rnd) for split, fams in per_split.items()}
    return suite, rewords, varies


def _suite() -> dict[str, tuple[Prompt, ...]]:
    return _built()[0]


def _round_robin(lists: list[list[Prompt]]):
    for i in range(max(map(len, lists))):
        yield [lst[i] for lst in lists if i < len(lst)]


def _multiplication() -> list[tuple[str, str]]:
    pairs: list[tuple[int, int]] = []
    k = 0
    while len(pairs) < NEW_TASK_ITEMS:  # 3..12 times 2..9: within a small model's reach, unlike 59 + 52
        a, b = 3 + _h(f"mul:{k}:a") % 10, 2 + _h(f"mul:{k}:b") % 8
        k += 1
        if (a, b) not in pairs and (b, a) not in pairs:
            pairs.append((a, b))
    ask = _NEW_TASK_QUESTIONS["multiplication"]
    return [(f"{_pick(ask, f'{a}x{b}').format(a, b)} {_pick(_NUMBER, f'{a}x{b}')}", str(a * b)) for a, b in pairs]


def _previous() -> list[tuple[str, str]]:
    half = NEW_TASK_ITEMS // 2
    picked = [(what, names, x) for what, names in (("day", _DAYS), ("month", _MONTHS))
              for x in sorted(names, key=lambda n: _h(f"prev:{n}"))[:half]]
    ask = _NEW_TASK_QUESTIONS["previous"][0]
    return [(f"{ask.format(what, x)} {_pick(_WORD, 'prev:' + x)}", names[names.index(x) - 1])
            for what, names, x in picked]


def _plurals() -> list[tuple[str, str]]:
    ask = _NEW_TASK_QUESTIONS["plurals"]
    return [(f"{_pick(ask, w).format(w)} {_pick(_WORD, 'pl:' + w)}", pl) for w, pl in _PLURALS[:NEW_TASK_ITEMS]]


def _countries() -> list[tuple[str, str]]:
    one_word = sorted(((c, a) for c, a in _CAPITALS if " " not in c), key=lambda ca: _h(f"country:{ca[0]}"))
    ask = _NEW_TASK_QUESTIONS["countries"]
    return [(f"{_pick(ask, a).format(a)} {_pick(_WORD, 'country:' + a)}", c) for c, a in one_word[:NEW_TASK_ITEMS]]


@cache
def _heldout() -> dict[str, tuple[Prompt, ...]]:
    """The three held-out splits (see the module docstring)."""
    eval_items = _suite()["eval"][: SHIPPED["eval"]]
    rewords = _built()[1]
    seen: Counter[str] = Counter()
    new_wording = []
    for p in eval_items:
        family = family_of(p.id)
        new_wording.append(Prompt(id=f"new-wording/{p.id}", prompt=rewords[p.id](seen[family]), answer=p.answer))
        seen[family] += 1
    builders = {"multiplication": _multiplication, "previous": _previous, "plurals": _plurals,
                "countries": _countries}
    new_task = [[Prompt(id=f"new-task/{family}-{i:03d}", prompt=q, answer=a)
                 for i, (q, a) in enumerate(sorted(builders[family](), key=lambda x: _h(x[0])))]
                for family in NEW_TASK_FAMILIES]
    return {"in-distribution": tuple(replace(p, id=f"in-distribution/{p.id}") for p in eval_items),
            "new-wording": tuple(new_wording),
            "new-task": tuple(p for rnd in _round_robin(new_task) for p in rnd)}


def task_suite(split: str) -> list[Prompt]:
    """The fixed "train" or "eval" split, families round-robin; identical on every run and machine."""
    if split not in ("train", "eval"):
        raise UserError(f"unknown task split {split!r} (expected 'train' or 'eval')")
    return list(_suite()[split])


def varied_split(name: str) -> list[Prompt]:
    """Training-distribution prompts in varied training wordings (never an evaluation-only one):
    "train-varied" - the shipped 48 training items (same ids, facts and answers), each asked with a question
                     and an instruction drawn by hash from its family's whole training pool;
    "valid"        - a validation slice for choosing recipe values: the 40 training-split items after the
                     shipped 48, 8 per family, drawn the same way, ids `valid/<family>-<n>`. Its facts are in
                     no shipped training or held-out file, and its wordings are training wordings, so choosing
                     on it never looks at the held-out splits."""
    if name not in VARIED:
        raise UserError(f"unknown varied split {name!r} (expected one of {', '.join(VARIED)})")
    train, varies = task_suite("train"), _built()[2]
    n = SHIPPED["train"]
    if name == "train-varied":
        return [replace(p, prompt=varies[p.id](f"train:{p.id}")) for p in train[:n]]
    per_family = VALID_ITEMS // len(FAMILIES)
    taken: Counter[str] = Counter()
    out = []
    for p in train[n:]:
        family = family_of(p.id)
        if taken[family] < per_family:
            taken[family] += 1
            out.append(Prompt(id=f"valid/{p.id}", prompt=varies[p.id](f"valid:{p.id}"), answer=p.answer))
    return out


def heldout_split(split: str) -> list[Prompt]:
    """One held-out split ("in-distribution", "new-wording" or "new-task"), ids prefixed with its name."""
    if split not in SPLITS:
        raise UserError(f"unknown held-out split {split!r} (expected one of {', '.join(SPLITS)})")
    return list(_heldout()[split])


def heldout_suite() -> list[Prompt]:
    """All three held-out splits in `SPLITS` order: the contents of recipes/data/tasks-eval-splits.jsonl."""
    return [p for split in SPLITS for p in _heldout()[split]]


def wordings(family: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A training family's format instructions: (training, evaluation-only), disjoint."""
    if family not in FAMILIES:
        raise UserError(f"unknown task family {family!r} (expected one of {', '.join(FAMILIES)})")
    kinds = _FAMILY_WORDINGS[family][0]
    return tuple(w for k in kinds for w in _INSTRUCTIONS[k][0]), tuple(w for k in kinds for w in _INSTRUCTIONS[k][1])


def questions(family: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A training family's question templates: (training, evaluation-only), disjoint."""
    if family not in FAMILIES:
        raise UserError(f"unknown task family {family!r} (expected one of {', '.join(FAMILIES)})")
    tasks = _FAMILY_WORDINGS[family][1]
    return tuple(q for t in tasks for q in _QUESTIONS[t][0]), tuple(q for t in tasks for q in _QUESTIONS[t][1])


def split_of(prompt_id: str) -> str | None:
    """The held-out split an id names ("new-task/plurals-003" -> "new-task"); None for an id without one."""
    prefix, slash, _ = prompt_id.partition("/")
    return prefix if slash and prefix in SPLITS else None


def family_of(prompt_id: str) -> str:
    """The family of a task-suite id ("capitals-017" or "new-wording/capitals-017" -> "capitals")."""
    prefix, slash, rest = prompt_id.partition("/")
    name = rest if slash and (prefix in SPLITS or prefix == "valid") else prompt_id
    family, dash, number = name.rpartition("-")
    if family not in FAMILIES + NEW_TASK_FAMILIES or not dash or not number.isdigit():
        raise UserError(f"{prompt_id!r} is not a task-suite id (expected [<split>/]<family>-<number>)")
    return family


_EDGE = "'\"`*\u2018\u2019\u201c\u201d"  # quotes (also typographic), markdown bold/code


def normalize_reply(text: str) -> str:
    """Strip surrounding whitespace, quotes, `*`/backticks and trailing .!? (repeatedly); case is kept."""
    prev = None
    while text != prev:
        prev, text = text, text.strip().strip(_EDGE).rstrip(".!?")
    return text


def strict_match(reply: str, answer: str) -> bool:
    """The whole normalized reply is the answer, ignoring case."""
    return normalize_reply(reply).casefold() == normalize_reply(answer).casefold() != ""


def lenient_match(reply: str, answer: str) -> bool:
    """The answer occurs in the reply as a whole word (or number), ignoring case."""
    words = answer.strip().split()
    if not words:
        return False
    body = r"\s+".join(map(re.escape, words))  # a multi-word answer may be spaced differently
    sign = r"(?<!\d[.,])(?<!-)" if body.isdigit() else ""  # 68 is not in 0.68, 1,068 or -68
    pattern = rf"(?<![^\W_]){sign}{body}(?![^\W_])(?![.,]\d)"  # letters/digits make words, not _
    return re.search(pattern, reply, re.IGNORECASE) is not None


def write_jsonl(prompts: list[Prompt], path: str | Path) -> None:
    """Write rows {"id", "prompt", "answer"}, one JSON object a line."""
    rows = (json.dumps({"id": p.id, "prompt": p.prompt, "answer": p.answer}, ensure_ascii=False)
            for p in prompts)
    Path(path).write_text("".join(r + "\n" for r in rows), encoding="utf-8")


def _counts(prompts: list[Prompt]) -> str:
    """"family n, ..." for a printout."""
    counts = Counter(family_of(p.id) for p in prompts)
    return ", ".join(f"{f} {n}" for f, n in counts.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pudl.tasks", description=__doc__.split("\n")[0])
    parser.add_argument("--write", metavar="DIR",
                        help=f"write tasks-train.jsonl, tasks-eval.jsonl, {SPLITS_FILE}, "
                        f"{', '.join(VARIED.values())}")
    args = parser.parse_args(argv)
    out = Path(args.write) if args.write else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval"):
        prompts = task_suite(split)
        print(f"{split}: {len(prompts)} items ({_counts(prompts)}); shipped: first {SHIPPED[split]}")
        if out:
            write_jsonl(prompts[: SHIPPED[split]], out / f"tasks-{split}.jsonl")
    for split in SPLITS:
        prompts = heldout_split(split)
        print(f"held-out {split}: {len(prompts)} items ({_counts(prompts)})")
    for name, filename in VARIED.items():
        prompts = varied_split(name)
        print(f"{name}: {len(prompts)} items ({_counts(prompts)}), training wordings varied")
        if out:
            write_jsonl(prompts, out / filename)
    if out:
        write_jsonl(heldout_suite(), out / SPLITS_FILE)


if __name__ == "__main__":
    main()
