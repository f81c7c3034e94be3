"""Pairwise / listwise losses against float64 NumPy references (fresh random inputs every run).

The seed is printed (pytest shows it for a failing test); PUDL_TEST_SEED=<seed> replays
it.  Array errors are max-norm relative, max|got - want| / max|want|; the scalar GRPO
loss is compared relative to the sum of its terms' magnitudes (its condition number).
Each reference gradient is itself checked by central differences in float64.
"""

from __future__ import annotations

import os
import secrets

import mlx.core as mx
import numpy as np
import pytest

from pudl.kernels import dpo_loss, grpo_advantages, grpo_token_loss, ldl_loss, listmle_loss

VALUE_RTOL = 1e-5
GRAD_RTOL = 1e-4


@pytest.fixture
def rng():
    seed = int(os.environ.get("PUDL_TEST_SEED") or secrets.randbits(32))
    print(f"PUDL_TEST_SEED={seed}")
    return np.random.default_rng(seed)


def rel_err(got, want, scale=None) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.all(np.isfinite(got)), "non-finite values"
    denom = np.max(np.abs(want)) if scale is None else scale
    err = np.max(np.abs(got - want)) if got.size else 0.0
    return float(err / max(denom, 1e-30))


def f32(x):
    """Round to float32 once, so MLX and the reference see the same numbers."""
    return np.asarray(x, np.float32)


def finite_diff(f, args, which, step=1e-6):
    """Central differences of scalar f(*args) w.r.t. args[which] (float64)."""
    x = args[which]
    out = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        a, b = [list(args), list(args)]
        a[which], b[which] = x.copy(), x.copy()
        a[which][idx] += step
        b[which][idx] -= step
        out[idx] = (f(*a) - f(*b)) / (2 * step)
    return out


def assert_fd(f, args, which, grad, tol=1e-6):
    fd = finite_diff(f, args, which)
    scale = max(np.max(np.abs(grad)), 1e-12)
    assert np.max(np.abs(fd - grad)) / scale < tol, (fd, grad)


def mlx_grads(fn, args, argnums, cot):
    """Value and VJP of fn(*args) (MLX arrays built from NumPy) with cotangent cot."""
    xs = [mx.array(a) for a in args]
    out, vjps = mx.vjp(lambda *d: fn(*[d[argnums.index(i)] if i in argnums else xs[i]
                                       for i in range(len(xs))]),
                       [xs[i] for i in argnums], [mx.array(f32(cot))])
    mx.eval(out, vjps)
    return np.array(out[0]), [np.array(v) for v in vjps]


# ================================================================== DPO

def ref_dpo(c, r, beta, kind, eps):
    m = c - r
    z = beta * m
    sp = lambda x: np.logaddexp(0.0, x)                       # noqa: E731
    sig = lambda x: np.exp(-np.logaddexp(0.0, -x))           # noqa: E731
    if kind == "sigmoid":
        return (1 - eps) * sp(-z) + eps * sp(z), beta * (eps * sig(z) - (1 - eps) * sig(-z))
    if kind == "robust":
        loss = ((1 - eps) * sp(-z) - eps * sp(z)) / (1 - 2 * eps)
        return loss, -beta * ((1 - eps) * sig(-z) + eps * sig(z)) / (1 - 2 * eps)
    if kind == "ipo":
        d = m - 1 / (2 * beta)
        return d**2, 2 * d
    return np.maximum(1 - z, 0.0), np.where(z < 1, -beta, 0.0)


DPO_CASES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1), ("robust", 0.0),
             ("ipo", 0.0), ("hinge", 0.0)]


@pytest.mark.parametrize("kind,eps", DPO_CASES)
def test_dpo_reference_gradient_fd(rng, kind, eps):
    beta = float(rng.uniform(0.05, 2.0))
    c, r = rng.standard_normal(6) * 3, rng.standard_normal(6) * 3
    if kind == "hinge":  # keep FD steps off the kink at beta*m = 1
        m = c - r
        c = np.where(np.abs(beta * m - 1) < 1e-3, c + 0.1, c)
    g = rng.standard_normal(6)
    slope = ref_dpo(c, r, beta, kind, eps)[1]
    f = lambda cc, rr: float(np.sum(g * ref_dpo(cc, rr, beta, kind, eps)[0]))  # noqa: E731
    assert_fd(f, [c, r], 0, g * slope)
    assert_fd(f, [c, r], 1, -g * slope)


@pytest.mark.parametrize("kind,eps", DPO_CASES)
@pytest.mark.parametrize("scale", [3.0, 1e4])
def test_dpo_matches_reference(rng, kind, eps, scale):
    n = 64
    beta = float(rng.uniform(0.05, 2.0))
    c, r = f32(rng.standard_normal(n) * scale), f32(rng.standard_normal(n) * scale)
    g = f32(rng.standard_normal(n))
    want, slope = ref_dpo(c.astype(np.float64), r.astype(np.float64), beta, kind, eps)
    got, (dc, dr) = mlx_grads(lambda a, b: dpo_loss(a, b, beta, kind, eps), [c, r], [0, 1], g)
    assert rel_err(got, want) < VALUE_RTOL
    assert rel_err(dc, g * slope) < GRAD_RTOL
    assert rel_err(dr, -g * slope) < GRAD_RTOL


def test_dpo_validation():
    x = mx.zeros((3,))
    for bad in (dict(kind="nope"), dict(beta=0.0), dict(label_smoothing=0.5),
                dict(kind="ipo", label_smoothing=0.1)):
        kw = dict(beta=0.1) | bad
        with pytest.raises(ValueError):
            dpo_loss(x, x, **kw)


# ================================================================== LDL

def ref_ldl(x, s, mask, beta, tau):
    """Per-row loop: loss [P], d/dx [P,K], d/ds [P,K]."""
    p_rows, k = x.shape
    loss, dx, ds = np.zeros(p_rows), np.zeros((p_rows, k)), np.zeros((p_rows, k))
    for i in range(p_rows):
        v = np.flatnonzero(mask[i])
        if len(v) < 2:
            continue
        a, b = beta * x[i, v], s[i, v] / tau
        logp = a - np.logaddexp.reduce(a)
        logq = b - np.logaddexp.reduce(b)
        q = np.exp(logq)
        r = logq - logp
        loss[i] = np.sum(q * r)
        dx[i, v] = beta * (np.exp(logp) - q)
        # q_k (r_k - loss) without cancelling ~1e4-sized terms when q is nearly one-hot.
        ds[i, v] = q * ((r[:, None] - r[None, :]) * q[None, :]).sum(axis=1) / tau
    return loss, dx, ds


def ldl_inputs(rng, p, k, scale=3.0, valid_p=0.7, score_scale=3.0, score_offset=0.0):
    x = f32(rng.standard_normal((p, k)) * scale)
    offset = score_offset * rng.choice([-1.0, 1.0], size=(p, 1))
    s = f32(rng.standard_normal((p, k)) * score_scale + offset)
    mask = rng.random((p, k)) < valid_p
    mask[0] = False                    # empty row
    if p > 1:
        mask[1] = False
        mask[1, rng.integers(k)] = True  # one valid entry
    return x, s, mask


def test_ldl_reference_gradient_fd(rng):
    x, s, mask = ldl_inputs(rng, 4, 5)
    x, s = x.astype(np.float64), s.astype(np.float64)
    beta, tau = 0.7, 1.3
    g = rng.standard_normal(4)
    _, dx, ds = ref_ldl(x, s, mask, beta, tau)
    f = lambda xx, ss: float(np.sum(g * ref_ldl(xx, ss, mask, beta, tau)[0]))  # noqa: E731
    assert_fd(f, [x, s], 0, g[:, None] * dx)
    assert_fd(f, [x, s], 1, g[:, None] * ds)


@pytest.mark.parametrize("p,k,scale,score_scale,score_offset", [
    (12, 8, 3.0, 3.0, 0.0),
    (12, 8, 1e4, 3.0, 0.0),     # log-ratios of order 1e4
    (12, 8, 3.0, 3.0, 1e4),     # scores of order 1e4, spread O(1): q stays soft
    (12, 8, 1e4, 1e4, 0.0),     # both spread at 1e4: q and p (nearly) one-hot
    (5, 1, 3.0, 3.0, 0.0),      # K = 1
])
def test_ldl_matches_reference(rng, p, k, scale, score_scale, score_offset):
    x, s, mask = ldl_inputs(rng, p, k, scale, score_scale=score_scale,
                            score_offset=score_offset)
    beta, tau = float(rng.uniform(0.1, 2)), float(rng.uniform(0.2, 2))
    g = f32(rng.standard_normal(p))
    want, dx, ds = ref_ldl(x.astype(np.float64), s.astype(np.float64), mask, beta, tau)
    got, (gx, gs) = mlx_grads(lambda a, b, m: ldl_loss(a, b, m, beta, tau), [x, s, mask],
                              [0, 1], g)
    assert got.shape == (p,)
    assert np.all(got[mask.sum(1) < 2] == 0.0)
    assert np.all(gx[~mask] == 0.0) and np.all(gs[~mask] == 0.0)
    assert np.all(np.isfinite(gs))
    if not np.any(want):
        assert np.all(got == 0.0) and np.all(gx == 0.0) and np.all(gs == 0.0)
        return
    assert rel_err(got, want) < VALUE_RTOL
    assert rel_err(gx, g[:, None] * dx) < GRAD_RTOL
    if score_scale < 1e4:
        # With scores spread at 1e4 the score gradient is ~exp(-gap / tau) and falls
        # below float32's range; everything else is still compared above.
        assert rel_err(gs, g[:, None] * ds) < GRAD_RTOL


def test_ldl_ignores_garbage_in_masked_slots(rng):
    x, s, mask = ldl_inputs(rng, 6, 5)
    beta, tau = 0.5, 1.0
    want = np.array(ldl_loss(mx.array(x), mx.array(s), mx.array(mask), beta, tau))
    x[~mask], s[~mask] = np.nan, np.inf
    got = np.array(ldl_loss(mx.array(x), mx.array(s), mx.array(mask), beta, tau))
    assert np.array_equal(got, want)


# ================================================================== ListMLE

def ref_listmle(x, s, mask, beta):
    """Sort-based Plackett-Luce NLL per row and its gradient w.r.t. x."""
    p_rows, k = x.shape
    loss, dx = np.zeros(p_rows), np.zeros((p_rows, k))
    for i in range(p_rows):
        v = np.flatnonzero(mask[i])
        order = v[np.argsort(-s[i, v], kind="stable")]  # ties keep index order
        a = beta * x[i, order]
        for j in range(len(order)):
            lse = np.logaddexp.reduce(a[j:])
            loss[i] += lse - a[j]
            dx[i, order[j:]] += beta * np.exp(a[j:] - lse)
            dx[i, order[j]] -= beta
    return loss, dx


def listmle_inputs(rng, p, k, scale=3.0, ties=False):
    x = f32(rng.standard_normal((p, k)) * scale)
    s = f32(rng.integers(0, 3, size=(p, k)) if ties else rng.standard_normal((p, k)))
    mask = rng.random((p, k)) < 0.8
    mask[0] = False
    return x, s, mask


def test_listmle_reference_gradient_fd(rng):
    x, s, mask = listmle_inputs(rng, 4, 5, ties=True)
    x = x.astype(np.float64)
    beta = 0.8
    g = rng.standard_normal(4)
    _, dx = ref_listmle(x, s, mask, beta)
    f = lambda xx: float(np.sum(g * ref_listmle(xx, s, mask, beta)[0]))  # noqa: E731
    assert_fd(f, [x], 0, g[:, None] * dx)


@pytest.mark.parametrize("p,k,scale,ties", [(10, 8, 3.0, False), (10, 8, 3.0, True),
                                            (10, 6, 1e4, True), (4, 1, 3.0, False)])
def test_listmle_matches_reference(rng, p, k, scale, ties):
    x, s, mask = listmle_inputs(rng, p, k, scale, ties)
    beta = float(rng.uniform(0.1, 2))
    g = f32(rng.standard_normal(p))
    want, dx = ref_listmle(x.astype(np.float64), s, mask, beta)
    got, (gx,) = mlx_grads(lambda a, b, m: listmle_loss(a, b, m, beta), [x, s, mask], [0], g)
    assert np.all(got[mask.sum(1) < 2] == 0.0) and np.all(gx[~mask] == 0.0)
    if np.any(want):
        assert rel_err(got, want) < VALUE_RTOL
        assert rel_err(gx, g[:, None] * dx) < GRAD_RTOL
    else:
        assert np.all(got == 0.0) and np.all(gx == 0.0)


def test_listmle_tie_order_matters(rng):
    # Two items with equal score: index order decides, so swapping their columns changes
    # the loss unless their log-ratios are equal too.
    x = f32([[2.0, -1.0, 0.5]])
    s = f32([[1.0, 1.0, 0.0]])
    m = np.ones((1, 3), bool)
    a = np.array(listmle_loss(mx.array(x), mx.array(s), mx.array(m), 1.0))
    b = np.array(listmle_loss(mx.array(x[:, [1, 0, 2]]), mx.array(s), mx.array(m), 1.0))
    assert rel_err(a, ref_listmle(x.astype(np.float64), s, m, 1.0)[0]) < VALUE_RTOL
    assert abs(a[0] - b[0]) > 1.0


# ================================================================== GRPO

def ref_advantages(s, mask, scale_by_std, eps):
    out = np.zeros_like(s, dtype=np.float64)
    for i in range(s.shape[0]):
        v = np.flatnonzero(mask[i])
        if len(v) == 0:
            continue
        d = s[i, v] - s[i, v].mean()
        out[i, v] = d / (s[i, v].std() + eps) if scale_by_std else d
    return out


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_advantages(rng, scale_by_std):
    p, k = 9, 6
    s = f32(rng.standard_normal((p, k)) * 2)
    s[1] = 0.7                                   # all tied: advantages 0
    s[2, :3] = s[2, 0]                           # partial ties
    mask = rng.random((p, k)) < 0.8
    mask[0] = False
    mask[3] = False
    mask[3, 2] = True                            # one valid entry: 0
    s[4, :3] = 2.9   # float32: (2.9 + 2.9 + 2.9) / 3 != 2.9
    mask[4] = [True, True, True, False, False, False]  # the valid ones all tied: 0
    got = np.array(grpo_advantages(mx.array(s), mx.array(mask), scale_by_std, 1e-4))
    want = ref_advantages(s.astype(np.float64), mask, scale_by_std, 1e-4)
    assert np.all(got[~mask] == 0.0)
    assert np.all(got[1] == 0.0) and np.all(got[3] == 0.0) and np.all(got[4] == 0.0)
    assert rel_err(got, want) < VALUE_RTOL
    one = np.array(grpo_advantages(mx.array(s[:, :1]), mx.array(np.ones((p, 1), bool))))
    assert np.all(one == 0.0)                    # K = 1


def ref_grpo(logp, old, ref, adv, mask, clip_eps, beta, norm):
    """Loss, gradients (logp, old, ref, adv) and the sum of |weighted terms|."""
    w = mask.astype(np.float64)
    if norm == "token":
        weight = w / max(w.sum(), 1.0)
    else:
        cnt = w.sum(1, keepdims=True)
        weight = w / (np.maximum(cnt, 1.0) * max((cnt > 0).sum(), 1))
    a = adv[:, None]
    r = np.exp(logp - old)
    u, v = r * a, np.clip(r, 1 - clip_eps, 1 + clip_eps) * a
    take_u = (u <= v) & (a != 0)
    gap = ref - logp
    tok = np.where(mask, beta * (np.exp(gap) - gap - 1) - np.minimum(u, v), 0.0)
    ds = np.where(take_u, u, 0.0)
    d_logp = weight * (beta * (1 - np.exp(gap)) - ds)
    d_old = weight * ds
    d_ref = weight * beta * (np.exp(gap) - 1)
    d_adv = -(weight * np.where(take_u, r, np.clip(r, 1 - clip_eps, 1 + clip_eps))).sum(1)
    return (weight * tok).sum(), (d_logp, d_old, d_ref, d_adv), (weight * np.abs(tok)).sum()


def grpo_inputs(rng, n, t, spread=0.3, clip_eps=0.2):
    logp = rng.standard_normal((n, t)) - 2.0
    old = logp + rng.standard_normal((n, t)) * spread
    r = np.exp(logp - old)
    # Keep ratios away from the clip kinks so central differences stay on one branch.
    near = (np.abs(r - (1 - clip_eps)) < 1e-3) | (np.abs(r - (1 + clip_eps)) < 1e-3)
    old = np.where(near, old + 0.01, old)
    ref = logp + rng.standard_normal((n, t)) * spread
    adv = rng.standard_normal(n)
    mask = rng.random((n, t)) < 0.75
    mask[0] = False                                # empty sequence
    return [f32(logp), f32(old), f32(ref), f32(adv), mask]


@pytest.mark.parametrize("norm", ["token", "sequence"])
def test_grpo_reference_gradient_fd(rng, norm):
    args = grpo_inputs(rng, 3, 4)
    args = [a.astype(np.float64) for a in args[:4]] + [args[4]]
    _, grads, _ = ref_grpo(*args, 0.2, 0.05, norm)
    f = lambda *a: float(ref_grpo(*a, 0.2, 0.05, norm)[0])  # noqa: E731
    for i in range(4):
        assert_fd(f, args, i, grads[i])


@pytest.mark.parametrize("norm", ["token", "sequence"])
@pytest.mark.parametrize("spread", [0.3, 15.0])
def test_grpo_token_loss_matches_reference(rng, norm, spread):
    clip_eps, beta = 0.2, float(rng.uniform(0.0, 0.2))
    args = grpo_inputs(rng, 8, 12, spread, clip_eps)
    want, grads, scale = ref_grpo(*[a.astype(np.float64) for a in args[:4]], args[4],
                                  clip_eps, beta, norm)
    got, vjps = mlx_grads(lambda *a: grpo_token_loss(*a, clip_eps, beta, norm), args,
                          [0, 1, 2, 3], np.float32(1.0))
    assert got.shape == ()
    assert rel_err(got, want, scale=scale) < VALUE_RTOL
    for gv, wv in zip(vjps, grads):
        assert rel_err(gv, wv) < GRAD_RTOL
    assert np.all(vjps[0][~args[4]] == 0.0)


def test_grpo_token_loss_all_masked_is_zero(rng):
    args = grpo_inputs(rng, 3, 5)
    args[4][:] = False
    got, vjps = mlx_grads(lambda *a: grpo_token_loss(*a, 0.2, 0.1, "sequence"), args,
                          [0], np.float32(1.0))
    assert got == 0.0 and np.all(vjps[0] == 0.0)


def test_grpo_overflows_that_do_not_matter_stay_finite(rng):
    # exp(100) overflows float32: with A = 0 the surrogate is 0 and nothing may be NaN.
    args = grpo_inputs(rng, 3, 4)
    args[0][1] = args[1][1] + 100.0
    args[3][1] = 0.0
    args[4][1] = True
    for norm in ("token", "sequence"):
        got, vjps = mlx_grads(lambda *a: grpo_token_loss(*a, 0.2, 0.0, norm), args,
                              [0, 1, 2, 3], np.float32(1.0))
        assert np.isfinite(got) and all(np.all(np.isfinite(v)) for v in vjps)
        assert np.all(vjps[0][1] == 0.0)
    # beta = 0 ignores ref_logp entirely, even an overflowing one.
    args[2][2] = args[0][2] + 200.0
    got, vjps = mlx_grads(lambda *a: grpo_token_loss(*a, 0.2, 0.0, "token"), args,
                          [0, 1, 2, 3], np.float32(1.0))
    assert np.isfinite(got) and all(np.all(np.isfinite(v)) for v in vjps)


def test_grpo_token_vs_sequence_weighting():
    # Sequence A: 1 token of loss 1; sequence B: 3 tokens of loss 0 (ratio 1, A = 0,
    # logp = ref).  token mean = 1/4, sequence mean = (1 + 0) / 2.
    logp = mx.zeros((2, 3))
    adv = mx.array([-1.0, 0.0])
    mask = mx.array([[1, 0, 0], [1, 1, 1]])
    tok = grpo_token_loss(logp, logp, logp, adv, mask, 0.2, 0.0, "token")
    seq = grpo_token_loss(logp, logp, logp, adv, mask, 0.2, 0.0, "sequence")
    assert abs(tok.item() - 0.25) < 1e-7 and abs(seq.item() - 0.5) < 1e-7
