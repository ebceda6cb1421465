"""Where a decode step's time goes (MLX only; random decoder weights, no checkpoint needed).

For one MLX config.json (e.g. a converted checkpoint's), with the decoder cast to --dtype, it
times in this process:
  loop_ms      the real token loop (`TokenLoop.run`: sampling + compiled step, pipelined)
  sync_ms      one compiled step + sampling, waited for after every call (no overlap)
  per_layer_ms (sync_ms - sync_ms of a 1-layer model) / (layers - 1)
  fixed_ms     the rest (embeddings, positions, heads, sampling, dispatch)
The decoder runs in its fused layout (one q/k/v matmul per layer, one head matmul, one embedding
gather: `MusicGen.fuse`), the only layout its forward has. Run it once per MLX environment setting
(e.g. MLX_MAX_OPS_PER_BUFFER) to compare: those are read once per process.

    python benchmarks/profile_step.py --config benchmarks/.cache/mlx-small-bf16/config.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx_music  # noqa: E402,F401  (MKL preload on Linux CPUs)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from mlx_music.models.musicgen import MusicGen  # noqa: E402
from mlx_music.runtime.delay_pattern import build_pattern  # noqa: E402
from mlx_music.runtime.sampling import RowSampling, SamplingConfig, row_keys  # noqa: E402
from mlx_music.runtime.token_loop import Conditioning, TokenLoop  # noqa: E402

DTYPES = {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16}


def build(config: dict, dtype: mx.Dtype, layers: int | None) -> MusicGen:
    cfg = json.loads(json.dumps(config))
    if layers is not None:
        cfg["decoder"]["num_layers"] = layers
    model = MusicGen(cfg)  # checkpoint layout: random weights per checkpoint tensor, then fuse
    # Scale-aware random weights (O(1) activations, spread-out logits), in the benchmark dtype.
    flat = [(k, (mx.random.normal(v.shape) * (v.shape[-1] ** -0.5 if v.ndim == 2 and "embed" not in k else 1.0)
                 ).astype(dtype)) for k, v in tree_flatten(model.decoder.parameters())]
    model.decoder.update(tree_unflatten(flat))
    model.fuse()
    mx.eval(model.decoder.parameters())
    return model


def time_loop(model: MusicGen, steps: int, k: int, channels: int) -> tuple[float, TokenLoop]:
    h = model.decoder_args.hidden_size
    cond = Conditioning(mx.random.normal((2, 12, h)).astype(model.decoder.layer_norm.weight.dtype),
                        mx.ones((2, 12), dtype=mx.int32))
    pattern = build_pattern(steps - (k // channels - 1), k, channels, 2048, batch=1)
    rs = RowSampling.stack([SamplingConfig(guidance_scale=3.0, top_k=250)], 2048)
    loop = TokenLoop(model, 2, pattern.shape[-1], rs.static)
    best = float("inf")
    for _ in range(3):  # first run traces/JITs
        t0 = time.perf_counter()
        toks = [t for _, t, _ in loop.run(cond, pattern, rs, row_keys([0]))]
        mx.eval(toks)
        best = min(best, time.perf_counter() - t0)
    return best / (pattern.shape[-1] - 1) * 1e3, loop


def time_sync(loop: TokenLoop, k: int, n: int = 40) -> float:
    rs = RowSampling.stack([SamplingConfig(guidance_scale=3.0, top_k=250)], 2048)
    advance, _ = loop._functions(rs)
    logits = mx.random.normal((2, k, 2048))
    forced = mx.full((1, k), -1, dtype=mx.int32)
    keys = row_keys([0])
    n = min(n, loop.cache.max_len - 2)
    loop.cache.offset = mx.array(0, dtype=mx.int32)
    mx.eval(advance(logits, forced, keys, *rs.arrays()))
    t0 = time.perf_counter()
    for _ in range(n):
        mx.eval(advance(logits, forced, keys, *rs.arrays()))
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    ap.add_argument("--steps", type=int, default=250)
    a = ap.parse_args()
    config = json.loads(Path(a.config).read_text())
    k, ch = config["num_codebooks"], config["audio_channels"]
    layers = config["decoder"]["num_layers"]
    dtype = DTYPES[a.dtype]
    out = {"config": Path(a.config).name, "dtype": a.dtype, "device": str(mx.default_device()),
           "env": {n: os.environ[n] for n in os.environ if n.startswith("MLX_")}}
    full, one = build(config, dtype, None), build(config, dtype, 1)
    loop_ms, loop = time_loop(full, a.steps, k, ch)
    sync_ms = time_sync(loop, k)
    one_ms = time_sync(time_loop(one, 20, k, ch)[1], k)
    per_layer = (sync_ms - one_ms) / (layers - 1)
    out["fused"] = {"loop_ms": round(loop_ms, 3), "sync_ms": round(sync_ms, 3),
                    "fixed_ms": round(one_ms - per_layer, 3), "per_layer_ms": round(per_layer, 4),
                    "steps_per_s": round(1e3 / loop_ms, 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
