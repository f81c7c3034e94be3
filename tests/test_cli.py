"""The command line: every user mistake is one line on stderr and exit code 2, never a traceback.

The bad-input matrix runs in-process through the click group (the same code path as the `pudl` command);
one subprocess test checks the contract as a shell sees it.
"""

import pytest
from click.testing import CliRunner

from tests.conftest import assert_one_line_error, pudl

GOOD_PROMPTS = '{"prompt": "What is 2 + 2? Reply with only the number.", "answer": "4"}\n'
BASE = '[data]\nprompts = "p.jsonl"\n'

BAD_INPUT = [  # (id, recipe body, prompts file, extra args, needle)
    ("k=0", BASE + "[sample]\nk = 0\n", GOOD_PROMPTS, [], "sample.k"),
    ("k-not-int", BASE + '[sample]\nk = "four"\n', GOOD_PROMPTS, [], "sample.k"),
    ("unknown-key", BASE + "[sample]\nkk = 3\n", GOOD_PROMPTS, [], "sample.kk"),
    ("lr-not-float", BASE + '[train]\nlearning_rate = "fast"\n', GOOD_PROMPTS, [], "train.learning_rate"),
    ("unknown-data-key", BASE + "bogus = 1\n", GOOD_PROMPTS, [], "data.bogus"),
    ("temperature<0", BASE + "[sample]\ntemperature = -1\n", GOOD_PROMPTS, [], "sample.temperature: -1.0 is below"),
    ("rank=0", BASE + "[lora]\nrank = 0\n", GOOD_PROMPTS, [], "lora.rank: 0 is below the minimum 1"),
    ("top_p=0", BASE + "[sample]\ntop_p = 0\n", GOOD_PROMPTS, [], "sample.top_p"),
    ("lr>1", BASE + "[train]\nlearning_rate = 2.0\n", GOOD_PROMPTS, [], "train.learning_rate: 2.0 is above"),
    ("bool-for-int", BASE + "[train]\nepochs = true\n", GOOD_PROMPTS, [], "train.epochs: expected int"),
    ("unknown-section", BASE + "[samples]\nk = 3\n", GOOD_PROMPTS, [], "[samples]: unknown section"),
    ("bad-choice", BASE + '[rank]\nscorer = "vibes"\n', GOOD_PROMPTS, [], "rank.scorer: 'vibes' is not one of"),
    ("bad-target", BASE + '[lora]\ntargets = ["qq_proj"]\n', GOOD_PROMPTS, [], "lora.targets"),
    ("empty-targets", BASE + "[lora]\ntargets = []\n", GOOD_PROMPTS, [], "lora.targets: must not be empty"),
    ("concurrency=0", BASE + "[teacher]\nmax_concurrency = 0\n", GOOD_PROMPTS, [], "teacher.max_concurrency"),
    ("checkpoint_every=0", BASE + "[train]\ncheckpoint_every = 0\n", GOOD_PROMPTS, [], "train.checkpoint_every"),
    ("no-prompts-key", "[sample]\nk = 2\n", GOOD_PROMPTS, [], "data.prompts: required"),
    ("prompts-missing", '[data]\nprompts = "missing.jsonl"\n', GOOD_PROMPTS, [], "data.prompts"),
    ("eval-missing", BASE + 'eval = "nope.jsonl"\n', GOOD_PROMPTS, [], "data.eval: file not found"),
    ("brackets-in-path", '[data]\nprompts = "in[key]/p.jsonl"\n', GOOD_PROMPTS, [], "in[key]/p.jsonl"),
    ("jsonl-no-path", BASE + '[teacher]\nbackend = "jsonl"\n', GOOD_PROMPTS, [], "teacher.path: required"),
    ("jsonl-missing", BASE + '[teacher]\nbackend = "jsonl"\npath = "a.jsonl"\n', GOOD_PROMPTS, [],
     "teacher.path: file not found"),
    ("openai-no-url", BASE + '[teacher]\nbackend = "openai"\nmodel = "m"\n', GOOD_PROMPTS, [], "teacher.base_url"),
    ("openai-ftp", BASE + '[teacher]\nbackend = "openai"\nmodel = "m"\nbase_url = "ftp://h/v1"\n', GOOD_PROMPTS, [],
     "teacher.base_url: must start with http"),
    ("model-missing", BASE + '[student]\nmodel = "nope.gguf"\n', GOOD_PROMPTS, [], "student.model"),
    ("model-not-gguf", BASE + '[student]\nmodel = "p.jsonl"\n', GOOD_PROMPTS, [], "student.model"),
    ("model-dir", BASE + '[student]\nmodel = "."\n', GOOD_PROMPTS, [], "is a directory"),
    ("invalid-toml", "[data\n", GOOD_PROMPTS, [], "invalid TOML"),
    ("set-no-dot", BASE, GOOD_PROMPTS, ["--set", "k=3"], "expected section.key=value"),
    ("set-range", BASE, GOOD_PROMPTS, ["--set", "sample.k=0"], "sample.k: 0 is below"),
    ("bad-json-line", BASE, '{"prompt": "a"}\n{oops}\n', [], "p.jsonl:2"),
    ("not-utf8", BASE, b'{"prompt": "\xff\xfe"}\n', [], "p.jsonl:1"),
    ("empty-prompts", BASE, "", [], "prompts file is empty"),
    ("json-not-object", BASE, "[1, 2]\n", [], "p.jsonl:1: expected a JSON object"),
    ("unknown-field", BASE, '{"prompt": "a", "question": "b"}\n', [], "p.jsonl:1: unknown field(s) question"),
    ("blank-prompt", BASE, '{"prompt": "a"}\n{"prompt": "  "}\n', [], "p.jsonl:2: 'prompt' must be a non-empty"),
    ("id-not-string", BASE, '{"prompt": "a", "id": 7}\n', [], "p.jsonl:1: 'id' must be a string"),
    ("duplicate-ids", BASE, '{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n', [],
     "p.jsonl:2: duplicate prompt id 'x' (first at line 1)"),
]


def recipe(tmp_path, body, prompts=GOOD_PROMPTS):
    (tmp_path / "p.jsonl").write_bytes(prompts.encode() if isinstance(prompts, str) else prompts)
    path = tmp_path / "r.toml"
    path.write_text(body)
    return str(path)


def in_process(*args, cwd):
    """`pudl ARGS` through the click group in this process (stderr kept apart from stdout)."""
    import os

    from pudl.cli import main

    before = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(before)


@pytest.mark.parametrize("body, prompts, args, needle", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_recipe_or_prompts_is_one_line_and_exit_2(tmp_path, body, prompts, args, needle):
    out = in_process("run", recipe(tmp_path, body, prompts), "--out", tmp_path / "run", *args, cwd=tmp_path)
    assert_one_line_error(out, needle)


def test_the_exit_code_contract_as_a_shell_sees_it(tmp_path):
    out = pudl("run", recipe(tmp_path, BASE + "[sample]\nk = 0\n"), "--out", tmp_path / "run")
    assert_one_line_error(out, "sample.k: 0 is below the minimum 1")
    assert out.stdout == ""


def test_not_a_gguf_and_truncated_gguf(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a model")
    out = in_process("run", recipe(tmp_path, f'{BASE}[student]\nmodel = "{fake}"\n'), cwd=tmp_path)
    assert_one_line_error(out, "not a GGUF file")


def test_help_explains_commands():
    out = pudl("--help")
    assert out.returncode == 0
    for command in ("run", "eval", "doctor"):
        assert command in out.stdout
    assert "anchor" in pudl("run", "--help").stdout
