"""The teacher's ledger: what every teacher request cost, per purpose, over the life of a run's cache.

Purposes: `anchors` (training prompts), `references` (the teacher's answers to held-out prompts), `judge` (the
judged comparison). Each purpose sums `calls` (HTTP requests sent, retries included; one per answer for the
local backends), `prompt_tokens` and `completion_tokens` (the OpenAI-compatible `usage` field; llama.cpp's own
count for the `llamacpp` backend; 0 for `jsonl` / `tasks`, which read answers from files) and `seconds` (wall
time of the calls). Rows live in the cache (`pudl.cache.Cache.ledger`), so resumed runs keep adding to them.
"""

from __future__ import annotations

PURPOSES = ("anchors", "references", "judge")
FIELDS = ("calls", "prompt_tokens", "completion_tokens", "seconds")


def complete(ledger: dict[str, dict]) -> dict[str, dict]:
    """Every purpose present (zeros where nothing was asked), in `PURPOSES` order, then any other."""
    zero = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "seconds": 0.0}
    names = list(PURPOSES) + sorted(set(ledger) - set(PURPOSES))
    return {p: {**zero, **ledger.get(p, {})} for p in names}


def cost(ledger: dict[str, dict], price_in: float, price_out: float) -> dict | None:
    """The cost of each purpose and in all at the given prices per million tokens; None when both are 0."""
    if not price_in and not price_out:
        return None
    each = {p: (row["prompt_tokens"] * price_in + row["completion_tokens"] * price_out) / 1e6
            for p, row in ledger.items()}
    return {"price_in": price_in, "price_out": price_out, "by_purpose": each, "total": sum(each.values())}


def with_cost(ledger: dict[str, dict], price_in: float = 0.0, price_out: float = 0.0) -> dict:
    """summary.json's ledger: each purpose's sums, and `cost` when a price is set."""
    out: dict = complete(ledger)
    money = cost(out, price_in, price_out)
    if money is not None:
        out = {**out, "cost": money}
    return out


def lines(ledger: dict) -> list[str]:
    """One line per purpose that was asked anything, and the cost, for the terminal."""
    out = []
    for purpose in PURPOSES:
        row = ledger.get(purpose)
        if row and row["calls"]:
            out.append(f"{purpose}: {row['calls']} call(s), {row['prompt_tokens']} prompt + "
                       f"{row['completion_tokens']} completion tokens, {row['seconds']:.1f} s")
    money = ledger.get("cost")
    if money:
        out.append(f"cost: {money['total']:.4f} (at {money['price_in']:g} in / {money['price_out']:g} out per "
                   f"million tokens)")
    return out
