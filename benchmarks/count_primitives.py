"""Primitives per decode step: the nodes of the compiled step's graph, without the timing runs.

The same count as the `primitives/step` column of benchmarks/RESULTS.md (bench_generate.py's
`count_primitives` on its `--direct` MLX worker: `mx.export_to_dot` of one call of the compiled
step, sampling included), for a random-weight model of the real shapes, on the default device.
It reuses that worker with a few untimed steps, so the graph counted is exactly the benchmarked
one. Which kernels are in the graph depends on the device and the environment, read once per
process: on CPU every fused kernel is its plain-MLX fallback; on CUDA `MLX_MUSIC_KERNELS=0`
gives the same fallbacks, `MLX_MUSIC_GEMV=1` the opt-in small-row GEMV (mlx_models/kernels.py).
Run it once per setting to get "before / after" on one machine:

    python benchmarks/count_primitives.py --size small --modes bf16,q8 --batch 1,16
    MLX_MUSIC_KERNELS=0 python benchmarks/count_primitives.py --size small --json fallbacks.json
    python benchmarks/count_primitives.py --size tiny --kinds 8          # seconds on a CPU

Prints one table row per mode and batch (the total, then the most frequent primitive kinds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx_music  # noqa: E402,F401  (MKL preload before MLX on Linux CPUs)
import bench_generate  # noqa: E402  (sizes, the random-weight model, the counted step)

ENV_KEYS = ("MLX_MUSIC_KERNELS", "MLX_MUSIC_GEMV")


def count(size: str, stereo: bool, mode: str, batches: list[int], steps: int) -> list[dict]:
    """One result per batch: primitives of the compiled step ('primitives') and their kinds."""
    rows = bench_generate.worker_direct_mlx(size, stereo, mode, steps, batches, repeats=1)
    env = ",".join(f"{k}={os.environ[k]}" for k in ENV_KEYS if k in os.environ)
    return [{"size": size + ("-stereo" if stereo else ""), "mode": r["mode"], "batch": r["batch"],
             "device": r["device"], "env": env, "primitives": r["primitives"],
             "primitive_kinds": r["primitive_kinds"]} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=tuple(bench_generate.SIZES), default="small")
    ap.add_argument("--stereo", action="store_true")
    ap.add_argument("--modes", default="fp32,bf16,q8", help="comma-separated: fp32, fp16, bf16, q8, q4")
    ap.add_argument("--batch", default="1", help="prompts (CFG doubles the rows), e.g. 1,16")
    ap.add_argument("--steps", type=int, default=8, help="untimed decoder steps before counting")
    ap.add_argument("--kinds", type=int, default=5, help="how many primitive kinds to list per row")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in bench_generate.MLX_MODES]
    if bad:
        ap.error(f"--modes: unknown {bad}; expected some of {list(bench_generate.MLX_MODES)}")
    batches = [int(b) for b in a.batch.split(",") if b]
    results = [r for m in modes for r in count(a.size, a.stereo, m, batches, a.steps)]
    print("| model | mode | batch | device | env | primitives/step | most frequent kinds |")
    print("| --- | --- | ---: | --- | --- | ---: | --- |")
    for r in results:
        kinds = ", ".join(f"{k} {n}" for k, n in list(r["primitive_kinds"].items())[:a.kinds])
        print(f"| {r['size']} | {r['mode']} | {r['batch']} | {r['device']} | {r['env'] or '(default)'} | "
              f"{r['primitives']} | {kinds} |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
