"""Fused LM head + selective log-softmax: log p(target) per token without the full B*T*V logits.

The forward pass walks the vocabulary in chunks of ``chunk_size`` rows of the head,
folding each chunk's log-sum-exp into a running one (logaddexp) and picking the target
logit out of the chunk that holds it.  The backward pass recomputes each chunk's logits
from ``hidden`` and ``weight`` (nothing of size V is stored) and turns them straight
into the two matmul gradients.  See docs/kernels.md for the derivation and figures.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from . import device as _device

DEFAULT_CHUNK_SIZE = 4096
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
def token_logprobs(hidden: mx.array, weight: mx.array, targets: mx.array,
                   mask: mx.array | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   backend: str = "auto", head_grad: bool = False) -> mx.array:
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
    fn = _fused(min(int(chunk_size), vocab), backend, compute, bool(head_grad))
    logp, _lse = fn(h2, weight, t1, m1)
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

@mx.compile
def _lse_step(logits, local_t, inside, run_lse, tl):
    """Fold one chunk [N, C] into the running log-sum-exp and the target logit."""
    # run_lse starts at -inf and logaddexp(-inf, x) = x. The chunk's own logsumexp
    # shifts by its max, so logits of any magnitude stay finite.
    run_lse = mx.logaddexp(run_lse, mx.logsumexp(logits, axis=1))
    picked = mx.take_along_axis(logits, local_t[:, None], axis=1)[:, 0]
    return run_lse, mx.where(inside, picked, tl)


@mx.compile
def _dlogits(logits, local_t, lse, g_onehot, g_soft):
    """d(out)/d(logits) for one chunk: g_onehot * onehot(t) - g_soft * softmax."""
    cols = mx.arange(logits.shape[1], dtype=mx.int32)
    onehot = (cols[None, :] == local_t[:, None]).astype(mx.float32)
    return g_onehot[:, None] * onehot - g_soft[:, None] * mx.exp(logits - lse[:, None])


def _after(x: mx.array, dep, c0: int) -> mx.array:
    """x, but scheduled after dep: chunk c's matmul may not run before chunk c-1 is folded.

    The chunks' matmuls do not depend on each other, so without this MLX may schedule
    them all first, which holds every chunk (the full logits) at once.
    """
    return x if c0 == 0 else mx.depends(x, dep)


@functools.lru_cache(maxsize=None)
def _fused(chunk: int, backend: str, compute: mx.Dtype, head_grad: bool):
    """Build the custom_function for one (chunk size, backend, compute dtype, head_grad)."""
    if backend == "mlx":
        lse_step, dlogits = _lse_step, _dlogits
    else:
        lse_step, dlogits = _device.lse_step(backend), _device.dlogits(backend)

    def chunk_logits(h, wc):
        # [N, C]; device kernels read the compute dtype as is, the MLX path upcasts.
        logits = h @ wc.T
        return logits.astype(mx.float32) if backend == "mlx" else logits

    @mx.custom_function
    def fused(h, w, t, m):
        n, vocab = h.shape[0], w.shape[0]
        hc = h.astype(compute)
        lse = mx.full((n,), -mx.inf, mx.float32)
        tgt = mx.zeros((n,), mx.float32)
        local_t, inside = _local_targets(t, vocab, chunk)
        for i, (c0, c1) in enumerate(_chunks(vocab, chunk)):
            logits = chunk_logits(_after(hc, [lse, tgt], c0), w[c0:c1].astype(compute))
            # A short last chunk: keep the (discarded) gather of other chunks' targets in bounds.
            lt = local_t if c1 - c0 == chunk else mx.minimum(local_t, c1 - c0 - 1)
            lse, tgt = lse_step(logits, lt, inside[i], lse, tgt)
        logp = mx.where(m > 0, tgt - lse, mx.zeros_like(lse))
        # lse is a second output only so the backward pass can reuse it.
        return logp, lse

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        h, w, t, m = primals
        g_logp, g_lse = cotangents
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

        dh = mx.zeros(hc.shape, compute)
        dw_parts = []
        for i, (c0, c1) in enumerate(_chunks(vocab, chunk)):
            deps = [dh, dw_parts[-1]] if head_grad and dw_parts else [dh]
            wc, dz = dz_chunk(_after(hc, deps, c0), i, c0, c1)
            dh = dh + dz @ wc
            if head_grad:
                dw_parts.append(dz.T @ hc)
        if not head_grad:
            # dW gets its own chain that recomputes the logits: if the caller never asks
            # for the head's gradient (frozen head, LoRA) lazy evaluation drops it whole.
            for i, (c0, c1) in enumerate(_chunks(vocab, chunk)):
                dep = dw_parts[-1] if dw_parts else None
                _, dz = dz_chunk(hc if dep is None else mx.depends(hc, dep), i, c0, c1)
                dw_parts.append(dz.T @ hc)
        dw = dw_parts[0] if len(dw_parts) == 1 else mx.concatenate(dw_parts, axis=0)
        return dh.astype(h.dtype), dw.astype(w.dtype), mx.zeros_like(t), mx.zeros_like(m)

    return fused
