"""Where the batched sampler's time goes: seconds per llama.cpp decode step against the tokens in it, and the
same job with the GGUF's weights in other llama.cpp types (a diagnostic beside `pudl bench sampling`).

For each weight type (f32 = pudl's default on the CPU: the Q4_1 blocks dequantized exactly; f16, bf16, q8_0
requantized from them; q4_1 as shipped) it samples the sampling bench's job (the first P prompts of the task
suite, K candidates, max_tokens) `repeats` times in one process and reports the best tokens/s, then fits
step seconds = fixed + per_token x tokens over every step of the f32 runs (least squares; the first step, the
prompts' prefill, included), and compares greedy replies with f32's (identical replies, largest log-prob gap
on the shared prefix).
Run: `python -m pudl.bench.sampling_steps [--prompts 8 --k 4 --max-tokens 32 --repeats 3 --types f32,f16,...]`;
the last line of stdout is one JSON object.
`--scan` instead times single decode steps (`scan`): n sequences advancing one token each while the KV cache
holds C cells, in llama.cpp's unified cache and with a cache stream per sequence; `--layouts` samples the job
with each `sample.kv_cache` layout (`layouts`); `--floor` replays the job's own decodes on an emptied cache
with each weight type, the fastest llama.cpp's kernels could run them, beside the sequential peer (`floor`).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pudl.atomic_files import dumps
from pudl.bench import common
from pudl.domain import SamplingParams

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_1")


def _requantized(path: Path, kind: str, directory: Path) -> Path:
    import llama_cpp

    ftype = {"f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16, "bf16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16,
             "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[kind]
    out = directory / f"{kind}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.pure = ftype, True, True
    if llama_cpp.llama_model_quantize(str(path).encode(), str(out).encode(), ctypes.byref(params)):
        raise RuntimeError(f"llama.cpp could not write {kind} weights")
    return out


def run(prompts: int = 8, k: int = 4, max_tokens: int = 32, repeats: int = 3, types=TYPES, threads: int = 0,
        measure: bool = True) -> dict:
    """Sample the job with each weight type; `measure`: time the machine's sgemm too (off for smoke tests)."""
    from pudl.models import Tokenizer, resolve_model_path
    from pudl.prompts import load_prompts
    from pudl.recipe import SampleConfig
    from pudl.sampler import Sampler

    from pudl.bench.sampling import TASKS

    path = resolve_model_path("smollm2-135m")
    tok = Tokenizer(path)
    jobs = load_prompts(TASKS)[:prompts]
    cfg, greedy = SamplingParams.of(SampleConfig(k=k, max_tokens=max_tokens)), SamplingParams.greedy(max_tokens)
    threads = threads or os.cpu_count()
    result = {"prompts": prompts, "k": k, "max_tokens": max_tokens, "repeats": repeats, "threads": threads,
              "machine": common.machine(measure), "tok_s": {}, "greedy_vs_f32": {}}
    steps = []  # (tokens in the batch, seconds) of every f32 decode
    replies = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in types:
            if kind in ("f32", "q4_1"):
                sampler = Sampler(path, tok, threads=threads, float_weights=kind == "f32")
            else:
                sampler = Sampler(_requantized(path, kind, Path(tmp)), tok, threads=threads, float_weights=False)
            if kind == "f32":
                sampler.on_decode = lambda n, n_out, seconds: steps.append((n, seconds))
            rates = []
            for r in range(repeats):
                counts = []
                t0 = time.perf_counter()
                sampler.sample_all(jobs, cfg, r, 0, lambda p, c: counts.extend(len(x.token_ids) for x in c))
                rates.append(sum(counts) / (time.perf_counter() - t0))
            result["tok_s"][kind] = max(rates)
            got = {}
            sampler.sample_all(jobs, greedy, 0, 0, lambda p, c: got.__setitem__(p.id, c[0]))
            replies[kind] = got
            sampler.close()
    if "f32" in replies:
        for kind, got in replies.items():
            same, gap = 0, 0.0
            for pid, ref in replies["f32"].items():
                a, b = ref.token_ids.tolist(), got[pid].token_ids.tolist()
                n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                same += a == b
                if n:
                    gap = max(gap, float(np.abs(ref.logprobs[:n] - got[pid].logprobs[:n]).max()))
            result["greedy_vs_f32"][kind] = {"identical": same, "of": len(replies["f32"]), "max_logprob_gap": gap}
        n, sec = np.array(steps, float).T
        fixed, per_token = np.linalg.lstsq(np.stack([np.ones_like(n), n], 1), sec, rcond=None)[0]
        result["f32_step_fit"] = {"fixed_ms": 1e3 * fixed, "per_token_ms": 1e3 * per_token, "steps": len(steps),
                                  "mean_tokens_per_step": float(n.mean()),
                                  "fixed_share_of_decode": float(fixed * len(n) / sec.sum())}
    result["machine"]["load_after"] = common.load_average()
    return result


def scan(tokens=(1, 8, 16, 32, 64), cells=(256, 1024, 2700), sequences: int = 64, reps: int = 5,
         threads: int = 0, measure: bool = True) -> dict:
    """Milliseconds of one decode step (one new token for each of n sequences, best of `reps`) on the float32
    weights while `sequences` sequences hold C KV cells in all (C / sequences each): in one unified cache
    (`kv_unified`, pudl's layout: every token attends over all C cells, the others masked) and in a stream per
    sequence (a token attends over its own sequence's cells). The streams are also timed for n/2 sequences
    whose ids are every other one: llama.cpp then splits the step into one batch per run of consecutive ids."""
    import llama_cpp

    from pudl.models import Tokenizer, resolve_model_path
    from pudl.sampler import Sampler

    threads = threads or os.cpu_count()
    if max(tokens) > sequences or min(cells) < sequences:
        raise ValueError("need max(tokens) <= sequences <= min(cells)")
    path = resolve_model_path("smollm2-135m")
    sampler = Sampler(path, Tokenizer(path), threads=threads)  # its contexts: float32 weights, exact attention
    rng = np.random.default_rng(0)
    result = {"tokens": list(tokens), "cells": list(cells), "sequences": sequences, "threads": threads,
              "machine": common.machine(measure), "unified_ms": {}, "streams_ms": {}, "streams_every_other_ms": {}}
    try:
        for layout in ("unified", "streams"):
            for c in cells:
                per = c // sequences
                # Room for the step's token: one more cell per sequence (a stream's size, or n_ctx in all).
                sampler.prepare(sequences, layout == "streams",
                                 per + 1 if layout == "streams" else (per + 1) * sequences, 512)
                batch = sampler.batch
                for q in range(sequences):
                    batch.clear()
                    batch.add(rng.integers(100, 40000, per).tolist(), 0, q, False)
                    sampler.decode(0)

                def step_ms(ids, per=per, batch=batch):
                    best = float("inf")
                    for _ in range(reps):
                        batch.clear()
                        for q in ids:
                            batch.add([1000 + q], per, q, True)
                        t = time.perf_counter()
                        sampler.decode(len(ids))
                        best = min(best, time.perf_counter() - t)
                        for q in ids:
                            llama_cpp.llama_memory_seq_rm(sampler.memory, q, per, -1)
                    return 1e3 * best

                result[f"{layout}_ms"][c] = {n: step_ms(range(n)) for n in tokens}
                if layout == "streams":
                    result["streams_every_other_ms"][c] = {
                        n // 2: step_ms(range(0, n, 2)) for n in tokens if n >= 2}
    finally:
        sampler.close()
    result["machine"]["load_after"] = common.load_average()
    return result


def layouts(prompts: int = 8, k: int = 4, max_tokens: int = 32, repeats: int = 3, threads: int = 0,
            measure: bool = True) -> dict:
    """Tokens/s of the job with the sampler's unified KV cache and with a stream per sequence, the two in one
    process in rotating order with the same seeds, and which one `kv_cache = "auto"` picks for it."""
    from pudl.models import Tokenizer, resolve_model_path
    from pudl.prompts import load_prompts
    from pudl.recipe import SampleConfig
    from pudl.sampler import Sampler

    from pudl.bench.sampling import TASKS

    path = resolve_model_path("smollm2-135m")
    tok = Tokenizer(path)
    jobs = load_prompts(TASKS)[:prompts]
    cfg = SamplingParams.of(SampleConfig(k=k, max_tokens=max_tokens))
    threads = threads or os.cpu_count()
    names = ("unified", "streams", "auto")
    samplers = {name: Sampler(path, tok, threads=threads, kv_cache=name) for name in names}
    rates = {name: [] for name in names}
    try:
        for s in samplers.values():  # warm-up: the context is sized to the job
            s.sample_all(jobs, cfg, 10_000, 0, lambda p, c: None)
        for r in range(repeats):
            for name in names[r % 3:] + names[: r % 3]:
                counts = []
                t = time.perf_counter()
                samplers[name].sample_all(jobs, cfg, r, 0, lambda p, c: counts.extend(len(x.token_ids) for x in c))
                rates[name].append(sum(counts) / (time.perf_counter() - t))
        picked = "streams" if samplers["auto"].streams else "unified"
    finally:
        for s in samplers.values():
            s.close()
    return {"prompts": len(jobs), "k": k, "max_tokens": max_tokens, "repeats": repeats, "threads": threads,
            "machine": common.machine(measure), "tok_s": rates,
            "median_tok_s": {n: float(np.median(v)) for n, v in rates.items()}, "auto_picks": picked,
            "streams_over_unified": float(np.median(rates["streams"]) / np.median(rates["unified"]))}


def floor(prompts: int = 8, k: int = 4, max_tokens: int = 32, repeats: int = 3, types=TYPES, threads: int = 0,
          measure: bool = True) -> dict:
    """The fastest llama.cpp could run the job's own decodes: sample the job with the f32 sampler (`repeats`
    seeds, recording every llama_decode's tokens and outputs), then replay each seed's decodes with each
    weight type on an emptied cache (each token attends over llama.cpp's minimum of 256 cells: no cells of
    other sequences, no sampling between decodes) and sum the best of `repeats` times per seed. A step costs
    a fixed part plus a part per token, so no schedule of the same replies needs fewer tokens or fewer steps
    than the longest reply: the replay estimates the most any batching over llama.cpp's kernels could reach
    (an estimate, not a bound: it is timed on this machine, noise included). The sampling bench's sequential
    peer (create_chat_completion) runs in the same process after each seed's job, for the ratio (best of
    `repeats` each). The weight types replay each decode in rotating order, so the machine's drift hits them
    alike."""
    import llama_cpp

    from pudl.models import Tokenizer, resolve_model_path
    from pudl.prompts import load_prompts
    from pudl.recipe import SampleConfig
    from pudl.sampler import Sampler

    from pudl.bench.sampling import TASKS, _peer

    path = resolve_model_path("smollm2-135m")
    tok = Tokenizer(path)
    jobs = load_prompts(TASKS)[:prompts]
    cfg = SamplingParams.of(SampleConfig(k=k, max_tokens=max_tokens))
    threads = threads or os.cpu_count()
    result = {"prompts": prompts, "k": k, "max_tokens": max_tokens, "repeats": repeats, "threads": threads,
              "machine": common.machine(measure)}
    sampler = Sampler(path, tok, threads=threads, kv_cache="unified")
    record, rates = [], []

    def on_decode(*decode):
        if record:  # not during the warm-up
            record[-1]["decodes"].append(decode)
    sampler.on_decode = on_decode
    try:
        sampler.sample_all(jobs, cfg, 10_000, 0, lambda p, c: None)  # warm-up: the context is sized to the job
        for seed in range(repeats):  # the job and the sequential peer alternate: the machine's drift hits both
            counts = []
            record.append({"seed": seed, "decodes": []})
            t = time.perf_counter()
            sampler.sample_all(jobs, cfg, seed, 0, lambda p, c: counts.extend(len(x.token_ids) for x in c))
            record[-1].update(tokens=sum(counts), seconds=time.perf_counter() - t)
            rates.append(_peer("sequential", prompts, k, max_tokens, threads)["tok_s"])
    finally:
        sampler.close()
    result["jobs"] = [{"seed": j["seed"], "tokens": j["tokens"], "seconds": j["seconds"],
                       "decode_seconds": sum(d[2] for d in j["decodes"]),
                       "decodes": [d[:2] for d in j["decodes"]]} for j in record]
    result["pudl_runs_tok_s"] = [j["tokens"] / j["seconds"] for j in record]
    result["pudl_tok_s"] = max(result["pudl_runs_tok_s"])
    largest = max(n for j in record for n, _, _ in j["decodes"])
    n_seq = max(n_out for j in record for _, n_out, _ in j["decodes"]) + 1
    rng = np.random.default_rng(0)

    def replay(s, n, n_out):
        """n tokens: one per sequence for a step (all outputs), else one run (the last n_out out)."""
        s.batch.clear()
        ids = rng.integers(100, 40000, n).tolist()
        if n_out == n:
            for q, token in enumerate(ids):
                s.batch.add([token], 0, q, True)
        else:
            if n > n_out:
                s.batch.add(ids[: n - n_out], 0, 0, False)
            for i in range(n - n_out, n):
                s.batch.add([ids[i]], i, 0, True)
        t = time.perf_counter()
        s.decode(n_out)
        seconds = time.perf_counter() - t
        llama_cpp.llama_memory_clear(s.memory, False)
        return seconds

    samplers = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for kind in types:
                weights = path if kind in ("f32", "q4_1") else _requantized(path, kind, Path(tmp))
                samplers[kind] = Sampler(weights, tok, threads=threads, float_weights=kind == "f32",
                                         kv_cache="unified")
                samplers[kind].prepare(n_seq, False, 512, largest)
            seconds = {kind: [0.0] * len(record) for kind in types}
            for i, job in enumerate(record):
                for n, n_out, _ in job["decodes"]:  # each decode: the types in rotating order, best of repeats
                    best = {kind: float("inf") for kind in types}
                    for r in range(repeats):
                        for kind in types[r % len(types):] + types[: r % len(types)]:
                            best[kind] = min(best[kind], replay(samplers[kind], n, n_out))
                    for kind in types:
                        seconds[kind][i] += best[kind]
        finally:
            for s in samplers.values():
                s.close()
    result["floor_tok_s"] = {kind: max(j["tokens"] / sec for j, sec in zip(record, seconds[kind]))
                             for kind in types}
    result["floor_over_pudl"] = {kind: rate / result["pudl_tok_s"] for kind, rate in result["floor_tok_s"].items()}
    result["sequential_tok_s"], result["sequential_runs_tok_s"] = max(rates), rates
    result["ratio_vs_sequential"] = result["pudl_tok_s"] / result["sequential_tok_s"]
    result["median_ratio_vs_sequential"] = float(np.median(result["pudl_runs_tok_s"]) / np.median(rates))
    result["floor_ratio_vs_sequential"] = {kind: rate / result["sequential_tok_s"]
                                           for kind, rate in result["floor_tok_s"].items()}
    result["machine"]["load_after"] = common.load_average()
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--scan", action="store_true", help="time single decode steps by tokens x KV cells instead")
    ap.add_argument("--layouts", action="store_true", help="sample the job with each KV-cache layout instead")
    ap.add_argument("--floor", action="store_true",
                    help="replay the job's decodes on an emptied cache with each weight type instead: the fastest "
                         "llama.cpp could run them, against the sequential peer")
    a = ap.parse_args(argv)
    if a.floor:
        result = floor(a.prompts, a.k, a.max_tokens, a.repeats, a.types.split(","), a.threads)
        print(f"{result['prompts']} prompts x K={result['k']}, {result['max_tokens']} new tokens: pudl "
              f"{result['pudl_tok_s']:.1f} tok/s, sequential {result['sequential_tok_s']:.1f} "
              f"({result['ratio_vs_sequential']:.2f}x)")
        for kind, rate in result["floor_tok_s"].items():
            print(f"{kind:>5} replay floor {rate:7.1f} tok/s = {result['floor_over_pudl'][kind]:.2f}x pudl's job, "
                  f"{result['floor_ratio_vs_sequential'][kind]:.2f}x sequential")
        print(dumps(result))
        return
    if a.layouts:
        result = layouts(a.prompts, a.k, a.max_tokens, a.repeats, a.threads)
        print(f"{result['prompts']} prompts x K={result['k']}, {result['max_tokens']} new tokens: " + ", ".join(
            f"{n} {v:.1f} tok/s" for n, v in result["median_tok_s"].items()) +
            f" (medians of {a.repeats}); streams / unified {result['streams_over_unified']:.2f}; "
            f"auto picks {result['auto_picks']}")
        print(dumps(result))
        return
    if a.scan:
        result = scan(threads=a.threads)
        for key in ("unified_ms", "streams_ms", "streams_every_other_ms"):
            for c, row in result[key].items():
                print(f"{key[:-3]:>20} {c:5d} cells: " + "  ".join(f"n={n} {ms:6.1f} ms" for n, ms in row.items()))
        print(dumps(result))
        return
    result = run(a.prompts, a.k, a.max_tokens, a.repeats, a.types.split(","), a.threads)
    for kind, rate in result["tok_s"].items():
        g = result["greedy_vs_f32"].get(kind, {})
        print(f"{kind:>5} {rate:7.1f} tok/s  greedy = f32 in {g.get('identical')}/{g.get('of')} prompts, "
              f"max log-prob gap {g.get('max_logprob_gap', 0):.4f}")
    if "f32_step_fit" in result:
        f = result["f32_step_fit"]
        print(f"f32 step = {f['fixed_ms']:.1f} ms + {f['per_token_ms']:.2f} ms x tokens "
              f"({f['steps']} steps, {f['mean_tokens_per_step']:.1f} tokens each on average; the fixed part is "
              f"{f['fixed_share_of_decode']:.0%} of decode time)")
    print(dumps(result))


if __name__ == "__main__":
    main()
