"""Issue 18: prompts without an answer key. A held-out share when the recipe names no eval file, the teacher's
ledger, reference metrics (chrF, ROUGE-L) and the judged comparison, each against real components: a real
`pudl run` (tiny random GGUF student), the fault-injecting OpenAI-compatible server of tests/openai_server.py
(it logs every request and reports usage) and a real `python -m llama_cpp.server` as teacher and judge.
"""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path

import pytest

from pudl.cache import SCHEMA, SCHEMA_VERSION, Cache
from pudl.errors import UserError
from pudl.evaluate import rouge_l
from pudl.judge import JUDGE_TEMPLATE, Job, outcome, parse_verdict, rates, wilson
from pudl.ledger import with_cost
from pudl.loop import holdout_ids
from pudl.prompts import Prompt
from tests import recipe_files
from tests.conftest import assert_strict_json_run_files, pudl
from tests.openai_server import OpenAIServer
from tests.test_reliability import KEY, KEY_ENV, llama_server  # noqa: F401 (a fixture)

PROMPTS = ["Explain in two sentences why the sky is blue.", "Write a polite reply declining a meeting.",
           "Write a haiku about autumn rain.", "Summarise what a library card is for.",
           "Explain in two sentences what a thermostat does."]
JUDGE_MARK = JUDGE_TEMPLATE.split("\n")[0][:40]  # how a judge request is told apart in the server's log


# ---------------------------------------------------------------------------------------------------------
# Pieces


def test_holdout_is_seeded_stable_and_at_least_a_few():
    ids = [f"p{i}" for i in range(40)]
    held = holdout_ids(ids, 0.1, seed=0)
    assert len(held) == 4 and held == holdout_ids(list(reversed(ids)), 0.1, 0)[::-1]  # not the file's order
    assert held != holdout_ids(ids, 0.1, seed=1)
    assert set(held) <= set(holdout_ids(ids + ["new"], 0.1, 0)) | {"new"}  # adding a prompt moves no other
    assert len(holdout_ids(ids[:12], 0.1, 0)) == 3  # at least min(3, N // 4)
    assert len(holdout_ids(ids[:4], 0.1, 0)) == 1 and holdout_ids(ids[:3], 0.1, 0) == []
    assert holdout_ids(ids, 0.0, 0) == [] and holdout_ids(["only"], 0.5, 0) == []


def test_verdicts_parse_strictly_and_invalid_is_not_a_tie():
    for text, want in [("A", "A"), (" b.", "B"), ("**Tie**", "tie"), ("Reply A", "A"), ("'B'", "B"),
                       ("TIE - both fine", "tie"), ("Both are good", "invalid"), ("", "invalid"),
                       ("ECHO[A]", "invalid"), ("Answer: B", "B"), ("C", "invalid")]:
        assert parse_verdict(text) == want, text
    p = Prompt("x", "q")
    jobs = [Job("k1", p, "vs_before", "after", "new", "old"), Job("k2", p, "vs_before", "other", "old", "new"),
            Job("k3", p, "vs_teacher", "after", "new", "ref"), Job("k4", p, "vs_teacher", "other", "ref", "new")]
    # position bias: the same verdict "A" in both orders is one win and one loss for the trained student
    assert [outcome(j, "A") for j in jobs[:2]] == ["win", "loss"]
    got = rates(jobs, {"k1": "A", "k2": "B", "k3": "invalid", "k4": "tie"})
    vb, vt = got["win_rate_vs_before"], got["win_rate_vs_teacher"]
    assert (vb["win_rate"], vb["n"], vb["invalid"], vb["ci95"]) == (1.0, 2, 0, wilson(2, 2))
    assert (vt["win_rate"], vt["tie_rate"], vt["loss_rate"], vt["n"], vt["invalid"]) == (0.0, 1.0, 0.0, 1, 1)
    none = rates(jobs[:2], {})["win_rate_vs_before"]
    assert none["n"] == 0 and none["missing"] == 2 and none["win_rate"] is None and none["ci95"] is None


def test_wilson_interval_and_rouge_l():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)  # textbook values
    assert wilson(0, 0) is None and wilson(0, 5)[0] == 0.0
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("the cat", "a dog") == 0.0 and rouge_l("", "") == 1.0 and rouge_l("", "x") == 0.0
    # LCS "the cat on mat" = 4 of 6 hypothesis and 4 of 5 reference words
    assert rouge_l("the cat sat on the mat", "the cat lay on mat") == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))


def test_ledger_cost_at_prices_per_million_tokens():
    spent = with_cost({"anchors": {"calls": 3, "prompt_tokens": 2_000_000, "completion_tokens": 1_000_000,
                                   "seconds": 1.0}}, price_in=0.5, price_out=2.0)
    assert spent["anchors"]["calls"] == 3 and spent["judge"] == {"calls": 0, "prompt_tokens": 0,
                                                                "completion_tokens": 0, "seconds": 0.0}
    assert spent["cost"]["total"] == pytest.approx(3.0) and "cost" not in with_cost({})


def test_version_1_cache_is_upgraded_in_place_and_a_newer_one_refused(tmp_path):
    path = tmp_path / "cache.sqlite"
    with sqlite3.connect(path) as db:  # a cache as pudl wrote it before schema version 2
        db.executescript(SCHEMA)
        db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        db.execute("INSERT INTO anchors VALUES ('a', 'an anchor', 'tasks', 1.0)")
    old = Cache.open_read_only(path)  # reading does not upgrade
    assert old.ledger() == {} and old.judgments() == {} and old.anchors() == {"a": "an anchor"}
    old.close()
    cache = Cache(path)
    assert cache.anchors() == {"a": "an anchor"} and cache.ledger() == {}
    cache.put_eval_reference("h", "a reference", "tasks", spent=None)
    cache.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
    newer = path.read_bytes()
    with pytest.raises(UserError, match=f"cache schema version 3, this pudl reads {SCHEMA_VERSION}"):
        Cache(path)
    assert path.read_bytes() == newer


# ---------------------------------------------------------------------------------------------------------
# Whole runs


def write_recipe(d: Path, student: Path, teacher: str, judge: str = "teacher") -> Path:
    """A tiny real run on five open-ended prompts without answers and without an eval file: two are held out."""
    rows = [json.dumps({"id": f"q{i}", "prompt": text}) for i, text in enumerate(PROMPTS)]
    return recipe_files.write_recipe(d, {
        "run": {"out": d / "run"}, "student": {"model": student, "n_ctx": 256, "threads": 1},
        "data": {"eval_fraction": 0.4}, "sample": {"k": 2, "max_tokens": 4},
        "train": {"epochs": 1, "batch_size": 2}, "lora": {"rank": 2, "targets": ["q_proj", "v_proj"]},
        "eval": {"max_tokens": 6, "judge": judge}}, prompts=rows, extra_toml=f"[teacher]\n{teacher}")


def table(run: Path, sql: str) -> list:
    with sqlite3.connect(run / "cache.sqlite") as c:
        return c.execute(sql).fetchall()


@pytest.mark.integration
def test_held_out_share_ledger_and_invalid_verdicts_against_the_server_log(tmp_path, tiny_gguf):
    """Against the fault-injecting server: the held-out prompts are never trained on; every request (retries
    included) is in the ledger with the usage the server reported; the judge's replies (ECHO[...]) are all
    invalid, never ties; a kill -9 in the judge phase repeats no request; a rerun asks nothing. (One request in
    flight: with more, those in flight at the kill are neither stored nor counted, and asked again.)"""
    with OpenAIServer() as server:
        teacher = (f'backend = "openai"\nbase_url = "{server.base_url}"\nmodel = "m"\napi_key_env = "{KEY_ENV}"\n'
                   f'max_concurrency = 1\nmax_retries = 3\nbackoff_s = 0.01\nsystem = "Answer in house style."\n'
                   f"price_in = 1.5\nprice_out = 6.0\n")
        recipe = write_recipe(tmp_path, tiny_gguf, teacher)
        server.inject("503")
        server.inject("429", retry_after=0)
        killed = pudl("run", recipe, "--quiet", env={KEY_ENV: KEY, "PUDL_TEST_KILL_AT": "judge:1"})
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        out = pudl("run", recipe, env={KEY_ENV: KEY})
        assert out.returncode == 0, out.stderr[-3000:]
        requests = list(server.requests)
        again = pudl("run", recipe, "--quiet", env={KEY_ENV: KEY})
        assert again.returncode == 0 and len(server.requests) == len(requests)  # everything from the cache
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    held = summary["held_out"]
    assert held["source"] == "data.eval_fraction" and held["n"] == 2 and len(held["ids"]) == 2
    assert "held out 2 prompt(s) of data.prompts" in out.stdout
    for sql in ("SELECT prompt_id FROM anchors", "SELECT prompt_id FROM candidates", "SELECT prompt_id FROM pairs",
                "SELECT prompt_id FROM references_"):
        assert not {r[0] for r in table(run, sql)} & set(held["ids"]), sql
    assert {r[0] for r in table(run, "SELECT prompt_id FROM eval_references")} == set(held["ids"])
    texts = {f"q{i}": t for i, t in enumerate(PROMPTS)}
    held_texts = {texts[i] for i in held["ids"]}

    def purpose(r):
        return "judge" if r["user"].startswith(JUDGE_MARK) else "references" if r["user"] in held_texts else "anchors"

    chats = [r for r in requests if r["path"] == "/v1/chat/completions"]
    ledger = summary["ledger"]
    for name in ("anchors", "references", "judge"):
        mine = [r for r in chats if purpose(r) == name]
        good = [r for r in mine if r["fault"] is None]
        assert ledger[name]["calls"] == len(mine) > 0, name
        assert ledger[name]["prompt_tokens"] == sum(r["usage"]["prompt_tokens"] for r in good), name
        assert ledger[name]["completion_tokens"] == sum(r["usage"]["completion_tokens"] for r in good), name
        # the house style goes to the teacher's answers only, never to the judge
        assert all((r["system"] == "Answer in house style.") == (name != "judge") for r in mine), name
    assert ledger["anchors"]["calls"] == 3 + 2  # the two faults were retried
    tokens_in = sum(v["prompt_tokens"] for k, v in ledger.items() if k != "cost")
    tokens_out = sum(v["completion_tokens"] for k, v in ledger.items() if k != "cost")
    assert ledger["cost"]["total"] == pytest.approx((tokens_in * 1.5 + tokens_out * 6.0) / 1e6)
    # the judge: each pair asked once over the killed and the resumed run, in both orders; ECHO[...] is invalid
    judged = [r["user"] for r in chats if purpose(r) == "judge"]
    rows = table(run, "SELECT prompt_id, comparison, first, verdict FROM judgments")
    assert len(judged) == len(set(judged)) == len(rows) >= 4
    assert {v for *_, v in rows} == {"invalid"}
    for pid, comparison, _, _ in rows:
        assert {f for p, c, f, _ in rows if (p, c) == (pid, comparison)} == {"after", "other"}
    verdicts = summary["after"]["judge"]
    for key in ("win_rate_vs_before", "win_rate_vs_teacher"):
        assert {"win_rate", "tie_rate", "loss_rate", "n", "ci95", "invalid"} <= set(verdicts[key])
    vt = verdicts["win_rate_vs_teacher"]
    assert vt["n"] == 0 and vt["invalid"] == 4 and vt["tie_rate"] is None and vt["ci95"] is None
    for name in ("before", "after"):
        ref = summary[name]["reference"]
        assert ref["n"] == 2 and 0 <= ref["chrf"] <= 1 and 0 <= ref["rouge_l"] <= 1
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m for m in metrics if m["kind"] == "ledger"][-1]["judge"] == ledger["judge"]
    assert_strict_json_run_files(run)
    page = (run / "report.html").read_text()
    assert "Judged comparison" in page and "Teacher ledger" in page and "reference answers</h2>" in page
    ls = pudl("cache", "ls", run)
    assert ls.returncode == 0 and "judge" in ls.stdout and "cost" in ls.stdout


@pytest.mark.integration
def test_real_llama_cpp_server_judges_both_orders_once_and_resumes_after_kill(llama_server, tmp_path,  # noqa: F811
                                                                             tiny_gguf):
    """SmolLM2 behind `python -m llama_cpp.server` is teacher and judge: tokens from its usage field, each pair
    asked in both orders, a kill -9 after the first verdict loses none and repeats none, `pudl eval --judge`
    reuses the run's verdicts."""
    teacher = (f'backend = "openai"\nbase_url = "{llama_server}"\nmodel = "smollm2"\napi_key_env = "{KEY_ENV}"\n'
               f"max_concurrency = 1\ntimeout_s = 120.0\nmax_tokens = 12\n")
    recipe = write_recipe(tmp_path, tiny_gguf, teacher)
    run = tmp_path / "run"
    killed = pudl("run", recipe, "--quiet", env={KEY_ENV: KEY, "PUDL_TEST_KILL_AT": "judge:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert len(table(run, "SELECT key FROM judgments")) == 1
    out = pudl("run", recipe, "--quiet", env={KEY_ENV: KEY})
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    rows = table(run, "SELECT prompt_id, comparison, first, verdict FROM judgments")
    assert summary["ledger"]["judge"]["calls"] == len(rows) >= 4  # one request per verdict, over both processes
    assert summary["ledger"]["anchors"]["prompt_tokens"] > 0 and summary["ledger"]["judge"]["completion_tokens"] > 0
    assert {v for *_, v in rows} <= {"A", "B", "tie", "invalid"}
    for pid, comparison, _, _ in rows:
        assert {f for p, c, f, _ in rows if (p, c) == (pid, comparison)} == {"after", "other"}
    verdicts = summary["after"]["judge"]["win_rate_vs_teacher"]
    assert verdicts["n"] + verdicts["invalid"] == 4
    again = pudl("eval", recipe, "--adapter", run / "adapter.gguf", "--json", "--judge", "teacher",
                 env={KEY_ENV: KEY})
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads(again.stdout.strip().splitlines()[-1])
    assert result["judge"]["win_rate_vs_teacher"] == verdicts and result["reference"]["n"] == 2
    assert json.loads((run / "summary.json").read_text())["ledger"]["judge"]["calls"] == len(rows)
