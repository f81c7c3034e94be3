"""Benchmarks only need to run at a tiny size here; their figures go in the docs, never into assertions."""

import json
import os
import subprocess
import sys


def test_bench_kernels_tiny_ends_with_one_json_object():
    out = subprocess.run([sys.executable, "-m", "pudl.cli", "bench", "kernels", "--tiny", "--json"],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("fused", "naive", "speedup", "memory_ratio"):
        assert key in result
    assert result["fused"]["seconds"] > 0 and result["naive"]["peak_bytes"] > 0
