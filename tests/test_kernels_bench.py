"""The logprobs benchmark runs end to end at a tiny size and reports what it says it does."""

from __future__ import annotations

import json

import pytest

from pudl.kernels import bench


def test_bench_runs_tiny(tmp_path):
    out = tmp_path / "bench.json"
    # Same V and chunk as the compile test in test_kernels_logprobs.py, so a cold run
    # JIT-compiles fewer of MLX's fused CPU kernels.
    res = bench.run(sizes=[(1, 8, 16, 45), {"B": 2, "T": 4, "H": 8, "V": 45}], repeats=2,
                    json_out=out, chunk_size=16)
    assert [(r["B"], r["T"], r["H"], r["V"]) for r in res["sizes"]] == [(1, 8, 16, 45),
                                                                      (2, 4, 8, 45)]
    for row in res["sizes"]:
        for case in ("fused", "naive"):
            assert row[case]["seconds"] > 0 and len(row[case]["all_seconds"]) == 2
            assert row[case]["peak_bytes"] > 0
        assert row["speedup"] == pytest.approx(row["naive"]["seconds"] / row["fused"]["seconds"])
        assert row["memory_ratio"] == pytest.approx(
            row["fused"]["peak_bytes"] / row["naive"]["peak_bytes"])
    first = res["sizes"][0]
    assert res["fused"] == first["fused"] and res["speedup"] == first["speedup"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["config"]["grads"] == "hidden" and "grad_ready=True" in res["config"]["fused_call"]


def test_bench_trained_head_variant():
    res = bench.run(sizes=[(1, 8, 16, 45)], repeats=1, chunk_size=16, head_grad=True)
    assert res["config"]["grads"] == "hidden+weight" and "head_grad=True" in res["config"]["fused_call"]
    assert res["fused"]["seconds"] > 0 and res["naive"]["seconds"] > 0


def test_bench_rejects_bad_repeats():
    with pytest.raises(ValueError):
        bench.run(sizes=[(1, 2, 4, 8)], repeats=0)
