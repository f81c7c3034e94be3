"""BLAS fix, reports and policies, checked in real subprocesses with the real MLX and OpenBLAS."""

from __future__ import annotations

import glob
import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pudl.errors import UserError
from pudl.hardware import NO_FIX_VAR, REEXEC_MARKER, blas_report, openblas_path, peak_memory_bytes

mx = pytest.importorskip("mlx.core")
from pudl.hardware import choose_device, compute_policy  # noqa: E402  (needs mlx)

ROOT = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS fix is for Linux")
needs_openblas = pytest.mark.skipif(openblas_path() is None, reason="no OpenBLAS installed")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any BLAS preload or pudl marker (the Makefile runs pytest preloaded)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", REEXEC_MARKER, NO_FIX_VAR)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def run_python(args: list[str], env: dict[str, str]) -> str:
    """Run this interpreter with `args`; its stdout (fails the test on a non-zero exit)."""
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# After the fix (or not), import mlx, run a matmul and tell what the process looks like.
PROBE = textwrap.dedent(
    """
    import json, os, sys
    from pudl.hardware import ensure_fast_blas
    ensure_fast_blas()
    import mlx.core as mx
    mx.eval(mx.matmul(mx.ones((64, 64)), mx.ones((64, 64)), stream=mx.cpu))
    maps = open("/proc/self/maps").read()
    print(json.dumps({"openblas_mapped": "libopenblas" in maps, "marker": os.environ.get("PUDL_BLAS_REEXEC"),
                      "ld_preload": os.environ.get("LD_PRELOAD"), "args": sys.argv[1:]}))
    """
)


@linux_only
def test_openblas_path_finds_the_installed_one():
    # Found independently of pudl's candidate list (a recursive glob of /usr/lib takes minutes).
    patterns = ("/usr/lib*/libopenblas*.so*", "/usr/lib*/*/libopenblas*.so*", "/usr/lib*/*/*/libopenblas*.so*")
    installed = [p for pattern in patterns for p in glob.glob(pattern) if os.path.isfile(p)]
    path = openblas_path()
    if not installed:
        assert path is None
        return
    assert path is not None and os.path.isfile(path) and "openblas" in os.path.realpath(path)
    out = run_python(["-m", "pudl.hardware", "--preload-path"], clean_env())
    assert out.strip() == path


@linux_only
@needs_openblas
def test_ensure_fast_blas_reexecutes_with_openblas_preloaded():
    out = json.loads(run_python(["-c", PROBE, "first", "--second"], clean_env()))
    assert out["openblas_mapped"]
    assert out["marker"] == "1"
    assert out["ld_preload"] == openblas_path()
    assert out["args"] == ["first", "--second"]  # the very same command line ran again


@linux_only
@needs_openblas
def test_no_fix_when_disabled():
    out = json.loads(run_python(["-c", PROBE], clean_env(**{NO_FIX_VAR: "1"})))
    assert not out["openblas_mapped"]
    assert out["marker"] is None and out["ld_preload"] is None


@linux_only
@needs_openblas
def test_no_reexec_when_openblas_already_preloaded():
    out = json.loads(run_python(["-c", PROBE], clean_env(LD_PRELOAD=openblas_path())))
    assert out["openblas_mapped"] and out["marker"] is None


@linux_only
@needs_openblas
def test_existing_preload_is_kept_after_openblas():
    out = json.loads(run_python(["-c", PROBE], clean_env(LD_PRELOAD="libm.so.6")))
    assert out["ld_preload"] == f"{openblas_path()}:libm.so.6"
    assert out["marker"] == "1"


@linux_only
@needs_openblas
def test_ensure_fast_blas_runs_the_given_argv():
    child = "import os; print('child', os.environ['PUDL_BLAS_REEXEC'], os.environ['LD_PRELOAD'])"
    argv = [sys.executable, "-c", child]
    code = f"from pudl.hardware import ensure_fast_blas; ensure_fast_blas({argv!r}); print('not replaced')"
    assert run_python(["-c", code], clean_env()).split() == ["child", "1", openblas_path()]


@pytest.fixture(scope="module")
def reports():
    """`python -m pudl.hardware --report` with the automatic fix, and with it disabled."""
    if not sys.platform.startswith("linux") or openblas_path() is None:
        pytest.skip("needs Linux with OpenBLAS installed")
    fixed = json.loads(run_python(["-m", "pudl.hardware", "--report"], clean_env()))
    slow = json.loads(run_python(["-m", "pudl.hardware", "--report"], clean_env(**{NO_FIX_VAR: "1"})))
    return fixed, slow


def test_report_names_the_blas_in_use(reports):
    fixed, slow = reports
    assert fixed["blas"] == "openblas" and fixed["blas_library"] == openblas_path()
    assert fixed["advice"] == "fast BLAS in use"
    assert slow["blas"] == "reference"
    assert slow["blas_library"] in slow["blas_libraries"]
    assert NO_FIX_VAR in slow["advice"]
    for report in reports:
        assert report["mlx_version"] == mx.__version__
        assert report["default_device"] in ("cpu", "gpu")
        assert report["platform"].startswith("Linux")


def test_fix_makes_sgemm_much_faster(reports):
    fixed, slow = reports
    # Measured here: ~194 vs ~6 GFLOP/s; a ratio between two runs on one machine, not an absolute number.
    assert fixed["sgemm_gflops"] > 3 * slow["sgemm_gflops"] > 0


@linux_only
def test_numpys_bundled_openblas_is_not_mistaken_for_mlxs():
    pytest.importorskip("numpy")
    code = (
        "import json, numpy; numpy.ones((8, 8)) @ numpy.ones((8, 8))\n"
        "from pudl.hardware import blas_report; print(json.dumps(blas_report(measure=False)))"
    )
    report = json.loads(run_python(["-c", code], clean_env()))
    if not any("openblas" in p for p in report["blas_libraries"]):
        pytest.skip("this numpy does not bundle OpenBLAS")
    assert report["blas"] == "reference"
    assert report["sgemm_gflops"] is None  # measure=False


def test_blas_report_in_this_process():
    report = blas_report(measure=False)
    expected = {"platform", "python", "mlx_version", "default_device", "ld_preload", "blas_libraries",
                "blas", "blas_library", "sgemm_gflops", "advice"}  # fmt: skip
    assert set(report) == expected
    fast = report["blas"] in ("openblas", "mkl", "blis", "accelerate")
    assert (report["advice"] == "fast BLAS in use") == fast
    if sys.platform.startswith("linux"):
        assert fast == ("openblas" in os.environ.get("LD_PRELOAD", "").lower())


def test_compute_policy_per_device():
    cpu, gpu = compute_policy("cpu"), compute_policy("gpu")
    assert (cpu.dequantize, cpu.dtype) == (True, mx.float32)
    assert (gpu.dequantize, gpu.dtype) == (False, mx.bfloat16)
    default = "gpu" if mx.default_device().type == mx.gpu else "cpu"
    assert compute_policy() == compute_policy(default)
    with pytest.raises(UserError):
        compute_policy("tpu")


def test_choose_device():
    before = mx.default_device()
    try:
        has_gpu = mx.is_available(mx.gpu)
        assert choose_device("auto") == ("gpu" if has_gpu else "cpu")
        assert choose_device("cpu") == "cpu" and mx.default_device() == mx.cpu
        if not has_gpu:
            with pytest.raises(UserError, match="gpu"):
                choose_device("gpu")
        with pytest.raises(UserError):
            choose_device("tpu")
    finally:
        mx.set_default_device(before)


def test_peak_memory_covers_mlx_and_rss():
    big = mx.arange(64 * 1024 * 1024, dtype=mx.float32)  # 256 MiB, materialized (a zeros could be a broadcast)
    mx.eval(big)
    peak = peak_memory_bytes()
    assert peak >= 256 * 1024 * 1024
    assert peak >= mx.get_peak_memory()
    assert peak >= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
