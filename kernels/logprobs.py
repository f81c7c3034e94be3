"""Fused LM head + selective log-softmax: log p(target) per token without the full B*T*V logits.

The forward pass walks the vocabulary in chunks of ``chunk_size`` rows of the head,
keeping an online log-sum-exp (running max ``m`` and rescaled sum ``s``) and picking
the target logit out of the chunk that holds it.  The backward pass recomputes each
chunk's logits from ``hidden`` and ``weight`` (nothing of size V is stored) and turns
them straight into the two matmul gradients.  See docs/kernels.md for the derivation.
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


def token_logprobs(hidden: mx.array, weight: mx.array, targets: mx.array,
                   mask: mx.array | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   backend: str = "auto", head_grad: bool = False) -> mx.array:
    """log p(targets) per position, [*lead] float32, from hidden [*lead, H] and head weight [V, H]."""
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


# --- per-chunk pieces of the MLX path (mx.compile fuses the elementwise work per chunk) ---

@mx.compile
def _lse_step(logits, local_t, m, s, tl):
    """Fold one chunk [N, C] into the running max / rescaled sum / target logit."""
    c = logits.shape[1]
    m_new = mx.maximum(m, logits.max(axis=1))
    # m starts at -inf: exp(-inf - finite) = 0, so the empty prefix contributes nothing.
    s = s * mx.exp(m - m_new) + mx.exp(logits - m_new[:, None]).sum(axis=1)
    inside = (local_t >= 0) & (local_t < c)
    picked = mx.take_along_axis(logits, mx.clip(local_t, 0, c - 1)[:, None], axis=1)[:, 0]
    return m_new, s, mx.where(inside, picked, tl)


@mx.compile
def _dlogits(logits, local_t, lse, g_onehot, g_soft):
    """d(out)/d(logits) for one chunk: g_onehot * onehot(t) - g_soft * softmax."""
    cols = mx.arange(logits.shape[1], dtype=mx.int32)
    onehot = (cols[None, :] == local_t[:, None]).astype(mx.float32)
    return g_onehot[:, None] * onehot - g_soft[:, None] * mx.exp(logits - lse[:, None])


def _after(x: mx.array, dep: mx.array, c0: int) -> mx.array:
    """x, but not before dep is computed: keeps chunk c's matmul from running ahead.

    Without it MLX's scheduler is free to run every chunk's matmul first (they do not
    depend on each other), which would hold all chunks, i.e. the full logits, at once.
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
        run_m = mx.full((n,), -mx.inf, mx.float32)
        run_s = mx.zeros((n,), mx.float32)
        tgt = mx.zeros((n,), mx.float32)
        for c0, c1 in _chunks(vocab, chunk):
            logits = chunk_logits(_after(hc, [run_m, run_s, tgt], c0), w[c0:c1].astype(compute))
            run_m, run_s, tgt = lse_step(logits, t - c0, run_m, run_s, tgt)
        lse = run_m + mx.log(run_s)
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

        def dz_chunk(h_dep, c0, c1):
            wc = w[c0:c1].astype(compute)
            logits = chunk_logits(h_dep, wc)
            return wc, dlogits(logits, t - c0, lse, g_onehot, g_soft).astype(compute)

        dh = mx.zeros(hc.shape, compute)
        dw_parts = []
        for c0, c1 in _chunks(vocab, chunk):
            deps = [dh, dw_parts[-1]] if head_grad and dw_parts else [dh]
            wc, dz = dz_chunk(_after(hc, deps, c0), c0, c1)
            dh = dh + dz @ wc
            if head_grad:
                dw_parts.append(dz.T @ hc)
        if not head_grad:
            # dW gets its own chain that recomputes the logits: if the caller never asks
            # for the head's gradient (frozen head, LoRA) lazy evaluation drops it whole.
            for c0, c1 in _chunks(vocab, chunk):
                dep = dw_parts[-1] if dw_parts else None
                _, dz = dz_chunk(hc if dep is None else mx.depends(hc, dep), c0, c1)
                dw_parts.append(dz.T @ hc)
        dw = dw_parts[0] if len(dw_parts) == 1 else mx.concatenate(dw_parts, axis=0)
        return dh.astype(h.dtype), dw.astype(w.dtype), mx.zeros_like(t), mx.zeros_like(m)

    return fused
