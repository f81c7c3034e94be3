"""Which stages of a run are done, and what a rerun does with each: reuse, extend, resume, recompute.

Each round's stages (sample, score, prefs, train) carry a fingerprint of what they depend on (the recipe
sections and the previous stage's fingerprint). `Stages.begin` compares it with the one the cache recorded and
decides; the cache keeps the rows. Every decision is said once (summary.json "stages", a metrics row, a line).
"""

from __future__ import annotations

from pudl.cache import Cache


class Stages:
    """The stage state machine of one `pudl run` over its cache."""

    def __init__(self, cache: Cache, reporter):
        self.cache = cache
        self.rep = reporter
        self.status: dict[str, dict[str, str]] = {}  # round -> stage -> computed|resumed|reused|extended|recomputed
        self._changed_from: int | None = None  # first round whose stages a changed input cleared

    def begin(self, round_: int, name: str, fp: str, missing: int = 0) -> bool:
        """True when this stage is done with this fingerprint (and `missing` prompts are 0); else get it ready to
        run: rows of an interrupted run with the same fingerprint are kept (resume), rows made from other inputs
        are cleared with this stage's later ones. Per-prompt stages (sample, score) whose fingerprint matches
        keep their rows and only add the `missing` prompts (e.g. ones whose anchor arrived since)."""
        state = self.cache.stage_state(round_, name, fp)
        if state == "done" and not missing:
            return self._note(round_, name, "reused", True)
        if state == "other":
            self.rep.say(f"round {round_}: the recipe or the prompts changed since '{name}' ran; "
                         "recomputing it and what follows")
            self.cache.clear_from(round_, name)
            self._changed_from = round_ if self._changed_from is None else min(self._changed_from, round_)
        self.cache.start_stage(round_, name, fp)  # a crash from here on resumes under this fingerprint, or clears
        if state == "none" and self._changed_from is not None and round_ >= self._changed_from:
            state = "other"  # cleared with an earlier stage whose inputs changed
        status = {"done": "extended", "started": "resumed", "other": "recomputed"}.get(state, "computed")
        return self._note(round_, name, status, False)

    def finish(self, round_: int, name: str, fp: str):
        """Record the stage as done under `fp` (its rows are all committed)."""
        self.cache.finish_stage(round_, name, fp)

    def _note(self, round_: int, name: str, status: str, result: bool) -> bool:
        """Say what happened to a stage (summary.json "stages", a metrics row, and a line unless quiet)."""
        self.status.setdefault(str(round_), {})[name] = status
        self.rep.log("stage", round=round_, stage=name, status=status)
        if status in ("reused", "extended", "resumed"):
            self.rep.say(f"round {round_}: '{name}' {status} from the cache")
        return result
