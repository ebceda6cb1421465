"""Fused decode-step kernels (`mx.fast.cuda_kernel`) with plain-MLX fallbacks.

Each public function computes the same thing on every backend: on an NVIDIA GPU (MLX's CUDA
backend) it is one custom kernel, i.e. one primitive in the step's graph; elsewhere (CPU, Apple
GPUs) it is the plain MLX composition it replaces, which the parity tests run.

* `add_layer_norm(x, d, weight, bias, eps)` -> (x + d, layer_norm(x + d)): the residual add and
  the next pre-LayerNorm in one pass (MLX has no fused op for it).
* `decode_attention(q, kv, visible, ...)` -> attention of single-position queries over a
  (2, B, heads, L, head_dim) key/value buffer, with either "slot j visible iff j <= limit" (self-
  attention over a fixed-size cache) or a (B, L) bool row mask (cross-attention with padding).
  MLX's CUDA SDPA runs a fused kernel only without an array mask; with one it falls back to
  5 primitives (scale, QK^T, where, softmax, PV). The output is written with heads merged,
  (B, 1, heads * head_dim), ready for the output projection.
* `linear(x, weight, bias)` -> x @ weight.T + bias with a small-row GEMV kernel for <= 32 rows.
  UNVALIDATED (never run on a GPU yet) and therefore OFF: only MLX_MUSIC_GEMV=1 turns it on, on
  CUDA; see the section below.

No Metal twins: on Apple GPUs MLX's own SDPA takes bool masks in its fused vector kernel, and
`mx.fast.layer_norm` + a compiled add cost two primitives; kernels that cannot be run here are
not shipped. Set MLX_MUSIC_KERNELS=0 to force the fallbacks (benchmarks, debugging); it also
turns off the q8 models' dequantized copies (`musicgen_decoder.DENSE_ROWS_CUDA`), the other
CUDA-only path, e.g. when GPU memory is short.
"""

from __future__ import annotations

import os
from functools import lru_cache

import mlx.core as mx


def cuda_kernels_enabled() -> bool:
    """True when the default device is a CUDA GPU and MLX_MUSIC_KERNELS is not 0."""
    if os.environ.get("MLX_MUSIC_KERNELS", "1") == "0":
        return False
    return _on_cuda()


@lru_cache(maxsize=1)
def _cuda_available() -> bool:
    cuda = getattr(mx, "cuda", None)
    try:
        return bool(cuda is not None and cuda.is_available())
    except Exception:  # pragma: no cover - backends without the query
        return False


def _on_cuda() -> bool:
    return mx.default_device() == mx.gpu and _cuda_available()


# --------------------------------------------------------------------------- add + LayerNorm
_ADD_LN_SOURCE = """
    // one block per row; N_PER elements per thread (row length = N_PER * blockDim.x at most)
    const int row = blockIdx.x;
    const int n = x_shape[x_ndim - 1];
    const int tid = threadIdx.x;
    const size_t base = (size_t)row * n;
    float v[N_PER];
    float s = 0.f;
    #pragma unroll
    for (int i = 0; i < N_PER; ++i) {
        int c = tid + i * blockDim.x;
        float t = 0.f;
        if (c < n) {
            T sum = T(static_cast<float>(x[base + c]) + static_cast<float>(d[base + c]));
            out_x[base + c] = sum;
            t = static_cast<float>(sum);
        }
        v[i] = t;
        s += t;
    }
    __shared__ float red[32];
    const int lane = tid & 31, warp = tid >> 5, nwarps = (blockDim.x + 31) >> 5;
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
    if (lane == 0) red[warp] = s;
    __syncthreads();
    float tot = 0.f;
    for (int i = 0; i < nwarps; ++i) tot += red[i];
    const float mean = tot / n;
    __syncthreads();
    float q = 0.f;
    #pragma unroll
    for (int i = 0; i < N_PER; ++i) {
        int c = tid + i * blockDim.x;
        if (c < n) { float t = v[i] - mean; q += t * t; }
    }
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffff, q, o);
    if (lane == 0) red[warp] = q;
    __syncthreads();
    float var = 0.f;
    for (int i = 0; i < nwarps; ++i) var += red[i];
    const float rstd = rsqrtf(var / n + eps[0]);
    #pragma unroll
    for (int i = 0; i < N_PER; ++i) {
        int c = tid + i * blockDim.x;
        if (c < n) {
            float y = (v[i] - mean) * rstd * static_cast<float>(w[c]) + static_cast<float>(b[c]);
            out_n[base + c] = T(y);
        }
    }
"""


@lru_cache(maxsize=None)
def _add_ln_kernel():
    return mx.fast.cuda_kernel(name="mlx_music_add_layer_norm", input_names=["x", "d", "w", "b", "eps"],
                               output_names=["out_x", "out_n"], source=_ADD_LN_SOURCE)


def add_layer_norm_fallback(x: mx.array, d: mx.array, weight: mx.array, bias: mx.array,
                            eps: float) -> tuple[mx.array, mx.array]:
    y = x + d
    return y, mx.fast.layer_norm(y, weight, bias, eps)


def add_layer_norm(x: mx.array, d: mx.array | None, weight: mx.array, bias: mx.array,
                   eps: float) -> tuple[mx.array, mx.array]:
    """(x + d, LayerNorm(x + d)); d None means no residual (x, LayerNorm(x))."""
    if d is None:
        return x, mx.fast.layer_norm(x, weight, bias, eps)
    n = x.shape[-1]
    if (not cuda_kernels_enabled() or x.shape != d.shape or x.dtype != d.dtype
            or x.dtype not in (mx.float32, mx.float16, mx.bfloat16) or n > 8192):
        return add_layer_norm_fallback(x, d, weight, bias, eps)
    threads = 256
    n_per = -(-n // threads)
    rows = x.size // n
    out_x, out_n = _add_ln_kernel()(
        inputs=[x, d, weight.astype(x.dtype), bias.astype(x.dtype), mx.array([eps], mx.float32)],
        template=[("T", x.dtype), ("N_PER", n_per)], grid=(rows * threads, 1, 1),
        threadgroup=(threads, 1, 1), output_shapes=[x.shape, x.shape], output_dtypes=[x.dtype, x.dtype])
    return out_x, out_n


# --------------------------------------------------------------------------- decode attention
_ATTN_SOURCE = """
    // block = one (row b, head h); NW warps split the key slots; lane holds EPL dims of a row.
    constexpr int EPL = D / 32;
    const int H = kv_shape[2];
    const int L = kv_shape[3];
    const int BH = kv_shape[1] * H;
    const int bh = blockIdx.x;
    const int b = bh / H;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const float scale = rsqrtf((float)D);
    const T* kp = kv + (size_t)bh * L * D;
    const T* vp = kv + ((size_t)BH + bh) * L * D;
    float qv[EPL], acc[EPL];
    #pragma unroll
    for (int e = 0; e < EPL; ++e) {
        qv[e] = static_cast<float>(q[(size_t)bh * D + lane * EPL + e]) * scale;
        acc[e] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    int limit = L - 1;
    if (USE_LIMIT) limit = min((int)vis[0], L - 1);
    const int end = limit + 1;
    for (int j = w; j < end; j += NW) {
        if (!USE_LIMIT) { if (!vis[(size_t)b * L + j]) continue; }
        const T* kr = kp + (size_t)j * D + lane * EPL;
        float s = 0.f;
        #pragma unroll
        for (int e = 0; e < EPL; ++e) s += qv[e] * static_cast<float>(kr[e]);
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
        const float mn = fmaxf(m, s);
        const float c = __expf(m - mn);
        const float p = __expf(s - mn);
        l = l * c + p;
        const T* vr = vp + (size_t)j * D + lane * EPL;
        #pragma unroll
        for (int e = 0; e < EPL; ++e) acc[e] = acc[e] * c + p * static_cast<float>(vr[e]);
        m = mn;
    }
    __shared__ float sm[NW], sl[NW], sacc[NW * D];
    if (lane == 0) { sm[w] = m; sl[w] = l; }
    #pragma unroll
    for (int e = 0; e < EPL; ++e) sacc[w * D + lane * EPL + e] = acc[e];
    __syncthreads();
    if (w == 0) {
        float M = -INFINITY;
        for (int i = 0; i < NW; ++i) M = fmaxf(M, sm[i]);
        float tot = 0.f, o[EPL];
        #pragma unroll
        for (int e = 0; e < EPL; ++e) o[e] = 0.f;
        for (int i = 0; i < NW; ++i) {
            const float c = sm[i] == -INFINITY ? 0.f : __expf(sm[i] - M);
            tot += sl[i] * c;
            #pragma unroll
            for (int e = 0; e < EPL; ++e) o[e] += sacc[i * D + lane * EPL + e] * c;
        }
        #pragma unroll
        for (int e = 0; e < EPL; ++e) out[(size_t)bh * D + lane * EPL + e] = T(o[e] / tot);
    }
"""


@lru_cache(maxsize=None)
def _attn_kernel():
    return mx.fast.cuda_kernel(name="mlx_music_decode_attention", input_names=["q", "kv", "vis"],
                               output_names=["out"], source=_ATTN_SOURCE)


def decode_attention_fallback(q: mx.array, kv: mx.array, visible: mx.array, *, by_limit: bool,
                              scale: float) -> mx.array:
    """q (B, heads, 1, D); kv (2, B, heads, L, D); visible: int32 scalar limit (slot j visible
    iff j <= limit) when by_limit, else (B, L) bool. Returns (B, 1, heads * D)."""
    L = kv.shape[3]
    if by_limit:
        mask = (mx.arange(L) <= visible)[None, :]
    else:
        mask = visible[:, None, None, :]
    out = mx.fast.scaled_dot_product_attention(q, kv[0], kv[1], scale=scale, mask=mask)
    B, H, T, D = out.shape
    return out.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def decode_attention(q: mx.array, kv: mx.array, visible: mx.array, *, by_limit: bool,
                     scale: float) -> mx.array:
    """Attention of one query position per row; see `decode_attention_fallback` for the
    contract. The CUDA kernel computes scores, softmax and the weighted sum in float32."""
    B, H, T, D = q.shape
    if (not cuda_kernels_enabled() or T != 1 or D % 32 or D > 256 or kv.dtype != q.dtype
            or q.dtype not in (mx.float32, mx.float16, mx.bfloat16) or abs(scale - D ** -0.5) > 1e-12 * scale):
        return decode_attention_fallback(q, kv, visible, by_limit=by_limit, scale=scale)
    nw = 8
    (out,) = _attn_kernel()(
        inputs=[q, kv, visible.reshape(1) if by_limit else visible],
        template=[("T", q.dtype), ("D", D), ("NW", nw), ("USE_LIMIT", bool(by_limit))],
        grid=(B * H * nw * 32, 1, 1), threadgroup=(nw * 32, 1, 1),
        output_shapes=[(B, 1, H * D)], output_dtypes=[q.dtype])
    return out


# --------------------------------------------------------------------------- small-row GEMV
# UNVALIDATED: written without a GPU (2026-12-05); compiled (nvcc 13.0, sm_90, in a copy of the
# signature MLX generates) but never run or timed; OFF unless
# MLX_MUSIC_GEMV=1 (and only on CUDA, and MLX_MUSIC_KERNELS=0 overrides it). benchmarks/gpu_check.py
# checks it against the plain matmul and benchmarks/h200_run.sh times it only after that check
# passed; switch it on by default only once RESULTS.md shows it correct and faster.
# Why: MLX's CUDA `gemv` takes one row only, so a float linear of 2-32 rows (CFG at batch 1-16)
# goes to cuBLASLt, ~14 us of host time per call on the H200 against ~5 us for MLX's own kernels.
GEMV_MAX_ROWS = 32

_GEMV_SOURCE = """
    // y[r, o] = sum_k x[r, k] * w[o, k] (+ bias[o]): one warp per output o, all NROWS rows at once,
    // so the weight row is read once; lane l reads VEC consecutive elements per 32*VEC-wide stripe.
    const int N = w_shape[0];
    const int K = w_shape[1];
    const int lane = threadIdx.x & 31;
    const int o = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (o >= N) return;  // whole warps leave together; no block-wide barrier below
    float acc[NROWS];
    #pragma unroll
    for (int r = 0; r < NROWS; ++r) acc[r] = 0.f;
    const T* wr = w + (size_t)o * K;
    for (int k = lane * VEC; k < K; k += 32 * VEC) {
        float wv[VEC];
        #pragma unroll
        for (int e = 0; e < VEC; ++e) wv[e] = static_cast<float>(wr[k + e]);
        #pragma unroll
        for (int r = 0; r < NROWS; ++r) {
            const T* xr = x + (size_t)r * K + k;
            #pragma unroll
            for (int e = 0; e < VEC; ++e) acc[r] += wv[e] * static_cast<float>(xr[e]);
        }
    }
    #pragma unroll
    for (int r = 0; r < NROWS; ++r) {
        float s = acc[r];
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffff, s, off);
        acc[r] = s;  // every lane holds the sum
    }
    #pragma unroll
    for (int r = 0; r < NROWS; ++r) {
        if (lane == r) {
            float y = acc[r];
            /*BIAS*/
            out[(size_t)r * N + o] = T(y);
        }
    }
"""


@lru_cache(maxsize=None)
def _gemv_kernel(has_bias: bool):
    # two sources: without a bias input the name `bias` must not appear at all
    names = ["x", "w", "bias"] if has_bias else ["x", "w"]
    source = _GEMV_SOURCE.replace("/*BIAS*/", "y += static_cast<float>(bias[o]);" if has_bias else "")
    return mx.fast.cuda_kernel(name=f"mlx_music_gemv{'_bias' if has_bias else ''}", input_names=names,
                               output_names=["out"], source=source)


def gemv_enabled() -> bool:
    """True only when MLX_MUSIC_GEMV=1 is set explicitly and the CUDA kernels are enabled
    (`cuda_kernels_enabled`: a CUDA default device and MLX_MUSIC_KERNELS not 0)."""
    return os.environ.get("MLX_MUSIC_GEMV", "0") == "1" and cuda_kernels_enabled()


def linear_fallback(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """x @ weight.T (+ bias), exactly as `mlx.nn.Linear` computes it."""
    return x @ weight.T if bias is None else mx.addmm(bias, x, weight.T)


def linear(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """A float linear layer: x (..., in), weight (out, in), bias (out,) or None -> (..., out).

    With `gemv_enabled()` and at most `GEMV_MAX_ROWS` rows (the product of x's leading axes),
    one small-row GEMV kernel (float32 accumulation); otherwise `linear_fallback`. The kernel has
    no gradient: it is for inference; training's many rows never reach it."""
    k = x.shape[-1]
    rows = x.size // k if k else 0
    vec = 8 if x.dtype in (mx.float16, mx.bfloat16) else 4  # 16-byte stripes per lane
    if (not gemv_enabled() or not 0 < rows <= GEMV_MAX_ROWS or weight.ndim != 2 or weight.shape[1] != k
            or x.dtype not in (mx.float32, mx.float16, mx.bfloat16) or weight.dtype != x.dtype
            or (bias is not None and bias.dtype != x.dtype) or k % vec):
        return linear_fallback(x, weight, bias)
    n = weight.shape[0]
    warps = 8
    inputs = [x.reshape(rows, k), weight] + ([bias] if bias is not None else [])
    (out,) = _gemv_kernel(bias is not None)(
        inputs=inputs, template=[("T", x.dtype), ("NROWS", rows), ("VEC", vec)],
        grid=(-(-n // warps) * warps * 32, 1, 1), threadgroup=(warps * 32, 1, 1),
        output_shapes=[(rows, n)], output_dtypes=[x.dtype])
    return out.reshape(*x.shape[:-1], n)
