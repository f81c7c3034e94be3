"""Issue 5: pudl survives crashes, teacher faults and bad input, loses nothing, and never leaks a key.

Crash tests kill a real `pudl run` with SIGKILL at chosen moments (PUDL_TEST_KILL_AT, read only by
pudl.loop._kill_hook) and compare the resumed run with an uninterrupted one. The teacher is the fault-injecting
OpenAI-compatible server of tests/openai_server.py (it counts every request), or a real llama-cpp-python server.
docs/reliability.md lists every fault and bad input with the test that shows it.
"""

from __future__ import annotations

import fcntl
import json
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.openai_server import OpenAIServer
from tests import recipe_files
from tests.conftest import assert_one_line_error as one_line_error
from tests.conftest import pudl as run_pudl

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV, KEY = "PUDL_RELIABILITY_KEY", "sk-rel-5b7e2d-must-never-be-written"
TASKS = (ROOT / "recipes/data/tasks-train.jsonl").read_text().splitlines()[:3]  # capitals, arithmetic, units
GOOD_PROMPTS = TASKS[0] + "\n"


def pudl(*args, env=None, **options):
    """`pudl ARGS` as a real subprocess with the API key always in its environment (it must never leak)."""
    return run_pudl(*args, env={KEY_ENV: KEY, **(env or {})}, **options)


def assert_one_line_error(out, needle: str):
    """The one-line error contract, and the key appears in no output."""
    one_line_error(out, needle)
    assert KEY not in out.stderr + out.stdout


def openai_teacher(base_url: str, concurrency: int = 1) -> str:
    return (f'backend = "openai"\nbase_url = "{base_url}"\nmodel = "m"\napi_key_env = "{KEY_ENV}"\n'
            f"max_concurrency = {concurrency}\ntimeout_s = 2.0\nmax_retries = 4\nbackoff_s = 0.01\nmax_tokens = 32\n")


def write_recipe(d: Path, teacher: str, prompts: list[str] = TASKS) -> Path:
    """The smallest real run: SmolLM2, 3 prompts x K=2 candidates of <= 8 tokens, ~6 one-pair steps.
    `teacher`: the lines of the [teacher] section. llama.cpp gets 1 thread (2 crawl on a busy 2-core machine)."""
    return recipe_files.write_recipe(d, {
        "run": {"out": d / "run"}, "student": {"threads": 1}, "sample": {"k": 2, "max_tokens": 8},
        "train": {"epochs": 1, "batch_size": 1, "checkpoint_every": 2},
        "lora": {"rank": 4, "targets": ["q_proj", "v_proj"]}}, prompts=prompts, extra_toml=f"[teacher]\n{teacher}")


def db_rows(run: Path, sql: str) -> list:
    with sqlite3.connect(run / "cache.sqlite") as c:
        return c.execute(sql).fetchall()


def count(run: Path, table: str) -> int:
    return db_rows(run, f"SELECT COUNT(*) FROM {table}")[0][0]  # noqa: S608 (test-fixed names)


def run_files(run: Path) -> list[Path]:
    return [run, *sorted(run.rglob("*"))]


def assert_private_and_keyless(run: Path, *outputs, private: bool = True):
    """Every file and directory the run wrote is user-only, and the key is in none of them (nor in any output)."""
    for path in run_files(run):
        if private:
            assert path.stat().st_mode & 0o077 == 0, f"{path} is {oct(path.stat().st_mode & 0o777)}"
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    for out in outputs:
        assert KEY not in out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------------------
# Bad input: one clear line, exit code 2, no traceback (the recipe and prompts matrix: tests/test_cli.py).

BASE = '[data]\nprompts = "p.jsonl"\n'


def test_recipe_file_missing_or_not_utf8(tmp_path):
    assert_one_line_error(pudl("run", str(tmp_path / "nope.toml")), "recipe not found")
    (tmp_path / "r.toml").write_bytes(b'[data]\nprompts = "\xff.jsonl"\n')
    assert_one_line_error(pudl("run", str(tmp_path / "r.toml")), "not valid UTF-8")


def small_recipe(tmp_path: Path, extra: str = "", prompts: str = GOOD_PROMPTS) -> str:
    (tmp_path / "p.jsonl").write_text(prompts)
    (tmp_path / "r.toml").write_text(f'[run]\nout = "{tmp_path / "run"}"\n' + BASE + extra)
    return str(tmp_path / "r.toml")


def test_truncated_model_file(tmp_path, smollm2):
    cut = tmp_path / "cut.gguf"
    with open(smollm2, "rb") as f:
        cut.write_bytes(f.read(50_000_000))  # the header is intact, the tensor data is not
    out = pudl("run", small_recipe(tmp_path, f'[student]\nmodel = "{cut}"\n'))
    assert_one_line_error(out, f"student.model: llama.cpp cannot load {cut}")


def test_jsonl_teacher_file_with_a_bad_line_or_without_the_anchors(tmp_path):
    teacher = '[teacher]\nbackend = "jsonl"\npath = "a.jsonl"\n'
    (tmp_path / "a.jsonl").write_text('{"id": "other", "anchor": "x"}\n{"id": "y"}\n')
    assert_one_line_error(pudl("run", small_recipe(tmp_path, teacher), "--quiet"),
                          "a.jsonl:2: 'anchor' must be a non-empty string")
    (tmp_path / "a.jsonl").write_text('{"id": "other", "anchor": "x"}\n')
    out = pudl("run", small_recipe(tmp_path, teacher), "--quiet")
    assert_one_line_error(out, "no prompt has an anchor: the teacher failed for all 1 (first: capitals-000: no anchor")
    # the failure is recorded per prompt; a fixed anchors file answers it on the next run
    assert db_rows(tmp_path / "run", "SELECT prompt_id FROM teacher_failures") == [("capitals-000",)]


def test_missing_key_variable_is_named_never_its_value(tmp_path):
    extra = openai_teacher("http://127.0.0.1:9/v1").replace(KEY_ENV, "PUDL_RELIABILITY_UNSET")
    out = pudl("run", small_recipe(tmp_path, "[teacher]\n" + extra))
    assert_one_line_error(out, "environment variable PUDL_RELIABILITY_UNSET is not set")


def test_every_prompt_longer_than_the_context(tmp_path):
    out = pudl("run", small_recipe(tmp_path, "[student]\nn_ctx = 64\n",
                                   json.dumps({"prompt": "word " * 100}) + "\n"), "--quiet")
    assert_one_line_error(out, "no prompt fits student.n_ctx=64 tokens")


def test_foreign_or_newer_cache_is_refused_untouched(tmp_path):
    recipe = small_recipe(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "cache.sqlite").write_bytes(b"not sqlite at all " * 100)
    assert_one_line_error(pudl("run", recipe), "cache.sqlite: not a pudl cache")
    (run / "cache.sqlite").unlink()
    with sqlite3.connect(run / "cache.sqlite") as c:
        c.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        c.execute("INSERT INTO meta VALUES ('schema_version', '99')")
    before = (run / "cache.sqlite").read_bytes()
    assert_one_line_error(pudl("run", recipe), "cache schema version 99, this pudl reads 2")
    assert (run / "cache.sqlite").read_bytes() == before


def test_a_second_run_on_a_locked_directory_is_refused(tmp_path):
    recipe = small_recipe(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "run.lock", "w") as lock:  # the lock another `pudl run` holds (flock, as pudl.loop.RunLock)
        fcntl.flock(lock, fcntl.LOCK_EX)
        out = pudl("run", recipe)
    assert_one_line_error(out, "another pudl run is using this run directory")
    assert not (run / "cache.sqlite").exists()  # refused before touching anything


def test_eval_adapter_missing_or_not_gguf(tmp_path):
    recipe = small_recipe(tmp_path)
    assert_one_line_error(pudl("eval", recipe, "--adapter", str(tmp_path / "nope.gguf")), "--adapter: file not found")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF but not really" * 10)
    assert_one_line_error(pudl("eval", recipe, "--adapter", str(tmp_path / "junk.gguf")), "not a GGUF LoRA")


@pytest.mark.integration
def test_eval_adapter_of_another_model(tmp_path, tiny_gguf):
    from pudl.adapters import write_gguf_lora
    from pudl.models import load_student

    write_gguf_lora(load_student(tiny_gguf, 4, 8.0, ["q_proj", "v_proj"]), tmp_path / "other.gguf")
    out = pudl("eval", small_recipe(tmp_path), "--adapter", str(tmp_path / "other.gguf"), "--json")
    assert_one_line_error(out, "adapter does not fit this model at blk.0.attn_q (another model or LoRA rank?)")


def test_disk_full_while_writing_the_cache_loses_no_committed_row(tmp_path):
    """A file-size limit (`ulimit -f`, EFBIG) in the middle of the teacher phase: one line naming the cache,
    every anchor committed before it is intact, and the rerun asks only for the rest."""
    n = 150
    prompts = "".join(json.dumps({"id": f"p{i}", "prompt": f"Question {i}?"}) + "\n" for i in range(n))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "anchor": f"{i} " * 500}) + "\n"
                                              for i in range(n)))
    recipe = small_recipe(tmp_path, '[teacher]\nbackend = "jsonl"\npath = "a.jsonl"\n', prompts)
    Path(recipe).write_text(Path(recipe).read_text().replace(BASE, BASE + "eval_fraction = 0.0\n"))  # all train
    run = tmp_path / "run"
    out = pudl("run", recipe, "--quiet", fsize=384 * 1024)
    assert_one_line_error(out, f"{run / 'cache.sqlite'}: cannot write (disk I/O error; disk full?)")
    assert db_rows(run, "PRAGMA integrity_check") == [("ok",)]
    stored = dict(db_rows(run, "SELECT prompt_id, anchor FROM anchors"))
    assert 0 < len(stored) < n
    # the rerun asks the teacher for the missing anchors only (and is stopped right after that phase)
    again = pudl("run", recipe, "--quiet", env={"PUDL_TEST_KILL_AT": f"teacher:{n - len(stored)}"})
    assert again.returncode == -signal.SIGKILL, again.stderr[-3000:]
    after = dict(db_rows(run, "SELECT prompt_id, anchor FROM anchors"))
    assert len(after) == n and {k: after[k] for k in stored} == stored


# ---------------------------------------------------------------------------------------------------------
# Secrets and safety


def test_help_never_shows_the_key():
    for args in ([], ["run"], ["eval"], ["doctor"]):
        out = pudl(*args, "--help")
        assert out.returncode == 0 and KEY not in out.stdout + out.stderr


def test_no_pickle_no_remote_code_no_shell_in_pudl():
    """Models load from GGUF/safetensors only; nothing pudl reads can make it run code."""
    banned = re.compile(r"\bpickle\b|torch\.load|allow_pickle\s*=\s*True|trust_remote_code|shell\s*=\s*True"
                        r"|(?<![\w.])(eval|exec)\(|yaml\.load\(|import\s+marshal")
    sources = [p for d in ("pudl", "kernels", "bench") for p in (ROOT / d).rglob("*.py")]
    assert len(sources) > 20
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in sources for i, line in enumerate(p.read_text().splitlines(), 1)
            if banned.search(line)]
    assert hits == []


def test_chat_template_from_a_model_file_runs_sandboxed(smollm2):
    """A GGUF's chat template is Jinja from the file: it is rendered in Jinja's immutable sandbox."""
    from jinja2.exceptions import SecurityError

    from pudl.models import Tokenizer

    tok = Tokenizer(smollm2)
    tok.metadata = {"tokenizer.chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}
    with pytest.raises(SecurityError):
        tok.render([{"role": "user", "content": "hi"}])


def test_teacher_phase_limits_concurrency_commits_each_anchor_and_retries_only_failures(tmp_path, monkeypatch):
    """The teacher phase itself, in-process on a real server and cache: at most teacher.max_concurrency requests
    in flight, every transient fault retried, a permanent failure recorded, the rerun asks only for it."""
    from pudl.loop import Run
    from pudl.recipe import load_recipe
    from pudl.report import Reporter

    prompts = [json.dumps({"id": f"q{i}", "prompt": f"Question {i}?"}) for i in range(8)]
    prompts.append(json.dumps({"id": "long", "prompt": "word " * 400}))  # skipped, never sent to the teacher
    with OpenAIServer() as server:
        server.delay_s = 0.2  # answers overlap, so the limit is what caps them
        server.fail_prompts("Question 5?", "echo_auth")  # a 500 whose body echoes the Authorization header
        # Six transient faults over three workers: no prompt can meet more than four (max_retries = 4).
        for fault, options in [("429", {"retry_after": 0}), ("429", {}), ("500", {}), ("502", {}), ("503", {}),
                               ("malformed", {})]:
            server.inject(fault, **options)
        recipe = small_recipe(tmp_path, "[student]\nn_ctx = 256\n[teacher]\n" +
                              openai_teacher(server.base_url, concurrency=3), "\n".join(prompts) + "\n")
        Path(recipe).write_text(Path(recipe).read_text().replace(BASE, BASE + "eval_fraction = 0.0\n"))
        monkeypatch.setenv(KEY_ENV, KEY)
        (tmp_path / "run").mkdir()
        state = Run(load_recipe(recipe), Reporter(tmp_path / "run", quiet=True))
        anchors = state.collect_anchors()
        assert server.peak_in_flight == 3
        assert state.too_long == ["long"] and not any("word word" in r["user"] for r in server.requests)
        assert sorted(anchors) == sorted(f"q{i}" for i in range(8) if i != 5)
        assert list(state.failures) == ["q5"] and "HTTP 500" in state.failures["q5"]
        assert len([r for r in server.requests if r["user"] == "Question 5?"]) == 5  # 1 + max_retries
        state.cache.close()
        server.heal()
        answered = len(server.answered())
        again = Run(load_recipe(recipe), Reporter(tmp_path / "run", quiet=True))
        assert len(again.collect_anchors()) == 8 and not again.failures
        assert server.answered()[answered:] == ["Question 5?"]
        again.cache.close()
    assert all(r["authorization"] == f"Bearer {KEY}" for r in server.requests)
    assert_private_and_keyless(tmp_path / "run", private=False)  # (in-process: pudl.loop.run sets the umask)


# ---------------------------------------------------------------------------------------------------------
# Crash and resume on the real SmolLM2 (integration)

CACHE_TABLES = ("prompts", "anchors", "teacher_failures", "candidates", "scores", "groups", "pairs", "references_",
                "stages")
FLOAT_BLOBS = ("logprobs", "token_logps")
ORDER = {"prompts": "id", "anchors": "prompt_id", "teacher_failures": "prompt_id", "stages": "round, stage"}


def cache_dump(run: Path) -> dict[str, list[dict]]:
    """Every cache row, without wall-clock columns (created, finished: only whether a stage finished)."""
    out = {}
    with sqlite3.connect(run / "cache.sqlite") as c:
        for table in CACHE_TABLES:
            cur = c.execute(f"SELECT * FROM {table} ORDER BY {ORDER.get(table, '1, 2, 3')}")  # noqa: S608
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r)) for r in cur]
            for r in rows:
                r.pop("created", None)
                if "finished" in r:
                    r["finished"] = r["finished"] > 0
            out[table] = rows
    return out


def assert_same_cache(got: dict, want: dict, atol: float):
    """Same rows, same keys and texts and token ids; floats (log-probs, scores) within `atol`."""
    for table in CACHE_TABLES:
        assert len(got[table]) == len(want[table]), table
        for g, w in zip(got[table], want[table]):
            assert g.keys() == w.keys()
            for name in g:
                if name in FLOAT_BLOBS:
                    np.testing.assert_allclose(np.frombuffer(g[name], np.float32), np.frombuffer(w[name], np.float32),
                                               atol=atol, err_msg=f"{table}.{name}")
                elif isinstance(g[name], float):
                    assert g[name] == pytest.approx(w[name], abs=atol), (table, name, g, w)
                else:
                    assert g[name] == w[name], (table, name, g, w)


def adapter_tensors(run: Path) -> dict[str, np.ndarray]:
    import mlx.core as mx

    return {k: np.array(v) for k, v in mx.load(str(run / "round-1" / "adapter.safetensors")).items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run; while it holds the run directory, a second `pudl run` on it must be refused."""
    d = tmp_path_factory.mktemp("reference")
    with OpenAIServer() as server:
        recipe = write_recipe(d, openai_teacher(server.base_url))
        first = pudl("run", str(recipe), "--quiet", popen=True)
        deadline = time.monotonic() + 300
        while not (d / "run" / "cache.sqlite").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the cache is created after the lock is taken
        second = pudl("run", str(recipe), "--quiet")
        stdout, stderr = first.communicate(timeout=900)
        assert first.returncode == 0, stderr[-3000:]
        answered = server.answered()
    run = d / "run"
    return SimpleNamespace(dir=d, run=run, recipe=recipe, second=second, answered=answered,
                           output=SimpleNamespace(stdout=stdout, stderr=stderr), cache=cache_dump(run),
                           adapter=adapter_tensors(run), summary=json.loads((run / "summary.json").read_text()))


@pytest.mark.integration
def test_second_run_on_a_busy_directory_is_refused(reference):
    assert_one_line_error(reference.second, "another pudl run is using this run directory")
    assert reference.summary["teacher_calls"] == 3 and sorted(reference.answered) == sorted(
        json.loads(t)["prompt"] for t in TASKS)
    assert_private_and_keyless(reference.run, reference.output, reference.second)


KILLS = ("teacher:2", "sample:1", "score:1", "train:3", "export:1")  # one process killed in each phase, in turn


@pytest.mark.integration
def test_killed_in_every_phase_loses_nothing_and_resumes_to_the_same_result(reference, tmp_path):
    """Six processes, five of them SIGKILLed (one per phase), then compared with (a) the uninterrupted reference:
    same anchors and teacher calls, same rows; (b) a twin copied after sampling and run without interruption:
    same scores, pairs, references and adapter. (Candidates sampled after the mid-sampling kill come from a
    smaller llama.cpp batch, whose float16 numerics differ slightly, so their tokens may differ from (a).)"""
    run, twin = tmp_path / "run", tmp_path / "twin" / "run"
    outputs = []
    with OpenAIServer() as server:
        recipe = write_recipe(tmp_path, openai_teacher(server.base_url))
        # Transient faults (max_retries = 4): the 1st prompt meets four, the 3rd (asked after the first kill) four.
        before = {"teacher:2": [("429", {"retry_after": 0}), ("429", {}), ("500", {}), ("cutoff", {})],
                  "sample:1": [("malformed", {}), ("empty", {}), ("502", {}), ("503", {})]}
        for kill in KILLS:
            for fault, options in before.get(kill, []):
                server.inject(fault, **options)
            out = pudl("run", str(recipe), env={"PUDL_TEST_KILL_AT": kill})
            outputs.append(out)
            assert out.returncode == -signal.SIGKILL, (kill, out.returncode, out.stderr[-3000:])
            if kill == "teacher:2":
                assert count(run, "anchors") == 2
            if kill == "sample:1":
                assert count(run, "anchors") == 3
                first = db_rows(run, "SELECT * FROM candidates ORDER BY 1, 2, 3")
                # drawn in the same batch as the reference's, so the same tokens
                pid = first[0][1]
                assert len(first) == 2 and first == [tuple(r.values()) for r in reference.cache["candidates"]
                                                     if r["prompt_id"] == pid]
            if kill == "score:1":
                assert len(db_rows(run, "SELECT DISTINCT prompt_id FROM scores")) == 1
                shutil.copytree(run, twin)  # from here the twin runs without interruption
            if kill == "train:3":
                assert json.loads((run / "round-1" / "checkpoint.json").read_text())["step"] == 2
            if kill == "export:1":
                assert "training resumed from step 2" in out.stderr
                assert (run / "round-1" / "adapter.safetensors").exists()
                assert not (run / "round-1" / "adapter.gguf").exists()
        final = pudl("run", str(recipe), "--quiet")
        assert final.returncode == 0, final.stderr[-3000:]
        # No teacher call was repeated for a stored anchor: one good answer per prompt over the six processes.
        assert sorted(server.answered()) == sorted(reference.answered)
        assert len(server.requests) == 3 + 8
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher_calls"] == 0 and summary["cache"] == reference.summary["cache"]
    statuses = [(r["stage"], r["status"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "stage"]
    assert {("sample", "resumed"), ("score", "resumed"), ("train", "resumed")} <= set(statuses)
    got = cache_dump(run)
    for table in CACHE_TABLES:  # nothing lost, nothing duplicated
        assert [len(got[table]), got[table] and got[table][0].keys()] == \
               [len(reference.cache[table]), reference.cache[table] and reference.cache[table][0].keys()], table
    for table in ("prompts", "anchors", "teacher_failures"):
        assert got[table] == reference.cache[table], table
    assert [c["prompt_id"] for c in got["candidates"]] == [c["prompt_id"] for c in reference.cache["candidates"]]
    # The twin: the same cache and the same adapter as after the training and export kills.
    twin_out = pudl("run", str(recipe), "--out", str(twin), "--quiet")
    assert twin_out.returncode == 0, twin_out.stderr[-3000:]
    assert_same_cache(got, cache_dump(twin), atol=1e-6)
    want = adapter_tensors(twin)
    assert adapter_tensors(run).keys() == want.keys()
    for name, value in adapter_tensors(run).items():
        np.testing.assert_allclose(value, want[name], atol=1e-6, rtol=1e-5, err_msg=name)
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]
    assert_private_and_keyless(run, *outputs, final)


def copy_of(reference, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference.run, run)
    return run


@pytest.mark.integration
def test_changed_recipe_reuses_what_it_can_and_says_what_it_recomputes(reference, tmp_path):
    run = copy_of(reference, tmp_path)
    # The teacher server is gone and teacher settings changed: anchors never depend on the recipe.
    out = pudl("run", str(reference.recipe), "--out", str(run), "--set", "rank.pairs=anchor-vs-worst",
               "--set", "teacher.max_tokens=7", "--set", "train.checkpoint_every=3")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher_calls"] == 0
    assert summary["stages"] == {"1": {"sample": "reused", "score": "reused", "prefs": "recomputed",
                                       "train": "recomputed"}}
    assert "round 1: 'sample' reused from the cache" in out.stderr
    assert "round 1: the recipe or the prompts changed since 'prefs' ran; recomputing it and what follows" in out.stderr
    now = cache_dump(run)
    for table in ("anchors", "candidates", "scores", "groups"):
        assert now[table] == reference.cache[table], table
    assert {p["kind"] for p in now["pairs"]} == {"anchor-vs-worst"}
    # checkpoint_every is not part of what training depends on: changing it alone retrains nothing
    mtime = (run / "round-1" / "adapter.gguf").stat().st_mtime_ns
    again = pudl("run", str(reference.recipe), "--out", str(run), "--quiet", "--set", "rank.pairs=anchor-vs-worst",
                 "--set", "train.checkpoint_every=5")
    assert again.returncode == 0, again.stderr[-3000:]
    assert set(json.loads((run / "summary.json").read_text())["stages"]["1"].values()) == {"reused"}
    assert (run / "round-1" / "adapter.gguf").stat().st_mtime_ns == mtime


@pytest.mark.integration
def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(reference, tmp_path):
    run = copy_of(reference, tmp_path)
    ckpt = run / "round-1"
    before = {p.name: p.read_bytes() for p in ckpt.glob("checkpoint.*")}
    # 384 KiB per file: the cache and logs fit, a 2.8 MB checkpoint does not.
    out = pudl("run", str(reference.recipe), "--out", str(run), "--quiet", "--set", "train.learning_rate=3e-4",
               fsize=384 * 1024)
    assert_one_line_error(out, f"{ckpt / 'checkpoint.safetensors'}: cannot write (")
    assert {p.name: p.read_bytes() for p in ckpt.glob("checkpoint.*")} == before
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]
    assert cache_dump(run)["candidates"] == reference.cache["candidates"]


@pytest.mark.integration
def test_diverging_training_stops_with_one_line_and_the_checkpoint_intact(reference, tmp_path):
    run = copy_of(reference, tmp_path)
    before = {p.name: p.read_bytes() for p in (run / "round-1").glob("checkpoint.*")}
    # RMSNorm keeps SmolLM2 finite under any learning rate; a LoRA scale of 2.5e29 overflows the gradient.
    out = pudl("run", str(reference.recipe), "--out", str(run), "--quiet", "--set", "lora.alpha=1e30")
    assert_one_line_error(out, "training diverged: ")
    assert "at step 1" in out.stderr
    assert {p.name: p.read_bytes() for p in (run / "round-1").glob("checkpoint.*")} == before


# ---------------------------------------------------------------------------------------------------------
# Teacher faults through a whole run, and a real llama-cpp-python server as the teacher (integration)


@pytest.mark.integration
def test_teacher_failures_are_reported_and_the_rerun_asks_only_for_them(tmp_path):
    long_prompt = json.dumps({"id": "too-long", "prompt": "word " * 1200})
    run = tmp_path / "run"
    with OpenAIServer() as server:
        server.fail_prompts("grams", "503")  # units-000 fails every attempt
        recipe = write_recipe(tmp_path, openai_teacher(server.base_url, concurrency=2), [*TASKS, long_prompt])
        out = pudl("run", str(recipe), "--quiet")
        assert out.returncode == 0, out.stderr[-3000:]
        assert "teacher failed for 1 prompt(s), left out of this run; rerun to ask again: units-000" in out.stdout
        assert "1 prompt(s) longer than student.n_ctx skipped: too-long" in out.stdout
        summary = json.loads((run / "summary.json").read_text())
        assert list(summary["teacher_failed"]) == ["units-000"] and "HTTP 503" in summary["teacher_failed"]["units-000"]
        assert summary["skipped_too_long"] == ["too-long"] and summary["per_round"][0]["groups"] == 2
        assert not any("word word" in r["user"] for r in server.requests)
        sampled = db_rows(run, "SELECT * FROM candidates ORDER BY 1, 2, 3")
        server.heal()
        answered = len(server.answered())
        again = pudl("run", str(recipe), "--quiet", env={"PUDL_TEST_KILL_AT": "sample:1"})
        assert again.returncode == -signal.SIGKILL, again.stderr[-3000:]
        assert [json.loads(TASKS[2])["prompt"]] == server.answered()[answered:]  # only the failed prompt
    assert count(run, "anchors") == 3 and count(run, "teacher_failures") == 0
    # the new prompt's candidates join the old ones, which are kept as they were
    now = db_rows(run, "SELECT * FROM candidates ORDER BY 1, 2, 3")
    assert [r for r in now if r[1] != "units-000"] == sampled and len(now) == len(sampled) + 2
    assert_private_and_keyless(run, out, again)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def llama_server(smollm2, tmp_path):
    """python -m llama_cpp.server on 127.0.0.1 serving the SmolLM2 GGUF, requiring KEY as its API key."""
    pytest.importorskip("llama_cpp.server.app", reason="pip install 'llama-cpp-python[server]' (make install does)")
    port = free_port()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "llama_server.py"), "--model", str(smollm2),
                             "--model_alias", "smollm2", "--host", "127.0.0.1", "--port", str(port),
                             "--api_key", KEY, "--n_ctx", "1024", "--n_threads", "1"],
                            stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            try:
                request = urllib.request.Request(base_url + "/models", headers={"Authorization": f"Bearer {KEY}"})
                with urllib.request.urlopen(request, timeout=5):
                    break
            except OSError:
                time.sleep(0.5)
        yield base_url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.mark.integration
def test_real_llama_cpp_server_as_the_teacher(llama_server, tmp_path):
    teacher = openai_teacher(llama_server).replace('model = "m"', 'model = "smollm2"').replace("max_tokens = 32",
                                                                                               "max_tokens = 8")
    recipe = write_recipe(tmp_path, teacher.replace("timeout_s = 2.0", "timeout_s = 120.0"))
    # A wrong key is refused by the server: one line naming the variable, never the key.
    wrong = pudl("run", str(recipe), "--quiet", "--out", str(tmp_path / "wrong"), env={KEY_ENV: "sk-wrong"})
    assert_one_line_error(wrong, f"rejected the key from ${KEY_ENV} (HTTP 401")
    out = pudl("run", str(recipe), "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    anchors = db_rows(run, "SELECT anchor, teacher FROM anchors")
    assert len(anchors) == 3 and all(a.strip() and t == "openai:smollm2" for a, t in anchors)
    assert json.loads((run / "summary.json").read_text())["teacher_calls"] == 3
    assert_private_and_keyless(run, out, wrong)
