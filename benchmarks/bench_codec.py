"""EnCodec decode speed: mlx-music's decoder against transformers' EncodecModel (torch), one run.

Decodes ``--frames`` frames (default 500 = 10 s at 32 kHz) of random codes with a random-weight
EnCodec of MusicGen's real 32 kHz shape (benchmarks/bench_generate.py's ENCODEC_32K: 4 codebooks
of 2048, hop 640) on each engine's default device:

  * ``mlx before``: mlx-music with MLX's own ``conv1d`` / ``conv_transpose1d`` (what runs on
    Metal/CUDA; on the CPU the only path before ``conv1d_matmul`` / ``conv_transpose1d_matmul``);
  * ``mlx``: mlx-music as shipped (on the CPU: the convolutions as BLAS matmuls, the transposed
    ones followed by an overlap-add);
  * ``torch``: transformers' ``EncodecModel.decode`` (audiocraft's MusicGen/MAGNeT use the same
    SEANet decoder in torch).

The two MLX rows share weights and codes, and the table reports their largest audio difference.
Weights differ between MLX and torch (each randomly initialised; parity on shared weights is
tests/test_encodec.py's job). Best of ``--repeats`` after one untimed warm-up.

    python benchmarks/bench_codec.py                 # 10 s clip, before/after/torch
    python benchmarks/bench_codec.py --skip-before   # without the slow old path
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import mlx_music  # noqa: F401  (before mlx.core: MKL BLAS for MLX's CPU matmuls)
import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _best(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=500, help="frames to decode (50 per second)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per engine (best kept)")
    ap.add_argument("--skip-before", action="store_true", help="skip MLX's own conv ops")
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()

    from bench_generate import ENCODEC_32K
    from mlx_music.models import encodec as mlx_encodec

    mlx_args = mlx_encodec.EncodecArgs.from_dict(ENCODEC_32K)
    mx.random.seed(0)
    model = mlx_encodec.EncodecModel(mlx_args)
    mx.eval(model.parameters())
    codes_np = np.random.default_rng(0).integers(0, mlx_args.codebook_size,
                                                 (1, mlx_args.num_quantizers, args.frames))
    codes = mx.array(codes_np.astype(np.int32))
    seconds = args.frames / mlx_args.frame_rate

    def mlx_decode():
        audio = model.decode(codes)
        mx.eval(audio)
        return np.array(audio)

    rows: list[tuple[str, float]] = []
    after_s, after = _best(mlx_decode, args.repeats)
    diff = None
    if not args.skip_before:
        with mock.patch.object(mlx_encodec, "_on_cpu", lambda: False):
            before_s, before = _best(mlx_decode, args.repeats)
        rows.append(("mlx before (MLX conv ops)", before_s))
        diff = float(np.abs(after - before).max())
    rows.append(("mlx", after_s))
    if not args.skip_torch:
        import torch
        from transformers import EncodecConfig, EncodecModel

        torch.manual_seed(0)
        hf = EncodecModel(EncodecConfig(**ENCODEC_32K)).eval()
        tcodes = torch.from_numpy(codes_np.astype(np.int64))[None]

        def torch_decode():
            with torch.no_grad():
                return hf.decode(tcodes, [None]).audio_values

        torch_s, _ = _best(torch_decode, args.repeats)
        rows.append((f"torch {torch.__version__} (transformers EncodecModel)", torch_s))
        torch_threads = torch.get_num_threads()

    print(f"EnCodec 32 kHz decode of {args.frames} frames ({seconds:g} s of audio), "
          f"MLX device {mx.default_device()}, best of {args.repeats}"
          + ("" if args.skip_torch else f", torch threads {torch_threads}"))
    print("| engine | decode s | audio s/s | vs mlx |")
    print("|---|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s:.2f} | {seconds / s:.2f} | {s / after_s:.2f}x |")
    if diff is not None:
        print(f"max |mlx - mlx before| on the same weights and codes: {diff:.2e} "
              f"(audio std {after.std():.2e})")


if __name__ == "__main__":
    main()
