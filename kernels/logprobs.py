"""Fused LM head + selective log-softmax: log p(target) per token without the full B*T*V logits.

The forward pass walks the vocabulary in chunks of ``chunk_size`` rows of the head,
folding each chunk's log-sum-exp into a running one (logaddexp) and picking the target
logit out of the chunk that holds it.  The backward pass recomputes each chunk's logits
from ``hidden`` and ``weight`` (nothing of size V is stored) and turns them straight
into the two matmul gradients.  With ``grad_ready=True`` (training) the forward pass also
accumulates E = softmax(z) @ W, so the hidden-state gradient needs no recompute and is
elementwise.  See docs/kernels.md for the derivation and figures.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from . import device as _device

DEFAULT_CHUNK_SIZE = 1024  # [N, C] blocks of a 4096-token batch stay in a large L3
BACKENDS = ("auto", "mlx", "metal", "cuda")


def naive_token_logprobs(hidden: mx.array, weight: mx.array, targets: mx.array,
                         mask: mx.array | None = None) -> mx.array:
    """Reference: full logits, log_softmax and take_along_axis (float32, O(B*T*V) memory)."""
    logits = hidden.astype(mx.float32) @ weight.astype(mx.float32).T
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    # Padding positions may carry ids like -100; clip so the gather stays in bounds.
    idx = mx.clip(targets.astype(mx.int32), 0, weight.shape[0] - 1)
    out = mx.take_along_axis(logp, idx[..., None], axis=-1)[..., 0]
    if mask is not None:
        out = mx.where(mask.astype(mx.bool_), out, mx.zeros_like(out))
    return out


# mask: 1 = score this position; 0 = output exactly 0 with zero gradient (targets there may
#   be anything, e.g. -100).  chunk_size: vocabulary rows per chunk; memory is
#   O(N * chunk_size).  backend: "auto" picks the Metal/CUDA kernels when the default device
#   is such a GPU, else the compiled-MLX path ("mlx").  head_grad: only a speed switch, the
#   weight gradient is exact either way.  False (frozen head, e.g. LoRA): dW is a separate
#   lazy chain that costs nothing unless asked for, and recomputes the logits when it is.
#   True (trained head, tied embeddings): dW shares the backward pass with dh.
#   grad_ready: also a speed switch only.  True (training): the forward pass accumulates
#   E = softmax(z) @ W ([N, H], one more matmul pass) and the hidden gradient becomes
#   g*m*(W[t] - E) + g_lse*E, elementwise: forward + backward is 2 matmul passes, like the
#   naive version, instead of 3.  False (scoring without gradients): no E, 1 matmul pass.
#   With grad_ready the weight gradient, if asked for, is always the lazy recompute chain.
def token_logprobs(hidden: mx.array, weight: mx.array, targets: mx.array,
                   mask: mx.array | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   backend: str = "auto", head_grad: bool = False,
                   grad_ready: bool = False) -> mx.array:
    """log p(targets) [*lead] float32 from hidden [*lead, H] and the LM head weight [V, H]."""
    if hidden.ndim < 1 or weight.ndim != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"token_logprobs: hidden {hidden.shape} and weight {weight.shape} "
                         "must be [..., H] and [V, H]")
    lead = tuple(hidden.shape[:-1])
    if tuple(targets.shape) != lead:
        raise ValueError(f"token_logprobs: targets {targets.shape} must be {lead}")
    if mask is not None and tuple(mask.shape) != lead:
        raise ValueError(f"token_logprobs: mask {mask.shape} must be {lead}")
    if int(chunk_size) < 1:
        raise ValueError(f"token_logprobs: chunk_size must be >= 1, got {chunk_size}")
    if backend not in BACKENDS:
        raise ValueError(f"token_logprobs: backend must be one of {BACKENDS}, got {backend!r}")

    n = math.prod(lead)
    vocab, dim = weight.shape
    if n == 0:
        return mx.zeros(lead, mx.float32)
    h2 = hidden.reshape(n, dim)
    t1 = targets.reshape(n).astype(mx.int32)
    if mask is None:
        m1 = mx.ones((n,), mx.float32)
    else:
        m1 = mx.stop_gradient((mask.reshape(n) != 0).astype(mx.float32))

    backend = _device.pick_backend(backend)
    # CPU: always float32 (half-precision matmuls are slow there). GPU: keep the input
    # precision for the matmuls; the softmax statistics are float32 either way.
    if backend == "mlx" and mx.default_device().type == mx.DeviceType.cpu:
        compute = mx.float32
    else:
        compute = mx.promote_types(hidden.dtype, weight.dtype)
        if not mx.issubdtype(compute, mx.floating):
            compute = mx.float32
    cpu = mx.default_device().type == mx.DeviceType.cpu
    fn = _fused(min(int(chunk_size), vocab), backend, compute, bool(head_grad), bool(grad_ready),
                cpu)
    logp = fn(h2, weight, t1, m1)[0]
    return logp.reshape(lead)


def _chunks(vocab: int, chunk: int) -> list[tuple[int, int]]:
    return [(c0, min(c0 + chunk, vocab)) for c0 in range(0, vocab, chunk)]


def _local_targets(t: mx.array, vocab: int, chunk: int) -> tuple[mx.array, mx.array]:
    """Target column in its own chunk [N], and per chunk whether the target is in it [n_chunks, N].

    No per-chunk constants: under mx.compile each distinct constant (a chunk offset, say)
    gets its own JIT-compiled CPU kernel, which costs seconds on a cold cache.
    """
    # Padding positions may carry ids like -100; clipping keeps every gather in bounds.
    t = mx.clip(t, 0, vocab - 1)
    block = t // chunk
    n_chunks = -(-vocab // chunk)
    inside = block[None, :] == mx.arange(n_chunks, dtype=block.dtype)[:, None]
    return t - block * chunk, inside


# --- per-chunk pieces of the MLX path (mx.compile fuses the elementwise work per chunk) ---

# Cody-Waite split of ln 2: k * _LN2_HI is exact in float32 for |k| < 2^11.
_LOG2E, _LN2_HI, _LN2_LO = 1.4426950408889634, 0.693145751953125, 1.4286068203094173e-06


def _exp_poly(x):
    """exp(x) in float32 ops, relative error ~1e-7 (float32 rounding), for x <= 0 as used here.

    MLX's CPU exp measured ~70 ns per element on the development machine (NumPy's ~4 ns)
    and the kernel is dominated by its exp passes; this fused polynomial runs about twice
    as fast.  x = k ln2 + r with |r| <= ln2/2, exp(r) by its Taylor series to r^7/7! (the
    truncation, 0.35^8/8! ~ 5e-9, is below float32 rounding), 2^k built in the exponent
    bits.  x is clipped to [-87, 87] so 2^k stays a normal float: below -87 the result is
    ~1e-38 instead of 0, nothing next to the >= 1 sums it goes into.
    """
    x = mx.clip(x, -87.0, 87.0)
    k = mx.round(x * _LOG2E)
    r = (x - k * _LN2_HI) - k * _LN2_LO
    p = r * (1.0 / 5040.0) + (1.0 / 720.0)
    for c in (1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        p = p * r + c
    return p * ((k.astype(mx.int32) + 127) << 23).view(mx.float32)


def _pick(logits, local_t, inside, tl):
    picked = mx.take_along_axis(logits, local_t[:, None], axis=1)[:, 0]
    return mx.where(inside, picked, tl)


@functools.lru_cache(maxsize=None)
def _mlx_steps(fast_exp: bool):
    """The compiled per-chunk pieces (lse_step, dlogits, softmax_step); fast_exp: _exp_poly."""
    exp = _exp_poly if fast_exp else mx.exp

    def lse_step(logits, local_t, inside, run_lse, tl):
        """Fold one chunk [N, C] into the running log-sum-exp and the target logit."""
        # run_lse starts at -inf and logaddexp(-inf, x) = x.  The chunk's own sum of exp
        # shifts by its max, so logits of any magnitude stay finite.
        top = mx.max(logits, axis=1)
        chunk_lse = top + mx.log(exp(logits - top[:, None]).sum(axis=1))
        return mx.logaddexp(run_lse, chunk_lse), _pick(logits, local_t, inside, tl)

    def softmax_step(logits, wc, local_t, inside, run_lse, tl, acc):
        """lse_step, plus folding the chunk into acc = softmax(z) @ W over the chunks so far.

        With e = exp(z_c - top) (top = the chunk's row max; one exp pass serves both the
        sum and the matmul) and the new lse, acc <- acc exp(lse_old - lse_new) +
        (e @ W_c) exp(top - lse_new): acc stays normalised by the running lse, so after
        the last chunk it is E.  Both factors are <= 1; at the first chunk lse_old = -inf
        and the zero acc is multiplied by 0.
        """
        top = mx.max(logits, axis=1)
        e = exp(logits - top[:, None])
        new_lse = mx.logaddexp(run_lse, top + mx.log(e.sum(axis=1)))
        part = (e.astype(wc.dtype) @ wc).astype(mx.float32)
        acc = acc * mx.exp(run_lse - new_lse)[:, None] + part * mx.exp(top - new_lse)[:, None]
        return new_lse, _pick(logits, local_t, inside, tl), acc

    def dlogits(logits, local_t, lse, g_onehot, g_soft):
        """d(out)/d(logits) for one chunk: g_onehot * onehot(t) - g_soft * softmax."""
        cols = mx.arange(logits.shape[1], dtype=mx.int32)
        onehot = (cols[None, :] == local_t[:, None]).astype(mx.float32)
        return g_onehot[:, None] * onehot - g_soft[:, None] * exp(logits - lse[:, None])

    return mx.compile(lse_step), mx.compile(dlogits), mx.compile(softmax_step)


def _after(x: mx.array, dep, c0: int) -> mx.array:
    """x, but scheduled after dep: chunk c's matmul may not run before chunk c-1 is folded.

    The chunks' matmuls do not depend on each other, so without this MLX may schedule
    them all first, which holds every chunk (the full logits) at once.
    """
    return x if c0 == 0 else mx.depends(x, dep)


@functools.lru_cache(maxsize=None)
def _fused(chunk: int, backend: str, compute: mx.Dtype, head_grad: bool, grad_ready: bool,
           cpu: bool):
    """Build the custom_function for one (chunk, backend, dtype, head_grad, grad_ready, device)."""
    mlx_lse_step, mlx_dlogits, softmax_step = _mlx_steps(cpu)
    if backend == "mlx":
        lse_step, dlogits = mlx_lse_step, mlx_dlogits
    else:
        lse_step, dlogits = _device.lse_step(backend), _device.dlogits(backend)
    # grad_ready's forward has no device kernel: it runs the MLX ops on any device.
    f32_logits = backend == "mlx" or grad_ready

    def chunk_logits(h, wc, upcast=backend == "mlx"):
        # [N, C]; device kernels read the compute dtype as is, the MLX path upcasts.
        logits = h @ wc.T
        return logits.astype(mx.float32) if upcast else logits

    @mx.custom_function
    def fused(h, w, t, m):
        n, vocab = h.shape[0], w.shape[0]
        hc = h.astype(compute)
        lse = mx.full((n,), -mx.inf, mx.float32)
        tgt = mx.zeros((n,), mx.float32)
        # E = softmax(z) @ W, accumulated relative to the running lse (online softmax).
        acc = mx.zeros((n, w.shape[1]), mx.float32) if grad_ready else None
        local_t, inside = _local_targets(t, vocab, chunk)
        for i, (c0, c1) in enumerate(_chunks(vocab, chunk)):
            wc = w[c0:c1].astype(compute)
            deps = [lse, tgt] if acc is None else [lse, tgt, acc]
            logits = chunk_logits(_after(hc, deps, c0), wc, f32_logits)
            # A short last chunk: keep the (discarded) gather of other chunks' targets in bounds.
            lt = local_t if c1 - c0 == chunk else mx.minimum(local_t, c1 - c0 - 1)
            if acc is None:
                lse, tgt = lse_step(logits, lt, inside[i], lse, tgt)
            else:
                lse, tgt, acc = softmax_step(logits, wc, lt, inside[i], lse, tgt, acc)
        logp = mx.where(m > 0, tgt - lse, mx.zeros_like(lse))
        # lse (and E) are extra outputs only so the backward pass can reuse them.
        return (logp, lse) if acc is None else (logp, lse, acc)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        h, w, t, m = primals
        g_logp, g_lse = cotangents[:2]
        lse = outputs[1]
        vocab = w.shape[0]
        hc = h.astype(compute)
        # logp = m * (z_t - lse): dz = g*m*onehot - (g*m - g_lse) * softmax(z).
        g_onehot = g_logp.astype(mx.float32) * m
        g_soft = g_onehot - g_lse.astype(mx.float32)

        local_t, inside = _local_targets(t, vocab, chunk)

        def dz_chunk(h_dep, i, c0, c1):
            wc = w[c0:c1].astype(compute)
            logits = chunk_logits(h_dep, wc)
            # `inside` zeroes the one-hot column for targets that fall in another chunk.
            g_hot = mx.where(inside[i], g_onehot, 0.0)
            return wc, dlogits(logits, local_t, lse, g_hot, g_soft).astype(compute)

        dw_parts = []
        if grad_ready:
            # dh = dz @ W = g*m * W[t] - g_soft * E: elementwise, E from the forward pass.
            w_t = w[mx.clip(t, 0, vocab - 1)].astype(mx.float32)
            dh = g_onehot[:, None] * w_t - g_soft[:, None] * outputs[2]
        else:
            dh = mx.zeros(hc.shape, compute)
            for i, (c0, c1) in enumerate(_chunks(vocab, chunk)):
                deps = [dh, dw_parts[-1]] if head_grad and dw_parts else [dh]
                wc, dz = dz_chunk(_after(hc, deps, c0), i, c0, c1)
                dh = dh + dz @ wc
                if head_grad:
                    dw_parts.append(dz.T @ hc)
        if not dw_parts:
            # dW gets its own chain that recomputes the logits: if the caller never asks
            # for the head's gradient (frozen head, LoRA) lazy evaluation drops it whole.
            for i, (c0, c1) in enumerate(_chunks(vocab, chunk)):
                dep = dw_parts[-1] if dw_parts else None
                _, dz = dz_chunk(hc if dep is None else mx.depends(hc, dep), i, c0, c1)
                dw_parts.append(dz.T @ hc)
        dw = dw_parts[0] if len(dw_parts) == 1 else mx.concatenate(dw_parts, axis=0)
        return dh.astype(h.dtype), dw.astype(w.dtype), mx.zeros_like(t), mx.zeros_like(m)

    return fused
