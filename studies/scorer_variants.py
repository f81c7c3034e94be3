"""Rescore a run's cached candidates under variants of the anchor-likelihood scorer (issue 7).

    python studies/scorer_variants.py CACHE.sqlite PROMPTS.jsonl [--json OUT.json]
    python studies/scorer_variants.py CACHE.sqlite PROMPTS.jsonl --sample recipes/demo.toml  # sample first

Every variant is a way of showing the anchor (the context the candidate is scored in) and a way of turning the
candidate's per-token log-probs into one number. The per-token log-probs of each context are computed once on
the demo's base student (SmolLM2-135M in MLX, no adapter) and every aggregation is read off them, so variants differ only in what
they claim to differ in. Prints, per variant, the pooled ROC AUC against lenient / strict correctness, the mean
within-group Spearman, and the lenient AUC per task family (`pudl.agreement.order_consistency`).

`--sample RECIPE` first samples the prompts that the cache has no round-1 candidates for, with pudl's sampler
and the recipe's [sample] settings (seed = run.seed), and stores them with the task suite's reference answers as
anchors (the demo's `tasks` teacher): a second, independent candidate set for the held-out prompts.

`--adapter ROUND_DIR` (e.g. runs/demo/round-1) uses a trained student instead of the base one, for sampling
(llama.cpp with the round's adapter.gguf) and for scoring (MLX with its adapter.safetensors; the LoRA settings
come from the run's recipe.toml): how well does the student rank after training, on prompts it never saw?
Use a fresh cache for it, as the candidates differ from the base student's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pudl.agreement import order_consistency
from pudl.cache import Cache
from pudl.domain import Candidate, SamplingParams
from pudl.models import Tokenizer, load_student, resolve_model_path
from pudl.prompts import Prompt, chat_messages, load_prompts
from pudl.scoring import anchored_messages, chrf
from pudl.sequences import completion_logprobs

from order_consistency import print_table  # studies/ is the script's own directory on sys.path

AGAIN = "Answer again."


def _with_system(prompt: Prompt, text: str) -> list[dict]:
    system = text if not prompt.system else f"{prompt.system}\n\n{text}"
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt.prompt}]


# How the anchor is shown when the candidate is scored: (prompt, anchor) -> chat messages up to the reply.
CONTEXTS = {
    "plain": lambda p, a: chat_messages(p),  # no anchor: the denominator of the gain variants
    "user-ref": anchored_messages,  # pudl's REFERENCE_TEMPLATE in the user turn
    "prev-turn-again": lambda p, a: chat_messages(p) + [{"role": "assistant", "content": a},
                                                        {"role": "user", "content": AGAIN}],
    "prev-turn-repeat": lambda p, a: chat_messages(p) + [{"role": "assistant", "content": a},
                                                         {"role": "user", "content": p.prompt}],
    "system-ref": lambda p, a: _with_system(p, f"A reference answer to the user's request is: {a}"),
    "minimal": lambda p, a: chat_messages(p, f"{p.prompt}\n\nAnswer: {a}"),
}


def reverse_messages(prompt: Prompt, candidate: str) -> list[dict]:
    """The other direction: the candidate as the student's previous reply, then the anchor is scored as the
    answer given again (log p(anchor | prompt, candidate): does the candidate lead to the anchor?)."""
    return chat_messages(prompt) + [{"role": "assistant", "content": candidate}, {"role": "user", "content": AGAIN}]


def token_logprobs(student, tokenizer, prompts, anchors, candidates, contexts, batch_size=8, adapter=False):
    """Per-token log-probs: forward[context][pid] = K + 1 arrays (the candidates' tokens in that context, then
    the anchor's own tokens in it); reverse[pid] = K arrays (the anchor's tokens after each candidate), with the
    anchor as a reply to the bare prompt last (the reverse direction's baseline). `contexts` names the forward
    contexts to compute ("plain" is always computed), and "reverse" to compute the reverse direction."""
    forward = {}
    for name in ["plain"] + [c for c in contexts if c in CONTEXTS and c != "plain"]:
        seqs, owners = [], []
        for p in prompts:
            ctx = tokenizer.chat_tokens(CONTEXTS[name](p, anchors[p.id]))
            for ids in [list(c.token_ids) for c in candidates[p.id]] + [tokenizer.answer_tokens(anchors[p.id])]:
                seqs.append((ctx, ids))
                owners.append(p.id)
        out = completion_logprobs(student, seqs, batch_size, adapter=adapter)
        forward[name] = {p.id: [x for x, o in zip(out, owners) if o == p.id] for p in prompts}
    reverse = {}
    if "reverse" in contexts:
        seqs, owners = [], []
        for p in prompts:
            answer = tokenizer.answer_tokens(anchors[p.id])
            for c in candidates[p.id]:
                seqs.append((tokenizer.chat_tokens(reverse_messages(p, c.text)), answer))
                owners.append(p.id)
            seqs.append((tokenizer.chat_tokens(chat_messages(p)), answer))
            owners.append(p.id)
        out = completion_logprobs(student, seqs, batch_size, adapter=adapter)
        reverse = {p.id: [x for x, o in zip(out, owners) if o == p.id] for p in prompts}
    return forward, reverse


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else 0.0


def aggregations(forward, reverse, eos_id: int, candidates) -> dict[str, dict[str, list[float]]]:
    """variant name -> prompt id -> K scores."""
    out: dict[str, dict[str, list[float]]] = {}

    def put(name, pid, values):
        out.setdefault(name, {})[pid] = [float(v) for v in values]

    for pid, cands in candidates.items():
        plain = forward["plain"][pid][:-1]
        for ctx, by_prompt in forward.items():
            lw, anchor = by_prompt[pid][:-1], by_prompt[pid][-1]
            means = np.array([_mean(x) for x in lw])
            put(f"{ctx} mean", pid, means)
            if ctx == "plain":
                continue
            # Per-prompt offsets: the same ranking within a prompt, another scale across prompts.
            put(f"{ctx} mean - group mean", pid, means - means.mean())
            put(f"{ctx} mean - anchor mean", pid, means - _mean(anchor))
            put(f"{ctx} sum", pid, [x.sum() for x in lw])
            put(f"{ctx} sum/len^0.5", pid, [x.sum() / max(len(x), 1) ** 0.5 for x in lw])
            for n in (4, 8):
                put(f"{ctx} mean first {n}", pid, [_mean(x[:n]) for x in lw])
            # Without the end-of-turn token: a truncated candidate has none, a finished one is judged on it too.
            put(f"{ctx} mean no-eos", pid, [_mean(x[:-1] if int(c.token_ids[-1]) == eos_id else x)
                                            for x, c in zip(lw, cands)])
            put(f"{ctx} min", pid, [x.min() if len(x) else 0.0 for x in lw])
            gains = [w - q for w, q in zip(lw, plain)]
            put(f"{ctx} gain mean", pid, [_mean(g) for g in gains])
            put(f"{ctx} gain sum", pid, [g.sum() for g in gains])
            put(f"{ctx} gain max", pid, [g.max() if len(g) else 0.0 for g in gains])
        if reverse:
            rows, baseline = reverse[pid][:-1], reverse[pid][-1]
            put("reverse sum", pid, [x.sum() for x in rows])
            put("reverse mean", pid, [_mean(x) for x in rows])
            put("reverse gain", pid, [x.sum() - baseline.sum() for x in rows])
    return out


def ensure_candidates(cache: Cache, prompts: list[Prompt], recipe_path: str, tokenizer, model_path, adapter_gguf=None):
    """Sample (and store, with the suite's reference answers as anchors) the prompts without round-1 candidates."""
    from pudl.recipe import load_recipe
    from pudl.sampler import Sampler

    recipe = load_recipe(recipe_path)
    todo = [p for p in prompts if p.id not in cache.sampled_prompt_ids(1)]
    cache.put_prompts(prompts)
    for p in prompts:
        cache.put_anchor(p.id, p.answer, "tasks")
    if not todo:
        return
    sampler = Sampler(model_path, tokenizer, adapter_gguf, n_ctx=recipe.student.n_ctx, threads=recipe.student.threads)
    started = time.time()
    try:
        sampler.sample_all(todo, SamplingParams.of(recipe.sample), recipe.run.seed, 1, lambda p, c: cache.put_candidates(1, c))
    finally:
        sampler.close()
    print(f"sampled {len(todo)} prompts x K={recipe.sample.k} in {time.time() - started:.0f} s")


def save_tokens(path: str, forward: dict, reverse: dict):
    """The per-token log-probs as an .npz (keys f<TAB>context<TAB>prompt<TAB>i and r<TAB>prompt<TAB>i)."""
    arrays = {f"f\t{c}\t{pid}\t{i}": a for c, by in forward.items() for pid, xs in by.items() for i, a in enumerate(xs)}
    arrays.update({f"r\t{pid}\t{i}": a for pid, xs in reverse.items() for i, a in enumerate(xs)})
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_tokens(path: str) -> tuple[dict, dict]:
    forward: dict = {}
    reverse: dict = {}
    with np.load(path) as data:
        for key in sorted(data.files, key=lambda k: (k.rsplit("\t", 1)[0], int(k.rsplit("\t", 1)[1]))):
            kind, *where, _ = key.split("\t")
            if kind == "f":
                forward.setdefault(where[0], {}).setdefault(where[1], []).append(data[key])
            else:
                reverse.setdefault(where[0], []).append(data[key])
    return forward, reverse


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cache")
    ap.add_argument("prompts")
    ap.add_argument("--sample", metavar="RECIPE", help="sample missing prompts first with this recipe's [sample]")
    ap.add_argument("--json", help="write every variant's figures here")
    ap.add_argument("--tokens", help="keep the per-token log-probs in this .npz and reuse them when it exists "
                    "(same cache, prompts and contexts): new aggregations cost nothing")
    ap.add_argument("--contexts", default=",".join([*CONTEXTS, "reverse"]),
                    help="comma-separated forward contexts to score (plain always), and 'reverse'")
    ap.add_argument("--adapter", metavar="ROUND_DIR", help="sample and score with this trained round's LoRA")
    args = ap.parse_args(argv)
    adapter = Path(args.adapter) if args.adapter else None

    model_path = resolve_model_path("smollm2-135m")
    tokenizer = Tokenizer(model_path)
    prompts = [p for p in load_prompts(args.prompts) if p.answer is not None]
    # Read-only unless sampling into it: a finished run's cache is left byte for byte.
    cache = Cache(args.cache) if args.sample else Cache.open_read_only(args.cache)
    if args.sample:
        ensure_candidates(cache, prompts, args.sample, tokenizer, model_path,
                          adapter / "adapter.gguf" if adapter else None)
    candidates: dict[str, list[Candidate]] = cache.candidates(1)
    anchors = cache.anchors()
    prompts = [p for p in prompts if p.id in candidates and p.id in anchors]
    candidates = {p.id: candidates[p.id] for p in prompts}

    started = time.time()
    contexts = args.contexts.split(",")
    unknown = set(contexts) - set(CONTEXTS) - {"reverse"}
    if unknown:
        ap.error(f"unknown context(s) {', '.join(sorted(unknown))} (choose from {', '.join([*CONTEXTS, 'reverse'])})")
    if args.tokens and Path(args.tokens).exists():
        forward, reverse = load_tokens(args.tokens)
    else:
        if adapter:
            import tomllib

            from pudl.adapters import load_adapter

            lora = tomllib.loads((adapter.parent / "recipe.toml").read_text())["lora"]  # the run's LoRA settings
            student = load_student(model_path, lora["rank"], lora["alpha"], lora["targets"])
            load_adapter(student, adapter / "adapter.safetensors")
        else:
            student = load_student(model_path, 1, 1.0, ["q_proj"])  # the adapter is switched off while scoring
        forward, reverse = token_logprobs(student, tokenizer, prompts, anchors, candidates, contexts,
                                          adapter=adapter is not None)
        if args.tokens:
            save_tokens(args.tokens, forward, reverse)
    print(f"scored {len(prompts)} prompts in {', '.join(forward)}{' and reverse' if reverse else ''}: "
          f"{time.time() - started:.0f} s")
    scores = aggregations(forward, reverse, tokenizer.eos_id, candidates)
    # Model-free reference rows: chrF to the anchor (pudl's lexical scorer) and the candidate's shortness.
    scores["chrf (no model)"] = {p.id: [chrf(c.text, anchors[p.id]) for c in candidates[p.id]] for p in prompts}
    scores["-length (no model)"] = {p.id: [-len(c.token_ids) for c in candidates[p.id]] for p in prompts}
    result = order_consistency(prompts, candidates, scores)

    print(f"{len(prompts)} prompts")
    print_table(result, "variant")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
