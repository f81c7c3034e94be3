"""Benchmark the fused token_logprobs against the naive full-logits version (forward + backward).

    python -m pudl.kernels.bench --repeats 3 --json bench.json

Each case runs ``mx.compile(mx.value_and_grad(loss, argnums=0))``, i.e. the gradient for
the hidden states with a frozen head, as pudl's LoRA training needs it (the fused case is
``token_logprobs(..., grad_ready=True)``); ``head_grad=True`` (``--head-grad``) benches a
trained head instead: ``argnums=(0, 1)`` and ``head_grad=True`` on the fused side.  Each
runs ``warmup`` times (trace + JIT) and then ``repeats`` timed times, alternating
fused / naive; the median is reported.  Peak memory
is ``mx.get_peak_memory()`` after ``mx.reset_peak_memory()`` (max over the timed runs)
and includes the inputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx

from .logprobs import DEFAULT_CHUNK_SIZE, naive_token_logprobs, token_logprobs

# SmolLM2-135M's head (V=49152, H=576) on a batch of 8 x 512 tokens, plus a smaller one.
DEFAULT_SIZES = ((8, 512, 576, 49152), (2, 256, 576, 8192))


def _size(s) -> dict:
    if isinstance(s, dict):
        b, t, h, v = (int(s[k]) for k in ("B", "T", "H", "V"))
    else:
        b, t, h, v = (int(x) for x in s)
    return {"B": b, "T": t, "H": h, "V": v}


def _inputs(size: dict, seed: int):
    key = mx.random.key(seed)
    k1, k2, k3, k4 = mx.random.split(key, 4)
    b, t, h, v = size["B"], size["T"], size["H"], size["V"]
    hidden = mx.random.normal((b, t, h), key=k1)
    weight = mx.random.normal((v, h), key=k2) * (h ** -0.5)
    targets = mx.random.randint(0, v, (b, t), key=k3).astype(mx.int32)
    mask = mx.random.uniform(shape=(b, t), key=k4) < 0.9  # some padding, as in real batches
    mx.eval(hidden, weight, targets, mask)
    return hidden, weight, targets, mask


def _measure(fns: dict, args, repeats: int, warmup: int, argnums) -> dict:
    """Median wall time and peak memory per case (name -> loss fn) over `repeats` runs."""
    # The timed runs alternate between the cases so that load from other processes on a
    # shared machine hits every case alike.
    steps = {name: mx.compile(mx.value_and_grad(lambda h, w, t, m, fn=fn: fn(h, w, t, m).sum(),
                                                argnums=argnums))
             for name, fn in fns.items()}
    for step in steps.values():
        for _ in range(warmup):
            mx.eval(step(*args))
        mx.clear_cache()
    mx.synchronize()
    inputs_bytes = mx.get_active_memory()
    times = {name: [] for name in steps}
    peaks = dict.fromkeys(steps, 0)
    for _ in range(repeats):
        for name, step in steps.items():
            mx.clear_cache()
            mx.reset_peak_memory()
            t0 = time.perf_counter()
            mx.eval(step(*args))
            times[name].append(time.perf_counter() - t0)
            peaks[name] = max(peaks[name], mx.get_peak_memory())
    return {name: {"seconds": statistics.median(times[name]), "all_seconds": times[name],
                   "peak_bytes": peaks[name],
                   "peak_over_inputs_bytes": peaks[name] - inputs_bytes}
            for name in steps}


def run(sizes=DEFAULT_SIZES, repeats: int = 3, json_out: str | Path | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE, warmup: int = 1, head_grad: bool = False) -> dict:
    """Time fused vs naive fwd+bwd per size; the top-level figures are for the first size.

    head_grad=False: gradient for the hidden states only (frozen head, LoRA), fused with
    grad_ready=True.  True: gradients for the hidden states and the head, fused with
    head_grad=True.  The naive side computes the same gradients as the fused one.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    argnums = (0, 1) if head_grad else 0
    kw = {"head_grad": True} if head_grad else {"grad_ready": True}
    rows = []
    for i, s in enumerate(sizes):
        size = _size(s)
        args = _inputs(size, seed=i)
        res = _measure({"fused": lambda h, w, t, m: token_logprobs(
                            h, w, t, m, chunk_size=chunk_size, **kw),
                        "naive": naive_token_logprobs}, args, repeats, warmup, argnums)
        fused, naive = res["fused"], res["naive"]
        mx.clear_cache()
        rows.append({**size, "chunk_size": min(chunk_size, size["V"]), "fused": fused,
                     "naive": naive, "speedup": naive["seconds"] / fused["seconds"],
                     "memory_ratio": fused["peak_bytes"] / naive["peak_bytes"]})
        del args
    first = rows[0]
    result = {
        "fused": first["fused"], "naive": first["naive"], "speedup": first["speedup"],
        "memory_ratio": first["memory_ratio"], "sizes": rows,
        "config": {"repeats": repeats, "warmup": warmup, "chunk_size": chunk_size,
                   "grads": "hidden+weight" if head_grad else "hidden",
                   "fused_call": "token_logprobs(..., " + ", ".join(f"{k}=True" for k in kw) + ")",
                   "device": str(mx.default_device()),
                   "mlx": mx.__version__},
    }
    if json_out is not None:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None) -> None:
    """CLI: print one line per size, optionally write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join("x".join(map(str, s)) for s in DEFAULT_SIZES),
                   help="comma-separated BxTxHxV (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--head-grad", action="store_true",
                   help="also the head's gradient (trained / tied head); default: hidden only")
    a = p.parse_args(argv)
    sizes = [tuple(int(x) for x in s.split("x")) for s in a.sizes.split(",")]
    res = run(sizes, a.repeats, a.json_out, a.chunk_size, a.warmup, a.head_grad)
    for r in res["sizes"]:
        print(f"B={r['B']} T={r['T']} H={r['H']} V={r['V']} chunk={r['chunk_size']}: "
              f"fused {r['fused']['seconds']:.3f}s {r['fused']['peak_bytes'] / 2**20:.0f} MiB | "
              f"naive {r['naive']['seconds']:.3f}s {r['naive']['peak_bytes'] / 2**20:.0f} MiB | "
              f"speedup {r['speedup']:.2f}x memory {r['memory_ratio']:.2f}x")


if __name__ == "__main__":
    main()
