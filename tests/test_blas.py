"""runtime/blas.py: MKL preload gives the same numbers as MLX's bundled reference BLAS.

Each configuration runs in its own subprocess because the preload must happen before `mlx.core`
is imported and cannot be undone in-process. `import runtime` itself preloads (runtime/__init__.py),
so the reference run opts out with MLX_MUSIC_BLAS=reference. No timing asserts (shared machines).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs in a child: optionally preload, then compute a few BLAS-backed MLX ops on fixed inputs.
CHILD = r"""
import json, sys
import numpy as np
sys.path.insert(0, {root!r})
mode, out = sys.argv[1], sys.argv[2]
if mode == "late":
    import mlx.core  # noqa: F401  (imported before runtime on purpose: the preload must refuse)
from mlx_music import blas
loaded = blas.preload_fast_blas()  # idempotent: returns what `import runtime` already did
import mlx.core as mx
import mlx.nn as nn
mx.set_default_device(mx.cpu)
rng = np.random.default_rng(0)
f = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32))
res = {{}}
a, b = f(96, 200), f(200, 130)
res["matmul"] = a @ b
res["matmul_tn"] = f(200, 64).T @ b  # transposed operand path
res["batched"] = f(3, 17, 33) @ f(3, 33, 29)
x, w = f(2, 120, 24), f(32, 5, 24)  # MLX conv layout: (N, L, C_in), weight (C_out, K, C_in)
res["conv1d"] = mx.conv1d(x, w, stride=1, padding=2)
res["conv1d_dil"] = mx.conv1d(x, w, stride=2, padding=4, dilation=2)
mx.random.seed(0)
mlp = nn.Sequential(nn.Linear(48, 192), nn.GELU(), nn.Linear(192, 48))
res["mlp"] = mlp(f(10, 48))
res["inv"] = mx.linalg.inv(f(24, 24) + 24 * mx.eye(24), stream=mx.cpu)
mx.eval(res)
np.savez(out, **{{k: np.array(v) for k, v in res.items()}})
print(json.dumps({{"loaded": loaded, "info": blas.blas_info()}}))
"""


def _run(mode: str, tmp_path: Path) -> tuple[dict, dict]:
    out = tmp_path / f"{mode}.npz"
    script = CHILD.format(root=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script, mode, str(out)], capture_output=True,
                          text=True, timeout=240, cwd=tmp_path,
                          env={**os.environ, "MLX_MUSIC_BLAS": "reference" if mode == "ref" else ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads(proc.stdout.strip().splitlines()[-1])
    with np.load(out) as z:
        return meta, {k: z[k] for k in z.files}


def _mkl_available() -> bool:
    sys.path.insert(0, str(ROOT))
    from mlx_music.blas import find_mkl_rt

    return sys.platform.startswith("linux") and find_mkl_rt() is not None


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _run("ref", tmp_path_factory.mktemp("blas"))


def test_reference_reported(reference):
    meta, _ = reference
    assert meta["loaded"] is None
    info = meta["info"]
    if sys.platform == "darwin":
        assert info["backend"] == "accelerate"
    else:
        assert info["backend"] == "reference" and info["blas"] == "reference (bundled)"
        assert info["preloaded"] is False and info["reason"] == "disabled by MLX_MUSIC_BLAS"


@pytest.mark.skipif(not _mkl_available(), reason="needs Linux + the mkl wheel")
def test_mkl_same_results(reference, tmp_path):
    _, ref = reference
    meta, got = _run("mkl", tmp_path)
    info = meta["info"]
    assert meta["loaded"] and Path(meta["loaded"]).name.startswith("libmkl_rt.so")
    assert info["backend"] == "mkl" and info["blas"] == f"mkl ({meta['loaded']})"
    assert info["preloaded"] is True and info["reason"] is None and "Math Kernel" in info["mkl_version"]
    assert set(got) == set(ref)
    for k in ref:
        scale = float(np.abs(ref[k]).max())
        # Different summation order only: relative 1e-5 of the tensor's scale.
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-5 * scale, err_msg=k)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-only preload")
def test_refuses_after_mlx_import(tmp_path):
    meta, _ = _run("late", tmp_path)
    assert meta["loaded"] is None
    assert "imported before" in meta["info"]["reason"]
    assert meta["info"]["backend"] == "reference"
