"""`pudl run` end to end on the real SmolLM2 GGUF: 2 prompts x 2 candidates, then a rerun from the cache."""

import json
import sqlite3
from pathlib import Path

import pytest
from tests import recipe_files
from tests.conftest import assert_strict_json_run_files, pudl

pytestmark = pytest.mark.integration


def write_recipe(tmp_path: Path, rounds: int = 1) -> Path:
    return recipe_files.write_recipe(tmp_path, {
        "run": {"out": tmp_path / "run", "rounds": rounds}, "sample": {"k": 2, "max_tokens": 12},
        "train": {"epochs": 1, "batch_size": 2}, "lora": {"rank": 4, "targets": ["q_proj", "v_proj"]},
        "eval": {"max_tokens": 8}}, prompts=2, eval_prompts=2)


def rows(db: Path, table: str) -> int:
    with sqlite3.connect(db) as c:
        return c.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_run_end_to_end_then_rerun_uses_the_cache(tmp_path):
    recipe = write_recipe(tmp_path, rounds=2)
    first = pudl("run", str(recipe), "--quiet")
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher_calls"] == 2
    for name in ("before", "after"):
        assert {"strict_accuracy", "lenient_accuracy", "anchor_score"} <= set(summary[name])
    assert set(summary["retention"]["overall"]) == {"right_before", "kept", "retention"}
    db = run / "cache.sqlite"
    assert rows(db, "anchors") == 2 and rows(db, "candidates") == 2 * 2 * 2  # 2 rounds x 2 prompts x K=2
    # rank.scorer + rank.also_score's default (anchor-gain, chrf): K candidates + the anchor each
    assert rows(db, "scores") == 2 * 2 * (2 + 1) * 3
    assert rows(db, "pairs") >= 2
    for r in (1, 2):
        assert (run / f"round-{r}" / "adapter.gguf").stat().st_size > 0
    assert (run / "adapter.gguf").read_bytes() == (run / "round-2" / "adapter.gguf").read_bytes()
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step = next(s for s in steps if s["kind"] == "step")
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "tokens_per_s", "peak_memory_bytes"):
        assert key in step
    assert oct(run.stat().st_mode & 0o777) == "0o700"
    assert_strict_json_run_files(run)  # e.g. an AUC over a family with one class is null, not NaN
    with sqlite3.connect(db) as c:  # token ids and sampler log-probs are kept per candidate
        ids, lps = c.execute("SELECT token_ids, logprobs FROM candidates LIMIT 1").fetchone()
        assert len(ids) == len(lps) > 0

    before = {t: rows(db, t) for t in ("anchors", "candidates", "scores", "pairs")}
    mtime = (run / "round-2" / "adapter.gguf").stat().st_mtime_ns
    second = pudl("run", str(recipe), "--quiet")
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["teacher_calls"] == 0
    assert {t: rows(db, t) for t in before} == before
    assert (run / "round-2" / "adapter.gguf").stat().st_mtime_ns == mtime  # nothing retrained


def test_eval_json_reports_accuracy_and_anchor_score(tmp_path):
    recipe = write_recipe(tmp_path)
    out = pudl("eval", str(recipe), "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 2
    assert 0.0 <= result["strict_accuracy"] <= result["lenient_accuracy"] <= 1.0
    assert result["anchor_score"] < 0.0

    base = tmp_path / "base.json"
    again = pudl("eval", str(recipe), "--json", "--out", base)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(json.loads(base.read_text())["replies"]) == 2  # --out keeps the replies --json leaves out
    same = pudl("eval", str(recipe), "--json", "--before", base)
    kept = json.loads(same.stdout.strip().splitlines()[-1])["retention"]["overall"]
    assert kept["kept"] == kept["right_before"]  # the same student keeps everything it answered right
    assert kept["retention"] == (1.0 if kept["right_before"] else None)
    bad = pudl("eval", str(recipe), "--before", recipe)
    assert bad.returncode == 2 and "--before" in bad.stderr and "Traceback" not in bad.stderr
