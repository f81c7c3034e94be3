"""The stage state machine (pudl.stages) on a real SQLite cache: reuse, resume, extend, recompute."""

import numpy as np

from pudl.cache import Cache
from pudl.domain import Candidate
from pudl.report import Reporter
from pudl.stages import Stages


def candidate(pid: str) -> Candidate:
    return Candidate(pid, 0, "x", np.array([1, 2], np.int32), np.zeros(2, np.float32), "stop")


def fresh(tmp_path) -> Stages:
    """A new run over the same cache (a rerun of the recipe)."""
    return Stages(Cache(tmp_path / "c.sqlite"), Reporter(None, quiet=True))


def test_a_finished_stage_is_reused_and_an_interrupted_one_resumes(tmp_path):
    run = fresh(tmp_path)
    assert run.begin(1, "sample", "fp-a") is False  # nothing recorded: compute it
    run.cache.put_candidates(1, [candidate("p")])
    run.finish(1, "sample", "fp-a")
    assert run.begin(1, "score", "fp-b") is False  # started, then the process dies before finish
    assert run.status == {"1": {"sample": "computed", "score": "computed"}}

    rerun = fresh(tmp_path)
    assert rerun.begin(1, "sample", "fp-a") is True
    assert rerun.begin(1, "score", "fp-b") is False
    assert rerun.status == {"1": {"sample": "reused", "score": "resumed"}}
    assert set(rerun.cache.candidates(1)) == {"p"}  # resuming keeps what the interrupted run committed


def test_missing_prompts_extend_a_finished_stage_without_clearing_it(tmp_path):
    run = fresh(tmp_path)
    run.begin(1, "sample", "fp-a")
    run.cache.put_candidates(1, [candidate("p")])
    run.finish(1, "sample", "fp-a")
    rerun = fresh(tmp_path)
    assert rerun.begin(1, "sample", "fp-a", missing=1) is False
    assert rerun.status["1"]["sample"] == "extended" and set(rerun.cache.candidates(1)) == {"p"}


def test_a_changed_input_recomputes_the_stage_and_everything_after_it(tmp_path):
    run = fresh(tmp_path)
    for round_ in (1, 2):
        run.begin(round_, "sample", f"s{round_}")
        run.cache.put_candidates(round_, [candidate("p")])
        run.finish(round_, "sample", f"s{round_}")
        run.begin(round_, "score", f"c{round_}")
        run.cache.put_scores(round_, "p", "anchor-likelihood", [0.5], [0], "single")
        run.finish(round_, "score", f"c{round_}")

    rerun = fresh(tmp_path)
    assert rerun.begin(1, "sample", "s1") is True
    assert rerun.begin(1, "score", "c1-changed") is False  # e.g. rank.min_gap changed
    assert rerun.cache.scores(1, "anchor-likelihood") == {} and set(rerun.cache.candidates(1)) == {"p"}
    assert rerun.cache.candidates(2) == {}  # later rounds sampled from the old policy: gone
    # Round 2's stages were cleared with round 1's score: computing them again is a recompute, not a first run.
    assert rerun.begin(2, "sample", "s2") is False
    assert rerun.status == {"1": {"sample": "reused", "score": "recomputed"}, "2": {"sample": "recomputed"}}
