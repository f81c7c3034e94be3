"""What every benchmark shares: the machine description (with its measured sgemm speed and load), compute
ceilings, peers in subprocesses, and the PNG plot.

Ceilings: a phase's FLOPs per token over the measured float32 sgemm rate gives the tokens/s it could reach if
it ran at matmul speed throughout. Decoding a token costs ~2 FLOPs per parameter (one multiply-add per
weight); training forward + backward ~6 per parameter (the backward is two matmuls per forward one), LoRA's
own few parameters included. Attention's context-length term is left out: short sequences here.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from pudl.atomic_files import dumps

DECODE_FLOPS_PER_PARAM = 2
TRAIN_FLOPS_PER_PARAM = 6


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, macOS sysctl), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        if out.returncode == 0:
            return out.stdout.strip()
    return platform.processor() or "unknown"


def machine(measure: bool = True) -> dict:
    """The machine: CPU, cores, memory, BLAS, measured sgemm GFLOP/s (None when not measured) and load average.

    The load average is read before and after a bench (`load_after`): on a shared machine it says how much of
    the CPU the figures had.
    """
    from pudl.hardware import blas_report

    report = blas_report(measure=measure)
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = None
    return {"platform": report["platform"], "cpu": cpu_model(), "cores": os.cpu_count(), "memory_bytes": mem,
            "blas": report["blas"], "sgemm_gflops": report["sgemm_gflops"], "load_before": load_average(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def ceiling_tok_s(sgemm_gflops: float | None, flops_per_token: float) -> float | None:
    """Tokens/s at the measured sgemm rate for `flops_per_token` (None when the rate was not measured)."""
    if not sgemm_gflops:
        return None
    return sgemm_gflops * 1e9 / flops_per_token


def add_ceiling(result: dict, kind: str, n_params: int, key: str = "pudl_tok_s") -> None:
    """Add `{kind}_flops_per_token`, `{kind}_ceiling_tok_s` and `pudl_fraction_of_ceiling` to `result`.

    kind: 'decode' (2 FLOPs/parameter) or 'train' (6 FLOPs/parameter, forward + backward).
    """
    per_param = {"decode": DECODE_FLOPS_PER_PARAM, "train": TRAIN_FLOPS_PER_PARAM}[kind]
    flops = per_param * n_params
    ceiling = ceiling_tok_s(result["machine"].get("sgemm_gflops"), flops)
    result[f"{kind}_flops_per_token"] = flops
    result[f"{kind}_ceiling_tok_s"] = ceiling
    rate = result.get(key)
    result["pudl_fraction_of_ceiling"] = rate / ceiling if ceiling and rate else None


def n_params(model: str = "smollm2-135m") -> int:
    """The student's parameter count from its GGUF tensor shapes (read with pudl.hfdir's fast parser, no load)."""
    import numpy as np

    from pudl.hfdir import GGUFModel
    from pudl.models import resolve_model_path

    return int(sum(int(np.prod(shape)) for shape, _, _ in GGUFModel(resolve_model_path(model)).tensors.values()))


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing (a peer that did not run)."""
    return a / b if a is not None and b else None


def finish(result: dict) -> dict:
    """Stamp the end-of-run load average (the start one is in `machine`)."""
    result.setdefault("machine", {})["load_after"] = load_average()
    return result


def run_peer(module: str, args: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Run `python -m module *args` and return its last stdout line as JSON (a peer's own process: its own peak
    RSS). A failure raises RuntimeError with the tail of its stderr."""
    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report_main(module: str, result: dict, argv, json_out, lines, plot):
    """End of a bench's `python -m` entry: record the command, write F.json and its plot F.png (with
    --json-out F.json), the readable lines on stderr, the JSON object as the last line of stdout."""
    result["command"] = f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:])
    if json_out:
        Path(json_out).write_text(dumps(result, indent=2) + "\n")
        plot(result, Path(json_out).with_suffix(".png"))
    for line in lines(result):
        print(line, file=sys.stderr)
    print(dumps(result))


def thread_env(threads: int) -> dict:
    """One thread budget for every BLAS / OpenMP pool a peer may use."""
    n = str(threads)
    return {"OPENBLAS_NUM_THREADS": n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def fmt(value, spec: str = ".1f", missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def plot_bars(path: Path, title: str, groups: dict[str, dict[str, float | None]], subtitle: str = "") -> Path | None:
    """One bar panel per group ({panel title: {bar label: value}}); missing values are drawn as 'n/a'.
    Returns the PNG path, or None when matplotlib is not installed (the `bench` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, (panel, bars) in zip(axes[0], groups.items()):
        labels = list(bars)
        values = [bars[k] or 0.0 for k in labels]
        drawn = ax.bar(labels, values, color=["#2a6f97" if i == 0 else "#a9a9a9" for i in range(len(labels))])
        for rect, label in zip(drawn, labels):
            v = bars[label]
            ax.annotate("n/a" if v is None else f"{v:.4g}", (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_title(panel, fontsize=10)
        ax.tick_params(axis="x", labelsize=8, rotation=15)
    fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def machine_line(m: dict) -> str:
    load = m.get("load_before")
    return (f"{m.get('cpu')} x{m.get('cores')}, {m.get('blas')}, sgemm {fmt(m.get('sgemm_gflops'))} GFLOP/s, "
            f"load {load[0] if load else 'n/a'} -> {(m.get('load_after') or ['n/a'])[0]}")


def _kernels_extras(result: dict) -> None:
    """The kernels bench (bench/kernels.py) as the others: its head matmuls' ceiling and the fraction reached.
    Forward + backward of the vocabulary head costs 2*B*T*H*V FLOPs per matmul: the logits and the hidden
    gradient (4), plus the head's gradient when the bench asks for it (6)."""
    rows = result.get("sizes") or []
    gflops = (result.get("machine") or {}).get("sgemm_gflops")
    per = 6 if (result.get("config") or {}).get("grads") == "hidden+weight" else 4
    for row in rows:
        flops = per * row["B"] * row["T"] * row["H"] * row["V"]
        row["flops"] = flops
        row["fused_gflops"] = flops / row["fused"]["seconds"] / 1e9
        row["fused_fraction_of_sgemm"] = row["fused_gflops"] / gflops if gflops else None
    if rows:
        result["pudl_fraction_of_ceiling"] = rows[0]["fused_fraction_of_sgemm"]
        # Tokens here are head rows (B*T of them): the ceiling in the same unit as the other benches.
        result["pudl_tok_s"] = rows[0]["B"] * rows[0]["T"] / rows[0]["fused"]["seconds"]
        result["train_ceiling_tok_s"] = ceiling_tok_s(gflops, per * rows[0]["H"] * rows[0]["V"])


def _plot_kernels(result: dict, path: Path) -> Path | None:
    r = result["sizes"][0]
    size = f"B={r['B']} T={r['T']} H={r['H']} V={r['V']}"
    return plot_bars(path, f"pudl bench kernels ({size})", {
        "seconds (fwd+bwd), lower is better": {"fused": r["fused"]["seconds"], "naive": r["naive"]["seconds"]},
        "peak MiB, lower is better": {"fused": r["fused"]["peak_bytes"] / 2**20,
                                      "naive": r["naive"]["peak_bytes"] / 2**20}},
        machine_line(result.get("machine", {})))


def complete(name: str, module, result: dict, out: str | Path | None) -> Path | None:
    """What `pudl bench` does after any bench: the end load average, the kernels bench's ceiling fields, and
    with `--out F.json` the PNG plot F.png (None when not written)."""
    finish(result)
    if name == "kernels":
        _kernels_extras(result)
    if not out:
        return None
    png = Path(out).with_suffix(".png")
    plot = getattr(module, "plot", None)
    written = plot(result, png) if plot else _plot_kernels(result, png) if name == "kernels" else None
    result["plot"] = str(written) if written else None
    return written
