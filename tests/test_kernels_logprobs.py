"""token_logprobs (fused LM head + selective log-softmax) against a float64 NumPy reference.

Inputs are fresh random draws every run; the seed is printed (pytest shows it for a
failing test) and PUDL_TEST_SEED=<seed> replays it.  Errors are max-norm relative:
max|got - want| / max|want|.
"""

from __future__ import annotations

import os
import secrets

import mlx.core as mx
import numpy as np
import pytest

from pudl.kernels import naive_token_logprobs, token_logprobs
from pudl.kernels.device import gpu_backend
from pudl.kernels.logprobs import _exp_poly

VALUE_RTOL = 1e-5
GRAD_RTOL = 1e-4


@pytest.fixture
def rng():
    seed = int(os.environ.get("PUDL_TEST_SEED") or secrets.randbits(32))
    print(f"PUDL_TEST_SEED={seed}")
    return np.random.default_rng(seed)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.all(np.isfinite(got)), "non-finite values"
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


# ------------------------------------------------------------------ float64 reference

def ref_logprobs(h, w, t, m):
    """h [N,H], w [V,H], t [N], m [N] bool -> logp [N] (0 where masked)."""
    z = h @ w.T
    top = z.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    tc = np.clip(t, 0, w.shape[0] - 1)
    return np.where(m, z[np.arange(len(t)), tc] - lse, 0.0)


def ref_logprobs_grad(h, w, t, m, g):
    """Gradients of sum(g * ref_logprobs) w.r.t. h and w."""
    z = h @ w.T
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dz = -p
    rows = np.flatnonzero(m)
    dz[rows, t[rows]] += 1.0
    dz *= (g * m)[:, None]
    return dz @ w, dz.T @ h


def make_case(rng, b, t, h, v, scale=1.0, mask_p=0.0):
    hidden = rng.standard_normal((b, t, h)) * scale
    weight = rng.standard_normal((v, h)) / np.sqrt(h)
    targets = rng.integers(0, v, size=(b, t))
    mask = rng.random((b, t)) >= mask_p
    cot = rng.standard_normal((b, t))
    # Round to float32 once, so MLX and the float64 reference see the same numbers.
    return (hidden.astype(np.float32), weight.astype(np.float32), targets, mask,
            cot.astype(np.float32))


def mlx_value_and_grads(fn, hidden, weight, targets, mask, cot, **kw):
    tgt = mx.array(targets.astype(np.int32))
    msk = None if mask is None else mx.array(mask)
    g = mx.array(cot)

    def loss(hh, ww):
        out = fn(hh, ww, tgt, msk, **kw)
        return (out * g).sum(), out

    step = mx.value_and_grad(loss, argnums=(0, 1))
    (_, out), (dh, dw) = step(mx.array(hidden), mx.array(weight))
    mx.eval(out, dh, dw)
    return np.array(out), np.array(dh), np.array(dw)


def check_against_reference(hidden, weight, targets, mask, cot, **kw):
    b, t, h = hidden.shape
    m = np.ones((b, t), bool) if mask is None else mask
    args = (hidden.reshape(-1, h).astype(np.float64), weight.astype(np.float64),
            targets.reshape(-1), m.reshape(-1))
    want = ref_logprobs(*args).reshape(b, t)
    want_dh, want_dw = ref_logprobs_grad(*args, cot.reshape(-1).astype(np.float64))
    got, dh, dw = mlx_value_and_grads(token_logprobs, hidden, weight, targets, mask, cot, **kw)
    assert got.dtype == np.float32 and got.shape == (b, t)
    assert rel_err(got, want) < VALUE_RTOL
    assert rel_err(dh, want_dh.reshape(b, t, h)) < GRAD_RTOL
    assert rel_err(dw, want_dw) < GRAD_RTOL
    return got, dh, dw


# ------------------------------------------------------------------ tests

def test_reference_gradient_matches_finite_differences(rng):
    n, h, v = 5, 4, 7
    hid = rng.standard_normal((n, h))
    w = rng.standard_normal((v, h))
    t = rng.integers(0, v, size=n)
    m = np.array([True, True, False, True, True])
    g = rng.standard_normal(n)
    dh, dw = ref_logprobs_grad(hid, w, t, m, g)

    def f(hh, ww):
        return float(np.sum(g * ref_logprobs(hh, ww, t, m)))

    step = 1e-6
    for arr, grad, which in ((hid, dh, 0), (w, dw, 1)):
        fd = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += step
            minus[idx] -= step
            a = (plus, w) if which == 0 else (hid, plus)
            b = (minus, w) if which == 0 else (hid, minus)
            fd[idx] = (f(*a) - f(*b)) / (2 * step)
        assert np.max(np.abs(fd - grad)) / np.max(np.abs(grad)) < 1e-7


@pytest.mark.parametrize("b,t,h,v,chunk", [
    (2, 7, 16, 203, 64),    # vocab not a multiple of the chunk
    (3, 5, 8, 128, 32),     # exact multiple
    (1, 9, 12, 50, 4096),   # one chunk larger than the vocabulary
    (2, 4, 8, 17, 5),       # many small chunks, short last chunk
])
@pytest.mark.parametrize("head_grad,grad_ready", [(False, False), (True, False), (False, True),
                                                   (True, True)])
def test_matches_reference(rng, b, t, h, v, chunk, head_grad, grad_ready):
    hidden, weight, targets, mask, cot = make_case(rng, b, t, h, v, mask_p=0.3)
    kw = dict(chunk_size=chunk, head_grad=head_grad, grad_ready=grad_ready)
    check_against_reference(hidden, weight, targets, mask, cot, **kw)
    check_against_reference(hidden, weight, targets, None, cot, **kw)


@pytest.mark.parametrize("grad_ready", [False, True])
def test_hidden_only_gradient(rng, grad_ready):
    # pudl's LoRA training: frozen head, only the hidden states' gradient is asked for.
    b, t, h, v = 2, 5, 8, 70
    hidden, weight, targets, mask, cot = make_case(rng, b, t, h, v, mask_p=0.3)
    w, tgt, msk, g = mx.array(weight), mx.array(targets.astype(np.int32)), mx.array(mask), mx.array(cot)
    dh = mx.grad(lambda hh: (token_logprobs(hh, w, tgt, msk, chunk_size=16,
                                            grad_ready=grad_ready) * g).sum())(mx.array(hidden))
    args = (hidden.reshape(-1, h).astype(np.float64), weight.astype(np.float64),
            targets.reshape(-1), mask.reshape(-1))
    want_dh, _ = ref_logprobs_grad(*args, cot.reshape(-1).astype(np.float64))
    assert rel_err(np.array(dh).reshape(-1, h), want_dh) < GRAD_RTOL


def test_polynomial_exp(rng):
    # The CPU path's exp: float32 rounding level on [-87, 0], tiny and finite below.
    x = np.concatenate([-rng.exponential(4.0, 50_000), rng.uniform(-87.0, 0.0, 50_000),
                        [0.0, -1e-30, -0.5 * np.log(2), -87.0]]).astype(np.float32)
    got = np.array(_exp_poly(mx.array(x)), np.float64)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 3e-7
    far = np.array(_exp_poly(mx.array(np.array([-88.0, -1e4, -3e38], np.float32))))
    assert np.all((far >= 0) & (far < 2e-38))


def test_naive_matches_reference(rng):
    hidden, weight, targets, mask, cot = make_case(rng, 2, 6, 8, 40, mask_p=0.3)
    m = mask.reshape(-1)
    args = (hidden.reshape(-1, 8).astype(np.float64), weight.astype(np.float64),
            targets.reshape(-1), m)
    got, dh, dw = mlx_value_and_grads(naive_token_logprobs, hidden, weight, targets, mask, cot)
    want_dh, want_dw = ref_logprobs_grad(*args, cot.reshape(-1).astype(np.float64))
    assert rel_err(got.reshape(-1), ref_logprobs(*args)) < VALUE_RTOL
    assert rel_err(dh.reshape(-1, 8), want_dh) < GRAD_RTOL
    assert rel_err(dw, want_dw) < GRAD_RTOL


@pytest.mark.parametrize("grad_ready", [False, True])
def test_extreme_logits(rng, grad_ready):
    # Logits of order 1e4. Resample until every row's top two logits are > 10 apart, so
    # float32 rounding of the logits (~1e-3 here) cannot reorder the softmax.
    h, v = 16, 96
    for _ in range(100):
        hidden, weight, targets, mask, cot = make_case(rng, 2, 5, h, v)
        z = hidden.reshape(-1, h).astype(np.float64) @ weight.T.astype(np.float64)
        hidden = (hidden * (1e4 / np.abs(z).max())).astype(np.float32)
        z = hidden.reshape(-1, h).astype(np.float64) @ weight.T.astype(np.float64)
        top2 = np.sort(z, axis=1)[:, -2:]
        if np.min(top2[:, 1] - top2[:, 0]) > 10:
            break
    else:
        pytest.fail("could not draw well-separated extreme logits")
    # Half the targets are the argmax (logp ~ 0), half random (logp ~ -1e4).
    flat = targets.reshape(-1)
    flat[::2] = z.argmax(axis=1)[::2]
    got, _, _ = check_against_reference(hidden, weight, flat.reshape(targets.shape), mask, cot,
                                        chunk_size=32, grad_ready=grad_ready)
    assert np.abs(got).max() > 1e3


@pytest.mark.parametrize("grad_ready", [False, True])
def test_masked_positions_are_exactly_zero(rng, grad_ready):
    hidden, weight, targets, mask, cot = make_case(rng, 3, 6, 8, 33, mask_p=0.4)
    mask[1] = False                 # one sequence entirely masked
    # Padding ids out of range (below 0 or >= V) must not matter.
    targets[~mask] = rng.choice([-100, 33, 40], size=int((~mask).sum()))
    got, dh, _ = check_against_reference(hidden, weight, targets, mask, cot, chunk_size=8,
                                         grad_ready=grad_ready)
    assert np.all(got[~mask] == 0.0)
    assert np.all(dh[~mask] == 0.0)


@pytest.mark.parametrize("grad_ready", [False, True])
def test_all_masked_gives_zero_and_zero_grads(rng, grad_ready):
    hidden, weight, targets, _, cot = make_case(rng, 2, 4, 8, 21)
    mask = np.zeros((2, 4), bool)
    got, dh, dw = mlx_value_and_grads(token_logprobs, hidden, weight, targets, mask, cot,
                                      chunk_size=8, grad_ready=grad_ready)
    assert np.all(got == 0.0) and np.all(dh == 0.0) and np.all(dw == 0.0)


@pytest.mark.parametrize("grad_ready", [False, True])
def test_tied_head_gradient(rng, grad_ready):
    # The head is the input embedding: gradients from both uses must add up.
    b, t, h, v = 2, 5, 8, 37
    emb = (rng.standard_normal((v, h)) / np.sqrt(h)).astype(np.float32)
    proj = (rng.standard_normal((h, h)) / np.sqrt(h)).astype(np.float32)
    ids = rng.integers(0, v, size=(b, t))
    targets = rng.integers(0, v, size=(b, t))
    mask = rng.random((b, t)) > 0.2
    cot = rng.standard_normal((b, t)).astype(np.float32)

    def loss(e):
        hidden = mx.tanh(e[mx.array(ids)] @ mx.array(proj))
        out = token_logprobs(hidden, e, mx.array(targets), mx.array(mask), chunk_size=16,
                             grad_ready=grad_ready)
        return (out * mx.array(cot)).sum()

    got = np.array(mx.grad(loss)(mx.array(emb)))

    e64, p64 = emb.astype(np.float64), proj.astype(np.float64)
    hid = np.tanh(e64[ids.reshape(-1)] @ p64)
    dh, dw = ref_logprobs_grad(hid, e64, targets.reshape(-1), mask.reshape(-1),
                               cot.reshape(-1).astype(np.float64))
    want = dw.copy()
    np.add.at(want, ids.reshape(-1), (dh * (1 - hid**2)) @ p64.T)
    assert rel_err(got, want) < GRAD_RTOL


@pytest.mark.parametrize("grad_ready", [False, True])
def test_inside_compile_and_value_and_grad(rng, grad_ready):
    b, t, h, v = 2, 6, 8, 45
    tgt = mx.array(rng.integers(0, v, size=(b, t)).astype(np.int32))

    def loss(hh, ww, msk):
        return (token_logprobs(hh, ww, tgt, msk, chunk_size=16, grad_ready=grad_ready) * 0.5).sum()

    step = mx.compile(mx.value_and_grad(loss, argnums=(0, 1)))
    for _ in range(2):  # second call reuses the compiled graph on new values
        hidden, weight, _, mask, _ = make_case(rng, b, t, h, v, mask_p=0.3)
        val, (dh, dw) = step(mx.array(hidden), mx.array(weight), mx.array(mask))
        args = (hidden.reshape(-1, h).astype(np.float64), weight.astype(np.float64),
                np.array(tgt).reshape(-1), mask.reshape(-1))
        want_dh, want_dw = ref_logprobs_grad(*args, np.full(b * t, 0.5))
        assert rel_err(val.item(), 0.5 * ref_logprobs(*args).sum()) < VALUE_RTOL
        assert rel_err(np.array(dh).reshape(-1, h), want_dh) < GRAD_RTOL
        assert rel_err(np.array(dw), want_dw) < GRAD_RTOL


def test_half_precision_inputs(rng):
    hidden, weight, targets, mask, cot = make_case(rng, 2, 4, 8, 30, mask_p=0.2)
    hb = mx.array(hidden).astype(mx.bfloat16)
    wb = mx.array(weight).astype(mx.bfloat16)
    out = token_logprobs(hb, wb, mx.array(targets), mx.array(mask), chunk_size=8)
    dh = mx.grad(lambda x: token_logprobs(x, wb, mx.array(targets), mx.array(mask)).sum())(hb)
    assert out.dtype == mx.float32 and dh.dtype == mx.bfloat16
    # The reference sees the bf16-rounded inputs; on CPU the kernel computes in float32.
    h64 = np.array(hb.astype(mx.float32), np.float64).reshape(-1, 8)
    w64 = np.array(wb.astype(mx.float32), np.float64)
    want = ref_logprobs(h64, w64, targets.reshape(-1), mask.reshape(-1))
    tol = VALUE_RTOL if gpu_backend() is None else 2e-2
    assert rel_err(np.array(out).reshape(-1), want) < tol


def test_fused_peak_memory_stays_below_full_logits(rng):
    # The point of the kernel: no [N, V] array is ever needed.  MLX allocates ahead of
    # the compute while memory is plentiful, so the working set shows under a memory
    # limit: the scheduler then waits for buffers to be freed before allocating more.
    n, h, v, chunk = 256, 16, 8192, 512
    hidden = mx.array(rng.standard_normal((n, h)).astype(np.float32))
    weight = mx.array((rng.standard_normal((v, h)) / np.sqrt(h)).astype(np.float32))
    tgt = mx.array(rng.integers(0, v, size=n).astype(np.int32))
    full_logits = n * v * 4

    def extra_peak(fn, argnums, **kw):
        if argnums is None:  # forward only
            grad = lambda hh, ww: fn(hh, ww, tgt, None, **kw)  # noqa: E731
        else:
            grad = mx.grad(lambda hh, ww: fn(hh, ww, tgt, None, **kw).sum(), argnums=argnums)
        mx.eval(hidden, weight, tgt)
        mx.synchronize()
        base = mx.get_active_memory()
        old = mx.set_memory_limit(base + full_logits // 4)
        try:
            mx.reset_peak_memory()
            mx.eval(grad(hidden, weight))
            return mx.get_peak_memory() - base
        finally:
            mx.set_memory_limit(old)

    naive = extra_peak(naive_token_logprobs, (0, 1))
    assert naive > full_logits          # the measurement does see a full logits array
    for argnums in (None, 0, (0, 1)):
        for head_grad, grad_ready in ((False, False), (True, False), (False, True)):
            fused = extra_peak(token_logprobs, argnums, chunk_size=chunk, head_grad=head_grad,
                               grad_ready=grad_ready)
            # Well under one full logits array. With dW asked of a frozen-head (lazy) kernel, its dW chain
            # and the dh chain each hold a chunk and may run side by side: ~0.55 of the logits measured.
            assert fused < 0.75 * full_logits, (argnums, head_grad, grad_ready, fused, full_logits)


def test_input_validation():
    h = mx.zeros((2, 3, 4))
    w = mx.zeros((10, 4))
    t = mx.zeros((2, 3), mx.int32)
    with pytest.raises(ValueError):
        token_logprobs(h, mx.zeros((10, 5)), t)
    with pytest.raises(ValueError):
        token_logprobs(h, w, mx.zeros((2, 4), mx.int32))
    with pytest.raises(ValueError):
        token_logprobs(h, w, t, chunk_size=0)
    with pytest.raises(ValueError):
        token_logprobs(h, w, t, backend="tpu")


def test_device_kernels_match_mlx_path(rng):
    backend = gpu_backend()
    if backend is None:
        pytest.skip("no Metal/CUDA GPU as the default MLX device: device kernels not run")
    hidden, weight, targets, mask, cot = make_case(rng, 2, 9, 16, 300, mask_p=0.3)
    dev = check_against_reference(hidden, weight, targets, mask, cot, chunk_size=128,
                                  backend=backend)
    ref = mlx_value_and_grads(token_logprobs, hidden, weight, targets, mask, cot,
                              chunk_size=128, backend="mlx")
    for a, b in zip(dev, ref):
        assert rel_err(a, b) < GRAD_RTOL
