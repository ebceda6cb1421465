"""Kernels vs their plain-MLX fallbacks on the current device (run on the GPU; CPU runs only
the fallbacks). Prints the largest relative differences; exit 1 above tolerance.

The opt-in small-row GEMV (`kernels.linear`, MLX_MUSIC_GEMV=1; unvalidated until this runs on a
GPU) is checked with the variable set here, at every row count 1-32 on the decoder's shapes, and
timed against the plain matmul and MLX's `qmv` (an 8-bit QuantizedLinear of the same shape):
microseconds per call in a chain of 48 dependent calls, i.e. host and GPU time of a step's
linears. "gemv validated" is printed only when the kernel really ran (CUDA) and every check
passed; benchmarks/h200_run.sh times MLX_MUSIC_GEMV=1 only after that line."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx_music  # noqa: E402,F401  (MKL preload before MLX on Linux CPUs)
import mlx.core as mx  # noqa: E402

from mlx_music.models.kernels import (add_layer_norm, add_layer_norm_fallback, cuda_kernels_enabled,  # noqa: E402
                                      decode_attention, decode_attention_fallback)

ok = True
print("cuda kernels enabled:", cuda_kernels_enabled())
for dt, tol in ((mx.float32, 1e-5), (mx.bfloat16, 2e-2)):
    for by_limit in (True, False):
        B, H, L, D = 6, 16, 300, 64
        q = mx.random.normal((B, H, 1, D)).astype(dt)
        kv = mx.random.normal((2, B, H, L, D)).astype(dt)
        vis = mx.array(137, dtype=mx.int32) if by_limit else (mx.random.uniform(shape=(B, L)) < 0.5)
        a = decode_attention(q, kv, vis, by_limit=by_limit, scale=D ** -0.5).astype(mx.float32)
        b = decode_attention_fallback(q, kv, vis, by_limit=by_limit, scale=D ** -0.5).astype(mx.float32)
        err = (mx.abs(a - b).max() / mx.abs(b).max()).item()
        ok &= err <= tol
        print(f"decode_attention {dt} by_limit={by_limit}: rel err {err:.2e}")
    for n in (1024, 1536, 2048):
        x, d = mx.random.normal((32, 1, n)).astype(dt), mx.random.normal((32, 1, n)).astype(dt)
        w, bb = mx.random.normal((n,)).astype(dt), mx.random.normal((n,)).astype(dt)
        s1, n1 = add_layer_norm(x, d, w, bb, 1e-5)
        s2, n2 = add_layer_norm_fallback(x, d, w, bb, 1e-5)
        err = max((mx.abs(s1 - s2).max()).item(),
                  (mx.abs(n1.astype(mx.float32) - n2.astype(mx.float32)).max() / mx.abs(n2).max()).item())
        ok &= err <= tol
        print(f"add_layer_norm {dt} n={n}: err {err:.2e}")
# Quantized linears with >= DENSE_ROWS_CUDA rows use a dequantized copy: both routes against the
# fp32 product of the same (dequantized) weights.
import mlx.nn as nn  # noqa: E402

from mlx_music.models import musicgen_decoder as md  # noqa: E402

for rows in (2, md.DENSE_ROWS_CUDA, 32):
    lin = nn.Linear(1024, 3072, bias=False)
    lin.weight = (mx.random.normal((3072, 1024)) * 0.03).astype(mx.bfloat16)
    q = nn.QuantizedLinear.from_linear(lin, group_size=64, bits=8)
    x = mx.random.normal((rows, 1, 1024)).astype(mx.bfloat16)
    ref = x.astype(mx.float32) @ md.float_weight(q).astype(mx.float32).T
    packed = md._linear(q, x).astype(mx.float32)
    q._dense = md._DenseCopy(q)
    dense = md._linear(q, x).astype(mx.float32)
    e_packed, e_dense = ((mx.abs(v - ref).max() / mx.abs(ref).max()).item() for v in (packed, dense))
    ok &= e_dense <= max(2e-2, e_packed)  # never worse than the packed kernel
    print(f"q8 linear rows={rows}: rel err vs fp32, packed {e_packed:.2e}, route taken {e_dense:.2e}")

# ---------------------------------------------------------------- small-row GEMV (opt-in)
import os  # noqa: E402
import time  # noqa: E402

from mlx_music.models import kernels  # noqa: E402

os.environ["MLX_MUSIC_GEMV"] = "1"
gemv_ran = kernels.gemv_enabled()
print("small-row GEMV enabled (kernel runs):", gemv_ran)
gemv_ok = True
# (in, out): small's qkv / fc1 / fc2 / heads, medium's qkv / fc1, large's fc1; odd sizes for the tails
shapes = ((1024, 3072), (1024, 4096), (4096, 1024), (1024, 8192), (1536, 4608), (2048, 8192), (40, 77))
row_counts = (1, 2, 3, 4, 8, 16, 31, 32)
if not gemv_ran:  # CPU (a rehearsal): the fallback against itself, a few cases
    shapes, row_counts = shapes[:1] + shapes[-1:], (1, 2, 32)
for dt, tol in ((mx.float32, 1e-4), (mx.bfloat16, 2e-2)):
    for k, n in shapes:
        for rows in row_counts:
            for bias in (False, True):
                x = mx.random.normal((rows, 1, k)).astype(dt)
                w = (mx.random.normal((n, k)) * k ** -0.5).astype(dt)
                b = mx.random.normal((n,)).astype(dt) if bias else None
                a = kernels.linear(x, w, b).astype(mx.float32)
                ref = kernels.linear_fallback(x, w, b).astype(mx.float32)
                err = (mx.abs(a - ref).max() / mx.abs(ref).max()).item()
                if err > tol or a.shape != ref.shape:
                    gemv_ok = False
                    print(f"gemv {dt} in={k} out={n} rows={rows} bias={bias}: rel err {err:.2e} FAIL")
        print(f"gemv {dt} in={k} out={n} rows 1-32: {'ok' if gemv_ok else 'FAIL'}")
ok &= gemv_ok


def _us_per_call(fn, x, n_calls=48, reps=20):
    """Microseconds per call of a chain of n_calls dependent calls (x -> fn(x) -> ...), best of reps."""
    best = float("inf")
    for _ in range(reps + 2):
        t0 = time.perf_counter()
        y = x
        for _ in range(n_calls):
            y = fn(y)
        mx.eval(y)
        best = min(best, time.perf_counter() - t0)
    return best / n_calls * 1e6


print("| in=out | dtype | rows | plain matmul us/call | GEMV us/call | q8 qmv us/call |")
print("| ---: | --- | ---: | ---: | ---: | ---: |")
for k in (1024, 1536, 2048) if gemv_ran else (1024,):
    w = (mx.random.normal((k, k)) * k ** -0.5).astype(mx.bfloat16)
    lin = nn.Linear(k, k, bias=False)
    lin.weight = w
    q = nn.QuantizedLinear.from_linear(lin, group_size=64, bits=8)
    for rows in (2, 8, 32) if gemv_ran else (2,):
        x = mx.random.normal((rows, 1, k)).astype(mx.bfloat16)
        kw = {} if gemv_ran else dict(n_calls=2, reps=1)  # CPU (a rehearsal): the commands only
        plain = _us_per_call(lambda v: kernels.linear_fallback(v, w), x, **kw)
        gemv = _us_per_call(lambda v: kernels.linear(v, w), x, **kw)
        qmv = _us_per_call(lambda v: q(v.reshape(rows, k)).reshape(rows, 1, k), x, **kw)
        print(f"| {k} | bf16 | {rows} | {plain:.1f} | {gemv:.1f} | {qmv:.1f} |")
if gemv_ran and gemv_ok:
    print("gemv validated")
print("OK" if ok else "FAIL")
sys.exit(0 if ok else 1)
