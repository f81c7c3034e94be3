"""report.html from a real tiny run (the tiny random GGUF as the student), rendered in headless Chromium.

The run is real end to end; the only thing the test changes between runs is the training prompts' answers, set
afterwards to a word one sampled candidate contains, so that the rerun's self-ranker-vs-verifier figures are finite.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import re
import shutil
import sqlite3
import struct
import subprocess
from pathlib import Path

import pytest

from pudl.errors import UserError
from tests import recipe_files
from tests.conftest import pudl

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROKEN_PNG = "data:image/png;base64,iVBORw0KGgoAAAAN"  # a PNG cut short: the control image that must not load


def images(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]*)"', page)


def png_size(uri: str) -> tuple[int, int]:
    """Width and height from the PNG header of a data URI."""
    head, _, data = uri.partition(",")
    assert head == "data:image/png;base64"
    raw = base64.b64decode(data)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def chromium_image_sizes(page: Path, tmp_path: Path) -> list[list]:
    """Open the page in headless Chromium (no network: a dead proxy) and return [complete, naturalWidth,
    naturalHeight] per image, written into the DOM by a script added to a copy of the page."""
    probe = """<img alt="control" src="%s"><script>window.addEventListener('load', () => {
      const out = document.createElement('pre'); out.id = 'probe';
      out.textContent = JSON.stringify([...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]));
      document.body.appendChild(out);});</script>""" % BROKEN_PNG
    copy = tmp_path / "probe.html"
    copy.write_text(page.read_text().replace("</body>", probe + "</body>"))
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # the test's OpenBLAS preload aborts Chromium
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
                          "--virtual-time-budget=15000", "--dump-dom", copy.as_uri()],
                         capture_output=True, text=True, timeout=180, env=env)
    found = re.findall(r'<pre id="probe">(.*?)</pre>', out.stdout, re.S)
    assert found, (out.returncode, out.stderr[-2000:])
    sizes = json.loads(found[0])
    assert sizes[-1][1] == 0, "the broken control image loaded: the probe cannot tell"
    return sizes[:-1]


def write_recipe(tmp_path: Path, model: Path) -> Path:
    return recipe_files.write_recipe(tmp_path, {
        "run": {"out": tmp_path / "run", "rounds": 2}, "student": {"model": model, "n_ctx": 256, "threads": 1},
        "sample": {"k": 3, "max_tokens": 8}, "train": {"epochs": 1, "batch_size": 2},
        "lora": {"rank": 2, "targets": ["q_proj", "v_proj"]}, "eval": {"max_tokens": 6}}, prompts=3, eval_prompts=2)


def answers_from_candidates(run: Path, prompts: Path) -> int:
    """Give each prompt as answer a word that its first round-1 candidate contains and its others lack (where
    one exists), so the verifier sees correct and incorrect candidates. Returns how many prompts got one."""
    with sqlite3.connect(run / "cache.sqlite") as db:
        texts: dict[str, list[str]] = {}
        for pid, text in db.execute("SELECT prompt_id, text FROM candidates WHERE round=1 ORDER BY prompt_id, idx"):
            texts.setdefault(pid, []).append(text)
    rows, changed = [json.loads(line) for line in prompts.read_text().splitlines()], 0
    for row in rows:
        cands = texts.get(row["id"], [])
        for word in re.findall(r"[A-Za-z]{3,}", cands[0] if cands else ""):
            if not any(re.search(rf"(?i)(?<![^\W_]){word}(?![^\W_])", c) for c in cands[1:]):
                row["answer"], changed = word, changed + 1
                break
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return changed


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_gguf):
    """A finished 2-round run of the tiny model: (its folder, the recipe, the run directory)."""
    tmp_path = tmp_path_factory.mktemp("tiny_run")
    recipe = write_recipe(tmp_path, tiny_gguf)
    first = pudl("run", str(recipe), "--quiet")
    assert first.returncode == 0, first.stderr[-3000:]
    return tmp_path, recipe, tmp_path / "run"


def test_run_writes_report_that_chromium_renders(tiny_run):
    from pudl.recipe import load_recipe

    tmp_path, recipe, run = tiny_run
    page = (run / "report.html").read_text()
    assert len(images(page)) == 3  # training, accuracy, scores; the ranker has nothing to agree with yet
    assert "No agreement figures" in page
    assert "Held-out splits" not in page  # eval ids without a split prefix
    resolved = load_recipe(run / "recipe.toml")  # the resolved recipe the report shows, loadable as is
    assert dataclasses.replace(resolved, path="") == dataclasses.replace(load_recipe(recipe), path="")

    # Rerun with answers the candidates can match; the report cannot be written (a directory in its place):
    # the run still succeeds, with a warning.
    assert answers_from_candidates(run, tmp_path / "p.jsonl") >= 1
    (run / "report.html").unlink()
    (run / "report.html").mkdir()
    second = pudl("run", str(recipe), "--quiet")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "warning: report.html not written" in second.stderr
    summary = json.loads((run / "summary.json").read_text())
    aucs = [r["ranker"]["anchor-likelihood"]["auc"] for r in summary["per_round"]]
    assert any(math.isfinite(a) for a in aucs)

    (run / "report.html").rmdir()
    again = pudl("report", str(run))
    assert again.returncode == 0, again.stderr[-3000:]
    page = (run / "report.html").read_text()
    uris = images(page)
    assert len(uris) == 4  # + the ranker's agreement with the verifier
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing outside the file
    for section in ("Training", "Held-out accuracy", "Self-ranking scores", "Self-ranker vs verifier", "Recipe"):
        assert f"<h2>{section}</h2>" in page
    sizes = [png_size(u) for u in uris]
    assert all(w > 100 and h > 100 for w, h in sizes)
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install chromium; `make install` does it as root)")
    rendered = chromium_image_sizes(run / "report.html", tmp_path)
    assert [r[0] for r in rendered] == [True] * 4
    assert [tuple(r[1:]) for r in rendered] == sizes  # every image decoded at its own size


def test_report_of_a_directory_that_is_no_run(tmp_path):
    from pudl.html_report import write_report

    with pytest.raises(UserError, match="not a pudl run directory"):
        write_report(tmp_path)
    assert pudl("report", str(tmp_path / "missing")).returncode == 2


def table_rows(output: str) -> list[list[str]]:
    """The body rows of rich tables in `output` (cells split on the vertical bar)."""
    return [[c.strip() for c in line.strip().strip("│").split("│")] for line in output.splitlines()
            if line.startswith("│")]


def test_cache_ls_and_show(tiny_run, monkeypatch):
    from click.testing import CliRunner

    from pudl.cli import main
    from pudl.tasks import lenient_match, strict_match

    _, _, run = tiny_run
    monkeypatch.setenv("COLUMNS", "300")  # one table row per line

    def cli(*args):
        return CliRunner().invoke(main, ["cache", *args], catch_exceptions=False)

    with sqlite3.connect(run / "cache.sqlite") as db:
        one = lambda sql, *a: db.execute(sql, a).fetchone()[0]  # noqa: E731
        want = [[str(r), str(one("SELECT COUNT(DISTINCT prompt_id) FROM candidates WHERE round=?", r)),
                 str(one("SELECT COUNT(*) FROM candidates WHERE round=?", r)),
                 str(one("SELECT COUNT(*) FROM groups WHERE round=?", r)),
                 str(one("SELECT COUNT(*) FROM scores WHERE round=?", r)),
                 str(one("SELECT COUNT(*) FROM pairs WHERE round=?", r)),
                 str(one("SELECT COUNT(*) FROM references_ WHERE round=?", r))] for r in (1, 2)]
        answers = dict(db.execute("SELECT id, answer FROM prompts"))
        cands = {(p, i): t for p, i, t in db.execute("SELECT prompt_id, idx, text FROM candidates WHERE round=2")}
        first = db.execute("SELECT prompt_id FROM groups WHERE round=2 ORDER BY prompt_id").fetchone()[0]
        order = db.execute("SELECT idx, rank FROM scores WHERE round=2 AND prompt_id=? AND "
                           "scorer='anchor-likelihood' ORDER BY score DESC, idx", (first,)).fetchall()
    out = cli("ls", str(run))
    assert out.exit_code == 0, out.output
    rows = table_rows(out.output)
    assert [r[:7] for r in rows[:2]] == want
    assert rows[2:] == [["1", "done", "done", "done", "done"], ["2", "done", "done", "done", "done"]]

    out = cli("show", str(run), "--prompt", first)  # the latest round by default
    assert out.exit_code == 0, out.output
    assert out.output.startswith("round 2 · scorer anchor-likelihood")
    rows = table_rows(out.output)
    assert len(rows) == len(order)  # the K candidates and the anchor, best first
    for row, (idx, rank) in zip(rows, order):
        label, score, mark, text = row
        assert label == ("anchor" if idx == -1 else str(rank))
        if idx >= 0:
            reply = cands[(first, idx)]
            assert text == reply.replace("\n", "⏎ ").strip()  # line breaks shown as ⏎ (a random model's replies)
            assert mark == ("✓" if strict_match(reply, answers[first]) else
                            "~" if lenient_match(reply, answers[first]) else "✗")
    out = cli("show", str(run), "--round", "1", "--limit", "2")
    assert out.exit_code == 0 and out.output.startswith("round 1 ·") and "showing 2" in out.output

    for args, needle in ((["show", str(run), "--round", "9"], "--round 9: not in the cache (rounds: 1, 2)"),
                         (["show", str(run), "--prompt", "nope"], "--prompt nope: no such prompt id"),
                         (["show", str(run), "--scorer", "nonesuch"], "--scorer nonesuch: not in round 2"),
                         (["ls", str(run.parent)], "no pudl cache here")):
        out = cli(*args)
        assert out.exit_code == 2 and needle in out.output, out.output
    assert not (run.parent / "cache.sqlite").exists()  # looking never creates a cache


def html_rows(table: str) -> list[list[str]]:
    """The cells of each row of an HTML table, tags removed."""
    return [[re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", tr)]
            for tr in re.findall(r"<tr>(.*?)</tr>", table)]


def test_report_shows_held_out_splits_side_by_side(tmp_path):
    from pudl.html_report import write_report

    def rows(verdicts: dict[str, tuple[bool, bool]]) -> list[dict]:
        return [{"id": pid, "reply": "r", "strict": s, "lenient": le} for pid, (s, le) in verdicts.items()]

    before = rows({"in-distribution/capitals-032": (False, True), "in-distribution/units-048": (False, False),
                   "new-wording/capitals-032": (False, True), "new-wording/units-048": (False, True),
                   "new-task/plurals-000": (False, False)})
    after = rows({"in-distribution/capitals-032": (True, True), "in-distribution/units-048": (True, True),
                  "new-wording/capitals-032": (False, False), "new-wording/units-048": (True, True),
                  "new-task/plurals-000": (True, True)})
    evals = {
        "before": {"n": 5, "strict_accuracy": 0.0, "lenient_accuracy": 0.6, "replies": before,
                   "splits": {"in-distribution": {"n": 2, "strict_accuracy": 0.0, "lenient_accuracy": 0.5},
                              "new-wording": {"n": 2, "strict_accuracy": 0.0, "lenient_accuracy": 1.0},
                              "new-task": {"n": 1, "strict_accuracy": 0.0, "lenient_accuracy": 0.0}}},
        "after": {"n": 5, "strict_accuracy": 0.8, "lenient_accuracy": 0.8, "replies": after,
                  "splits": {"in-distribution": {"n": 2, "strict_accuracy": 1.0, "lenient_accuracy": 1.0},
                             "new-wording": {"n": 2, "strict_accuracy": 0.5, "lenient_accuracy": 0.5},
                             "new-task": {"n": 1, "strict_accuracy": 1.0, "lenient_accuracy": 1.0}}}}
    (tmp_path / "summary.json").write_text(json.dumps({"recipe": "r.toml"}))
    for name, e in evals.items():
        (tmp_path / f"eval-{name}.json").write_text(json.dumps(e))
    page = write_report(tmp_path).read_text()
    section = page.split("<h2>Held-out splits</h2>")[1].split("<h2>")[0]
    assert html_rows(section) == [
        ["split", "n", "strict before", "strict after", "lenient before", "lenient after", "retention",
         "kept / right before"],
        ["in-distribution", "2", "0.000", "1.000", "0.500", "1.000", "1.000", "1 / 1"],
        ["new-wording", "2", "0.000", "0.500", "1.000", "0.500", "0.500", "1 / 2"],
        ["new-task", "1", "0.000", "1.000", "0.000", "1.000", "—", "0 / 0"],  # the base knew none: no share
        ["all", "5", "0.000", "0.800", "0.600", "0.800", "0.667", "2 / 3"]]

    # Only the before evaluation (a run still going): its figures, dashes for the rest.
    (tmp_path / "eval-after.json").unlink()
    section = write_report(tmp_path).read_text().split("<h2>Held-out splits</h2>")[1].split("<h2>")[0]
    assert html_rows(section)[2] == ["new-wording", "2", "0.000", "—", "1.000", "—", "—", ""]
