import numpy as np

from pudl.domain import ANCHOR_IDX, Candidate
from pudl.agreement import roc_auc
from pudl.pairs import group_status, make_pairs, rank


def cands(*texts):
    return [Candidate("p", i, t, np.array([1, 2], np.int32), np.zeros(2, np.float32), "stop") for i, t in enumerate(texts)]


def test_rank_is_stable_on_ties():
    assert rank(np.array([0.5, 0.9, 0.5, -1.0])).tolist() == [1, 0, 2, 3]


def test_best_vs_worst_and_anchor_vs_worst():
    c = cands("Paris.", "The capital is Paris", "London")
    s = np.array([-0.5, -0.2, -3.0])
    pairs = make_pairs("p", "Paris", c, s, "both", 1e-6)
    kinds = {p.kind: p for p in pairs}
    assert (kinds["best-vs-worst"].chosen_idx, kinds["best-vs-worst"].rejected_idx) == (1, 2)
    assert abs(kinds["best-vs-worst"].margin - 2.8) < 1e-9
    assert (kinds["anchor-vs-worst"].chosen_idx, kinds["anchor-vs-worst"].rejected_idx) == (ANCHOR_IDX, 2)
    assert [p.kind for p in make_pairs("p", "Paris", c, s, "best-vs-worst", 1e-6)] == ["best-vs-worst"]
    assert [p.kind for p in make_pairs("p", "Paris", c, s, "anchor-vs-worst", 1e-6)] == ["anchor-vs-worst"]


def test_ties_all_equal_empty_and_single_groups_give_no_candidate_pair():
    same = cands("Paris", "Paris")
    assert group_status(np.array([-1.0, -1.0]), same, 1e-6) == "all-equal"
    assert [p.kind for p in make_pairs("p", "Rome", same, np.array([-1.0, -1.0]), "both", 1e-6)] == ["anchor-vs-worst"]
    tie = cands("a", "b")
    assert group_status(np.array([-1.0, -1.0]), tie, 1e-6) == "all-equal"
    empty = cands("", "  ")
    assert group_status(np.array([-1.0, -2.0]), empty, 1e-6) == "all-empty"
    assert group_status(np.array([-1.0]), cands("x"), 1e-6) == "single"
    assert make_pairs("p", "x", cands("x"), np.array([-1.0]), "both", 1e-6) == []  # worst already says the anchor


def test_empty_candidate_is_never_chosen():
    c = cands("", "Paris", "Rome")
    pairs = make_pairs("p", "Paris", c, np.array([5.0, -1.0, -2.0]), "best-vs-worst", 1e-6)
    assert pairs[0].chosen_idx == 1 and pairs[0].rejected_idx == 2


def test_roc_auc_against_bruteforce():
    rng = np.random.default_rng()
    s = np.round(rng.normal(size=40), 1)  # rounding makes ties
    y = rng.random(40) < 0.4
    brute = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a in s[y] for b in s[~y]])
    assert abs(roc_auc(s, y) - brute) < 1e-12
    assert np.isnan(roc_auc([1.0, 2.0], [True, True]))


def test_ranker_agreement_counts_correct_candidates():
    from pudl.agreement import order_consistency
    from pudl.prompts import Prompt

    prompts = [Prompt("a", "capital of France?", answer="Paris"), Prompt("b", "no answer")]
    c = {"a": cands("Paris.", "London", "It is Paris"), "b": cands("x", "y")}
    good = {"a": [-0.1, -5.0, -0.3], "b": [0.0, 1.0]}
    bad = {"a": [-5.0, -0.1, -0.3], "b": [0.0, 1.0]}
    out = order_consistency(prompts, c, {"good": good, "bad": bad})
    assert out["good"]["auc"] == 1.0 and out["good"]["best_vs_worst_correct"] == 1.0
    assert out["bad"]["auc"] == 0.0 and out["bad"]["best_vs_worst_correct"] == 0.0
    assert out["good"]["candidates"] == 3 and abs(out["good"]["correct_fraction"] - 2 / 3) < 1e-12


def test_anchor_on_top_of_its_group():
    from pudl.prefs import anchor_on_top, make_groups
    from pudl.prompts import Prompt

    rng = np.random.default_rng()
    prompts = [Prompt(f"p{i}", "q") for i in range(4)]
    scores = {p.id: list(rng.normal(size=3)) for p in prompts}
    scores["p3"] = [0.5, 0.5, 0.5]  # all equal: the anchor still sits above, by min_gap
    own = {p.id: -100.0 for p in prompts}  # an anchor the scorer ranks last
    scored = make_groups(prompts, scores, own, include_anchor=True)
    top = make_groups(prompts, scores, own, include_anchor=True, anchor="top", min_gap=1e-3)
    for g_scored, g_top in zip(scored, top):
        assert g_scored.members == g_top.members and g_top.members[-1] == ANCHOR_IDX
        assert g_scored.scores[-1] == -100.0 and g_scored.scores[:-1] == g_top.scores[:-1]
        cands = np.array(g_top.scores[:-1])
        spread = max(cands.max() - cands.min(), 1e-3)
        assert np.isclose(g_top.scores[-1], cands.max() + spread) and g_top.scores[-1] > cands.max()
        assert list(rank(np.array(g_top.scores)))[-1] == 0  # ranked first (rank 0 = best)
    assert anchor_on_top([0.5, 0.5]) == 0.5 + 1e-6
    assert make_groups(prompts, scores, own, include_anchor=False, anchor="top")[0].members == (0, 1, 2)


def test_near_anchor_gate_reads_candidates_as_unlabeled():
    rng = np.random.default_rng()
    anchor_score = float(rng.normal(-0.5, 0.2))
    c = cands("Paris.", "The capital is Paris", "Lyon")
    off = make_pairs("p", "Paris", c, np.array([anchor_score - 0.3, anchor_score - 0.1, anchor_score - 3.0]), "both",
                     1e-6, anchor_score, near_anchor=0.0)
    assert {p.kind for p in off} == {"best-vs-worst", "anchor-vs-worst"}  # off: as without the gate
    # the best is near the anchor: it may be chosen; the worst is far: it may be rejected
    near = make_pairs("p", "Paris", c, np.array([anchor_score - 0.3, anchor_score - 0.1, anchor_score - 3.0]),
                      "both", 1e-6, anchor_score, near_anchor=0.5)
    assert {(p.kind, p.chosen_idx, p.rejected_idx) for p in near} == {("best-vs-worst", 1, 2),
                                                                      ("anchor-vs-worst", ANCHOR_IDX, 2)}
    # no candidate is near the anchor: none is chosen, only the anchor is preferred
    far = make_pairs("p", "Paris", c, np.array([anchor_score - 2.0, anchor_score - 1.0, anchor_score - 3.0]),
                     "both", 1e-6, anchor_score, near_anchor=0.5)
    assert [(p.kind, p.rejected_idx) for p in far] == [("anchor-vs-worst", 2)]
    # even the worst is near the anchor: nothing is known to be worse, so no pair at all
    assert make_pairs("p", "Paris", c, np.array([anchor_score, anchor_score - 0.1, anchor_score - 0.4]), "both",
                      1e-6, anchor_score, near_anchor=0.5) == []
