"""`pudl init`: a commented starter recipe that loads as written, lists every key, and never overwrites by accident."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from pudl.cli import main
from pudl.init_recipe import _field_help
from pudl.recipe import SECTIONS, load_recipe


def init(*args):
    return CliRunner().invoke(main, ["init", *args], catch_exceptions=False)


def uncommented(text: str) -> str:
    """Every commented-out `# key = value` line made active (the help lines stay comments)."""
    return re.sub(r"(?m)^# (\w+ = )", r"\1", text)


def test_starter_loads_lists_every_key_and_its_defaults_are_pudls(tmp_path):
    path = tmp_path / "sub" / "my.toml"
    out = init(str(path))
    assert out.exit_code == 0, out.output
    recipe = load_recipe(path)
    assert recipe.teacher.backend == "tasks" and recipe.student.model == "smollm2-135m"
    assert Path(recipe.data.prompts) == tmp_path / "sub" / "data" / "tasks-train.jsonl"
    assert Path(recipe.data.eval).is_file()
    text = path.read_text()
    lines = text.splitlines()
    for name, cls in SECTIONS.items():
        assert f"[{name}]" in lines
        for f in dataclasses.fields(cls):
            i = next(i for i, line in enumerate(lines) if re.match(rf"(# )?{f.name} = ", line)
                     and lines[i - 1] == f"# {_field_help(f)}")
            assert i > 0
    # The commented-out values are pudl's defaults: making them all active changes nothing.
    path.write_text(uncommented(text))
    assert path.read_text() != text
    assert load_recipe(path) == recipe


def test_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("# mine\n")
    out = init(str(path))
    assert out.exit_code == 2 and "exists; pass --force" in out.output
    assert path.read_text() == "# mine\n"
    assert init(str(path), "--force").exit_code == 0
    load_recipe(path)


@pytest.mark.parametrize("teacher", ["openai", "tasks"])
def test_flags_for_model_teacher_and_data(tmp_path, teacher):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "Say hi."}\n')
    model = tmp_path / "models" / "student.gguf"
    model.parent.mkdir()
    model.write_bytes(b"GGUF")  # only its existence is checked when the recipe loads
    path = tmp_path / "r.toml"
    out = init(str(path), "--model", str(model), "--teacher", teacher, "--data", str(data))
    assert out.exit_code == 0, out.output
    assert not (tmp_path / "data").exists()  # --data given: no task suite written
    recipe = load_recipe(path)
    assert (recipe.teacher.backend, recipe.student.model, recipe.data.prompts) == (teacher, str(model), str(data))
    assert 'model = "models/student.gguf"' in path.read_text()  # relative to the recipe's folder
    assert recipe.data.eval == ""


def test_hub_id_model_and_file_teachers(tmp_path):
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text('{"id": "a", "anchor": "b"}\n')
    assert init(str(tmp_path / "a.toml"), "--model", "Qwen/Qwen2.5-0.5B-Instruct").exit_code == 0
    assert load_recipe(tmp_path / "a.toml").student.model == "Qwen/Qwen2.5-0.5B-Instruct"
    out = init(str(tmp_path / "b.toml"), "--teacher", "jsonl")
    assert out.exit_code == 2 and "--teacher jsonl needs --teacher-path" in out.output
    assert not (tmp_path / "b.toml").exists()
    assert init(str(tmp_path / "b.toml"), "--teacher", "jsonl", "--teacher-path", str(anchors)).exit_code == 0
    assert load_recipe(tmp_path / "b.toml").teacher.path == str(anchors)
    out = init(str(tmp_path / "c.toml"), "--teacher-path", str(anchors))
    assert out.exit_code == 2 and "only for --teacher llamacpp or jsonl" in out.output
    out = init(str(tmp_path / "d.txt"))
    assert out.exit_code == 2 and "ends in .toml" in out.output
