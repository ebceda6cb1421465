"""Batch-job throughput: rows/s and seconds of audio per second, in one run, for
`--batch-size` 1, 4 and 8 in one process, and for 1 process against 2 ranks (`mlx.launch`).

    python benchmarks/bench_batch.py                       # the tiny test model, CPU
    python benchmarks/bench_batch.py --model out/musicgen-small --rows 16 --duration 5

Batch sizes run in this process on one loaded model (load excluded): an untimed warm-up job with
the same shapes, then the timed job into a fresh folder. The time is split into the token loop,
the EnCodec decode and writing + hashing the files. The rank comparison runs the whole
`mlx-music batch` command (start, model load, generation, manifest), once directly and once under
`mlx.launch -n 2 --backend ring` on the loopback, with the CPU threads split between the ranks
(OMP_NUM_THREADS / OPENBLAS_NUM_THREADS); "gen" is the slowest rank's generation time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def prompts_file(folder: Path, rows: int, duration: float, **settings) -> Path:
    p = folder / ("prompts.jsonl" if not settings else "prompts-" + "-".join(f"{k}{v}" for k, v in settings.items())
                  + ".jsonl")
    styles = ["80s pop with synths", "calm piano", "lofi beat", "jazz trio", "techno", "ambient pads"]
    p.write_text("".join(json.dumps({"id": f"r{i:04d}", "prompt": styles[i % len(styles)], "duration": duration,
                                     "seed": i, **settings}) + "\n" for i in range(rows)))
    return p


def in_process(pipe, prompts: Path, work: Path, batch_size: int, note: str = "") -> dict:
    from mlx_music.runtime import batch_job

    spent = {"decode": 0.0, "write": 0.0}
    decode, write = pipe.decode_codes, batch_job._write_audio

    def timed_decode(codes):
        t = time.perf_counter()
        try:
            return decode(codes)
        finally:
            spent["decode"] += time.perf_counter() - t

    def timed_write(*a, **k):
        t = time.perf_counter()
        try:
            return write(*a, **k)
        finally:
            spent["write"] += time.perf_counter() - t

    run = lambda out: batch_job.run_batch(prompts, pipe, out, batch_size=batch_size, progress=False)  # noqa: E731
    run(work / f"warm-{batch_size}{note}")  # compiles this batch size's step shapes
    pipe.decode_codes, batch_job._write_audio = timed_decode, timed_write
    spent.update(decode=0.0, write=0.0)
    try:
        s = run(work / f"bs-{batch_size}{note}")
    finally:
        pipe.decode_codes, batch_job._write_audio = decode, write
    assert s.failed == 0 and s.generated == s.rows, s
    loop = s.seconds - spent["decode"] - spent["write"]
    return {"what": f"1 process, --batch-size {batch_size}{note}", "rows": s.generated, "audio_s": s.audio_seconds,
            "seconds": s.seconds, "loop": loop, "decode": spent["decode"], "write": spent["write"]}


def command(model: str, prompts: Path, out: Path, batch_size: int, ranks: int) -> dict:
    cmd = [str(BIN / "mlx-music"), "batch", str(prompts), "--model", model, "--out-dir", str(out),
           "--batch-size", str(batch_size), "--quiet"]
    if ranks > 1:
        # Several ranks on one host: split the cores, or the BLAS threads of the ranks (which spin
        # while waiting) oversubscribe them; on this 2-CPU box that made 2 ranks 10x slower.
        threads = str(max(1, (os.cpu_count() or 1) // ranks))
        cmd = [str(BIN / "mlx.launch"), "-n", str(ranks), "--backend", "ring", "--env", f"OMP_NUM_THREADS={threads}",
               "--env", f"OPENBLAS_NUM_THREADS={threads}", "--python", sys.executable, *cmd]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    text = r.stdout + r.stderr
    gen = [(int(m[1]), float(m[2]), float(m[3]))
           for m in re.finditer(r"generated (\d+) rows, ([\d.]+) s of audio in ([\d.]+) s", text)]
    if r.returncode or len(gen) != ranks:
        sys.exit(f"{' '.join(cmd)} failed:\n{text}")
    return {"what": f"{ranks} rank{'s' if ranks > 1 else ''} (whole command), --batch-size {batch_size}",
            "rows": sum(g[0] for g in gen), "audio_s": sum(g[1] for g in gen), "seconds": wall,
            "gen": max(g[2] for g in gen)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="MLX checkpoint (default: the tiny test model, converted here).")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--duration", type=float, default=1.0, help="Seconds of audio per row.")
    ap.add_argument("--batch-sizes", default="1,4,8")
    ap.add_argument("--rank-batch-size", type=int, default=8, help="--batch-size of the 1-vs-2-ranks runs.")
    ap.add_argument("--no-top-k0", dest="top_k0", action="store_false",
                    help="Skip the extra rows with top-k off (they show what the top-k sort costs).")
    ap.add_argument("--json", default=None, help="Also write the rows here.")
    a = ap.parse_args()

    import mlx_music  # first: it binds MLX's CPU BLAS to MKL, which must precede mlx.core
    from mlx_music.blas import blas_info

    import mlx.core as mx

    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        model = a.model
        if model is None:
            from mlx_music.converters.convert import convert_checkpoint

            model = str(work / "tiny-stereo")
            convert_checkpoint(ROOT / "tests" / "data" / "tiny-musicgen-stereo", model, progress=False)
        prompts = prompts_file(work, a.rows, a.duration)
        pipe = mlx_music.load(model)
        print(f"model {model}; {a.rows} rows x {a.duration} s; mlx {mx.__version__} {mx.default_device()}; "
              f"BLAS {blas_info()['blas']}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
        results = [in_process(pipe, prompts, work, int(b)) for b in a.batch_sizes.split(",")]
        if a.top_k0:  # where the time goes: the same rows without the top-k filter
            no_topk = prompts_file(work, a.rows, a.duration, top_k=0)
            results += [in_process(pipe, no_topk, work, int(b), ", top_k 0") for b in a.batch_sizes.split(",")[::2]]
        for ranks in (1, 2):
            results.append(command(model, prompts, work / f"ranks-{ranks}", a.rank_batch_size, ranks))
        base = results[0]["audio_s"] / results[0]["seconds"]
        print("\n| run | rows | rows/s | audio s/s | vs batch 1 | token loop s | decode s | write+sha256 s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in results:
            rate = r["audio_s"] / r["seconds"]
            split = (f"{r['loop']:.2f} | {r['decode']:.2f} | {r['write']:.2f}" if "loop" in r
                     else f"(gen {r['gen']:.2f} s, slowest rank) | | ")
            print(f"| {r['what']} | {r['rows']} | {r['rows'] / r['seconds']:.2f} | {rate:.2f} | {rate / base:.2f}x "
                  f"| {split} |")
        print(f"\nload average after: {os.getloadavg()[0]:.1f}")
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
