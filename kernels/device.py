"""GPU versions of token_logprobs' per-chunk softmax work (mx.fast.metal_kernel / cuda_kernel).

The matmuls stay with MLX (its GEMMs are already tuned); these kernels replace the
elementwise + reduction work on each [N, C] logits chunk:

* ``lse_step``: one threadgroup per row reads the chunk once, computing the chunk max
  and sum of exp in one pass (online), merges them into the running log-sum-exp and
  picks the target logit.
* ``dlogits``: one thread per element, g_onehot * onehot(t) - g_soft * exp(z - lse).

Not run on the machines this was written on (CPU only); see docs/kernels.md.
"""

from __future__ import annotations

import functools

import mlx.core as mx

THREADS = 256  # threads per row in lse_step; a multiple of the 32-wide SIMD group / warp


def gpu_backend() -> str | None:
    """'metal' or 'cuda' when the default device is a GPU with custom kernels, else None."""
    if mx.default_device().type != mx.DeviceType.gpu:
        return None
    if mx.metal.is_available() and hasattr(mx.fast, "metal_kernel"):
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available() and hasattr(mx.fast, "cuda_kernel"):
        return "cuda"
    return None


def pick_backend(backend: str) -> str:
    """Resolve 'auto' to the device kernel for the default device, or to 'mlx'."""
    if backend == "auto":
        return gpu_backend() or "mlx"
    if backend in ("metal", "cuda") and gpu_backend() != backend:
        raise RuntimeError(f"token_logprobs: backend {backend!r} needs a {backend} GPU as the "
                           "default device")
    return backend


# ---------------------------------------------------------------- Metal sources

_METAL_LSE = """
    uint row = threadgroup_position_in_grid.x;
    uint tid = thread_position_in_threadgroup.x;
    uint lane = thread_index_in_simdgroup;
    uint sg = simdgroup_index_in_threadgroup;
    constexpr uint NSG = TG / 32;
    const float NEG_INF = -metal::numeric_limits<float>::infinity();
    threadgroup float shm[NSG];
    const device T* z = logits + size_t(row) * C;

    // Per-thread online max / rescaled sum over a strided slice of the row.
    float m = NEG_INF, s = 0.0f;
    for (uint j = tid; j < uint(C); j += TG) {
        float x = float(z[j]);
        if (x > m) { s = s * metal::exp(m - x) + 1.0f; m = x; }
        else { s += metal::exp(x - m); }
    }
    // Row max: SIMD group, then across groups.
    float gm = simd_max(m);
    if (lane == 0) { shm[sg] = gm; }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    gm = shm[0];
    for (uint k = 1; k < NSG; ++k) { gm = metal::max(gm, shm[k]); }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // Rescale each partial sum to the row max and add them up.
    float part = (m == NEG_INF) ? 0.0f : s * metal::exp(m - gm);
    float gs = simd_sum(part);
    if (lane == 0) { shm[sg] = gs; }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) {
        gs = 0.0f;
        for (uint k = 0; k < NSG; ++k) { gs += shm[k]; }
        // Merge with the running log-sum-exp (which starts at -inf).
        float l0 = lse_in[row];
        float lc = gm + metal::log(gs);
        float mn = metal::max(l0, lc);
        float a = (l0 == NEG_INF) ? 0.0f : metal::exp(l0 - mn);
        float b = (lc == NEG_INF) ? 0.0f : metal::exp(lc - mn);
        lse_out[row] = mn + metal::log(a + b);
        t_out[row] = inside[row] ? float(z[local_t[row]]) : t_in[row];
    }
"""

_METAL_DLOGITS = """
    size_t elem = thread_position_in_grid.x;
    if (elem >= size_t(rows[0]) * C) { return; }
    uint row = uint(elem / C);
    int col = int(elem % C);
    float p = metal::exp(float(logits[elem]) - lse[row]);
    float hot = (col == local_t[row]) ? g_onehot[row] : 0.0f;
    out[elem] = T(hot - g_soft[row] * p);
"""

# ---------------------------------------------------------------- CUDA sources

_CUDA_HEADER = """
__device__ __forceinline__ float pudl_warp_max(float v) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}
__device__ __forceinline__ float pudl_warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}
"""

_CUDA_LSE = """
    const int row = blockIdx.x;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int wid = tid >> 5;
    constexpr int NW = TG / 32;
    const float NEG_INF = -cuda::std::numeric_limits<float>::infinity();
    __shared__ float shm[NW];
    const T* z = logits + (size_t)row * C;

    float m = NEG_INF, s = 0.0f;
    for (int j = tid; j < C; j += TG) {
        float x = static_cast<float>(z[j]);
        if (x > m) { s = s * expf(m - x) + 1.0f; m = x; }
        else { s += expf(x - m); }
    }
    float gm = pudl_warp_max(m);
    if (lane == 0) shm[wid] = gm;
    __syncthreads();
    gm = shm[0];
    for (int k = 1; k < NW; ++k) gm = fmaxf(gm, shm[k]);
    __syncthreads();
    float part = (m == NEG_INF) ? 0.0f : s * expf(m - gm);
    float gs = pudl_warp_sum(part);
    if (lane == 0) shm[wid] = gs;
    __syncthreads();
    if (tid == 0) {
        gs = 0.0f;
        for (int k = 0; k < NW; ++k) gs += shm[k];
        // Merge with the running log-sum-exp (which starts at -inf).
        float l0 = lse_in[row];
        float lc = gm + logf(gs);
        float mn = fmaxf(l0, lc);
        float a = (l0 == NEG_INF) ? 0.0f : expf(l0 - mn);
        float b = (lc == NEG_INF) ? 0.0f : expf(lc - mn);
        lse_out[row] = mn + logf(a + b);
        t_out[row] = inside[row] ? static_cast<float>(z[local_t[row]]) : t_in[row];
    }
"""

_CUDA_DLOGITS = """
    size_t elem = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (elem >= (size_t)rows[0] * C) return;
    int row = (int)(elem / C);
    int col = (int)(elem % C);
    float p = expf(static_cast<float>(logits[elem]) - lse[row]);
    float hot = (col == local_t[row]) ? g_onehot[row] : 0.0f;
    out[elem] = static_cast<T>(hot - g_soft[row] * p);
"""

_LSE_IN = ["logits", "local_t", "inside", "lse_in", "t_in"]
_LSE_OUT = ["lse_out", "t_out"]
_DL_IN = ["logits", "local_t", "lse", "g_onehot", "g_soft", "rows"]


@functools.lru_cache(maxsize=None)
def _kernels(backend: str):
    if backend == "metal":
        lse = mx.fast.metal_kernel(name="pudl_lse_step", input_names=_LSE_IN,
                                   output_names=_LSE_OUT, source=_METAL_LSE)
        dl = mx.fast.metal_kernel(name="pudl_dlogits", input_names=_DL_IN,
                                  output_names=["out"], source=_METAL_DLOGITS)
    elif backend == "cuda":
        lse = mx.fast.cuda_kernel(name="pudl_lse_step", input_names=_LSE_IN,
                                  output_names=_LSE_OUT, source=_CUDA_LSE, header=_CUDA_HEADER)
        dl = mx.fast.cuda_kernel(name="pudl_dlogits", input_names=_DL_IN,
                                 output_names=["out"], source=_CUDA_DLOGITS)
    else:
        raise ValueError(f"no device kernels for backend {backend!r}")
    return lse, dl


def lse_step(backend: str):
    """Device version of logprobs._mlx_steps()'s lse_step(logits, local_t, inside, lse, tl) -> (lse, tl)."""
    kernel = _kernels(backend)[0]

    def step(logits, local_t, inside, lse, tl):
        n, c = logits.shape
        return kernel(
            inputs=[logits, local_t.astype(mx.int32), inside, lse, tl],
            template=[("T", logits.dtype), ("C", c), ("TG", THREADS)],
            grid=(n * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
            output_shapes=[(n,), (n,)],
            output_dtypes=[mx.float32, mx.float32],
        )

    return step


def dlogits(backend: str):
    """Device version of logprobs._mlx_steps()'s dlogits(logits, local_t, lse, g_onehot, g_soft) -> [N, C]."""
    kernel = _kernels(backend)[1]

    def dz(logits, local_t, lse, g_onehot, g_soft):
        n, c = logits.shape
        threads = 256
        total = n * c
        return kernel(
            # The row count is an input, not a template argument, so a new batch
            # shape does not trigger a new JIT compile.
            inputs=[logits, local_t.astype(mx.int32), lse, g_onehot, g_soft,
                    mx.array([n], dtype=mx.int32)],
            template=[("T", logits.dtype), ("C", c)],
            grid=(-(-total // threads) * threads, 1, 1), threadgroup=(threads, 1, 1),
            output_shapes=[(n, c)], output_dtypes=[logits.dtype],
        )[0]

    return dz
