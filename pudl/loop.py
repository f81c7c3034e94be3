"""The round orchestrator: anchors -> sample -> score -> pairs -> train -> export -> eval.

Every stage commits what it made to the cache before the next starts, and hands it to the next in memory.
Each round's stages carry a fingerprint of what they depend on (the recipe sections and the previous stage's
fingerprint; `pudl.stages`), so a rerun skips what is done, resumes what was interrupted, and recomputes only
what a changed recipe invalidates. Other ranks of a distributed run only train (`follow`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import signal
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from rich.markup import escape

from pudl import adapters
from pudl.agreement import order_consistency
from pudl.atomic_files import write_json
from pudl.cache import Cache, fingerprint, pair_order
from pudl.distributed import SINGLE, World, init_world
from pudl.domain import ANCHOR_BEHAVIOUR_IDX, ANCHOR_IDX, Candidate, Group, Pair, SamplingParams, TrainJob
from pudl.errors import TeacherError, UserError
from pudl.evaluate import evaluate, reference_metrics, retention
from pudl import judge as judging
from pudl import ledger
from pudl.losses import LOSSES
from pudl.pairs import group_status, make_pairs, rank
from pudl.prefs import Completions, make_groups, needed_references, training_batches
from pudl.prompts import Prompt, chat_messages, load_prompts
from pudl.recipe import LISTWISE, Recipe
from pudl.report import Reporter
from pudl.runtime import Runtime
from pudl.scoring import REFERENCE_TEMPLATE, score_groups
from pudl.sequences import completion_logprobs
from pudl.stages import Stages
from pudl.teachers import ask_all, make_teacher, reply_of
from pudl.train import train

SCORE_CHUNK = 4  # prompts scored (and committed) together


class RunLock:
    """One `pudl run` per run directory: a second one fails at once with a clear message."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "run.lock"

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UserError(f"{self.path.parent}: another pudl run is using this run directory") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class Run:
    """State shared by the stages of one `pudl run`: the recipe's runtime, the cache, the stage state machine.

    A round's stages hand what they made to the next in memory; the cache is read only where a stage is
    reused or resumed (and for scores, which per-prompt extension makes a cache-first stage: docs/architecture.md).
    """

    def __init__(self, recipe: Recipe, reporter: Reporter, world: World = SINGLE):
        self.recipe = recipe
        self.world = world  # this process is rank 0 of it: the other ranks only train (`follow`)
        self.rep = reporter
        self.run_dir = Path(recipe.run.out)
        self.cache = Cache(self.run_dir / "cache.sqlite")
        self.stages = Stages(self.cache, reporter)
        self.prompts = load_prompts(recipe.data.prompts)  # a bad prompts file fails before a model is read
        self.eval_prompts = load_prompts(recipe.data.eval) if recipe.data.eval else []
        self.runtime = Runtime(recipe)
        self.tokenizer = self.runtime.tokenizer
        self.usable, self.too_long = self._fitting(self.prompts, "training")
        self.eval_prompts, _ = self._fitting(self.eval_prompts, "held-out")
        self.holdout: list[str] = []
        if not recipe.data.eval:  # every run reports something: hold out a seeded share, never trained on
            held = set(holdout_ids([p.id for p in self.usable], recipe.data.eval_fraction, recipe.run.seed))
            self.eval_prompts = [p for p in self.usable if p.id in held]
            self.usable = [p for p in self.usable if p.id not in held]
            self.holdout = [p.id for p in self.eval_prompts]
            if self.holdout:
                self.rep.say(f"held out {len(self.holdout)} of {len(self.holdout) + len(self.usable)} prompts for "
                             f"the before/after evaluation (data.eval_fraction = {recipe.data.eval_fraction:g}, "
                             f"seed {recipe.run.seed}); they are never trained on")
                self.rep.log("holdout", ids=self.holdout, fraction=recipe.data.eval_fraction)
        self.teacher_calls = 0
        self.failures: dict[str, str] = {}

    def _fitting(self, prompts: list[Prompt], what: str) -> tuple[list[Prompt], list[str]]:
        """The prompts whose chat context leaves the sampler room in student.n_ctx, and the ids of the others,
        which are skipped with a warning: one over-long prompt must not stop a run over thousands."""
        n_ctx = self.recipe.student.n_ctx
        keep, skipped = [], []
        for p in prompts:
            (keep if len(self.tokenizer.chat_tokens(chat_messages(p))) + 1 < n_ctx else skipped).append(p)
        if skipped:
            self.rep.say(f"[yellow]{len(skipped)} {what} prompt(s) do not fit student.n_ctx={n_ctx} tokens and are "
                         f"skipped (first: {escape(skipped[0].id)})")
            self.rep.log("skipped", prompts=what, reason=f"longer than student.n_ctx={n_ctx}",
                         ids=[p.id for p in skipped])
        return keep, [p.id for p in skipped]

    @property
    def student(self):
        return self.runtime.student

    @property
    def scorers(self) -> tuple[str, ...]:
        """The scorer that ranks, then the ones computed only for the ranker-vs-verifier report."""
        r = self.recipe.rank
        return tuple(dict.fromkeys([r.scorer, *r.also_score]))

    # teacher -------------------------------------------------------------------------------------
    def collect_anchors(self) -> dict[str, str]:
        """Ask the teacher for every usable prompt without a cached anchor, committing each answer as it arrives
        (a crash never costs a stored answer); a prompt the teacher fails is recorded and retried by the next run."""
        self.cache.put_prompts(self.prompts)
        anchors = self.cache.anchors()
        missing = [p for p in self.usable if p.id not in anchors]
        if missing:
            teacher = self.teacher()
            with self.rep.phase("teacher", len(missing)) as advance:  # the others answer locally, one at a time
                for p, answer in ask_all(lambda q: reply_of(teacher, q), missing, _workers(self.recipe.teacher)):
                    self.teacher_calls += 1
                    if isinstance(answer, TeacherError):
                        self.cache.put_teacher_failure(p.id, str(answer), spent=answer)
                    else:
                        self.cache.put_anchor(p.id, answer.text, teacher.name, spent=answer)
                        anchors[p.id] = answer.text
                    advance()
        ids = {p.id for p in self.usable}
        self.failures = {pid: e for pid, e in self.cache.teacher_failures().items() if pid in ids}
        if self.failures:
            pid, error = next(iter(self.failures.items()))
            self.rep.say(f"[yellow]teacher failed for {len(self.failures)} prompt(s); they are skipped this run "
                         f"and retried by the next (first: {escape(pid)}: {escape(error)})")
        self.rep.log("teacher", calls=self.teacher_calls, anchors=len(anchors), failures=len(self.failures))
        return anchors

    def references(self) -> dict[str, str]:
        """The teacher's reference answers to the held-out prompts (`collect_references`)."""
        return collect_references(self.recipe, self.cache, self.eval_prompts, self.rep, self.teacher)

    def teacher(self):
        """The recipe's teacher, made once per run (a local teacher model loads on its first answer)."""
        if getattr(self, "_teacher", None) is None:
            self._teacher = make_teacher(self.recipe.teacher)
        return self._teacher

    # evaluation ----------------------------------------------------------------------------------
    def evaluate(self, name: str, adapter: Path | None, key: str, anchors: dict[str, str],
                 before: dict | None = None) -> dict | None:
        """Held-out evaluation: the replies cached in eval-<name>.json under a fingerprint of what they depend on;
        reference metrics and (after training, eval.judge) the judged comparison, from the cache's references
        and verdicts, added each time (nothing is asked twice)."""
        if not self.eval_prompts:
            return None
        path = self.run_dir / f"eval-{name}.json"
        e = self.recipe.eval
        judged = [e.judge, self.recipe.section_dict("judge")] if e.judge != "none" and name == "after" else []
        fp = fingerprint(key, e.max_tokens, [asdict(p) for p in self.eval_prompts], *judged)
        result = None
        if path.exists():
            cached = json.loads(path.read_text())
            if cached.get("fingerprint") == fp:
                result = cached
        if result is None:
            with self.runtime.sampler(adapter) as sampler, \
                    self.rep.phase(f"eval {name}", len(self.eval_prompts)) as advance:
                result = evaluate(self.eval_prompts, sampler, self.student, self.tokenizer, anchors,
                                  max_tokens=e.max_tokens, on_prompt=lambda p: advance())
            result["fingerprint"] = fp
        references = self.references()
        result["held_out"] = "data.eval" if self.recipe.data.eval else "data.eval_fraction"
        result.pop("reference", None)
        result.pop("judge", None)
        metrics = reference_metrics(result, references)
        if metrics:
            result["reference"] = metrics
        if name == "after" and e.judge != "none":
            result["judge"] = judge_replies(self.recipe, self.cache, self.eval_prompts, result, before, references,
                                            self.rep)
        write_json(path, result)
        self.rep.log("eval", name=name, **{k: v for k, v in result.items() if k not in ("replies", "fingerprint")})
        return result

    # one round -----------------------------------------------------------------------------------
    def sample(self, round_: int, prompts: list[Prompt], adapter: Path | None, fp: str) -> dict[str, list[Candidate]]:
        """The round's candidates per prompt: sampled now for the prompts without any, the rest from the cache."""
        sampled = self.cache.sampled_prompt_ids(round_)
        if self.stages.begin(round_, "sample", fp, missing=sum(p.id not in sampled for p in prompts)):
            return self.cache.candidates(round_)
        candidates = self.cache.candidates(round_)  # read after begin(): it clears the rows of a changed recipe
        todo = [p for p in prompts if p.id not in candidates]
        with self.runtime.sampler(adapter) as sampler, self.rep.phase("sample", len(todo), round_) as advance:
            def store(p, cands):
                self.cache.put_candidates(round_, cands)
                candidates[p.id] = cands
                advance()

            sampler.sample_all(todo, SamplingParams.of(self.recipe.sample), self.recipe.run.seed, round_, store)
        self.stages.finish(round_, "sample", fp)
        return candidates

    def score(self, round_: int, prompts: list[Prompt], anchors: dict[str, str],
              candidates: dict[str, list[Candidate]], fp: str):
        """Score every prompt's candidates with each scorer not stored yet; scores go to the cache, prompt by
        prompt chunk (a crash keeps the chunks committed)."""
        # A scorer added to pudl after a round was scored is computed for that round's prompts on the next run
        # (the stage is "extended"); the scorers already stored are not recomputed.
        scorers = self.scorers
        scored = {s: self.cache.scored_prompt_ids(round_, s) for s in scorers}
        missing = {p.id: tuple(s for s in scorers if p.id not in scored[s]) for p in prompts}
        if self.stages.begin(round_, "score", fp, missing=sum(bool(m) for m in missing.values())):
            return
        todo = [p for p in prompts if missing[p.id] and p.id in candidates]
        min_gap = self.recipe.rank.min_gap
        with self.rep.phase("score", len(todo), round_) as advance:
            for start in range(0, len(todo), SCORE_CHUNK):
                chunk = todo[start : start + SCORE_CHUNK]
                groups = [(p, anchors[p.id], candidates[p.id]) for p in chunk]
                wanted = tuple(s for s in scorers if any(s in missing[p.id] for p in chunk))
                for (p, _, cands), scores in zip(groups, score_groups(self.student, self.tokenizer, groups, wanted)):
                    for scorer in missing[p.id]:
                        values, anchor_value = scores[scorer]
                        status = group_status(values, cands, min_gap)
                        self.cache.put_scores(round_, p.id, scorer, list(values), list(rank(values)), status,
                                              anchor_score=anchor_value)
                    advance()
        self.stages.finish(round_, "score", fp)

    def preferences(self, round_: int, prompts: list[Prompt], anchors: dict[str, str],
                    candidates: dict[str, list[Candidate]], fp: str) -> tuple[list[Pair], list[Group], dict]:
        """Pairs (dpo) or groups (listwise) from the ranking, with the reference log-probs they need (computed
        once, adapter disabled, and cached)."""
        r, t = self.recipe.rank, self.recipe.train
        scores = self.cache.scores(round_, r.scorer)
        anchor_scores = self.cache.anchor_scores(round_, r.scorer)
        groups = make_groups(prompts, scores, anchor_scores, t.include_anchor, r.anchor, r.min_gap)
        if self.stages.begin(round_, "prefs", fp):
            return self.cache.pairs(round_), groups, self.cache.references(round_)
        pairs = []  # listwise objectives train on the groups
        if t.algo == "dpo":
            for p in prompts:
                if p.id in scores:
                    pairs += make_pairs(p.id, anchors[p.id], candidates[p.id], np.array(scores[p.id]), r.pairs,
                                        r.min_gap, anchor_scores.get(p.id), r.near_anchor)
        pairs = pair_order(pairs)
        comp = Completions({p.id: p for p in prompts}, anchors, candidates, self.tokenizer)
        keys = needed_references(t.algo, pairs, groups)
        with self.rep.phase("reference", len(keys), round_) as advance:
            tokens = completion_logprobs(self.student, [comp.sequence(*k) for k in keys], adapter=False)
            advance(len(keys))
        refs = {k: np.asarray(v, np.float32) for k, v in zip(keys, tokens)}
        if t.algo == "grpo" and t.include_anchor:  # the anchor's behaviour log-probs: the current policy's
            anchor_keys = [(g.prompt_id, ANCHOR_IDX) for g in groups if ANCHOR_IDX in g.members]
            behaviour = completion_logprobs(self.student, [comp.sequence(*k) for k in anchor_keys])
            refs.update({(pid, ANCHOR_BEHAVIOUR_IDX): np.asarray(b, np.float32)
                         for (pid, _), b in zip(anchor_keys, behaviour)})
        self.cache.put_references(round_, [(pid, idx, t) for (pid, idx), t in refs.items()])
        self.cache.put_pairs(round_, pairs)
        self.stages.finish(round_, "prefs", fp)
        return pairs, groups, refs

    def train(self, round_: int, job: TrainJob) -> Path:
        """Train this round (round 0: the SFT warm-up) on `job`; export the adapter; its GGUF path."""
        round_dir = self.run_dir / f"round-{round_}"
        adapter_path = round_dir / "adapter.safetensors"
        if self.stages.begin(round_, "train", job.fingerprint) and adapter_path.exists():
            adapters.load_adapter(self.student, adapter_path)
            return round_dir / "adapter.gguf"
        t = job.cfg
        batches, skipped = training_batches(job, self.world.shard, self.tokenizer)
        unit = {"dpo": "pair", "sft": "anchor"}.get(job.algo, "group")
        if skipped:
            self.rep.say(f"round {round_}: {skipped} {unit}(s) longer than train.max_seq_len={t.max_seq_len} skipped")
        if not batches:
            raise UserError(f"round {round_}: nothing to train on: no {unit} survived ranking "
                            "(see rank.pairs, sample.k and the group statuses in metrics.jsonl)")
        if self.world.size > 1:  # the other ranks build their slices of the same batches from this job
            self.world.broadcast_object(job)
        with self.rep.phase("train", len(batches), round_) as advance:
            def on_step(step, row):
                self.rep.log("step", round=round_, **row)
                advance()

            result = train(self.student, batches, LOSSES[job.algo], t, checkpoint_dir=round_dir,
                           fingerprint=job.fingerprint, checkpoint_every=t.checkpoint_every, on_step=on_step,
                           world=self.world)
        if result.resumed_from:
            self.rep.say(f"round {round_}: training resumed from step {result.resumed_from}")
        with self.rep.phase("export", 2, round_) as advance:
            adapters.save_adapter(self.student, adapter_path)
            advance()
            adapters.write_gguf_lora(self.student, round_dir / "adapter.gguf")
            advance()
        self.stages.finish(round_, "train", job.fingerprint)
        return round_dir / "adapter.gguf"


def _workers(cfg) -> int:
    """Requests in flight: openai's max_concurrency; a local model answers one at a time."""
    return cfg.max_concurrency if cfg.backend == "openai" else 1


def collect_references(recipe: Recipe, cache: Cache, prompts: list[Prompt], rep: Reporter, teacher=None) -> dict:
    """The teacher's answer to each held-out prompt (eval.references): asked once in the life of the cache, each
    committed with its cost as it arrives ('references' in the ledger). A failure is asked again by the next
    run; that prompt has no reference metrics meanwhile."""
    if not (recipe.eval.references and prompts):
        return {}
    cache.put_prompts(prompts)
    refs = cache.eval_references()
    missing = [p for p in prompts if p.id not in refs]
    if missing:
        teacher = teacher() if callable(teacher) else make_teacher(recipe.teacher)
        failed = 0
        with rep.phase("references", len(missing)) as advance:
            for p, answer in ask_all(lambda q: reply_of(teacher, q), missing, _workers(recipe.teacher)):
                if isinstance(answer, TeacherError):
                    cache.spend("references", p.id, answer)
                    failed += 1
                else:
                    cache.put_eval_reference(p.id, answer.text, teacher.name, spent=answer)
                    refs[p.id] = answer.text
                advance()
        if failed:
            rep.say(f"[yellow]teacher failed to give a reference for {failed} held-out prompt(s); the next run asks "
                    "again")
    ids = {p.id for p in prompts}
    return {pid: text for pid, text in refs.items() if pid in ids}


def judge_config(recipe: Recipe):
    """eval.judge = 'teacher': the [judge] section if it names a backend, else the [teacher] endpoint without the
    teacher's system text (a house style is for answers, not verdicts), at temperature 0."""
    j, t = recipe.judge, recipe.teacher
    if j.backend:
        return j
    return dataclasses.replace(t, max_tokens=j.max_tokens, system="", temperature=0.0)


def judge_replies(recipe: Recipe, cache: Cache, prompts: list[Prompt], after: dict, before: dict | None,
                  references: dict[str, str], rep: Reporter) -> dict:
    """The judged comparison of the trained student's replies (`pudl.judge`), every verdict cached in `cache`."""
    cfg = judge_config(recipe)
    judge = make_teacher(cfg)
    replies = lambda result: {r["id"]: r["reply"] for r in (result or {}).get("replies", [])}  # noqa: E731
    jobs = judging.plan(judge.name, prompts, replies(after), replies(before), references)
    cached = cache.judgments()
    with rep.phase("judge", sum(j.key not in cached for j in jobs)) as advance:
        verdicts = judging.judge_all(cache, judge, jobs, _workers(cfg), on_job=lambda j: advance())
    return {**judging.rates(jobs, verdicts), "judge": judge.name}


def holdout_ids(ids: list[str], fraction: float, seed: int) -> list[str]:
    """The prompt ids held out for evaluation when the recipe names no data.eval: round(fraction * N), at least
    min(3, N // 4), none at fraction 0. Chosen by a seeded hash of each id, so the choice does not depend on the
    file's order and adding prompts moves none of the others between the two sides."""
    if fraction <= 0 or not ids:
        return []
    n = min(len(ids) - 1, max(round(fraction * len(ids)), min(3, len(ids) // 4)))
    rank = sorted(ids, key=lambda pid: hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest())
    chosen = set(rank[:n])
    return [pid for pid in ids if pid in chosen]


def _kill_hook(rep: Reporter) -> Reporter:
    """PUDL_TEST_KILL_AT="phase:N" SIGKILLs this process right after the N-th item of that phase (counted over
    rounds) is done: teacher, sample and score items are prompts (committed), train items are optimizer steps
    (before that step's checkpoint), export items are the two adapter files. The crash tests use it to kill a
    real run at a chosen moment; nothing else reads it."""
    spec = os.environ.get("PUDL_TEST_KILL_AT")
    if not spec:
        return rep
    target, _, n = spec.rpartition(":")
    phase, done = rep.phase, 0

    @contextlib.contextmanager
    def killing_phase(name, total, round_=None):
        with phase(name, total, round_) as advance:
            def step(k=1):
                nonlocal done
                advance(k)
                if name == target:
                    done += k
                    if done >= int(n):
                        os.kill(os.getpid(), signal.SIGKILL)

            yield step

    rep.phase = killing_phase
    return rep


def run(recipe: Recipe, reporter_factory=Reporter) -> dict | None:
    """Run a recipe to the end (resuming from the cache) and return the summary. Under a distributed launcher
    rank 0 runs it and the other ranks only train with it (`follow`; they return None)."""
    world = init_world()
    if not world.is_main:
        return follow(recipe, world)
    previous = os.umask(0o077)  # all the run writes is user-only: prompts, anchors, adapters, logs
    try:
        return _run(recipe, reporter_factory, world)
    finally:
        os.umask(previous)


def follow(recipe: Recipe, world: World) -> None:
    """What ranks other than 0 do in `pudl run`: wait for each training job rank 0 sends, train on this rank's
    slice of it, and stop when rank 0 sends None (its run finished). They hold no file of the run open."""
    runtime = Runtime(recipe)  # the same student as rank 0's: one set-up for every rank
    while (job := world.broadcast_object(None)) is not None:
        batches, _ = training_batches(job, world.shard, runtime.tokenizer)
        train(runtime.student, batches, LOSSES[job.algo], job.cfg, checkpoint_dir=None, fingerprint=job.fingerprint,
              checkpoint_every=job.cfg.checkpoint_every, world=world)


def _run(recipe: Recipe, reporter_factory, world: World = SINGLE) -> dict:
    run_dir = Path(recipe.run.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    t0 = time.perf_counter()
    with RunLock(run_dir):
        rep = _kill_hook(reporter_factory(run_dir))
        state = Run(recipe, rep, world)
        if not state.usable:
            raise UserError(f"{recipe.data.prompts}: no prompt fits student.n_ctx={recipe.student.n_ctx} tokens")
        anchors = state.collect_anchors()
        prompts = [p for p in state.usable if p.id in anchors]
        if not prompts:
            first = next(iter(state.failures.items()), ("?", "?"))
            raise UserError(f"no prompt has an anchor: the teacher failed for all {len(state.failures)} "
                            f"(first: {first[0]}: {first[1]})")
        by_id = {p.id: p for p in prompts}
        base_key = fingerprint(str(state.runtime.model_path), recipe.section_dict("lora"), recipe.run.seed)
        before = state.evaluate("before", None, base_key, anchors)
        prev_fp, adapter, rounds, tokens_sampled = base_key, None, [], 0
        t = recipe.train
        sft_key = {k: getattr(t, k) for k in ("learning_rate", "batch_size", "weight_decay", "max_seq_len")}

        def sft_job(round_: int, epochs: int | None, fp: str) -> TrainJob:  # anchors only: no candidate
            return TrainJob(t, "sft", epochs, [], [], {}, by_id, anchors, {}, recipe.run.seed + round_, fp)

        if t.warmup_sft_epochs and t.algo != "sft":  # round 0: SFT on the anchors; round 1 samples from it
            fp_sft = fingerprint(prev_fp, "sft", sft_key, t.warmup_sft_epochs, recipe.section_dict("lora"),
                                 [p.id for p in prompts])
            adapter = state.train(0, sft_job(0, t.warmup_sft_epochs, fp_sft))
            rounds.append({"round": 0, "algo": "sft", "anchors": len(prompts)})
            prev_fp = fp_sft
        for round_ in range(1, recipe.run.rounds + 1):
            if t.algo == "sft":  # anchors only: nothing is sampled, scored or ranked
                fp_train = fingerprint(prev_fp, "sft", sft_key, t.epochs, recipe.section_dict("lora"),
                                       [p.id for p in prompts])
                adapter = state.train(round_, sft_job(round_, None, fp_train))
                rounds.append({"round": round_, "algo": "sft", "anchors": len(prompts)})
                rep.log("round", **rounds[-1])
                prev_fp = fp_train
                continue
            # Samples and scores are per prompt (a prompt whose anchor arrives later only adds rows); pairs and
            # what follows depend on the whole set of prompts.
            fp_sample = fingerprint(prev_fp, recipe.section_dict("sample"),
                                    *([recipe.sample.backend] if recipe.sample.backend != "llamacpp" else []))
            fp_score = fingerprint(fp_sample, REFERENCE_TEMPLATE, recipe.rank.min_gap)
            anchor_top = recipe.rank.anchor == "top" and recipe.train.include_anchor and recipe.train.algo in LISTWISE
            fp_prefs = fingerprint(fp_score, recipe.section_dict("rank"), recipe.train.algo, [p.id for p in prompts],
                                   *(["anchor on top"] if anchor_top else []),
                                   *([f"near anchor {recipe.rank.near_anchor}"] if recipe.rank.near_anchor else []))
            fp_train = fingerprint(fp_prefs, recipe.section_dict("train", "lora"))
            candidates = state.sample(round_, prompts, adapter, fp_sample)
            state.score(round_, prompts, anchors, candidates, fp_score)
            pairs, groups, refs = state.preferences(round_, prompts, anchors, candidates, fp_prefs)
            adapter = state.train(round_, TrainJob(t, t.algo, None, pairs, groups, refs, by_id, anchors, candidates,
                                                   recipe.run.seed + round_, fp_train))
            tokens_sampled += sum(len(c.token_ids) for p in prompts for c in candidates.get(p.id, []))
            agreement = order_consistency(prompts, candidates,
                                          {s: state.cache.scores(round_, s) for s in state.scorers})
            rounds.append({"round": round_, "pairs": len(pairs), "groups": len(groups),
                           "group_status": state.cache.group_statuses(round_),
                           "candidates": sum(len(c) for c in candidates.values()), "ranker": agreement})
            rep.log("round", **rounds[-1])
            prev_fp = fp_train
        shutil.copyfile(adapter, run_dir / "adapter.gguf.tmp")
        os.replace(run_dir / "adapter.gguf.tmp", run_dir / "adapter.gguf")
        after = state.evaluate("after", adapter, prev_fp, anchors, before=before)
        spent = ledger.with_cost(state.cache.ledger(), recipe.teacher.price_in, recipe.teacher.price_out)
        rep.log("ledger", **spent)
        summary = {
            "recipe": recipe.path,
            "rounds": recipe.run.rounds,
            "prompts": len(state.prompts),
            "teacher_calls": state.teacher_calls,
            "teacher_failures": len(state.failures),
            "anchors_used": len(prompts),  # the teacher-call budget this run's training drew on
            "tokens_sampled": tokens_sampled,  # candidate tokens generated for training (evaluation excluded)
            "teacher_failed": state.failures,  # prompt id -> last error; the next run asks again
            "skipped_too_long": state.too_long,
            # where the held-out prompts came from; with data.eval_fraction, their ids (never trained on)
            "held_out": {"source": "data.eval" if recipe.data.eval else "data.eval_fraction",
                         "n": len(state.eval_prompts), "fraction": None if recipe.data.eval else recipe.data.eval_fraction,
                         "ids": state.holdout},
            "ledger": spent,  # every teacher request over the life of the cache, per purpose (pudl.ledger)
            "stages": state.stages.status,
            "cache": state.cache.counts(),
            "before": _brief(before),
            "after": _brief(after),
            # of the held-out prompts the base student answered right, the share the trained one still does
            "retention": retention(before, after) if before and after else None,
            "per_round": rounds,
            "phase_seconds": {k: round(v, 2) for k, v in rep.phase_seconds.items()},
            "wall_seconds": round(time.perf_counter() - t0, 2),
            "adapter": str(run_dir / "adapter.gguf"),
            "ranks": world.size,  # training processes (mlx.launch); each trained train.batch_size items per step
        }
        write_json(run_dir / "summary.json", summary)
        state.cache.close()
        world.broadcast_object(None)  # the other ranks' follow() returns
        _write_report(run_dir, recipe, rep)
        return summary


def _write_report(run_dir: Path, recipe: Recipe, rep: Reporter):
    """report.html from what the run wrote. Everything the run made is on disk already: a failure to draw the
    report is a warning (`pudl report RUN_DIR` retries), never a failed run."""
    try:
        from pudl.html_report import write_report

        rep.say(f"report: {write_report(run_dir, recipe)}")
    except Exception as e:  # noqa: BLE001 (any plotting or rendering failure)
        rep.console.print(f"[yellow]warning: report.html not written ({escape(type(e).__name__)}: {escape(str(e))}); "
                          f"retry with: pudl report {escape(str(run_dir))}", highlight=False)
        rep.log("report", error=f"{type(e).__name__}: {e}")


def _brief(result: dict | None) -> dict | None:
    if result is None:
        return None
    return {k: v for k, v in result.items() if k not in ("replies", "fingerprint")}
