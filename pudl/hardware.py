"""Hardware: the fast-BLAS fix for MLX on Linux, device choice and compute policy, memory readings.

This module must not import mlx at import time: `ensure_fast_blas` has to run before mlx is loaded.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pudl.errors import UserError

if TYPE_CHECKING:
    import mlx.core as mx

REEXEC_MARKER = "PUDL_BLAS_REEXEC"  # set in the re-executed process, so it never re-executes again
NO_FIX_VAR = "PUDL_NO_BLAS_FIX"  # set by a user to keep the process as it was started

# MLX's Linux CPU wheel bundles the reference BLAS (about 6 GFLOP/s sgemm); OpenBLAS is ~30x faster.
# Threaded builds first (pthread, then OpenMP), the serial build last: it still beats the reference.
_MULTIARCH = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu", "arm64": "aarch64-linux-gnu"}


def _openblas_candidates(machine: str | None = None) -> list[str]:
    """Known OpenBLAS locations on Debian/Ubuntu (multiarch), Fedora/RHEL (lib64) and Arch (lib)."""
    triplet = _MULTIARCH.get(machine or platform.machine())
    debian = [] if triplet is None else [
        f"/usr/lib/{triplet}/openblas-pthread/libopenblas.so.0",
        f"/usr/lib/{triplet}/openblas-openmp/libopenblas.so.0",
        f"/usr/lib/{triplet}/libopenblas.so.0",  # the update-alternatives choice
        f"/usr/lib/{triplet}/openblas-serial/libopenblas.so.0",
    ]
    fedora = ["/usr/lib64/libopenblasp.so.0", "/usr/lib64/libopenblaso.so.0", "/usr/lib64/libopenblas.so.0"]
    return debian + fedora + ["/usr/lib/libopenblas.so.0"]


def openblas_path() -> str | None:
    """The first installed OpenBLAS shared library for this machine, or None (always None off Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    return next((p for p in _openblas_candidates() if os.path.isfile(p)), None)


def ensure_fast_blas(argv: list[str] | None = None) -> None:
    """Re-execute this process with OpenBLAS in LD_PRELOAD when MLX would otherwise use the slow reference BLAS.

    Call it first thing, before mlx is imported. Returns (a no-op) off Linux, when PUDL_NO_BLAS_FIX is set,
    when LD_PRELOAD already holds an OpenBLAS, when already re-executed, or when no OpenBLAS is installed.
    `argv` is the command to re-execute; by default the interpreter's own command line.
    """
    if not sys.platform.startswith("linux") or os.environ.get(REEXEC_MARKER) or os.environ.get(NO_FIX_VAR):
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if "openblas" in preload.lower():
        return
    path = openblas_path()
    if path is None:
        return
    if argv is None:
        # orig_argv keeps `-m pkg` / `-c code` and interpreter flags, which sys.argv has lost.
        argv = [sys.executable, *sys.orig_argv[1:]]
        if sys.argv[0] in ("", "-"):  # interactive or a script read from stdin: cannot be replayed
            return
    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{path}:{preload}" if preload else path
    env[REEXEC_MARKER] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(argv[0], argv, env)
    except OSError:
        return  # could not re-execute: go on with the slow BLAS rather than fail


def _loaded_libraries() -> list[str]:
    """Paths of the shared libraries mapped into this process (Linux /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
    except OSError:
        return []
    return sorted(p for p in paths if ".so" in os.path.basename(p))


_BLAS_NAME = re.compile(r"blas|lapack|mkl|blis|atlas|accelerate", re.IGNORECASE)


def _blas_kind(path: str | None) -> str:
    """'openblas', 'mkl', 'blis', 'atlas', 'reference' or 'unknown' for a library path."""
    if not path:
        return "unknown"
    name = os.path.realpath(path).lower()  # Debian's libblas.so.3 may be an alternatives link to OpenBLAS
    for kind in ("openblas", "mkl", "blis", "atlas"):
        if kind in name:
            return kind
    return "reference" if "libblas" in os.path.basename(name) else "unknown"


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _global_cblas_provider() -> str | None:
    """The library providing `cblas_sgemm` in the process's global symbol scope, or None.

    MLX's libmlx.so binds cblas_sgemm to the global scope (executable, LD_PRELOAD, their dependencies)
    before its own bundled libblas, so this, not a mere mapping in /proc/self/maps, is what MLX calls.
    (numpy's bundled OpenBLAS is mapped too, but with renamed symbols that MLX never binds to.)
    """
    try:
        process = ctypes.CDLL(None)
        address = ctypes.cast(process.cblas_sgemm, ctypes.c_void_p).value
        info = _DlInfo()
        if not process.dladdr(ctypes.c_void_p(address), ctypes.byref(info)) or not info.dli_fname:
            return None
    except (AttributeError, OSError):
        return None
    return os.fsdecode(info.dli_fname)


def _sgemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Median float32 n x n matmul speed on MLX's CPU stream, in GFLOP/s."""
    import mlx.core as mx

    a = mx.random.normal((n, n), dtype=mx.float32)
    b = mx.random.normal((n, n), dtype=mx.float32)
    mx.eval(mx.matmul(a, b, stream=mx.cpu))  # warm-up: thread pools, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(mx.matmul(a, b, stream=mx.cpu))
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def blas_report(measure: bool = True) -> dict[str, Any]:
    """Which BLAS MLX's CPU matmuls use here, how fast they are, and what to do about it (for `pudl doctor`)."""
    import mlx.core as mx

    a = mx.ones((64, 64), dtype=mx.float32)
    mx.eval(mx.matmul(a, a, stream=mx.cpu))  # make sure the BLAS library is loaded before looking
    report: dict[str, Any] = {
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "mlx_version": getattr(mx, "__version__", "unknown"),
        "default_device": _device_type(mx.default_device()),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "blas_libraries": [p for p in _loaded_libraries() if _BLAS_NAME.search(os.path.basename(p))],
    }
    if sys.platform == "darwin":
        report["blas"], report["blas_library"] = "accelerate", "Accelerate.framework"
    else:
        provider = _global_cblas_provider()
        if provider is None:  # nothing global: MLX uses the BLAS it links itself (the one mapped next to it)
            provider = next((p for p in report["blas_libraries"] if "libblas" in os.path.basename(p)), None)
        report["blas"], report["blas_library"] = _blas_kind(provider), provider
    report["sgemm_gflops"] = round(_sgemm_gflops(), 1) if measure else None
    report["advice"] = _advice(report["blas"])
    return report


def _advice(kind: str) -> str:
    if kind in ("openblas", "mkl", "blis", "accelerate"):
        return "fast BLAS in use"
    found = openblas_path()
    if found is None:
        return (
            "slow BLAS: install OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread; "
            "Fedora: dnf install openblas-threads); pudl then preloads it automatically"
        )
    if os.environ.get(NO_FIX_VAR):
        return f"slow BLAS: unset {NO_FIX_VAR} so pudl preloads {found}"
    return f"slow BLAS: run through the pudl command (it preloads OpenBLAS) or set LD_PRELOAD={found}"


def _device_type(device: Any) -> str:
    """'cpu' or 'gpu' for an MLX device."""
    import mlx.core as mx

    return "gpu" if device.type == mx.gpu else "cpu"


def choose_device(name: str = "auto") -> str:
    """Make MLX compute on `name` ('auto': the GPU if there is one, else 'cpu'); returns 'cpu' or 'gpu'."""
    import mlx.core as mx

    if name not in ("auto", "cpu", "gpu"):
        raise UserError(f"device must be auto, cpu or gpu, got {name!r}")
    has_gpu = mx.is_available(mx.gpu)
    if name == "gpu" and not has_gpu:
        raise UserError("device 'gpu' requested but MLX has no GPU here (this mlx build is CPU-only)")
    chosen = "gpu" if name == "gpu" or (name == "auto" and has_gpu) else "cpu"
    mx.set_default_device(mx.gpu if chosen == "gpu" else mx.cpu)
    return chosen


@dataclass(frozen=True)
class ComputePolicy:
    """How the student's linear layers compute on one device."""

    device: str  # 'cpu' or 'gpu'
    dequantize: bool  # dequantize quantized weights once and use plain matmuls
    dtype: mx.Dtype  # the dtype weights and activations are computed in


def compute_policy(device: str | None = None) -> ComputePolicy:
    """The compute policy for `device` ('cpu' or 'gpu'; default: MLX's default device): the one place for it."""
    import mlx.core as mx

    device = device or _device_type(mx.default_device())
    if device == "cpu":
        # Measured on MLX's CPU backend: quantized_matmul 2.3 GFLOP/s and fp16/bf16 matmuls 4-6 GFLOP/s,
        # while dequantized float32 through OpenBLAS reaches 162: the memory saving is not worth 70x.
        return ComputePolicy(device="cpu", dequantize=True, dtype=mx.float32)
    if device == "gpu":
        # GPU kernels for quantized matmul and half precision are fast and save memory; bfloat16 has
        # float32's range, so training does not need loss scaling.
        return ComputePolicy(device="gpu", dequantize=False, dtype=mx.bfloat16)
    raise UserError(f"device must be cpu or gpu, got {device!r}")


def peak_memory_bytes() -> int:
    """Peak memory so far: the larger of MLX's peak allocation (0 if mlx is not imported) and the peak RSS.

    The peak RSS (getrusage ru_maxrss) covers everything in the process, MLX's CPU arrays included;
    MLX's own peak (mx.get_peak_memory) also counts GPU memory, which the RSS does not.
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux
    mlx_bytes = 0
    mx = sys.modules.get("mlx.core")  # importing mlx just to read a counter would only add memory
    if mx is not None:
        getter = getattr(mx, "get_peak_memory", None) or getattr(getattr(mx, "metal", None), "get_peak_memory", None)
        mlx_bytes = int(getter()) if getter else 0
    return max(rss_bytes, mlx_bytes)


def _main(argv: list[str]) -> int:
    import json

    if argv == ["--preload-path"]:
        path = openblas_path()
        if path:
            print(path)
        return 0 if path else 1
    if argv in ([], ["--report"]):
        ensure_fast_blas()  # report what a pudl command would get
        print(json.dumps(blas_report(), indent=2))
        return 0
    print("usage: python -m pudl.hardware [--preload-path | --report]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
