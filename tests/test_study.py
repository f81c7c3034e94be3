"""`pudl study` on the tiny GGUF: real runs per arm, then the table, JSON and chart; reruns reuse the arms."""

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from pudl.errors import UserError
from pudl.study import load_study
from tests.test_scorers import tiny_recipe
from tests.conftest import pudl


def write_study(tmp_path: Path, arms: str, extra: str = "") -> Path:
    path = tmp_path / "s.toml"
    path.write_text(f"""
[study]
out = "{tmp_path / 'study'}"
recipe = "r.toml"
seeds = [3]
title = "tiny study"
{extra}
{arms}
""")
    return path


ARMS = """
[[arm]]
name = "base"
base = true
[[arm]]
name = "sft"
set = ["train.algo=sft"]
[[arm]]
name = "pu-dpo"
set = ["rank.pairs=anchor-vs-worst"]
[[arm]]
name = "pu-bvw"
cache_from = "pu-dpo"
set = ["rank.pairs=best-vs-worst"]
"""


def test_tiny_study_writes_table_json_and_chart_from_real_runs(tmp_path, tiny_gguf):
    tiny_recipe(tmp_path, tiny_gguf, 'algo = "dpo"')
    study = write_study(tmp_path, ARMS, extra="""set = ['rank.also_score=["judge"]']  # every arm""")
    out = pudl("study", str(study), "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    d = tmp_path / "study"
    result = json.loads((d / "study.json").read_text())
    assert [a["arm"] for a in result["arms"]] == ["base", "sft", "pu-dpo", "pu-bvw"]
    runs = {r["arm"]: r for r in result["runs"]}
    for arm in ("sft", "pu-dpo"):  # each trained arm is a real run with its own summary
        summary = json.loads((d / arm / "seed-3" / "summary.json").read_text())
        assert runs[arm]["strict_accuracy"] == summary["after"]["strict_accuracy"]
        assert runs[arm]["teacher_calls"] == 3 and summary["stages"]["1"]["train"] == "computed"
    assert runs["sft"]["tokens_sampled"] == 0 < runs["pu-dpo"]["tokens_sampled"]
    with sqlite3.connect(d / "sft/seed-3/cache.sqlite") as c:  # SFT-only samples nothing
        assert c.execute("SELECT COUNT(*) FROM candidates").fetchone()[0] == 0
    steps = [json.loads(x) for x in (d / "sft/seed-3/metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if s["kind"] == "step"] == [1, 2]  # 3 anchors, batch 2, 1 epoch
    assert all("nll/anchor" in s for s in steps if s["kind"] == "step")
    assert runs["base"]["strict_accuracy"] == json.loads((d / "sft/seed-3/summary.json").read_text())["before"]["strict_accuracy"]
    assert "judge" in runs["pu-dpo"]["ranker"]
    # cache_from: pu-bvw started from pu-dpo's cache, so it ranked the very same candidates, sampled once
    stages = json.loads((d / "pu-bvw/seed-3/summary.json").read_text())["stages"]["1"]
    assert stages["sample"] == stages["score"] == "reused" and stages["prefs"] == "recomputed"  # other pairs

    def candidates(arm):
        with sqlite3.connect(d / arm / "seed-3/cache.sqlite") as c:
            return c.execute("SELECT * FROM candidates ORDER BY 1, 2").fetchall()

    assert candidates("pu-bvw") == candidates("pu-dpo") and len(candidates("pu-dpo")) > 0
    table = (d / "study.md").read_text()
    assert table.count("\n| ") == 6 and "| pu-dpo |" in table and "± 0.000" in table
    assert (d / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mtime = (d / "pu-dpo/seed-3/summary.json").stat().st_mtime_ns
    again = pudl("study", str(study), "--quiet", "--arm", "sft")
    assert again.returncode == 0 and again.stderr.count("done before") == 3, again.stderr[-2000:]
    assert (d / "pu-dpo/seed-3/summary.json").stat().st_mtime_ns == mtime
    # A changed recipe key that changes no stage (a new key outside the fingerprints): the run reuses every
    # stage, and the arm keeps the wall time of the run that computed them.
    record = d / "pu-dpo/seed-3/study-arm.json"
    kept = json.loads(record.read_text())
    record.write_text(json.dumps({**kept, "recipe_key": "from an older pudl"}))
    again = pudl("study", str(study), "--quiet", "--arm", "pu-dpo")
    assert again.returncode == 0 and "pu-dpo seed 3: running" in again.stderr, again.stderr[-2000:]
    row = json.loads(record.read_text())
    assert set(row["row"]["reused_stages"]["1"].values()) == {"reused"} and row["recipe_key"] != "from an older pudl"
    assert row["row"]["wall_seconds"] == kept["row"]["wall_seconds"] > 0


def test_study_mistakes_are_one_line(tmp_path, tiny_gguf):
    tiny_recipe(tmp_path, tiny_gguf, 'algo = "dpo"')
    with pytest.raises(UserError, match="arm 1: colour: unknown key"):
        load_study(write_study(tmp_path, '[[arm]]\nname = "a"\ncolour = 1'))
    with pytest.raises(UserError, match="cache_from: 'b' is not a trained arm listed before 'a'"):
        load_study(write_study(tmp_path, '[[arm]]\nname = "a"\ncache_from = "b"\n[[arm]]\nname = "b"'))
    with pytest.raises(UserError, match="at least one"):
        load_study(write_study(tmp_path, '[[arm]]\nname = "b"\nbase = true'))
    (tmp_path / "other.jsonl").write_text((tmp_path / "p.jsonl").read_text().splitlines()[0] + "\n")
    study = write_study(tmp_path, '[[arm]]\nname = "a"\n[[arm]]\nname = "b"\nset = ["data.prompts=other.jsonl"]')
    out = pudl("study", str(study))
    assert out.returncode == 2 and "arm b does not use the same training prompts" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_the_table_reports_every_held_out_split_with_retention():
    from pudl.study import Arm, Study, aggregate, base_row, markdown, split_fields

    rng = np.random.default_rng()
    rows = []
    for seed in (0, 1):
        figures = {s: {"n": 40, "strict_accuracy": float(rng.random()), "lenient_accuracy": float(rng.random())}
                   for s in ("in-distribution", "new-wording", "new-task")}
        kept = {s: {"right_before": 10, "kept": 9, "retention": 0.9} for s in figures}
        before = {"strict_accuracy": 0.0, "lenient_accuracy": 0.4, "splits": figures}
        rows.append({"arm": "pu", "seed": seed, "run_dir": "r", "strict_accuracy": 0.5, "lenient_accuracy": 0.5,
                     "teacher_calls": 48, "tokens_sampled": 100, "wall_seconds": 1.0, "before": before,
                     **split_fields({"splits": figures}, kept)})
    rows += [{**base_row(rows, seed), "arm": "base"} for seed in (0, 1)]
    study = Study(path="s.toml", out="o", recipe="r.toml", seeds=(0, 1), overrides=(), title="t",
                  arms=(Arm("base", base=True), Arm("pu")))
    result = aggregate(study, rows)
    pu = next(a for a in result["arms"] if a["arm"] == "pu")
    new_wording = [r["new-wording/lenient_accuracy"] for r in rows if r["arm"] == "pu"]
    assert pu["new-wording/lenient_accuracy"]["mean"] == pytest.approx(np.mean(new_wording))
    assert pu["new-task/retention"]["mean"] == pytest.approx(0.9)
    table = markdown(result)
    assert "| arm | in-distribution | new-wording | new-task |" in table
    assert table.splitlines()[-2].startswith("| base |") and table.splitlines()[-2].endswith("/ — |")
