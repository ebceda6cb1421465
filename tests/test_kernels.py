"""Fused decode kernels: the plain-MLX fallbacks (what CPU and Apple GPUs run) against numpy."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_music.models.kernels import (add_layer_norm, add_layer_norm_fallback, cuda_kernels_enabled,
                                      decode_attention, decode_attention_fallback)


def _np_attention(q, k, v, visible, scale):
    s = np.einsum("bhd,bhld->bhl", q[:, :, 0], k) * scale
    s = np.where(visible[:, None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhl,bhld->bhd", p, v)
    return o.reshape(o.shape[0], 1, -1)


def test_cpu_runs_the_fallbacks():
    assert not cuda_kernels_enabled()  # the suite runs on CPU: every test below is the fallback


@pytest.mark.parametrize("by_limit", [True, False])
def test_decode_attention_matches_reference(by_limit):
    rng = np.random.default_rng(0)
    B, H, L, D = 3, 4, 10, 32
    q = rng.standard_normal((B, H, 1, D)).astype(np.float32)
    kv = rng.standard_normal((2, B, H, L, D)).astype(np.float32)
    if by_limit:
        visible_arg = mx.array(6, dtype=mx.int32)
        visible = np.broadcast_to(np.arange(L) <= 6, (B, L))
    else:
        visible = rng.random((B, L)) < 0.6
        visible[:, 0] = True
        visible_arg = mx.array(visible)
    ref = _np_attention(q, kv[0], kv[1], visible, D ** -0.5)
    for fn in (decode_attention, decode_attention_fallback):
        out = fn(mx.array(q), mx.array(kv), visible_arg, by_limit=by_limit, scale=D ** -0.5)
        assert out.shape == (B, 1, H * D)
        np.testing.assert_allclose(np.array(out), ref, rtol=1e-5, atol=1e-5)


def test_add_layer_norm_matches_reference():
    rng = np.random.default_rng(1)
    x, d = (rng.standard_normal((2, 3, 48)).astype(np.float32) for _ in range(2))
    w, b = rng.standard_normal(48).astype(np.float32), rng.standard_normal(48).astype(np.float32)
    y = x + d
    ref = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-5) * w + b
    for fn in (add_layer_norm, add_layer_norm_fallback):
        s, n = fn(mx.array(x), mx.array(d), mx.array(w), mx.array(b), 1e-5)
        np.testing.assert_allclose(np.array(s), y, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.array(n), ref, rtol=1e-4, atol=1e-4)
    s, n = add_layer_norm(mx.array(x), None, mx.array(w), mx.array(b), 1e-5)
    np.testing.assert_array_equal(np.array(s), x)
