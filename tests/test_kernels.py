"""Fused decode kernels: the plain-MLX fallbacks (what CPU and Apple GPUs run) against numpy."""

import mlx_music  # noqa: F401  (MKL preload before MLX on Linux CPUs)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_music.models import kernels, musicgen_decoder
from mlx_music.models.kernels import (add_layer_norm, add_layer_norm_fallback, cuda_kernels_enabled,
                                      decode_attention, decode_attention_fallback, gemv_enabled, linear,
                                      linear_fallback)


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


# ------------------------------------------------------------------ small-row GEMV dispatch
class _Spy:
    """Stands in for a compiled CUDA kernel: records that it was asked to run."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        raise AssertionError("the CUDA kernel was dispatched")


@pytest.fixture
def fake_cuda(monkeypatch):
    """The dispatch as it would be on a CUDA device; every kernel replaced by a spy."""
    monkeypatch.setattr(kernels, "_on_cuda", lambda: True)
    spies = {name: _Spy() for name in ("_gemv_kernel", "_add_ln_kernel", "_attn_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(kernels, name, lambda *a, _spy=spy: _spy)
    monkeypatch.delenv("MLX_MUSIC_KERNELS", raising=False)
    monkeypatch.delenv("MLX_MUSIC_GEMV", raising=False)
    return spies


def _linear_case(rows, k=64, n=24, bias=True, seed=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 1, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    ref = x @ w.T + (b if bias else 0)
    return x, w, b, ref


def test_gemv_off_by_default_and_on_cpu(monkeypatch):
    monkeypatch.delenv("MLX_MUSIC_GEMV", raising=False)
    assert not gemv_enabled()
    monkeypatch.setenv("MLX_MUSIC_GEMV", "1")
    assert not gemv_enabled()  # the CPU: the opt-in alone does not turn it on
    for bias in (True, False):  # the path the CPU takes is nn.Linear's product
        x, w, b, ref = _linear_case(3, bias=bias)
        args = (mx.array(x), mx.array(w), None if b is None else mx.array(b))
        for fn in (linear, linear_fallback):
            out = fn(*args)
            assert out.shape == (3, 1, 24)
            np.testing.assert_allclose(np.array(out), ref, rtol=1e-5, atol=1e-5)


def test_gemv_dispatch_only_with_the_opt_in(fake_cuda, monkeypatch):
    x, w, b, ref = _linear_case(kernels.GEMV_MAX_ROWS)
    args = (mx.array(x), mx.array(w), mx.array(b))
    assert not gemv_enabled()  # CUDA, no opt-in: the plain matmul
    np.testing.assert_allclose(np.array(linear(*args)), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("MLX_MUSIC_GEMV", "1")
    assert gemv_enabled()
    with pytest.raises(AssertionError, match="dispatched"):
        linear(*args)  # <= GEMV_MAX_ROWS rows: the kernel
    assert fake_cuda["_gemv_kernel"].calls == 1
    lin = nn.Linear(64, 24, bias=False)  # the decoder's float linears take this route
    with pytest.raises(AssertionError, match="dispatched"):
        musicgen_decoder._linear(lin, mx.array(x))
    assert fake_cuda["_gemv_kernel"].calls == 2
    x, w, b, ref = _linear_case(kernels.GEMV_MAX_ROWS + 1)
    np.testing.assert_allclose(np.array(linear(mx.array(x), mx.array(w), mx.array(b))), ref, rtol=1e-5, atol=1e-5)
    x, w, b, ref = _linear_case(2, k=62)  # rows of 62 floats: not whole 4-element stripes
    np.testing.assert_allclose(np.array(linear(mx.array(x), mx.array(w), mx.array(b))), ref, rtol=1e-5, atol=1e-5)
    assert fake_cuda["_gemv_kernel"].calls == 2


def test_kernels_0_turns_every_kernel_off(fake_cuda, monkeypatch):
    assert cuda_kernels_enabled()
    monkeypatch.setenv("MLX_MUSIC_GEMV", "1")
    monkeypatch.setenv("MLX_MUSIC_KERNELS", "0")
    assert not cuda_kernels_enabled() and not gemv_enabled()
    x, w, b, ref = _linear_case(2)
    np.testing.assert_allclose(np.array(linear(mx.array(x), mx.array(w), mx.array(b))), ref, rtol=1e-5, atol=1e-5)
    rng = np.random.default_rng(3)
    xs, d = (mx.array(rng.standard_normal((2, 1, 32)).astype(np.float32)) for _ in range(2))
    add_layer_norm(xs, d, mx.ones(32), mx.zeros(32), 1e-5)
    q = mx.array(rng.standard_normal((1, 2, 1, 32)).astype(np.float32))
    kv = mx.array(rng.standard_normal((2, 1, 2, 5, 32)).astype(np.float32))
    decode_attention(q, kv, mx.array(3, dtype=mx.int32), by_limit=True, scale=32 ** -0.5)
    assert all(spy.calls == 0 for spy in fake_cuda.values())
