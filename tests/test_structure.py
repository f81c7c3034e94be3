"""The package's shape: imports point down the layers of docs/architecture.md and never go in a circle.

Every import counts, also the ones inside functions: a module imported lazily still depends on the other one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"pudl": ROOT / "pudl", "pudl.kernels": ROOT / "kernels", "pudl.bench": ROOT / "bench"}

# Top to bottom; a module may import its own layer and the ones below (docs/architecture.md, "Layers").
LAYERS = {
    "entry": {"pudl.cli", "pudl.cli_errors", "pudl.cache_cli", "pudl.pairs_export", "pudl.study", "pudl.export",
              "pudl.bench"},
    "loop": {"pudl.loop", "pudl.runtime"},
    "stages": {"pudl.teachers", "pudl.sampler", "pudl.mlx_sampler", "pudl.sampling", "pudl.scoring", "pudl.pairs",
               "pudl.prefs", "pudl.train", "pudl.losses", "pudl.evaluate", "pudl.agreement", "pudl.adapters", "pudl.judge",
               "pudl.stages", "pudl.distributed", "pudl.report", "pudl.html_report"},
    "model": {"pudl.models", "pudl.mlx_lm_models", "pudl.gguf_quants", "pudl.kernels", "pudl.cache", "pudl.sequences",
              "pudl.llamacpp", "pudl.hardware", "pudl.convert", "pudl.hfdir", "pudl.wire"},
    "values": {"pudl.domain", "pudl.errors", "pudl.recipe", "pudl.init_recipe", "pudl.prompts", "pudl.tasks",
               "pudl.atomic_files", "pudl.ledger"},
}
ORDER = list(LAYERS)


def modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name."""
    out = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The pudl modules `name` imports anywhere in its source (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def layer_of(module: str) -> str:
    """The layer a module belongs to (a package's submodules share the package's layer)."""
    for layer, members in LAYERS.items():
        if module in members or any(module.startswith(m + ".") for m in members):
            return layer
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods) | {"pudl"}
    return {name: imports(name, path, known) - {"pudl"} for name, path in mods.items()}


def test_every_module_has_a_layer_and_imports_point_down():
    wrong = []
    for module, targets in graph().items():
        if module in ("pudl", "pudl.kernels", "pudl.bench"):
            continue  # package markers
        here = ORDER.index(layer_of(module))
        wrong += [f"{module} ({ORDER[here]}) imports {t} ({layer_of(t)})" for t in sorted(targets)
                  if t not in ("pudl.kernels", "pudl.bench") and ORDER.index(layer_of(t)) < here]
    assert not wrong, "imports from a lower layer up:\n" + "\n".join(wrong)


def test_no_module_imports_one_that_imports_it_back():
    edges = graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_walk_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from pudl.loop import run\n    import pudl.cache\n")
    assert imports("pudl.m", source, {"pudl.loop", "pudl.cache", "pudl.loop.run"}) == \
        {"pudl.loop", "pudl.cache", "pudl.loop.run"}


def test_only_the_runtime_sets_up_a_student_or_a_sampler():
    """`pudl run`, the other ranks, `pudl eval` and `pudl study` get their student from pudl.runtime, so they
    cannot drift apart (the benches measure the pieces themselves)."""
    setup = {"pudl.sampler", "pudl.mlx_sampler", "pudl.models.load_student", "pudl.models.Tokenizer"}
    mods = modules()
    known = set(mods) | setup
    for module, path in mods.items():
        if module == "pudl.runtime" or module.startswith("pudl.bench"):
            continue
        assert not imports(module, path, known) & setup, module
