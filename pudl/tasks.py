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
from functools import cache
from pathlib import Path

from pudl.errors import UserError
from pudl.prompts import Prompt

FAMILIES: tuple[str, ...] = ("capitals", "arithmetic", "units", "antonyms", "format")
SHIPPED: dict[str, int] = {"train": 48, "eval": 40}  # first N of each split, see docstring

_WORD = ("Reply with one word.", "Answer with one word only.", "Respond with a single word.",
         "Reply with just one word, nothing else.")
_NUMBER = ("Reply with only the number.", "Give only the number.", "Answer with just the number.",
           "Respond with the number only, no words.")

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


def _capitals() -> tuple[list, list]:
    ask = ("What is the capital of {}?", "Which city is the capital of {}?",
           "Name the capital city of {}.")
    items = [(f"{_pick(ask, c).format(c)} {_pick(_WORD, a)}", a) for c, a in _CAPITALS]
    return _split(items, 3)


def _arithmetic() -> tuple[list, list]:
    ask = {"+": ("What is {} + {}?", "What is {} plus {}?", "Calculate {} + {}."),
           "-": ("What is {} - {}?", "What is {} minus {}?", "Calculate {} - {}.")}
    items = []
    for i, (a, b) in enumerate(_two_digit_pairs("arith", 64, lambda a, b: (min(a, b), max(a, b)))):
        op = "+-"[i // 4 % 2]  # blocks of 4, so eval (every 4th) alternates + and -
        a, b = (a, b) if op == "+" else (max(a, b), min(a, b))
        key = f"{a}{op}{b}"
        answer = str(a + b if op == "+" else a - b)
        items.append((f"{_pick(ask[op], key).format(a, b)} {_pick(_NUMBER, key)}", answer))
    return _split(items, 4)


def _units() -> tuple[list, list]:
    ask = ("How many {t} are in {n} {f}?", "Convert {n} {f} to {t}.", "{n} {f} is how many {t}?")
    train, eval_ = [], []
    for f, t, factor in _UNITS:
        for n in range(2, 10):
            key = f"{n} {f} {t}"
            item = (f"{_pick(ask, key).format(n=n, f=f, t=t)} {_pick(_NUMBER, key)}", str(n * factor))
            (eval_ if n in (3, 7) else train).append(item)
    return train, eval_


def _antonyms() -> tuple[list, list]:
    ask = ("What is the opposite of '{}'?", "Give the opposite of the word '{}'.",
           "What word means the opposite of '{}'?")
    groups = [[(a, b), (b, a)][:k] for a, b, k in _ANTONYMS]
    train, eval_ = _split(groups, 4)
    fmt = lambda gs: [(f"{_pick(ask, w).format(w)} {_pick(_WORD, o)}", o) for g in gs for w, o in g]
    return fmt(train), fmt(eval_)


def _format() -> tuple[list, list]:
    def seq(names, every, what):
        items = [(f"Which {what} comes after {x}? {_pick(_WORD, x)}", names[(i + 1) % len(names)])
                 for i, x in enumerate(names)]
        return _split(items, every)

    numbers = sorted({10 + _h(f"words:{k}") % 90 for k in range(40)}, key=lambda n: _h(f"w{n}"))[:17]
    words = [(f"Write the number {_in_words(n)} in digits. {_pick(_NUMBER, str(n))}", str(n))
             for n in numbers]
    larger = [(f"Which number is larger, {a} or {b}? {_pick(_NUMBER, f'{a} {b}')}", str(max(a, b)))
              for a, b in _two_digit_pairs("larger", 11)]
    repeat = [(f"Repeat this word exactly: '{w}'. Reply with only that word.", w) for w in _REPEAT]
    parts = [seq(_DAYS, 3, "day"), seq(_MONTHS, 4, "month"), _split(words, 3),
             _split(larger, 3), _split(repeat, 3)]
    return [x for tr, _ in parts for x in tr], [x for _, ev in parts for x in ev]


@cache
def _suite() -> dict[str, tuple[Prompt, ...]]:
    builders = {"capitals": _capitals, "arithmetic": _arithmetic, "units": _units,
                "antonyms": _antonyms, "format": _format}
    per_split: dict[str, list[list[Prompt]]] = {"train": [], "eval": []}
    for family in FAMILIES:
        train, eval_ = (sorted(items, key=lambda x: _h(x[0])) for items in builders[family]())
        for split, items, start in (("train", train, 0), ("eval", eval_, len(train))):
            per_split[split].append([Prompt(id=f"{family}-{start + i:03d}", prompt=p, answer=a)
                                     for i, (p, a) in enumerate(items)])
    return {split: tuple(p for rnd in _round_robin(fams) for p in rnd) for split, fams in per_split.items()}


def _round_robin(lists: list[list[Prompt]]):
    for i in range(max(map(len, lists))):
        yield [lst[i] for lst in lists if i < len(lst)]


def task_suite(split: str) -> list[Prompt]:
    """The fixed "train" or "eval" split, families round-robin; identical on every run and machine."""
    if split not in ("train", "eval"):
        raise UserError(f"unknown task split {split!r} (expected 'train' or 'eval')")
    return list(_suite()[split])


def family_of(prompt_id: str) -> str:
    """The family of a task-suite id ("capitals-017" -> "capitals")."""
    family = prompt_id.rpartition("-")[0]
    if family not in FAMILIES:
        raise UserError(f"{prompt_id!r} is not a task-suite id (expected <family>-<number>)")
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pudl.tasks", description=__doc__.split("\n")[0])
    parser.add_argument("--write", metavar="DIR", help="write tasks-train.jsonl and tasks-eval.jsonl")
    args = parser.parse_args(argv)
    for split in ("train", "eval"):
        prompts = task_suite(split)
        counts = ", ".join(f"{f} {sum(family_of(p.id) == f for p in prompts)}" for f in FAMILIES)
        print(f"{split}: {len(prompts)} items ({counts}); shipped: first {SHIPPED[split]}")
        if args.write:
            Path(args.write).mkdir(parents=True, exist_ok=True)
            write_jsonl(prompts[: SHIPPED[split]], Path(args.write) / f"tasks-{split}.jsonl")


if __name__ == "__main__":
    main()
