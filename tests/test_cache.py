import os
import sqlite3

import numpy as np
import pytest

from pudl.domain import ANCHOR_IDX, Candidate, Pair
from pudl.cache import Cache, fingerprint
from pudl.errors import UserError
from pudl.prompts import Prompt


def cand(pid, idx, n):
    rng = np.random.default_rng()
    return Candidate(pid, idx, f"text {idx}", rng.integers(0, 50000, n).astype(np.int32),
                     rng.normal(size=n).astype(np.float32), "stop")


def test_roundtrip_and_user_only_permissions(tmp_path):
    c = Cache(tmp_path / "c.sqlite")
    assert oct(os.stat(tmp_path / "c.sqlite").st_mode & 0o777) == "0o600"
    c.put_prompts([Prompt("a", "pa"), Prompt("b", "pb", answer="x")])
    c.put_anchor("a", "anchor a", "tasks")
    cands = [cand("a", i, n) for i, n in enumerate((3, 0, 7))]
    c.put_candidates(1, cands)
    back = c.candidates(1)["a"]
    for x, y in zip(cands, back):
        assert x.text == y.text and np.array_equal(x.token_ids, y.token_ids) and np.array_equal(x.logprobs, y.logprobs)
    c.put_scores(1, "a", "anchor-likelihood", [0.5, -1.0, 0.2], [0, 2, 1], "ok")
    c.put_pairs(1, [Pair("a", "anchor-vs-worst", ANCHOR_IDX, 1, None)])
    c.close()
    c = Cache(tmp_path / "c.sqlite")  # reopen: everything is on disk
    assert c.anchors() == {"a": "anchor a"}
    assert c.scores(1, "anchor-likelihood") == {"a": [0.5, -1.0, 0.2]}
    assert c.pairs(1)[0] == Pair("a", "anchor-vs-worst", ANCHOR_IDX, 1, None)
    assert c.counts()["candidates"] == 3


def test_clear_from_drops_stage_and_later_rounds_but_keeps_anchors(tmp_path):
    c = Cache(tmp_path / "c.sqlite")
    c.put_anchor("a", "x", "t")
    for r in (1, 2):
        c.put_candidates(r, [cand("a", 0, 2)])
        c.put_scores(r, "a", "s", [1.0], [0], "single")
        c.finish_stage(r, "sample", "fp")
        c.finish_stage(r, "score", "fp")
    c.clear_from(1, "score")
    assert c.stage_done(1, "sample", "fp") and not c.stage_recorded(1, "score")
    assert c.candidates(1) and not c.candidates(2) and not c.scores(1, "s")
    assert c.anchors() == {"a": "x"}


def test_failure_cleared_by_later_anchor(tmp_path):
    c = Cache(tmp_path / "c.sqlite")
    c.put_teacher_failure("a", "timeout")
    assert c.teacher_failures() == {"a": "timeout"}
    c.put_anchor("a", "x", "t")
    assert c.teacher_failures() == {}


def test_foreign_files_and_schema_versions_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(UserError, match="not a pudl cache"):
        Cache(bad)
    Cache(tmp_path / "v.sqlite").close()
    db = sqlite3.connect(tmp_path / "v.sqlite")
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(UserError, match="schema version 99"):
        Cache(tmp_path / "v.sqlite")


def test_fingerprint_is_stable_and_sensitive():
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
