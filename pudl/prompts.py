"""Prompt files (JSONL) and chat-template rendering."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pudl.errors import UserError


@dataclass(frozen=True)
class Prompt:
    """One prompt of a prompts file; `answer` is a reference for evaluation only, never for training."""

    id: str
    prompt: str
    system: str | None = None
    answer: str | None = None


def jsonl_rows(path: Path, fields: set[str], what: str):
    """Yield (where, lineno, row) for each non-blank line of a JSONL file of objects with only `fields`.

    Every problem (missing file, non-UTF-8 bytes, bad JSON, not an object, unknown field) is a UserError
    naming file:line.
    """
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object")
        unknown = set(row) - fields
        if unknown:
            raise UserError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        yield where, lineno, row


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read a JSONL prompts file; every bad line is a UserError naming file:line."""
    path = Path(path)
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for where, lineno, row in jsonl_rows(path, {"prompt", "id", "system", "answer"}, "prompts file"):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{where}: 'prompt' must be a non-empty string")
        for key in ("id", "system", "answer"):
            if key in row and not isinstance(row[key], str):
                raise UserError(f"{where}: '{key}' must be a string")
        pid = row.get("id") or f"line{lineno}"
        if pid in seen:
            raise UserError(f"{where}: duplicate prompt id {pid!r} (first at line {seen[pid]})")
        seen[pid] = lineno
        prompts.append(Prompt(id=pid, prompt=prompt, system=row.get("system"), answer=row.get("answer")))
    if not prompts:
        raise UserError(f"{path}: prompts file is empty")
    return prompts


def chat_messages(prompt: Prompt, user_text: str | None = None) -> list[dict]:
    """The chat messages for a prompt (optionally with a different user text)."""
    messages = []
    if prompt.system:
        messages.append({"role": "system", "content": prompt.system})
    messages.append({"role": "user", "content": user_text if user_text is not None else prompt.prompt})
    return messages
