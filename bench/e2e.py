"""The whole loop, timed: real `pudl run`s of the demo recipe at reduced sizes, split by phase.

  phases   one demo round (the largest size of the series) split by phase, from its summary.json
           (teacher, eval before, sample, score, reference, train, export, eval after)
  scaling  prompts x K doubled 3 times ((P, K), (2P, K), (2P, 2K), (4P, 2K)): how wall time and each phase grow
  rerun    the finished largest run started again on its own run directory: every stage comes from the cache
Sizes: recipes/demo.toml as is (its 48 prompts x K=4 and 40 eval prompts: ~25-40 min on 2 cores), except for
the prompts (the first P of its prompts file), K and the eval set (the first E of its eval file), passed with
`--set`. The default (P=2, K=2, E=4: 4, 8, 16, 32 candidates) takes about 10 minutes on 2 shared cores.
Each `pudl run` is its own subprocess; its peak RSS comes from wait4. Sampled tokens/s (generated tokens over the
sample phase) and training tokens/s (the median of the steps' rate) are set against the decode and training
ceilings of the measured sgemm speed.
Run: `python -m pudl.bench.e2e [--prompts 2 --k 2 --eval 4 --doublings 3 --work DIR]` or `pudl bench e2e`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pudl.bench import common
from pudl.cache import Cache

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "demo.toml"
TRAIN_PROMPTS = ROOT / "recipes" / "data" / "tasks-train.jsonl"
EVAL_PROMPTS = ROOT / "recipes" / "data" / "tasks-eval.jsonl"
PHASES = ("teacher", "eval before", "sample", "score", "reference", "train", "export", "eval after")


def sizes(prompts: int, k: int, doublings: int) -> list[tuple[int, int]]:
    """(prompts, K) with their product doubled `doublings` times, prompts and K in turn."""
    out = [(prompts, k)]
    for i in range(doublings):
        p, kk = out[-1]
        out.append((p * 2, kk) if i % 2 == 0 else (p, kk * 2))
    return out


def run(tiny: bool = False, prompts: int = 2, k: int = 2, n_eval: int = 4, doublings: int = 3,
        max_tokens: int | None = None, work: str | Path | None = None) -> dict:
    """The series, the phase split of its largest size and the rerun of that one."""
    if tiny:  # seconds-long smoke size: 1 prompt, one doubling, 4 new tokens, 1 eval prompt
        prompts, k, n_eval, doublings, max_tokens = 1, 2, 1, 1, 4
    series = sizes(prompts, k, doublings)
    lines_needed = max(p for p, _ in series)
    train_lines = TRAIN_PROMPTS.read_text().splitlines()
    if lines_needed > len(train_lines):
        raise ValueError(f"the largest size needs {lines_needed} prompts; {TRAIN_PROMPTS.name} has {len(train_lines)}")
    machine = common.machine(measure=not tiny)
    tmp = None
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="pudl-bench-e2e-")
        work = tmp.name
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    eval_file = work / "eval.jsonl"
    eval_file.write_text("\n".join(EVAL_PROMPTS.read_text().splitlines()[:n_eval]) + "\n")
    runs = []
    try:
        for p, kk in series:
            prompts_file = work / f"prompts-{p}.jsonl"
            prompts_file.write_text("\n".join(train_lines[:p]) + "\n")
            overrides = [f"data.prompts={prompts_file}", f"data.eval={eval_file}", f"sample.k={kk}"]
            if max_tokens:
                overrides += [f"sample.max_tokens={max_tokens}", f"eval.max_tokens={max_tokens}"]
            out = work / f"run-p{p}-k{kk}"
            runs.append({"prompts": p, "k": kk, "candidates": p * kk, **_pudl_run(out, overrides)})
        rerun = _pudl_run(out, overrides)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return summarize(runs, rerun, machine, n_eval, max_tokens)


def summarize(runs: list[dict], rerun: dict, machine: dict, n_eval: int, max_tokens: int | None) -> dict:
    """The bench's result from the series' run records (smallest first) and the rerun of the largest."""
    largest = runs[-1]
    result = {
        "recipe": str(RECIPE.relative_to(ROOT)), "eval_prompts": n_eval, "max_tokens": max_tokens or "recipe",
        "phases": largest["phase_seconds"], "phase_prompts": largest["prompts"], "phase_k": largest["k"],
        "first_run_seconds": largest["wall_seconds"], "rerun_seconds": rerun["wall_seconds"],
        "rerun_speedup": largest["wall_seconds"] / rerun["wall_seconds"],
        "rerun_phase_seconds": rerun["phase_seconds"],
        "scaling": runs,
        # wall time growth per doubling of prompts x K (1.0 = fixed costs only, 2.0 = all proportional)
        "growth_per_doubling": [b["wall_seconds"] / a["wall_seconds"] for a, b in zip(runs, runs[1:])],
        "sample_tok_s": largest["sample_tok_s"], "train_tok_s": largest["train_tok_s"],
        "peak_rss_bytes": max((r["peak_rss_bytes"] for r in runs if r.get("peak_rss_bytes")), default=None),
        "machine": machine,
        "n_params": largest["n_params"],
    }
    common.add_ceiling(result, "decode", result["n_params"], key="sample_tok_s")
    result["sample_fraction_of_ceiling"] = result.pop("pudl_fraction_of_ceiling")
    common.add_ceiling(result, "train", result["n_params"], key="train_tok_s")
    result["train_fraction_of_ceiling"] = result.pop("pudl_fraction_of_ceiling")
    result["pudl_fraction_of_ceiling"] = result["sample_fraction_of_ceiling"]  # the phase the loop spends most on
    return common.finish(result)


def _pudl_run(out: Path, overrides: list[str]) -> dict:
    """One `pudl run` of the demo recipe in a subprocess: wall seconds, its summary and peak RSS."""
    cmd = [sys.executable, "-m", "pudl.cli", "run", str(RECIPE), "--out", str(out), "--quiet"]
    for o in overrides:
        cmd += ["--set", o]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        err.seek(0)
        stderr = err.read()
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    if proc.returncode != 0:
        raise RuntimeError(f"pudl run failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}")
    return {"wall_seconds": wall, "peak_rss_bytes": rss, **read_run(out)}


def read_run(out: Path) -> dict:
    """A finished run directory's figures: phase seconds, sampled tokens and rates, accuracies."""
    summary = json.loads((out / "summary.json").read_text())
    phases = {name: summary["phase_seconds"].get(name) for name in PHASES}
    generated = _generated_tokens(out / "cache.sqlite")
    step_rates = [row["tokens_per_s"] for row in _metrics(out / "metrics.jsonl") if row.get("kind") == "step"]
    return {"pudl_wall_seconds": summary.get("wall_seconds"), "phase_seconds": phases,
            "generated_tokens": generated,
            "sample_tok_s": generated / phases["sample"] if phases["sample"] else None,
            "train_tok_s": statistics.median(step_rates) if step_rates else None, "train_steps": len(step_rates),
            "before": (summary.get("before") or {}).get("strict_accuracy"),
            "after": (summary.get("after") or {}).get("strict_accuracy"), "n_params": common.n_params()}


def _generated_tokens(cache_path: Path) -> int:
    cache = Cache.open_read_only(cache_path)
    try:
        return cache.generated_tokens()
    finally:
        cache.close()


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def lines(result: dict) -> list[str]:
    """The human-readable summary."""
    fmt = common.fmt
    out = [f"one demo round at {result['phase_prompts']} prompts x K={result['phase_k']} "
           f"({result['eval_prompts']} eval prompts), by phase:"]
    out.append("  " + ", ".join(f"{k} {fmt(v)} s" for k, v in result["phases"].items() if v is not None))
    out.append("scaling (prompts x K -> wall s):  " + ",  ".join(
        f"{r['prompts']}x{r['k']} -> {r['wall_seconds']:.0f}" for r in result["scaling"]))
    out.append("  growth per doubling: " + ", ".join(f"{g:.2f}x" for g in result["growth_per_doubling"]))
    out.append(f"rerun of the finished recipe (cache): {result['rerun_seconds']:.1f} s vs first "
               f"{result['first_run_seconds']:.1f} s ({result['rerun_speedup']:.1f}x)")
    out.append(f"sample {fmt(result['sample_tok_s'])} tok/s of a {fmt(result['decode_ceiling_tok_s'], '.0f')} decode "
               f"ceiling ({fmt(result['sample_fraction_of_ceiling'], '.1%')}); train {fmt(result['train_tok_s'])} tok/s "
               f"of {fmt(result['train_ceiling_tok_s'], '.0f')} ({fmt(result['train_fraction_of_ceiling'], '.1%')}); "
               f"peak RSS {common.mib(result['peak_rss_bytes'])}")
    out.append("machine: " + common.machine_line(result["machine"]))
    return out


def plot(result: dict, path: Path) -> Path | None:
    """Left: the phase split of one round; right: wall seconds over the scaling series (and the cached rerun)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    phases = {k: v for k, v in result["phases"].items() if v}
    a.barh(list(phases), list(phases.values()), color="#2a6f97")
    a.invert_yaxis()
    a.set_xlabel("seconds")
    a.set_title(f"one round, {result['phase_prompts']} prompts x K={result['phase_k']}", fontsize=10)
    xs = [r["candidates"] for r in result["scaling"]]
    b.plot(xs, [r["wall_seconds"] for r in result["scaling"]], "o-", color="#2a6f97", label="first run")
    b.plot([xs[-1]], [result["rerun_seconds"]], "s", color="#c44e52", label="rerun (cache)")
    b.set_xscale("log", base=2)
    b.set_xlabel("prompts x K")
    b.set_ylabel("wall seconds")
    b.set_title("scaling: prompts x K doubled", fontsize=10)
    b.legend(fontsize=8)
    fig.suptitle("pudl bench e2e\n" + common.machine_line(result["machine"]), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2, help="prompts at the smallest size")
    parser.add_argument("--k", type=int, default=2, help="K at the smallest size")
    parser.add_argument("--eval", type=int, default=4, help="eval prompts (fixed across the series)")
    parser.add_argument("--doublings", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=None, help="sample/eval max_tokens (default: the recipe's)")
    parser.add_argument("--work", help="keep the runs in this directory (default: a temporary one)")
    parser.add_argument("--json-out")
    parser.add_argument("--tiny", action="store_true")
    a = parser.parse_args(argv)
    result = run(a.tiny, a.prompts, a.k, a.eval, a.doublings, a.max_tokens, a.work)
    common.report_main("pudl.bench.e2e", result, argv, a.json_out, lines, plot)


if __name__ == "__main__":
    from pudl.hardware import ensure_fast_blas

    ensure_fast_blas()  # the sgemm reading needs the BLAS `pudl` itself gets; may re-execute this process
    main()
