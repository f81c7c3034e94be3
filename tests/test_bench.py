"""Benchmarks only need to run at a tiny size here; their figures go in the docs, never into assertions."""

import json
import os
import subprocess
import sys

import pytest


def test_bench_kernels_tiny_ends_with_one_json_object():
    out = subprocess.run([sys.executable, "-m", "pudl.cli", "bench", "kernels", "--tiny", "--json"],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("fused", "naive", "speedup", "memory_ratio"):
        assert key in result
    assert result["fused"]["seconds"] > 0 and result["naive"]["peak_bytes"] > 0


def _bench_tiny(name: str, tmp_path) -> dict:
    """`pudl bench NAME --tiny --json --out F`: the last stdout line is the JSON also written to F, with F.png."""
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, "-m", "pudl.cli", "bench", name, "--tiny", "--json", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result
    assert result["plot"] is None or (tmp_path / f"{name}.png").stat().st_size > 0
    assert result["machine"]["cores"] >= 1 and len(result["machine"]["load_after"]) == 3
    return result


def test_bench_sampling_tiny_compares_the_three_samplers(tmp_path):
    result = _bench_tiny("sampling", tmp_path)
    for peer in ("pudl", "sequential", "mlx"):
        (run,) = result["runs"][peer]
        assert run["tokens"] > 0 and run["seconds"] > 0
        assert result[f"{peer}_tok_s"] == run["tokens"] / run["seconds"]
        assert result[f"{peer}_peak_rss_bytes"] > 2**20
    assert result["ratio_vs_sequential"] == result["pudl_tok_s"] / result["sequential_tok_s"]
    assert result["ratio_vs_mlx"] == result["pudl_tok_s"] / result["mlx_tok_s"]
    # --tiny skips the sgemm measurement: no ceiling, said as null rather than made up
    assert result["machine"]["sgemm_gflops"] is None and result["decode_ceiling_tok_s"] is None
    assert result["decode_flops_per_token"] == 2 * result["n_params"] > 10**8


def test_sampling_steps_fits_step_times_and_compares_weight_types():
    from pudl.bench import sampling_steps

    result = sampling_steps.run(prompts=2, k=2, max_tokens=4, repeats=1, types=["f32", "q4_1"], threads=1,
                                measure=False)
    assert set(result["tok_s"]) == {"f32", "q4_1"} and min(result["tok_s"].values()) > 0
    assert result["greedy_vs_f32"]["f32"] == {"identical": 2, "of": 2, "max_logprob_gap": 0.0}
    fit = result["f32_step_fit"]
    assert fit["steps"] >= 2 and fit["per_token_ms"] > 0  # the prefill steps hold the most tokens


def test_sampling_steps_scan_times_steps_by_tokens_and_cells_in_both_cache_layouts():
    from pudl.bench import sampling_steps

    result = sampling_steps.scan(tokens=(1, 4), cells=(16, 64), sequences=8, reps=1, threads=1, measure=False)
    for key in ("unified_ms", "streams_ms"):
        assert set(result[key]) == {16, 64}
        assert all(set(row) == {1, 4} and min(row.values()) > 0 for row in result[key].values())
    assert all(set(row) == {2} and row[2] > 0 for row in result["streams_every_other_ms"].values())
    with pytest.raises(ValueError):
        sampling_steps.scan(tokens=(1, 16), cells=(64,), sequences=8, measure=False)


def test_sampling_steps_layouts_samples_the_job_with_each_kv_cache_layout():
    from pudl.bench import sampling_steps

    result = sampling_steps.layouts(prompts=2, k=2, max_tokens=4, repeats=1, threads=1, measure=False)
    assert set(result["tok_s"]) == {"unified", "streams", "auto"} and min(result["median_tok_s"].values()) > 0
    assert result["auto_picks"] == "unified"  # a tiny job: far below STREAMS_ABOVE_CELLS


def test_sampling_steps_floor_replays_the_jobs_decodes_against_the_sequential_peer():
    from pudl.bench import sampling_steps

    result = sampling_steps.floor(prompts=2, k=2, max_tokens=4, repeats=1, types=["f32", "q4_1"], threads=1,
                                  measure=False)
    (job,) = result["jobs"]
    head, *rest = job["decodes"]
    assert head[1] == 0 and head[0] > 0  # the chat template's shared head: decoded once, no logits
    steps = [d for d in rest if d[0] == d[1]]
    assert 1 <= len(steps) <= 4 - 1  # the prompts' decode samples the first token
    # Each candidate's first token comes from its prompt's logits, every other one from one output of a step.
    assert job["tokens"] == 2 * 2 + sum(n for n, _ in steps) and 0 < job["decode_seconds"] <= job["seconds"]
    assert set(result["floor_tok_s"]) == {"f32", "q4_1"} and min(result["floor_tok_s"].values()) > 0
    assert result["ratio_vs_sequential"] == result["pudl_tok_s"] / result["sequential_tok_s"] > 0
    assert set(result["floor_ratio_vs_sequential"]) == set(result["floor_over_pudl"]) == {"f32", "q4_1"}
    assert len(result["sequential_runs_tok_s"]) == len(result["pudl_runs_tok_s"]) == 1


def test_bench_e2e_tiny_times_real_runs_by_phase(tmp_path):
    result = _bench_tiny("e2e", tmp_path)
    first, second = result["scaling"]
    assert first["candidates"] * 2 == second["candidates"] == result["phase_prompts"] * result["phase_k"]
    assert result["phases"] == second["phase_seconds"]
    for phase in ("sample", "score", "reference", "train", "eval before", "eval after"):
        assert result["phases"][phase] > 0
    assert sum(v for v in result["phases"].values() if v) <= second["wall_seconds"]
    assert second["generated_tokens"] > 0 and second["train_steps"] >= 1 and second["peak_rss_bytes"] > 2**20
    # the rerun of a finished recipe recomputes nothing
    assert all(v is None for k, v in result["rerun_phase_seconds"].items() if k != "teacher")
    assert result["rerun_speedup"] == result["first_run_seconds"] / result["rerun_seconds"]
    assert result["train_flops_per_token"] == 6 * result["n_params"]


def test_bench_train_tiny_runs_pudl_and_whatever_peers_are_installed(tmp_path):
    import importlib.util

    result = _bench_tiny("train", tmp_path)
    assert result["steps"] == 1 and result["tokens"] > 0
    assert result["pudl_tok_s"] == result["tokens"] / result["runs"]["pudl"]["seconds"]
    assert result["pudl_peak_memory_bytes"] > 2**20 and result["runs"]["pudl"]["lora_params"] > 0
    for variant in ("pudl_quantized", "pudl_no_recompute"):  # pudl with one setting changed, same LoRA
        run = result["runs"][variant]
        assert result[f"{variant}_tok_s"] == result["tokens"] / run["seconds"]
        assert run["lora_params"] == result["runs"]["pudl"]["lora_params"]
        assert run["steps_trained"] == result["runs"]["pudl"]["steps_trained"] == result["steps"]
    needs = {"mlx_lm_lora": ["mlx_lm_lora"], "trl": ["trl", "peft", "torch", "datasets"]}
    for peer, modules in needs.items():
        installed = all(importlib.util.find_spec(m) is not None for m in modules)
        if installed:  # it ran, in its own process, on the same tokens
            assert result[f"{peer}_tok_s"] == result["tokens"] / result["runs"][peer]["seconds"], result["skipped"]
            assert result[f"{peer}_peak_memory_bytes"] > 2**20
        else:  # a missing peer: null figures and the reason, pudl's still measured
            assert result[f"{peer}_tok_s"] is None and result[f"{peer}_peak_memory_bytes"] is None
            assert "not installed" in result["skipped"][peer]
    ratio = result["ratio_vs_trl"]
    assert ratio is None if result["trl_tok_s"] is None else ratio == result["pudl_tok_s"] / result["trl_tok_s"]
