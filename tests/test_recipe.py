import pytest

from pudl.errors import UserError
from pudl.recipe import LORA_TARGETS, load_recipe

PROMPTS = '{"prompt": "What is 2 + 2? Reply with only the number.", "answer": "4"}\n'


def write(tmp_path, text, prompts=PROMPTS):
    (tmp_path / "p.jsonl").write_text(prompts)
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


def test_defaults_and_relative_paths(tmp_path):
    r = load_recipe(write(tmp_path, '[data]\nprompts = "p.jsonl"\n'))
    assert r.data.prompts == str(tmp_path / "p.jsonl")
    assert r.sample.k == 4 and r.train.algo == "dpo" and r.lora.targets == list(LORA_TARGETS)
    assert r.run.out == "runs/r"


def test_out_override_and_int_to_float(tmp_path):
    r = load_recipe(write(tmp_path, '[data]\nprompts = "p.jsonl"\n[train]\nbeta = 1\n'), out="elsewhere")
    assert r.run.out == "elsewhere" and isinstance(r.train.beta, float)


def test_missing_recipe(tmp_path):
    with pytest.raises(UserError, match="recipe not found"):
        load_recipe(tmp_path / "nope.toml")


def test_every_shipped_recipe_is_valid():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))
    assert len(recipes) >= 4
    algos = {load_recipe(r).train.algo for r in recipes}
    assert {"dpo", "grpo", "ldl", "listmle"} <= algos


def test_command_line_overrides_win_and_are_checked(tmp_path):
    path = write(tmp_path, '[data]\nprompts = "p.jsonl"\n[rank]\npairs = "both"\n')
    r = load_recipe(path, overrides=["rank.pairs=best-vs-worst", "sample.k=6", "lora.targets=[\"q_proj\"]"])
    assert (r.rank.pairs, r.sample.k, r.lora.targets) == ("best-vs-worst", 6, ["q_proj"])
    with pytest.raises(UserError, match="sample.k"):
        load_recipe(path, overrides=["sample.k=0"])
    with pytest.raises(UserError, match="expected section.key=value"):
        load_recipe(path, overrides=["k=3"])


def test_resolved_recipe_loads_from_anywhere(tmp_path, monkeypatch):
    """A run's recipe.toml names its files by absolute path, even when the recipe was given by a relative one."""
    from pudl.init_recipe import resolved_recipe

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "p.jsonl").write_text('{"prompt": "hi", "answer": "yo"}\n')
    (tmp_path / "r" / "r.toml").write_text('[data]\nprompts = "p.jsonl"\neval = "p.jsonl"\n[train]\nepochs = 3\n')
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("r/r.toml")  # relative: its paths resolve to r/p.jsonl, relative to here
    assert not recipe.data.prompts.startswith("/")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.toml").write_text(resolved_recipe(recipe))
    monkeypatch.chdir(tmp_path / "run")
    again = load_recipe("recipe.toml")
    assert again.data.prompts == again.data.eval == str((tmp_path / "r" / "p.jsonl").resolve())
    assert again.train.epochs == 3 and again.student == recipe.student
