"""The command line: every user mistake is one line on stderr and exit code 2, never a traceback."""

import os
import subprocess
import sys

import pytest

GOOD_PROMPTS = '{"prompt": "What is 2 + 2? Reply with only the number.", "answer": "4"}\n'


def pudl(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pudl.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"}, timeout=300)


def recipe(tmp_path, body, prompts=GOOD_PROMPTS):
    (tmp_path / "p.jsonl").write_bytes(prompts.encode() if isinstance(prompts, str) else prompts)
    path = tmp_path / "r.toml"
    path.write_text(body)
    return str(path)


CASES = [
    ('[data]\nprompts = "p.jsonl"\n[sample]\nk = 0\n', GOOD_PROMPTS, "sample.k"),
    ('[data]\nprompts = "p.jsonl"\n[train]\nlearning_rate = "fast"\n', GOOD_PROMPTS, "train.learning_rate"),
    ('[data]\nprompts = "p.jsonl"\nbogus = 1\n', GOOD_PROMPTS, "data.bogus"),
    ('[data]\nprompts = "p.jsonl"\n', '{"prompt": "a"}\n{oops}\n', "p.jsonl:2"),
    ('[data]\nprompts = "p.jsonl"\n', b'{"prompt": "\xff\xfe"}\n', "p.jsonl:1"),
    ('[data]\nprompts = "p.jsonl"\n', "", "prompts file is empty"),
    ('[data]\nprompts = "p.jsonl"\n[student]\nmodel = "nope.gguf"\n', GOOD_PROMPTS, "student.model"),
    ('[data]\nprompts = "p.jsonl"\n[student]\nmodel = "p.jsonl"\n', GOOD_PROMPTS, "student.model"),
    ('[data\n', GOOD_PROMPTS, "invalid TOML"),
]


@pytest.mark.parametrize("body, prompts, needle", CASES)
def test_bad_input_is_one_line_and_exit_2(tmp_path, body, prompts, needle):
    out = pudl("run", recipe(tmp_path, body, prompts), "--out", str(tmp_path / "run"))
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_not_a_gguf_and_truncated_gguf(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a model")
    out = pudl("run", recipe(tmp_path, f'[data]\nprompts = "p.jsonl"\n[student]\nmodel = "{fake}"\n'))
    assert out.returncode == 2 and "not a GGUF file" in out.stderr and "Traceback" not in out.stderr


def test_help_explains_commands():
    out = pudl("--help")
    assert out.returncode == 0
    for command in ("run", "eval", "doctor"):
        assert command in out.stdout
    assert "anchor" in pudl("run", "--help").stdout
