import pytest

from tests.tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """A tiny random llama GGUF with Q4_1/Q8_0 blocks (fresh random weights every session)."""
    import random

    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=random.randrange(1 << 30))


@pytest.fixture(scope="session")
def smollm2():
    from pudl.models import resolve_model_path

    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_gguf_f32(tmp_path_factory):
    """The same kind of tiny model with float32 weights (no quantization noise on either side)."""
    import random

    return write_tiny_gguf(tmp_path_factory.mktemp("tiny32") / "tiny32.gguf", seed=random.randrange(1 << 30),
                           quantize=False)


def pudl(*args, env=None, cwd=None, timeout=900, fsize=None, popen=False):
    """`pudl ARGS` as a real subprocess (`python -m pudl.cli`), output captured as text; `fsize` limits the
    size of any file it writes (`ulimit -f`, so a write fails like on a full disk); `popen` returns the process."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pudl.cli", *map(str, args)]
    env = {**os.environ, "COLUMNS": "200", **(env or {})}
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (pudl ignores it too; this covers interpreter start-up)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout,
                          stdin=subprocess.DEVNULL, preexec_fn=limit_file_size if fsize else None)


def assert_one_line_error(out, needle: str):
    """Exit code 2, no traceback, and exactly one line on stderr, starting 'error: ', that contains `needle`
    (`out`: a finished subprocess or click's CliRunner result)."""
    code = getattr(out, "returncode", getattr(out, "exit_code", None))
    assert code == 2, (code, out.stderr[-3000:])
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr[-3000:]
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]


def strict_json(text: str):
    """Parse JSON as jq and JavaScript's JSON.parse do: NaN and Infinity are errors."""
    import json

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def assert_strict_json_run_files(run_dir):
    """Every JSON file a run wrote, and every metrics.jsonl line, parses with a strict parser."""
    from pathlib import Path

    files = sorted(Path(run_dir).rglob("*.json"))
    assert files, run_dir
    for path in files:
        strict_json(path.read_text())
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        strict_json(line)
