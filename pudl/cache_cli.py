"""`pudl cache ...`: look inside a run's preference cache (read-only) from the command line.

`ls` prints what each round holds and the state of its stages; `show` prints ranked candidates of some prompts.
Reads go through pudl.cache (Cache.open_read_only): this module speaks no SQL and writes nothing.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pudl.cli_errors import user_errors
from pudl.pairs_export import export_command

TEXT_CHARS = 240  # a candidate's text is cut to this many characters in `show`


def _open(run_dir: str):
    from pudl.cache import Cache

    return Cache.open_read_only(Path(run_dir) / "cache.sqlite")


@click.group()
def cache():
    """Inspect a run's cache: rounds, counts, ranked candidates (read-only)."""


@cache.command("ls")
@click.argument("run_dir", type=click.Path(file_okay=False))
@user_errors
def ls(run_dir):
    """Rounds of RUN_DIR's cache with their counts and stage states.

    Counts per round (prompts sampled, candidates, prompts scored, score rows, pairs, reference log-prob rows,
    how the scored groups came out) and each stage's state: done, interrupted (begun, not finished: the next
    `pudl run` resumes it) or - (not run). Then the teacher's ledger: requests, tokens and seconds per purpose
    (anchors, references, judge) over the life of the cache, and the cost at the recipe's prices.
    """
    from pudl.cache import STAGES

    db = _open(run_dir)
    try:
        totals, rounds, stages = db.counts(), db.rounds(), db.stage_rows()
        per_round = {r: (db.round_counts(r), db.group_statuses(r)) for r in rounds}
        spent = db.ledger()
    finally:
        db.close()
    console = Console()
    console.print(f"[bold]{escape(str(Path(run_dir) / 'cache.sqlite'))}[/]: {totals['prompts']} prompts, "
                  f"{totals['anchors']} anchors, {totals['teacher_failures']} teacher failures", highlight=False)
    if not rounds:
        console.print("no rounds yet")
        return
    table = Table(title="rounds")
    for col in ("round", "prompts", "cands", "scored", "scores", "pairs", "refs"):
        table.add_column(col, justify="right")
    table.add_column("groups")
    for r in rounds:
        counts, groups = per_round[r]
        status = ", ".join(f"{k} {v}" for k, v in sorted(groups.items())) or "-"
        table.add_row(str(r), *(str(counts[k]) for k in ("prompts", "candidates", "scored", "scores", "pairs",
                                                          "references")), escape(status))
    console.print(table)
    state = {(r, s): "done" if done else "interrupted" for r, s, done in stages}
    names = list(STAGES) + sorted({s for _, s, _ in stages} - set(STAGES))  # (a cache from an older pudl)
    table = Table(title="stages", caption="interrupted: the next `pudl run` resumes it")
    table.add_column("round", justify="right")
    for name in names:
        table.add_column(name)
    for r in rounds:
        table.add_row(str(r), *(state.get((r, s), "-") for s in names))
    console.print(table)
    _print_ledger(console, Path(run_dir), spent)  # last: after the tables scripts read by position


def _prices(run_dir: Path) -> tuple[float, float]:
    """[teacher] price_in / price_out from the run's resolved recipe.toml (0, 0 when it has none)."""
    import tomllib

    try:
        teacher = tomllib.loads((run_dir / "recipe.toml").read_text()).get("teacher", {})
    except (OSError, ValueError):
        return 0.0, 0.0
    return float(teacher.get("price_in", 0.0) or 0.0), float(teacher.get("price_out", 0.0) or 0.0)


def _print_ledger(console: Console, run_dir: Path, spent: dict):
    """The teacher's ledger, one line per purpose, and the cost when the run's recipe sets prices."""
    from pudl.ledger import lines, with_cost

    for line in lines(with_cost(spent, *_prices(run_dir))):
        console.print(f"teacher ledger · {escape(line)}", highlight=False)


def _mark(text: str, answer: str | None) -> str:
    """✓ strict match, ~ lenient only, ✗ neither; '' when the prompt has no answer."""
    from pudl.tasks import lenient_match, strict_match

    if answer is None:
        return ""
    return "✓" if strict_match(text, answer) else "~" if lenient_match(text, answer) else "✗"


def _cut(text: str) -> str:
    text = text.replace("\n", "⏎ ")
    return text if len(text) <= TEXT_CHARS else text[: TEXT_CHARS - 1] + "…"


@cache.command("show")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--round", "round_", type=int, help="Round to show (default: the latest).")
@click.option("--prompt", "prompt_id", help="Show only this prompt id.")
@click.option("--limit", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many prompts to show (ignored with --prompt).")
@click.option("--scorer", help="Self-ranking score to order by (default: anchor-likelihood, else the first cached).")
@user_errors
def show(run_dir, round_, prompt_id, limit, scorer):
    """Ranked candidates of some prompts of RUN_DIR: score, rank, text, and correct? where the prompt has an
    answer (✓ strict, ~ lenient only, ✗ neither). The anchor (the teacher's answer) is listed with its score.
    """
    from pudl.domain import ANCHOR_IDX
    from pudl.errors import UserError

    db = _open(run_dir)
    try:
        rounds = db.rounds()
        if not rounds:
            raise UserError(f"{run_dir}: the cache holds no rounds yet")
        round_ = rounds[-1] if round_ is None else round_
        if round_ not in rounds:
            raise UserError(f"--round {round_}: not in the cache (rounds: {', '.join(map(str, rounds))})")
        scorers = db.scorers(round_)
        if not scorers:
            raise UserError(f"round {round_}: nothing is scored yet (see `pudl cache ls {run_dir}`)")
        if scorer is None:
            scorer = "anchor-likelihood" if "anchor-likelihood" in scorers else scorers[0]
        elif scorer not in scorers:
            raise UserError(f"--scorer {scorer}: not in round {round_} (cached: {', '.join(scorers)})")
        prompts = db.prompt_rows()
        if prompt_id is not None and prompt_id not in prompts:
            raise UserError(f"--prompt {prompt_id}: no such prompt id in the cache")
        rows = db.ranked(round_, scorer, prompt_id)
    finally:
        db.close()
    if prompt_id is not None and not rows:
        raise UserError(f"--prompt {prompt_id}: not scored in round {round_}")
    by_prompt: dict[str, list] = {}
    for pid, idx, score, rank, text in rows:
        by_prompt.setdefault(pid, []).append((idx, score, rank, text))
    console = Console()
    console.print(f"round {round_} · scorer {scorer} · {len(by_prompt)} scored prompt(s)"
                  + (f", showing {min(limit, len(by_prompt))}" if prompt_id is None else ""), highlight=False)
    for pid in list(by_prompt)[: 1 if prompt_id else limit]:
        question, _, answer = prompts.get(pid, ("", None, None))
        title = f"{escape(pid)}: {escape(_cut(question))}" + (f"\nanswer: {escape(answer)}" if answer else "")
        table = Table(title=title, title_justify="left")
        table.add_column("rank", justify="right")
        table.add_column("score", justify="right")
        if answer is not None:
            table.add_column("correct?", justify="center")
        table.add_column("text")
        for idx, score, rank, text in by_prompt[pid]:
            label = "anchor" if idx == ANCHOR_IDX else str(rank)
            cells = [label, f"{score:.3f}"] + ([_mark(text, answer)] if answer is not None else []) + [escape(_cut(text))]
            table.add_row(*cells, style="dim" if idx == ANCHOR_IDX else None)
        console.print(table)


cache.add_command(export_command)  # `pudl cache export` lives with its writer
