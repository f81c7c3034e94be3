"""Load time and peak memory of the MLX student per GGUF type, on a random model with Qwen2.5-1.5B's widths.

`PYTHONPATH=. .venv/bin/python -m tests.quant_bench [LAYERS ...]` writes a random F16 llama GGUF (hidden 1536,
ffn 8960, 12 heads, 2 kv heads, vocab 151936, tied head) with each number of layers (default 2 and 4), has
llama.cpp quantize it to each type, and loads each file with `load_student` in a fresh process (float32
weights, as on a CPU), printing one JSON line per file: load seconds and peak RSS. Two depths give the cost per
layer, from which the 28-layer model is extrapolated (building and quantizing the full 1.5B model would take
longer than the measurement is worth on a small machine). `... -m tests.quant_bench rates` times the decoding
of one block's tensors per type in-process (less noisy on a shared machine than whole-process loads).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 1536, 8960, 12, 2, 151936
TYPES = ["F16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS"]

LOAD = """
import json, resource, sys, time
t0 = time.perf_counter()
from pudl.models import load_student
t1 = time.perf_counter()
load_student(sys.argv[1], 8, 16.0, ["q_proj", "k_proj", "v_proj", "o_proj"], weights="float32")
t2 = time.perf_counter()
print(json.dumps({"import_s": round(t1 - t0, 2), "load_s": round(t2 - t1, 2),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
"""


def write_random_f16(path: Path, layers: int, seed: int = 0) -> Path:
    """A random llama GGUF at F16 with Qwen2.5-1.5B's widths and `layers` blocks (no tokenizer: load only)."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(layers)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    def mat(name, rows, cols):
        w.add_tensor(name, (rng.standard_normal((rows, cols), np.float32) * 0.02).astype(np.float16))

    head = HIDDEN // HEADS
    mat("token_embd.weight", VOCAB, HIDDEN)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        mat(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        mat(f"blk.{i}.attn_k.weight", KV_HEADS * head, HIDDEN)
        mat(f"blk.{i}.attn_v.weight", KV_HEADS * head, HIDDEN)
        mat(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        mat(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        mat(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        mat(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def measure(path: Path) -> dict:
    """load_student on `path` in a fresh process: import and load seconds, peak RSS."""
    out = subprocess.run([sys.executable, "-c", LOAD, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(depths: list[int], workdir: Path = Path("/tmp/pudl-quant-bench")):
    from pudl.gguf_quants import read_header
    from tests.tiny_gguf import llama_quantize

    workdir.mkdir(parents=True, exist_ok=True)
    for layers in depths:
        f16 = write_random_f16(workdir / f"l{layers}-F16.gguf", layers)
        for ftype in TYPES:
            t0 = time.perf_counter()
            path = f16 if ftype == "F16" else llama_quantize(f16, workdir / f"l{layers}-{ftype}.gguf", ftype)
            quantize_s = time.perf_counter() - t0
            types = sorted({t.type_name for t in read_header(path)[1]})
            row = {"layers": layers, "ftype": ftype, "tensor_types": types, "file_mib": path.stat().st_size >> 20,
                   "quantize_s": round(quantize_s, 1), **measure(path)}
            print(json.dumps(row), flush=True)
            if path != f16:
                path.unlink()
        f16.unlink()


def rates(workdir: Path = Path("/tmp/pudl-quant-bench")):
    """Decode speed per type (million weights per second, best of 3) of one block's tensors at these widths,
    in this process: the cost that scales with the number of layers."""
    import mlx.core as mx

    from pudl.gguf_quants import read_header, read_tensors
    from tests.tiny_gguf import llama_quantize

    workdir.mkdir(parents=True, exist_ok=True)
    f16 = write_random_f16(workdir / "r-F16.gguf", 1)
    for ftype in TYPES[1:]:
        path = llama_quantize(f16, workdir / f"r-{ftype}.gguf", ftype, pure=True, embedding_type=1)
        layer = [t for t in read_header(path)[1] if t.name.startswith("blk.") and len(t.shape) == 2]
        best = min(_timed(lambda: read_tensors(path, layer, False, mx.float32)) for _ in range(3))
        n = sum(int(np.prod(t.shape)) for t in layer)
        print(json.dumps({"ftype": ftype, "types": sorted({t.type_name for t in layer}), "weights_m": round(n / 1e6, 1),
                          "seconds": round(best, 2), "mweights_per_s": round(n / 1e6 / best, 1)}), flush=True)
        path.unlink()
    f16.unlink()


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    if sys.argv[1:] == ["rates"]:
        rates()
    else:
        main([int(a) for a in sys.argv[1:]] or [2, 4])
