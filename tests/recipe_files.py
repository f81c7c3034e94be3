"""The one writer of the small recipes the tests run: a few task-suite prompts and a TOML built from sections."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pudl.init_recipe import toml_value

ROOT = Path(__file__).resolve().parent.parent
TASK_LINES = (ROOT / "recipes/data/tasks-train.jsonl").read_text().splitlines()


def write_recipe(directory: Path, sections: dict, prompts: int | list[str] = 2, eval_prompts: int = 0,
                 name: str = "r", extra_toml: str = "") -> Path:
    """Write `directory`/p.jsonl (the suite's first `prompts` rows, or the given JSONL rows), e.jsonl (the next
    `eval_prompts` rows, if any) and `name`.toml from `sections` ({"train": {"epochs": 1}, ...}) plus
    `extra_toml` (TOML text merged in, e.g. a test's [teacher] section); return the recipe's path."""
    rows = TASK_LINES[:prompts] if isinstance(prompts, int) else prompts
    (directory / "p.jsonl").write_text("\n".join(rows) + "\n")
    data = {"prompts": "p.jsonl"}
    if eval_prompts:
        first = len(rows) if isinstance(prompts, int) else 0
        (directory / "e.jsonl").write_text("\n".join(TASK_LINES[first : first + eval_prompts]) + "\n")
        data["eval"] = "e.jsonl"
    merged = {key: dict(values) for key, values in sections.items()}
    for key, values in tomllib.loads(extra_toml).items():
        merged.setdefault(key, {}).update(values)
    merged["data"] = {**data, **merged.get("data", {})}
    lines = []
    for section, values in merged.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(str(v) if isinstance(v, Path) else v)}" for key, v in values.items()]
    path = directory / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path
