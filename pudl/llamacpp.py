"""Opening a llama.cpp model the way pudl needs it: quiet, and without the CPU weight-repacking buffers.

Measured here: llama.cpp's AMX path (an "extra buffer type" that repacks quantized weights) segfaults in
`ggml_backend_amx_mul_mat` on a VM whose CPU advertises AMX without the guest being able to use it, on
every Q4/Q8 model. So pudl loads models with `use_extra_bufts = false` unless PUDL_LLAMA_EXTRA_BUFTS=1.
"""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def quiet_stderr():
    """Silence llama.cpp's C-level logging on stderr while a model loads."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def _without_extra_buffers():
    import llama_cpp.llama_cpp as lib

    if os.environ.get("PUDL_LLAMA_EXTRA_BUFTS") == "1":
        yield
        return
    original = lib.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = original


def open_llama(path, **kwargs):
    """`llama_cpp.Llama(model_path=path, **kwargs)`, quiet, with extra weight buffers off (see module doc)."""
    from llama_cpp import Llama

    kwargs.setdefault("verbose", False)
    with _without_extra_buffers(), quiet_stderr():
        return Llama(model_path=str(path), **kwargs)
