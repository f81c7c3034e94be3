"""Every shipped recipe loads (schema, ranges, files): checked offline, without any model being present."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pudl.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.toml"))
STUDENTS = {"qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
            "qwen2.5-3b": "Qwen/Qwen2.5-3B-Instruct", "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
            "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct"}


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_shipped_recipe_loads(path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # validation never downloads: hub ids are checked at load time
    recipe = load_recipe(path)
    assert Path(recipe.data.prompts).is_file()


@pytest.mark.parametrize("stem, hub_id", STUDENTS.items())
def test_student_recipes_name_their_hub_model_and_memory(stem, hub_id):
    path = ROOT / "recipes" / f"{stem}.toml"
    assert load_recipe(path).student.model == hub_id
    text = path.read_text()
    assert re.search(r"Expected peak memory \(an ESTIMATE", text)
    assert re.search(r"CPU \(MLX in float32\): +~\d+\.\d GiB", text)


def test_docs_list_every_recipe():
    docs = (ROOT / "docs/recipes.md").read_text()
    for path in RECIPES:
        assert str(path.relative_to(ROOT)) in docs, path
