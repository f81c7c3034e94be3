"""The SQLite preference cache: the only module that speaks SQL.

Every stage writes here, in a transaction, before the next stage reads. Anchors are kept for the life of the
cache (the teacher is asked once per prompt, ever); per-round rows (candidates, scores, pairs) are tied to a
stage fingerprint so a changed recipe recomputes what depends on the change and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path

import numpy as np

from pudl.domain import ANCHOR_IDX, Candidate, Pair
from pudl.errors import UserError, write_failed

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # a version-1 cache is upgraded in place when opened for writing (`SCHEMA_V2`)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS prompts (
  id TEXT PRIMARY KEY, prompt TEXT NOT NULL, system TEXT, answer TEXT);
CREATE TABLE IF NOT EXISTS anchors (
  prompt_id TEXT PRIMARY KEY, anchor TEXT NOT NULL, teacher TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS teacher_failures (
  prompt_id TEXT PRIMARY KEY, error TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
  round INTEGER NOT NULL, prompt_id TEXT NOT NULL, idx INTEGER NOT NULL,
  text TEXT NOT NULL, token_ids BLOB NOT NULL, logprobs BLOB NOT NULL, finish TEXT NOT NULL,
  PRIMARY KEY (round, prompt_id, idx));
CREATE TABLE IF NOT EXISTS scores (
  round INTEGER NOT NULL, prompt_id TEXT NOT NULL, idx INTEGER NOT NULL, scorer TEXT NOT NULL,
  score REAL NOT NULL, rank INTEGER NOT NULL,
  PRIMARY KEY (round, prompt_id, idx, scorer));
CREATE TABLE IF NOT EXISTS groups (
  round INTEGER NOT NULL, prompt_id TEXT NOT NULL, status TEXT NOT NULL,
  PRIMARY KEY (round, prompt_id));
CREATE TABLE IF NOT EXISTS pairs (
  round INTEGER NOT NULL, prompt_id TEXT NOT NULL, kind TEXT NOT NULL,
  chosen_idx INTEGER NOT NULL, rejected_idx INTEGER NOT NULL, margin REAL,
  ref_chosen REAL, ref_rejected REAL,
  PRIMARY KEY (round, prompt_id, kind));
CREATE TABLE IF NOT EXISTS references_ (
  round INTEGER NOT NULL, prompt_id TEXT NOT NULL, idx INTEGER NOT NULL, token_logps BLOB NOT NULL,
  PRIMARY KEY (round, prompt_id, idx));
CREATE TABLE IF NOT EXISTS stages (
  round INTEGER NOT NULL, stage TEXT NOT NULL, fingerprint TEXT NOT NULL, finished REAL NOT NULL,
  PRIMARY KEY (round, stage));
"""

# Version 2 (issue 18) only adds tables: the teacher's ledger (every request's usage, per purpose), the
# teacher's reference answers to held-out prompts, and the judge's verdicts. Upgrading a version-1 cache is
# creating them; no row of version 1 changes.
SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS ledger (
  id INTEGER PRIMARY KEY AUTOINCREMENT, purpose TEXT NOT NULL, prompt_id TEXT, requests INTEGER NOT NULL,
  prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, seconds REAL NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS eval_references (
  prompt_id TEXT PRIMARY KEY, reference TEXT NOT NULL, teacher TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS judgments (
  key TEXT PRIMARY KEY, prompt_id TEXT NOT NULL, comparison TEXT NOT NULL, first TEXT NOT NULL,
  verdict TEXT NOT NULL, raw TEXT NOT NULL, judge TEXT NOT NULL, created REAL NOT NULL);
"""

STAGES = ("sample", "score", "prefs", "train")
STAGE_TABLES = {"sample": ("candidates",), "score": ("scores", "groups"), "prefs": ("pairs", "references_"),
                "train": ()}
ROUND_TABLES = ("candidates", "scores", "groups", "pairs", "references_", "stages")


class Cache:
    """A run's SQLite database."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        fresh = not self.path.exists()
        try:
            self.db = sqlite3.connect(self.path, timeout=30.0)
            version = self._schema_version()  # before anything writes: a foreign cache is left byte for byte
            if version is not None and version not in READABLE_VERSIONS:
                self.db.close()
                raise UserError(f"{self.path}: cache schema version {version}, this pudl reads {SCHEMA_VERSION}; "
                                "use the pudl that wrote it, or another run directory (run.out / --out)")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.DatabaseError as e:
            if getattr(e, "sqlite_errorname", "").startswith(("SQLITE_FULL", "SQLITE_IOERR")):
                raise UserError(write_failed(self.path, e)) from None
            raise UserError(f"{self.path}: not a pudl cache ({e})") from None
        with self._write():
            # executescript commits first, so the tables and the version are two steps; creating the tables
            # again is harmless, so a kill between them only upgrades again on the next open.
            self.db.executescript(SCHEMA + SCHEMA_V2)
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self.db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
        if fresh:
            os.chmod(self.path, 0o600)

    @classmethod
    def open_read_only(cls, path: str | Path) -> Cache:
        """Open an existing cache for reading (reports, `pudl cache ls/show`): nothing is created or written."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no pudl cache here (is this a run directory?)")
        self = cls.__new__(cls)
        self.path = path
        try:
            self.db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
            version = self._schema_version()
        except sqlite3.DatabaseError as e:
            raise UserError(f"{path}: not a pudl cache ({e})") from None
        if version not in READABLE_VERSIONS:
            self.db.close()
            raise UserError(f"{path}: cache schema version {version}, this pudl reads {SCHEMA_VERSION}")
        return self

    @contextlib.contextmanager
    def _write(self):
        """One transaction. A full disk (or any failed write) rolls it back, so nothing committed before is lost,
        and becomes one line naming the cache file."""
        try:
            with self.db:
                yield
        except sqlite3.OperationalError as e:
            name = getattr(e, "sqlite_errorname", "")
            if name == "SQLITE_FULL" or name.startswith("SQLITE_IOERR"):
                raise UserError(write_failed(self.path, e)) from None
            raise

    def _schema_version(self) -> int | None:
        has_meta = self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        if not has_meta:
            return None
        row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0]) if row else None

    def close(self):
        self.db.close()

    # prompts and anchors -------------------------------------------------------------------------
    def put_prompts(self, prompts):
        with self._write():
            self.db.executemany(
                "INSERT OR REPLACE INTO prompts VALUES (?, ?, ?, ?)",
                [(p.id, p.prompt, p.system, p.answer) for p in prompts],
            )

    def anchors(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT prompt_id, anchor FROM anchors"))

    def put_anchor(self, prompt_id: str, anchor: str, teacher: str, spent=None):
        """Commit one anchor at once, with what it cost (`spent`: a teachers.Reply, for the ledger): a crash after
        this never asks the teacher for it again, and never loses its cost."""
        with self._write():
            self.db.execute("INSERT OR REPLACE INTO anchors VALUES (?, ?, ?, ?)", (prompt_id, anchor, teacher, time.time()))
            self.db.execute("DELETE FROM teacher_failures WHERE prompt_id=?", (prompt_id,))
            self._spend("anchors", prompt_id, spent)

    def put_teacher_failure(self, prompt_id: str, error: str, spent=None):
        with self._write():
            self.db.execute("INSERT OR REPLACE INTO teacher_failures VALUES (?, ?, ?)", (prompt_id, error, time.time()))
            self._spend("anchors", prompt_id, spent)

    # the teacher's ledger, reference answers and judgments (schema version 2) ------------------------
    def _spend(self, purpose: str, prompt_id: str | None, spent):
        """One ledger row inside the caller's transaction; `spent` has requests, prompt/completion tokens, seconds."""
        if spent is None:
            return
        self.db.execute("INSERT INTO ledger (purpose, prompt_id, requests, prompt_tokens, completion_tokens, seconds, "
                        "created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (purpose, prompt_id, int(getattr(spent, "requests", 1)), int(getattr(spent, "prompt_tokens", 0)),
                         int(getattr(spent, "completion_tokens", 0)), float(getattr(spent, "seconds", 0.0)), time.time()))

    def spend(self, purpose: str, prompt_id: str | None, spent):
        """Record a teacher request that left nothing else to store (a failed reference or judgment)."""
        with self._write():
            self._spend(purpose, prompt_id, spent)

    def _has_table(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None

    def ledger(self) -> dict[str, dict]:
        """purpose -> {calls, prompt_tokens, completion_tokens, seconds} over the life of the cache."""
        if not self._has_table("ledger"):  # a version-1 cache opened read-only
            return {}
        rows = self.db.execute("SELECT purpose, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), "
                               "SUM(seconds) FROM ledger GROUP BY purpose ORDER BY purpose")
        return {p: {"calls": c, "prompt_tokens": i, "completion_tokens": o, "seconds": round(s, 3)}
                for p, c, i, o, s in rows}

    def eval_references(self) -> dict[str, str]:
        """Held-out prompt id -> the teacher's reference answer."""
        if not self._has_table("eval_references"):
            return {}
        return dict(self.db.execute("SELECT prompt_id, reference FROM eval_references"))

    def put_eval_reference(self, prompt_id: str, reference: str, teacher: str, spent=None):
        """Commit one reference answer and its cost together."""
        with self._write():
            self.db.execute("INSERT OR REPLACE INTO eval_references VALUES (?, ?, ?, ?)",
                            (prompt_id, reference, teacher, time.time()))
            self._spend("references", prompt_id, spent)

    def judgments(self) -> dict[str, str]:
        """Judgment key (`pudl.judge.judgment_key`) -> verdict: A, B, tie or invalid."""
        if not self._has_table("judgments"):
            return {}
        return dict(self.db.execute("SELECT key, verdict FROM judgments"))

    def put_judgment(self, key: str, prompt_id: str, comparison: str, first: str, verdict: str, raw: str, judge: str,
                     spent=None):
        """Commit one verdict and its cost together: a crash after this never asks the judge for it again."""
        with self._write():
            self.db.execute("INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (key, prompt_id, comparison, first, verdict, raw, judge, time.time()))
            self._spend("judge", prompt_id, spent)

    def teacher_failures(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT prompt_id, error FROM teacher_failures"))

    # stages --------------------------------------------------------------------------------------
    def stage_done(self, round_: int, stage: str, fingerprint: str) -> bool:
        return self.stage_state(round_, stage, fingerprint) == "done"

    def stage_state(self, round_: int, stage: str, fingerprint: str) -> str:
        """'done' (finished with this fingerprint), 'started' (begun with it, interrupted), 'other' (recorded
        under another fingerprint: its rows came from other inputs) or 'none'."""
        row = self.db.execute("SELECT fingerprint, finished FROM stages WHERE round=? AND stage=?",
                              (round_, stage)).fetchone()
        if row is None:
            return "none"
        if row[0] != fingerprint:
            return "other"
        return "done" if row[1] > 0 else "started"

    def start_stage(self, round_: int, stage: str, fingerprint: str):
        """Record the fingerprint a stage is being computed under (finished = 0), so a run resumed with a changed
        recipe knows the rows it finds came from other inputs."""
        with self._write():
            self.db.execute("INSERT OR REPLACE INTO stages VALUES (?, ?, ?, 0)", (round_, stage, fingerprint))

    def stage_recorded(self, round_: int, stage: str) -> bool:
        return self.db.execute("SELECT 1 FROM stages WHERE round=? AND stage=?", (round_, stage)).fetchone() is not None

    def finish_stage(self, round_: int, stage: str, fingerprint: str):
        with self._write():
            self.db.execute("INSERT OR REPLACE INTO stages VALUES (?, ?, ?, ?)", (round_, stage, fingerprint, time.time()))

    def clear_from(self, round_: int, stage: str):
        """Forget `stage` and every later stage of this round and all later rounds (their inputs changed)."""
        later = STAGES[STAGES.index(stage):]
        with self._write():
            for s in later:
                for table in STAGE_TABLES[s]:
                    self.db.execute(f"DELETE FROM {table} WHERE round=?", (round_,))  # noqa: S608 (fixed names)
                self.db.execute("DELETE FROM stages WHERE round=? AND stage=?", (round_, s))
            for table in ROUND_TABLES:
                self.db.execute(f"DELETE FROM {table} WHERE round>?", (round_,))  # noqa: S608

    # candidates ----------------------------------------------------------------------------------
    def put_candidates(self, round_: int, candidates: list[Candidate]):
        """Store all candidates of one prompt in one transaction."""
        with self._write():
            self.db.executemany(
                "INSERT OR REPLACE INTO candidates VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (round_, c.prompt_id, c.idx, c.text, np.asarray(c.token_ids, np.int32).tobytes(),
                     np.asarray(c.logprobs, np.float32).tobytes(), c.finish)
                    for c in candidates
                ],
            )

    def candidates(self, round_: int) -> dict[str, list[Candidate]]:
        out: dict[str, list[Candidate]] = {}
        rows = self.db.execute(
            "SELECT prompt_id, idx, text, token_ids, logprobs, finish FROM candidates WHERE round=? "
            "ORDER BY prompt_id, idx", (round_,))
        for pid, idx, text, ids, lps, finish in rows:
            out.setdefault(pid, []).append(
                Candidate(pid, idx, text, np.frombuffer(ids, np.int32), np.frombuffer(lps, np.float32), finish))
        return out

    def sampled_prompt_ids(self, round_: int) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT DISTINCT prompt_id FROM candidates WHERE round=?", (round_,))}

    # scores --------------------------------------------------------------------------------------
    def put_scores(self, round_: int, prompt_id: str, scorer: str, scores: list[float], ranks: list[int], status: str,
                   anchor_score: float | None = None):
        """One prompt's candidate scores and ranks (rank 0 = best), its group status, and the anchor's own score."""
        rows = [(round_, prompt_id, i, scorer, float(s), int(r)) for i, (s, r) in enumerate(zip(scores, ranks))]
        if anchor_score is not None:
            rows.append((round_, prompt_id, ANCHOR_IDX, scorer, float(anchor_score), -1))
        with self._write():
            self.db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?)", rows)
            self.db.execute("INSERT OR REPLACE INTO groups VALUES (?, ?, ?)", (round_, prompt_id, status))

    def scores(self, round_: int, scorer: str) -> dict[str, list[float]]:
        """Candidate scores per prompt, in candidate order (the anchor's is in `anchor_scores`)."""
        out: dict[str, list[float]] = {}
        for pid, s in self.db.execute(
            "SELECT prompt_id, score FROM scores WHERE round=? AND scorer=? AND idx>=0 ORDER BY prompt_id, idx",
            (round_, scorer),
        ):
            out.setdefault(pid, []).append(s)
        return out

    def anchor_scores(self, round_: int, scorer: str) -> dict[str, float]:
        rows = self.db.execute("SELECT prompt_id, score FROM scores WHERE round=? AND scorer=? AND idx=?",
                               (round_, scorer, ANCHOR_IDX))
        return dict(rows)

    def scored_prompt_ids(self, round_: int, scorer: str) -> set[str]:
        rows = self.db.execute("SELECT DISTINCT prompt_id FROM scores WHERE round=? AND scorer=?", (round_, scorer))
        return {r[0] for r in rows}

    def group_statuses(self, round_: int) -> dict[str, int]:
        rows = self.db.execute("SELECT status, COUNT(*) FROM groups WHERE round=? GROUP BY status", (round_,))
        return dict(rows)

    # pairs ---------------------------------------------------------------------------------------
    def put_pairs(self, round_: int, pairs: list[Pair]):
        # ref_chosen / ref_rejected stay in the schema (caches written before keep their values) but are no
        # longer filled: the trainer sums the per-token references of the references_ table itself.
        with self._write():
            self.db.executemany(
                "INSERT OR REPLACE INTO pairs VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)",
                [(round_, p.prompt_id, p.kind, p.chosen_idx, p.rejected_idx, p.margin) for p in pairs],
            )

    def pairs(self, round_: int) -> list[Pair]:
        """The round's pairs in `pair_order`."""
        rows = self.db.execute(
            "SELECT prompt_id, kind, chosen_idx, rejected_idx, margin FROM pairs WHERE round=? ORDER BY prompt_id, kind",
            (round_,))
        return [Pair(*r) for r in rows]

    # reference log-probs (adapter disabled), per completion token; idx ANCHOR_IDX = the anchor ----------
    def put_references(self, round_: int, rows: list[tuple[str, int, np.ndarray]]):
        with self._write():
            self.db.executemany(
                "INSERT OR REPLACE INTO references_ VALUES (?, ?, ?, ?)",
                [(round_, pid, idx, np.asarray(t, np.float32).tobytes()) for pid, idx, t in rows],
            )

    def references(self, round_: int) -> dict[tuple[str, int], np.ndarray]:
        rows = self.db.execute("SELECT prompt_id, idx, token_logps FROM references_ WHERE round=?", (round_,))
        return {(pid, idx): np.frombuffer(blob, np.float32) for pid, idx, blob in rows}

    def generated_tokens(self) -> int:
        """Candidate tokens sampled over all rounds (token ids are stored as int32)."""
        (n,) = self.db.execute("SELECT COALESCE(SUM(LENGTH(token_ids)), 0) / 4 FROM candidates").fetchone()
        return int(n)

    def copy_to(self, path: str | Path):
        """A consistent copy of this cache at `path` (SQLite's online backup: safe with a WAL in use)."""
        with contextlib.closing(sqlite3.connect(path)) as dst:
            self.db.backup(dst)

    # summaries -----------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        tables = ("prompts", "anchors", "teacher_failures", "candidates", "scores", "pairs", "references_")
        return {t: self.db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}  # noqa: S608

    # read-only views for reports and `pudl cache ls/show` -----------------------------------------
    def prompt_rows(self) -> dict[str, tuple[str, str | None, str | None]]:
        """prompt id -> (prompt, system, answer)."""
        return {r[0]: r[1:] for r in self.db.execute("SELECT id, prompt, system, answer FROM prompts")}

    def rounds(self) -> list[int]:
        """Every round with a recorded stage or a candidate, ascending."""
        rows = self.db.execute("SELECT round FROM stages UNION SELECT DISTINCT round FROM candidates ORDER BY 1")
        return [r[0] for r in rows]

    def stage_rows(self) -> list[tuple[int, str, bool]]:
        """(round, stage, finished) for every recorded stage; finished False = begun and interrupted."""
        rows = self.db.execute("SELECT round, stage, finished FROM stages ORDER BY round")
        return sorted(((r, s, f > 0) for r, s, f in rows), key=lambda x: (x[0], STAGES.index(x[1])
                                                                          if x[1] in STAGES else len(STAGES)))

    def round_counts(self, round_: int) -> dict[str, int]:
        """Rows one round holds: prompts sampled, candidates, scored prompts, score rows, pairs, reference rows."""
        one = lambda sql: self.db.execute(sql, (round_,)).fetchone()[0]  # noqa: E731
        return {
            "prompts": one("SELECT COUNT(DISTINCT prompt_id) FROM candidates WHERE round=?"),
            "candidates": one("SELECT COUNT(*) FROM candidates WHERE round=?"),
            "scored": one("SELECT COUNT(*) FROM groups WHERE round=?"),
            "scores": one("SELECT COUNT(*) FROM scores WHERE round=?"),
            "pairs": one("SELECT COUNT(*) FROM pairs WHERE round=?"),
            "references": one("SELECT COUNT(*) FROM references_ WHERE round=?"),
        }

    def ranked(self, round_: int, scorer: str, prompt_id: str | None = None) -> list[tuple[str, int, float, int, str]]:
        """(prompt id, idx, score, rank, text) of scored candidates, best first per prompt; idx ANCHOR_IDX (rank
        -1) is the anchor, whose text comes from the anchors table."""
        sql = ("SELECT s.prompt_id, s.idx, s.score, s.rank, COALESCE(c.text, a.anchor, '') FROM scores s "
               "LEFT JOIN candidates c ON c.round=s.round AND c.prompt_id=s.prompt_id AND c.idx=s.idx "
               "LEFT JOIN anchors a ON s.idx=? AND a.prompt_id=s.prompt_id "
               "WHERE s.round=? AND s.scorer=?")
        args: tuple = (ANCHOR_IDX, round_, scorer)
        if prompt_id is not None:
            sql += " AND s.prompt_id=?"
            args += (prompt_id,)
        rows = self.db.execute(sql + " ORDER BY s.prompt_id, s.score DESC, s.idx", args)
        return [tuple(r) for r in rows]

    def scorers(self, round_: int) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT scorer FROM scores WHERE round=? ORDER BY 1", (round_,))]


def pair_order(pairs: list[Pair]) -> list[Pair]:
    """Pairs in the order the cache returns them (by prompt id, then kind): the seeded shuffle of the training
    batches sees the same list whether a round's pairs were just made or read back by a resumed run."""
    return sorted(pairs, key=lambda p: (p.prompt_id, p.kind))


def fingerprint(*parts) -> str:
    """A stable key for what a stage's output depends on."""
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
