"""`pudl cache export`: a run's cached preferences as JSONL for peers (TRL DPOTrainer, mlx-lm-lora DPO).

Pair rows are `{"prompt", "chosen", "rejected"}`. With `--style chat` (default) the prompt is the chat
messages (system + user) and chosen/rejected are one assistant message each: TRL's conversational format,
where the trainer applies the model's chat template. With `--style text` they are plain strings, with the
system prompt in `"system"`: mlx-lm-lora's DPO format. `--listwise` writes one row per prompt with every
candidate, its score and rank (rank 0 = best) and the anchor (the teacher's answer, `is_anchor: true`).
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from pudl.atomic_files import dumps
from pudl.cli_errors import user_errors
from pudl.errors import UserError

STYLES = ("chat", "text")


def _messages(prompt: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def _prompt_fields(style: str, prompt: str, system: str | None) -> dict:
    if style == "chat":
        return {"prompt": _messages(prompt, system)}
    return {"prompt": prompt, **({"system": system} if system else {})}


def _reply(style: str, text: str):
    return [{"role": "assistant", "content": text}] if style == "chat" else text


def preference_rows(cache, round_: int, style: str = "chat", listwise: bool = False, scorer: str | None = None):
    """Rows of one round: pairs (chosen idx -1 = the anchor) or, `listwise`, every scored candidate per prompt."""
    from pudl.domain import ANCHOR_IDX

    prompts, anchors, candidates = cache.prompt_rows(), cache.anchors(), cache.candidates(round_)

    def text(pid: str, idx: int) -> str:
        return anchors[pid] if idx == ANCHOR_IDX else candidates[pid][idx].text

    if not listwise:
        for p in cache.pairs(round_):
            prompt, system, _ = prompts[p.prompt_id]
            yield {**_prompt_fields(style, prompt, system), "chosen": _reply(style, text(p.prompt_id, p.chosen_idx)),
                   "rejected": _reply(style, text(p.prompt_id, p.rejected_idx)), "id": p.prompt_id, "kind": p.kind,
                   "chosen_is_anchor": p.chosen_idx == ANCHOR_IDX, "margin": p.margin}
        return
    scorers = cache.scorers(round_)
    if not scorers:
        raise UserError(f"round {round_}: nothing is scored yet")
    if scorer is None:
        scorer = "anchor-likelihood" if "anchor-likelihood" in scorers else scorers[0]
    elif scorer not in scorers:
        raise UserError(f"--scorer {scorer}: not in round {round_} (cached: {', '.join(scorers)})")
    groups: dict[str, list] = {}
    for pid, idx, score, rank, _ in cache.ranked(round_, scorer):
        groups.setdefault(pid, []).append((idx, score, rank))
    for pid, rows in groups.items():
        prompt, system, answer = prompts[pid]
        items = [{"text": text(pid, idx), "score": score, "rank": None if idx == ANCHOR_IDX else rank,
                  "is_anchor": idx == ANCHOR_IDX, **({} if idx == ANCHOR_IDX else
                                                     {"finish": candidates[pid][idx].finish})}
                 for idx, score, rank in rows]
        if not any(i["is_anchor"] for i in items) and pid in anchors:  # an anchor the scorer did not score
            items.append({"text": anchors[pid], "score": None, "rank": None, "is_anchor": True})
        yield {**_prompt_fields(style, prompt, system), "id": pid, "scorer": scorer,
               "completions": [_reply(style, i["text"]) for i in items],
               "candidates": items, **({"answer": answer} if answer is not None else {})}


def export_pairs(run_dir: str | Path, out: str | Path, round_: int | None = None, style: str = "chat",
                 listwise: bool = False, scorer: str | None = None, force: bool = False) -> tuple[int, int]:
    """Write RUN_DIR's cached preferences of `round_` (default: the latest with pairs/scores) as JSONL.
    Returns (round, rows written)."""
    from pudl.cache import Cache

    run_dir, out = Path(run_dir), Path(out)
    if style not in STYLES:
        raise UserError(f"--style {style!r}: choose {' or '.join(STYLES)}")
    if not (run_dir / "cache.sqlite").is_file():
        raise UserError(f"{run_dir}: no cache.sqlite (not a pudl run directory?)")
    if out.exists() and not force:
        raise UserError(f"--out {out}: already exists (pass --force to replace it)")
    cache = Cache.open_read_only(run_dir / "cache.sqlite")
    try:
        rounds = [r for r in cache.rounds() if (cache.scorers(r) if listwise else cache.pairs(r))]
        if not rounds:
            raise UserError(f"{run_dir}: the cache holds no {'scored candidates' if listwise else 'pairs'} yet")
        round_ = rounds[-1] if round_ is None else round_
        if round_ not in rounds:
            raise UserError(f"--round {round_}: no {'scores' if listwise else 'pairs'} cached for it "
                            f"(rounds with them: {', '.join(map(str, rounds))})")
        tmp = out.with_name(out.name + ".tmp")
        n = 0
        with open(tmp, "w", encoding="utf-8") as f:
            for row in preference_rows(cache, round_, style, listwise, scorer):
                f.write(dumps(row, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, out)
    finally:
        cache.close()
    return round_, n


@click.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSONL file to write.")
@click.option("--round", "round_", type=int, help="Round to export (default: the latest with pairs).")
@click.option("--listwise", is_flag=True, help="One row per prompt: every candidate with score and rank, and the "
                                               "anchor (for listwise / GRPO-style trainers).")
@click.option("--style", default="chat", show_default=True, metavar="chat|text",
              help="chat: prompt as messages, replies as assistant messages (TRL conversational); text: plain "
                   "strings with a 'system' field (mlx-lm-lora DPO).")
@click.option("--scorer", help="--listwise: the self-ranking score to export (default: anchor-likelihood).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@user_errors
def export_command(run_dir, out, round_, listwise, style, scorer, force):
    """Write RUN_DIR's cached preference pairs as {"prompt", "chosen", "rejected"} JSONL (TRL / mlx-lm-lora
    DPO format); with --listwise, one row per prompt with all candidates, scores, ranks and the anchor.
    A pair whose chosen side is the teacher's anchor has "chosen_is_anchor": true."""
    r, n = export_pairs(run_dir, out, round_, style, listwise, scorer, force)
    click.echo(f"wrote {n} {'prompt' if listwise else 'pair'} row(s) of round {r} to {out}")
