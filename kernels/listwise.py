"""Pairwise / listwise preference losses over sequence-level log-ratios, with hand-written VJPs.

A log-ratio is ``policy sequence logp - reference sequence logp``.  Every loss is an
``mx.custom_function`` whose backward pass is written out (docs/kernels.md derives each
one); all of them work in float32 with log-sum-exp / softplus forms that stay finite
for inputs of magnitude 1e4.  Scalars (beta, tau, eps, ...) are Python floats and are
baked into a cached custom_function, so they are constants to autograd.
"""

from __future__ import annotations

import functools

import mlx.core as mx

DPO_KINDS = ("sigmoid", "ipo", "hinge", "robust")
GRPO_NORMS = ("token", "sequence")

_F32 = mx.float32


def _softplus(x: mx.array) -> mx.array:
    # log(1 + e^x) without overflow: max(x, 0) + log1p(e^-|x|).
    return mx.maximum(x, 0.0) + mx.log1p(mx.exp(-mx.abs(x)))


def _valid(mask: mx.array) -> mx.array:
    return mx.stop_gradient(mask != 0)


def _masked_log_softmax(x: mx.array, valid: mx.array, scale: float) -> mx.array:
    """log_softmax(scale * x) over the valid entries of the last axis; 0 at invalid entries.

    Shifts by the max before scaling: x - max is exact for nearby values, whereas
    rounding scale * x first (x ~ 1e4) puts ~1e-3 absolute error on every logit, i.e.
    ~1e-3 relative error on the probabilities.
    """
    neg_inf = mx.array(-mx.inf, _F32)
    any_valid = valid.any(axis=-1, keepdims=True)
    # Invalid slots may hold anything (padding, NaN): every use goes through `where`.
    top = mx.where(any_valid, mx.where(valid, x, neg_inf).max(axis=-1, keepdims=True), 0.0)
    z = (x - top) * scale
    lse = mx.log(mx.where(valid, mx.exp(z), 0.0).sum(axis=-1, keepdims=True))
    return mx.where(valid, z - lse, 0.0)


def _check_2d(name: str, *arrays: mx.array) -> None:
    shape = arrays[0].shape
    if len(shape) != 2 or any(a.shape != shape for a in arrays):
        raise ValueError(f"{name}: expected matching [P, K] arrays, got "
                         f"{[tuple(a.shape) for a in arrays]}")


# ------------------------------------------------------------------------- DPO family

def dpo_loss(chosen_logratio: mx.array, rejected_logratio: mx.array, beta: float,
             kind: str = "sigmoid", label_smoothing: float = 0.0) -> mx.array:
    """Per-pair DPO loss [N] (sigmoid/ipo/hinge/robust) of the margin chosen - rejected."""
    if kind not in DPO_KINDS:
        raise ValueError(f"dpo_loss: kind must be one of {DPO_KINDS}, got {kind!r}")
    beta, eps = float(beta), float(label_smoothing)
    if not beta > 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {eps}")
    if eps and kind in ("ipo", "hinge"):
        raise ValueError(f"dpo_loss: label_smoothing applies to 'sigmoid'/'robust', not {kind!r}")
    if chosen_logratio.shape != rejected_logratio.shape:
        raise ValueError(f"dpo_loss: shapes differ: {chosen_logratio.shape} vs "
                         f"{rejected_logratio.shape}")
    return _dpo_fn(kind, beta, eps)(chosen_logratio.astype(_F32), rejected_logratio.astype(_F32))


def _dpo_value_slope(kind: str, beta: float, eps: float, m: mx.array):
    """(loss, dloss/dm) elementwise in the margin m."""
    if kind == "ipo":
        d = m - 1.0 / (2.0 * beta)
        return d * d, 2.0 * d
    z = beta * m
    if kind == "hinge":
        return mx.maximum(1.0 - z, 0.0), mx.where(z < 1.0, -beta, 0.0)
    nls_pos = _softplus(-z)  # -log sigmoid(z)
    nls_neg = _softplus(z)   # -log sigmoid(-z)
    # d/dz softplus(-z) = -sigmoid(-z), d/dz softplus(z) = sigmoid(z); written without
    # 1 - sigmoid(.) so small slopes keep their relative precision.
    sig_pos, sig_neg = mx.sigmoid(z), mx.sigmoid(-z)
    if kind == "sigmoid":
        loss = (1.0 - eps) * nls_pos + eps * nls_neg
        dz = eps * sig_pos - (1.0 - eps) * sig_neg
    else:  # robust (Chowdhury et al. 2024): unbiased under label-flip rate eps
        loss = ((1.0 - eps) * nls_pos - eps * nls_neg) / (1.0 - 2.0 * eps)
        dz = -((1.0 - eps) * sig_neg + eps * sig_pos) / (1.0 - 2.0 * eps)
    return loss, beta * dz


@functools.lru_cache(maxsize=None)
def _dpo_fn(kind: str, beta: float, eps: float):
    @mx.custom_function
    def f(chosen, rejected):
        return _dpo_value_slope(kind, beta, eps, chosen - rejected)[0]

    @f.vjp
    def f_vjp(primals, cotangent, output):
        chosen, rejected = primals
        g = cotangent * _dpo_value_slope(kind, beta, eps, chosen - rejected)[1]
        return g, -g

    return f


# ------------------------------------------------------------------------- LDL (KL to a target)

def ldl_loss(logratio: mx.array, scores: mx.array, mask: mx.array, beta: float,
             tau: float) -> mx.array:
    """Per-prompt KL(q || p) [P], q = softmax(scores/tau), p = softmax(beta*logratio) on valid."""
    _check_2d("ldl_loss", logratio, scores, mask)
    beta, tau = float(beta), float(tau)
    if not (beta > 0 and tau > 0):
        raise ValueError(f"ldl_loss: beta and tau must be > 0, got {beta}, {tau}")
    return _ldl_fn(beta, tau)(logratio.astype(_F32), scores.astype(_F32), mask)


@functools.lru_cache(maxsize=None)
def _ldl_fn(beta: float, tau: float):
    def parts(logratio, scores, mask):
        valid = _valid(mask)
        logp = _masked_log_softmax(logratio, valid, beta)
        logq = _masked_log_softmax(scores, valid, 1.0 / tau)
        q = mx.where(valid, mx.exp(logq), 0.0)
        # A row with one valid entry has logp = logq = 0 exactly, an empty row q = 0:
        # both give KL = 0 with no special case.
        kl = (q * (logq - logp)).sum(axis=-1)
        return valid, logp, logq, q, kl

    @mx.custom_function
    def f(logratio, scores, mask):
        return parts(logratio, scores, mask)[-1]

    @f.vjp
    def f_vjp(primals, cotangent, output):
        logratio, scores, mask = primals
        valid, logp, logq, q, kl = parts(logratio, scores, mask)
        g = cotangent[:, None]
        p = mx.where(valid, mx.exp(logp), 0.0)
        d_logratio = g * beta * (p - q)
        # dKL/dy_k = q_k (r_k - KL) with r = log q - log p and KL = sum_j q_j r_j. Written
        # as q_k sum_j q_j (r_k - r_j): when q is nearly one-hot, r_k - KL cancels to 0 in
        # float32 for the top entry while its true (tiny) value balances the others.
        r = logq - logp
        spread = (q[:, None, :] * (r[:, :, None] - r[:, None, :])).sum(axis=-1)
        d_scores = (g / tau) * q * spread
        return d_logratio, d_scores, mx.zeros_like(mask)

    return f


# ------------------------------------------------------------------------- ListMLE (Plackett-Luce)

def listmle_loss(logratio: mx.array, scores: mx.array, mask: mx.array, beta: float) -> mx.array:
    """Plackett-Luce NLL [P] of the scores order (desc, ties by index) under beta*logratio."""
    _check_2d("listmle_loss", logratio, scores, mask)
    beta = float(beta)
    if not beta > 0:
        raise ValueError(f"listmle_loss: beta must be > 0, got {beta}")
    return _listmle_fn(beta)(logratio.astype(_F32), scores, mask)


def _listmle_pool(scores: mx.array, valid: mx.array) -> mx.array:
    """pool[p, k, j]: item j is still unplaced when item k is drawn (j == k included).

    Instead of sorting, j precedes k iff s_j > s_k or (s_j == s_k and j < k): the
    stable descending order, as a [P, K, K] mask (K is small).
    """
    k = scores.shape[-1]
    s_k, s_j = scores[:, :, None], scores[:, None, :]
    idx = mx.arange(k)
    earlier = idx[None, :] < idx[:, None]                     # [k, j]: j < k
    before = (s_j > s_k) | ((s_j == s_k) & earlier[None])
    return valid[:, :, None] & valid[:, None, :] & ~before


@functools.lru_cache(maxsize=None)
def _listmle_fn(beta: float):
    def parts(logratio, scores, mask):
        valid = _valid(mask)
        pool = mx.stop_gradient(_listmle_pool(scores, valid))
        lr = mx.broadcast_to(logratio[:, None, :], pool.shape)  # [P, k, j] = logratio_j
        has = pool.any(axis=-1, keepdims=True)
        top = mx.where(has, mx.where(pool, lr, -mx.inf).max(axis=-1, keepdims=True), 0.0)
        # Shift, then scale by beta (see _masked_log_softmax); z <= 0 on the pool.
        z = (lr - top) * beta
        lse = mx.log(mx.where(pool, mx.exp(z), 0.0).sum(axis=-1))
        # Term of item k: log sum_{j in pool} e^{beta lr_j} - beta lr_k (>= 0).
        term = mx.where(valid, (top[..., 0] - logratio) * beta + lse, 0.0)
        return pool, z, lse, valid, term.sum(axis=-1)

    @mx.custom_function
    def f(logratio, scores, mask):
        return parts(logratio, scores, mask)[-1]

    @f.vjp
    def f_vjp(primals, cotangent, output):
        logratio, scores, mask = primals
        pool, z, lse, valid, _ = parts(logratio, scores, mask)
        # dNLL/dx_j = sum_k [j in pool_k] softmax_{pool_k}(x)_j - valid_j,  x = beta*logratio
        probs = mx.where(pool, mx.exp(z - lse[..., None]), 0.0)
        dx = probs.sum(axis=1) - valid.astype(_F32)
        return cotangent[:, None] * beta * dx, mx.zeros_like(scores), mx.zeros_like(mask)

    return f


# ------------------------------------------------------------------------- GRPO

def grpo_advantages(scores: mx.array, mask: mx.array, scale_by_std: bool = True,
                    eps: float = 1e-4) -> mx.array:
    """Group-relative advantages [P, K]: (s - mean) / (std + eps) over valid entries, else 0."""
    _check_2d("grpo_advantages", scores, mask)
    valid = mask != 0
    s = scores.astype(_F32)
    # Shift by a valid entry first: a group of equal scores then gives exactly 0 instead of
    # rounding noise that the std division would blow up.
    top = mx.where(valid, s, -mx.inf).max(axis=-1, keepdims=True)
    s = mx.where(valid, s - mx.where(valid.any(axis=-1, keepdims=True), top, 0.0), 0.0)
    n = mx.maximum(valid.sum(axis=-1, keepdims=True), 1).astype(_F32)
    dev = mx.where(valid, s - s.sum(axis=-1, keepdims=True) / n, 0.0)
    if scale_by_std:
        # Population std (ddof=0): defined for K = 1, where the advantage is 0.
        dev = dev / (mx.sqrt((dev * dev).sum(axis=-1, keepdims=True) / n) + float(eps))
    return mx.stop_gradient(dev)


def grpo_token_loss(logp: mx.array, old_logp: mx.array, ref_logp: mx.array,
                    advantages: mx.array, mask: mx.array, clip_eps: float, beta: float,
                    norm: str = "token") -> mx.array:
    """Scalar GRPO loss: clipped-ratio surrogate + beta * k3 KL to the reference, averaged."""
    _check_2d("grpo_token_loss", logp, old_logp, ref_logp, mask)
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"grpo_token_loss: advantages {advantages.shape} must be "
                         f"{tuple(logp.shape[:1])}")
    if norm not in GRPO_NORMS:
        raise ValueError(f"grpo_token_loss: norm must be one of {GRPO_NORMS}, got {norm!r}")
    clip_eps, beta = float(clip_eps), float(beta)
    if not 0 <= clip_eps < 1 or beta < 0:
        raise ValueError(f"grpo_token_loss: need 0 <= clip_eps < 1 and beta >= 0, got "
                         f"{clip_eps}, {beta}")
    return _grpo_fn(clip_eps, beta, norm)(
        logp.astype(_F32), old_logp.astype(_F32), ref_logp.astype(_F32),
        advantages.astype(_F32), mask)


@functools.lru_cache(maxsize=None)
def _grpo_fn(clip_eps: float, beta: float, norm: str):
    def parts(logp, old, ref, adv, mask):
        valid = _valid(mask)
        w = valid.astype(_F32)
        if norm == "token":
            weight = w / mx.maximum(w.sum(), 1.0)
        else:
            per_seq = w.sum(axis=1, keepdims=True)
            n_seq = mx.maximum((per_seq > 0).sum(), 1).astype(_F32)
            weight = w / (mx.maximum(per_seq, 1.0) * n_seq)
        a = adv[:, None]
        ratio = mx.exp(logp - old)
        unclipped_obj = ratio * a  # inf * 0 = NaN at A = 0 is never selected below
        clipped_ratio = mx.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
        clipped_obj = clipped_ratio * a
        # min(u, v). Inside the clip range u == v and the slope is A (unclipped branch);
        # at A == 0 take the clipped branch, whose ratio stays finite for d/dA.
        take_unclipped = (unclipped_obj <= clipped_obj) & (a != 0)
        surrogate = mx.where(take_unclipped, unclipped_obj, clipped_obj)
        ref_gap = ref - logp
        e_gap = mx.exp(ref_gap)
        # beta = 0 (no KL term) must not touch ref_logp at all: 0 * inf would be NaN.
        kl = beta * (e_gap - ref_gap - 1.0) if beta else 0.0
        per_token = mx.where(valid, kl - surrogate, 0.0)
        return (valid, weight, ratio, unclipped_obj, clipped_ratio, take_unclipped, e_gap,
                (weight * per_token).sum())

    @mx.custom_function
    def f(logp, old, ref, adv, mask):
        return parts(logp, old, ref, adv, mask)[-1]

    @f.vjp
    def f_vjp(primals, cotangent, output):
        logp, old, ref, adv, mask = primals
        valid, weight, ratio, u, clipped_ratio, take_u, e_gap, _ = parts(*primals)
        gw = cotangent * weight
        # d surrogate / d logp = A * ratio on the unclipped branch (= u), 0 on the clipped one.
        ds = mx.where(take_u, u, 0.0)
        d_kl = beta * (e_gap - 1.0) if beta else mx.zeros_like(e_gap)  # d k3 / d ref
        d_logp = mx.where(valid, gw * (-d_kl - ds), 0.0)
        d_old = mx.where(valid, gw * ds, 0.0)
        d_ref = mx.where(valid, gw * d_kl, 0.0)
        d_adv = -mx.where(valid, gw * mx.where(take_u, ratio, clipped_ratio), 0.0).sum(axis=1)
        return d_logp, d_old, d_ref, d_adv, mx.zeros_like(mask)

    return f
