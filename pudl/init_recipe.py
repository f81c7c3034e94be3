"""Recipes as commented TOML, written from the recipe dataclasses themselves.

`pudl init` writes a starter recipe: every section and key, each under its help text, range and choices
(read from the fields' metadata in pudl.recipe, so the file never goes stale). Keys the user chose are set;
the rest are commented out at their default, so the recipe keeps following pudl's defaults. The same renderer
writes a run's resolved recipe (every value set) for its report.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pudl.errors import UserError
from pudl.recipe import SECTIONS, TEACHER_BACKENDS, Recipe

# What `--teacher` fills in beyond the backend; openai's values are placeholders to edit (a local server's).
TEACHER_STARTERS = {
    "openai": {"base_url": "http://127.0.0.1:8080/v1", "model": "teacher"},
    "llamacpp": {},
    "jsonl": {},
    "tasks": {},
}


def toml_value(value) -> str:
    """One value in TOML syntax (strings as JSON strings, which TOML's basic strings read alike)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _field_help(f: dataclasses.Field) -> str:
    meta = f.metadata
    extra = []
    if "choices" in meta:
        extra.append("one of: " + ", ".join(meta["choices"]))
    if "min" in meta or "max" in meta:
        extra.append("range " + f"{meta.get('min', '')}..{meta.get('max', '')}")
    return meta.get("help", "") + (f" ({'; '.join(extra)})" if extra else "")


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def render_recipe(values: dict[str, dict], header: str, all_set: bool = False) -> str:
    """Every section and key with its help as a comment. Keys in `values` (section -> key -> value) are set;
    the others are written commented out at their default, unless `all_set`."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for name, cls in SECTIONS.items():
        lines += ["", f"[{name}]"]
        chosen = values.get(name, {})
        for f in dataclasses.fields(cls):
            lines.append(f"# {_field_help(f)}")
            if f.name in chosen:
                lines.append(f"{f.name} = {toml_value(chosen[f.name])}")
            else:
                lines.append(f"{'' if all_set else '# '}{f.name} = {toml_value(_default(f))}")
    return "\n".join(lines) + "\n"


def resolved_recipe(recipe: Recipe) -> str:
    """A run's recipe as it ran (overrides applied, paths resolved): loadable with pudl.recipe.load_recipe."""
    values = {name: {f.name: getattr(getattr(recipe, name), f.name) for f in dataclasses.fields(cls)}
              for name, cls in SECTIONS.items()}
    # Paths are resolved against the recipe's folder, which may itself be relative to where pudl ran: made
    # absolute, the file loads from anywhere (run.out stays as given: it names where the run was written).
    for section, key in (("data", "prompts"), ("data", "eval"), ("teacher", "path"), ("student", "model")):
        value = values[section][key]
        if value and Path(value).exists():
            values[section][key] = str(Path(value).resolve())
    return render_recipe(values, f"The recipe this run used, resolved from {recipe.path}\n"
                                 "(command-line --set overrides applied, file paths made absolute).", all_set=True)


def _relative(path: Path, base: Path) -> str:
    """`path` as the recipe should name it: relative to the recipe's folder when inside it, else absolute."""
    path = path.resolve()
    try:
        return str(path.relative_to(base.resolve()))
    except ValueError:
        return str(path)


def starter_recipe(path: Path, model: str = "smollm2-135m", teacher: str = "tasks", data: Path | None = None,
                   eval_data: Path | None = None, teacher_path: Path | None = None) -> str:
    """The text of a starter recipe that will live at `path` (file inputs are named relative to it)."""
    if teacher not in TEACHER_BACKENDS:
        raise UserError(f"--teacher: {teacher!r} is not one of {', '.join(TEACHER_BACKENDS)}")
    base = path.parent
    values: dict[str, dict] = {"student": {"model": model}, "teacher": {"backend": teacher,
                                                                        **TEACHER_STARTERS[teacher]}}
    if model != "smollm2-135m" and Path(model).expanduser().exists():
        values["student"]["model"] = _relative(Path(model).expanduser(), base)
    if teacher in ("llamacpp", "jsonl"):
        if teacher_path is None:
            what = "the teacher's GGUF" if teacher == "llamacpp" else "the JSONL file of anchors {id, anchor}"
            raise UserError(f"--teacher {teacher} needs --teacher-path ({what})")
        values["teacher"]["path"] = _relative(teacher_path, base)
    elif teacher_path is not None:
        raise UserError(f"--teacher-path: only for --teacher llamacpp or jsonl, not {teacher}")
    values["data"] = {"prompts": _relative(data, base)} if data else {}
    if eval_data:
        values["data"]["eval"] = _relative(eval_data, base)
    header = (f"pudl recipe: {path.name}, written by `pudl init`.\n"
              "Every key is listed under its help text. Commented-out keys keep pudl's default;\n"
              "uncomment a key to change it. File paths are relative to this file.\n"
              f"Run it: pudl run {path}")
    if teacher == "openai":
        header += ("\nteacher.base_url and teacher.model are placeholders: point them at your OpenAI-compatible\n"
                   "endpoint (recipes/teachers/ has examples for OpenAI, a llama.cpp server and Ollama).")
    return render_recipe(values, header)


def write_starter(path: Path, force: bool = False, data: Path | None = None, **options) -> list[Path]:
    """Write a starter recipe at `path` (refusing to overwrite unless `force`). Without `data`, the built-in
    task suite is written next to it (data/tasks-train.jsonl, data/tasks-eval.jsonl) so the recipe runs as is.
    Returns the files written."""
    if path.suffix != ".toml":
        raise UserError(f"{path}: a recipe file name ends in .toml")
    if path.exists() and not force:
        raise UserError(f"{path}: exists; pass --force to overwrite it")
    if path.is_dir():
        raise UserError(f"{path}: is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    eval_data = None
    if data is None:
        from pudl.tasks import SHIPPED, task_suite, write_jsonl

        folder = path.parent / "data"
        files = {split: folder / f"tasks-{split}.jsonl" for split in ("train", "eval")}
        for split, file in files.items():
            if not file.exists():  # an earlier init's (or the user's edited) suite is kept
                folder.mkdir(exist_ok=True)
                write_jsonl(task_suite(split)[: SHIPPED[split]], file)
                written.append(file)
        data, eval_data = files["train"], files["eval"]
    elif not data.is_file():
        raise UserError(f"--data: file not found: {data}")
    path.write_text(starter_recipe(path, data=data, eval_data=eval_data, **options))
    return [path, *written]
