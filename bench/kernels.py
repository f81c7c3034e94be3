"""Fused linear + selective log-softmax vs the naive full-logits version, forward + backward."""

from __future__ import annotations

from pudl.bench.common import machine
from pudl.kernels.bench import DEFAULT_SIZES
from pudl.kernels.bench import run as run_kernels

TINY_SIZES = ((2, 16, 32, 1000),)


def run(tiny: bool = False) -> dict:
    # The machine (CPU, cores, sgemm rate, load average) is read before the run, as the other benches do.
    mach = machine(measure=not tiny)
    result = run_kernels(TINY_SIZES if tiny else DEFAULT_SIZES, repeats=1 if tiny else 3)
    result["machine"] = mach
    return result


def lines(result: dict) -> list[str]:
    return [f"B={r['B']} T={r['T']} H={r['H']} V={r['V']}: fused {r['fused']['seconds']:.3f} s "
            f"{r['fused']['peak_bytes'] / 2**20:.0f} MiB | naive {r['naive']['seconds']:.3f} s "
            f"{r['naive']['peak_bytes'] / 2**20:.0f} MiB | speedup {r['speedup']:.2f}x, memory {r['memory_ratio']:.2f}x"
            for r in result["sizes"]]
