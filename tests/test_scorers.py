"""Order-consistency scorers (judge, chrF), the rank statistics they are measured with, and the SFT objective."""

import json
import random
import sqlite3
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from pudl.domain import Candidate
from pudl.losses import LOSSES, TrainBatch
from pudl.prompts import Prompt
from pudl.agreement import average_ranks, order_consistency, roc_auc, spearman
from pudl.scoring import chrf, judge_scores, score_groups
from pudl.sequences import pack
from tests import recipe_files
from tests.conftest import pudl



def chrf_reference(hyp: str, ref: str, max_n: int = 6, beta: float = 2.0) -> float:
    """chrF written independently: n-grams listed and matched one by one (no Counter intersection)."""
    hyp, ref = hyp.replace(" ", "").replace("\n", "").replace("\t", ""), ref.replace(" ", "").replace("\n", "").replace("\t", "")
    ps, rs = [], []
    for n in range(1, max_n + 1):
        h = [hyp[i : i + n] for i in range(len(hyp) - n + 1)]
        r = [ref[i : i + n] for i in range(len(ref) - n + 1)]
        if not h or not r:
            break
        pool, match = list(r), 0
        for g in h:
            if g in pool:
                pool.remove(g)
                match += 1
        ps.append(match / len(h))
        rs.append(match / len(r))
    if not ps:
        return float(hyp == ref)
    p, r = sum(ps) / len(ps), sum(rs) / len(rs)
    return 0.0 if p + r == 0 else (1 + beta * beta) * p * r / (beta * beta * p + r)


def test_chrf_matches_an_independent_reference_on_random_strings():
    rng = random.Random()
    for _ in range(200):
        a = "".join(rng.choice("ab c") for _ in range(rng.randrange(0, 15)))
        b = "".join(rng.choice("abc ") for _ in range(rng.randrange(0, 15)))
        assert abs(chrf(a, b) - chrf_reference(a, b)) < 1e-12
    assert chrf("Paris", "Paris") == 1.0 and chrf("xyz", "Paris") == 0.0
    assert chrf("the capital is Paris", "Paris") > chrf("the capital is Rome", "Paris")


def spearman_reference(x, y) -> float:
    """Average ranks counted directly (rank = #smaller + (#equal + 1) / 2), then Pearson in float64."""
    def ranks(v):
        return np.array([sum(u < t for u in v) + (sum(u == t for u in v) + 1) / 2 for t in v], np.float64)
    return float(np.corrcoef(ranks(list(x)), ranks(list(y)))[0, 1])


def test_spearman_and_ranks_against_a_direct_count_with_ties():
    rng = np.random.default_rng()
    for _ in range(50):
        n = int(rng.integers(3, 30))
        x, y = rng.integers(0, 5, n).astype(float), rng.normal(size=n)
        if x.min() == x.max():
            continue
        assert abs(spearman(x, y) - spearman_reference(x, y)) < 1e-12
        assert np.allclose(average_ranks(x), [np.sum(x < t) + (np.sum(x == t) + 1) / 2 for t in x])
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    # AUC is the Mann-Whitney statistic: (rank sum of positives - n+(n+ + 1)/2) / (n+ n-)
    s, lab = rng.normal(size=40).round(1), rng.random(40) < 0.4
    r = average_ranks(s)
    npos, nneg = lab.sum(), (~lab).sum()
    assert abs(roc_auc(s, lab) - (r[lab].sum() - npos * (npos + 1) / 2) / (npos * nneg)) < 1e-12


def cand(text: str) -> Candidate:
    return Candidate(prompt_id="x", idx=0, text=text, token_ids=(1,), logprobs=np.zeros(1, np.float32),
                     finish="stop")


def test_order_consistency_per_family():
    prompts = [Prompt(id="capitals-000", prompt="?", answer="Oslo"), Prompt(id="antonyms-000", prompt="?", answer="hot"),
               Prompt(id="free", prompt="?")]  # no answer: skipped
    candidates = {"capitals-000": [cand("Oslo"), cand("It is Oslo."), cand("Bergen")],
                  "antonyms-000": [cand("cold"), cand("hot")], "free": [cand("a"), cand("b")]}
    perfect = {"capitals-000": [3.0, 2.0, 1.0], "antonyms-000": [0.0, 1.0], "free": [0.0, 1.0]}
    reversed_ = {k: [-v for v in vals] for k, vals in perfect.items()}
    out = order_consistency(prompts, candidates, {"good": perfect, "bad": reversed_})
    good, bad = out["good"], out["bad"]
    assert good["candidates"] == 5 and good["by_family"]["capitals"]["candidates"] == 3
    assert good["by_family"]["capitals"]["auc"] == 1.0 and good["by_family"]["capitals"]["auc_strict"] == 1.0
    assert good["by_family"]["capitals"]["spearman"] == pytest.approx(1.0)
    assert bad["by_family"]["capitals"]["spearman"] == pytest.approx(-1.0) and bad["by_family"]["capitals"]["auc_strict"] == 0.0
    assert good["spearman_within"] == pytest.approx(1.0) and good["best_vs_worst_correct"] == 1.0
    assert set(good["by_family"]) == {"antonyms", "capitals"}


@pytest.fixture(scope="module")
def tiny(tiny_gguf_f32):
    from pudl.models import Tokenizer, load_student

    return load_student(tiny_gguf_f32, 4, 8.0, ["q_proj", "v_proj"], seed=random.randrange(1000)), Tokenizer(tiny_gguf_f32)


def test_judge_is_the_expected_rating_of_an_unbatched_float64_forward(tiny):
    from pudl.prompts import chat_messages
    from pudl.scoring import JUDGE_TEMPLATE, rating_token_ids

    student, tok = tiny
    p = Prompt(id="capitals-000", prompt="Which city is the capital of Norway?", answer="Oslo")
    q = Prompt(id="antonyms-000", prompt="What is the opposite of hot?", answer="cold")
    items = [(p, "Oslo", t) for t in ("Oslo", "Bergen is the answer, I think, not Oslo", "", "Oslo.")]
    items += [(q, "cold", "cold"), (p, "Oslo", "Oslo")]  # another prompt; a repeated candidate (whole context shared)
    got = judge_scores(student, tok, items, batch_size=3)  # mixed lengths in one padded batch
    ids = rating_token_ids(tok)
    head = np.array(student.head_weight, np.float64)[ids]
    for (pp, a, c), value in zip(items, got):
        ctx = tok.chat_tokens(chat_messages(pp, JUDGE_TEMPLATE.format(prompt=pp.prompt, anchor=a, candidate=c)))
        last = np.array(student.hidden(mx.array([ctx]))[0, -1], np.float64)
        logits = head @ last
        q = np.exp(logits - logits.max())
        q /= q.sum()
        assert abs(value - float(q @ np.arange(1, 6))) < 1e-4
        assert 1.0 <= value <= 5.0


def test_score_groups_gives_every_scorer_for_candidates_and_anchor(tiny):
    student, tok = tiny
    p = Prompt(id="capitals-000", prompt="Capital of Norway?", answer="Oslo")
    ids = tok.answer_tokens("Oslo")[:-1]
    cands = [Candidate("capitals-000", i, t, tuple(tok.answer_tokens(t)[:-1] or ids), np.zeros(1, np.float32), "stop")
             for i, t in enumerate(["Oslo", "Bergen"])]
    (out,) = score_groups(student, tok, [(p, "Oslo", cands)])
    assert set(out) == {"anchor-likelihood", "anchor-gain", "judge", "chrf"}
    assert out["chrf"][0].tolist() == [1.0, 0.0] and out["chrf"][1] == 1.0
    (only,) = score_groups(student, tok, [(p, "Oslo", cands)], scorers=("judge",))
    assert set(only) == {"judge"} and np.allclose(only["judge"][0], out["judge"][0], atol=1e-5)


def test_sft_loss_is_the_token_mean_nll_of_the_anchors():
    rng = np.random.default_rng()
    seqs = [(list(rng.integers(1, 50, 3)), list(rng.integers(1, 50, n))) for n in (2, 5, 1)]
    batch = pack(seqs, multiple=4)
    logps = -rng.random(batch.mask.shape).astype(np.float32) * np.array(batch.mask)
    loss, metrics = LOSSES["sft"](mx.array(logps), TrainBatch(batch, {}, 3), None)
    ref = -np.asarray(logps, np.float64).sum() / (2 + 5 + 1)
    assert abs(float(loss) - ref) < 1e-5 * abs(ref)


def test_sft_batches_hold_only_anchors():
    from pudl.prefs import Completions, sft_batches

    class Tok:
        def chat_tokens(self, messages):
            return [1, 2, 3]

        def answer_tokens(self, text):
            return [ord(c) for c in text] + [0]

    class Cfg:
        epochs, batch_size, max_seq_len = 2, 2, 9

    prompts = {i: Prompt(id=i, prompt="?") for i in ("a", "b", "c")}
    comp = Completions(prompts, {"a": "xy", "b": "xyz", "c": "far too long"}, {}, Tok())
    batches, skipped = sft_batches(list(prompts), comp, Cfg, seed=random.randrange(100))
    assert skipped == 1 and sum(b.n_items for b in batches) == 4  # 2 usable anchors x 2 epochs
    for b in batches:
        assert np.array(b.extras["is_anchor"]).all()


def tiny_recipe(tmp_path: Path, model: Path, train: str) -> Path:
    """A tiny-model run recipe (3 prompts, 2 held out, K = 2); `train`: extra lines of its [train] section."""
    return recipe_files.write_recipe(tmp_path, {
        "run": {"out": tmp_path / "run"}, "student": {"model": model, "n_ctx": 256, "threads": 1},
        "sample": {"k": 2, "max_tokens": 6}, "train": {"epochs": 1, "batch_size": 2},
        "lora": {"rank": 4, "targets": ["q_proj", "v_proj"]}, "eval": {"max_tokens": 4}},
        prompts=3, eval_prompts=2, extra_toml=f"[train]\n{train}")


def count(db: Path, sql: str) -> int:
    with sqlite3.connect(db) as c:
        return c.execute(sql).fetchone()[0]


def test_sft_warmup_then_dpo_is_one_recipe_and_reruns_from_the_cache(tmp_path, tiny_gguf):
    recipe = tiny_recipe(tmp_path, tiny_gguf, 'algo = "dpo"\nwarmup_sft_epochs = 1')
    recipe.write_text(recipe.read_text() + '[rank]\nalso_score = ["anchor-gain", "judge", "chrf"]\n')
    out = pudl("run", str(recipe), "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stages"]["0"] == {"train": "computed"} and summary["stages"]["1"]["train"] == "computed"
    assert summary["tokens_sampled"] > 0 and (run / "round-0" / "adapter.gguf").exists()
    db = run / "cache.sqlite"
    assert count(db, "SELECT COUNT(DISTINCT scorer) FROM scores") == 4
    assert set(summary["per_round"][-1]["ranker"]["judge"]) >= {"auc", "auc_strict", "spearman", "by_family"}
    again = pudl("run", str(recipe), "--quiet")
    assert again.returncode == 0, again.stderr[-3000:]
    stages = json.loads((run / "summary.json").read_text())["stages"]
    assert stages["0"]["train"] == "reused" and set(stages["1"].values()) == {"reused"}
    # a changed warm-up invalidates what was sampled from it
    changed = pudl("run", str(recipe), "--quiet", "--set", "train.warmup_sft_epochs=2")
    assert changed.returncode == 0, changed.stderr[-3000:]
    stages = json.loads((run / "summary.json").read_text())["stages"]
    assert stages["0"]["train"] == "recomputed" and stages["1"]["sample"] == "recomputed"


@pytest.mark.parametrize("algo", ["ldl", "dpo"])
def test_rank_anchor_invalidates_listwise_preferences_only(tmp_path, tiny_gguf, algo):
    """Listwise groups change with rank.anchor, so their prefs and training are recomputed; DPO pairs do not
    depend on it, so a DPO run reuses every stage."""
    recipe = tiny_recipe(tmp_path, tiny_gguf, f'algo = "{algo}"')
    first = pudl("run", str(recipe), "--quiet")  # rank.anchor = "top" (the default)
    assert first.returncode == 0, first.stderr[-3000:]
    changed = pudl("run", str(recipe), "--quiet", "--set", "rank.anchor=scored")
    assert changed.returncode == 0, changed.stderr[-3000:]
    stages = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]["1"]
    assert stages["sample"] == stages["score"] == "reused"
    want = "recomputed" if algo == "ldl" else "reused"
    assert stages["prefs"] == stages["train"] == want, stages
