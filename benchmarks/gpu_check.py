"""Kernels vs their plain-MLX fallbacks on the current device (run on the GPU; CPU runs only
the fallbacks). Prints the largest relative differences; exit 1 above tolerance."""

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
print("OK" if ok else "FAIL")
sys.exit(0 if ok else 1)
