"""Server throughput: N concurrent HTTP clients vs one offline batch of N rows (not a test).

One run, for every level N in --levels (default 1, 4, 8):
  1. offline: `pipe.generate_batch` of N rows (own prompt and seed each) in this process;
  2. server: a real uvicorn (`mlx_music.server`, --max-batch = the largest level) on a free port,
     and N clients that POST /v1/generate/stream at once and read the whole WAV.
Each is warmed up once with the same shapes (compilation is not timed), then timed --repeats
times; the best run is reported. Throughput is seconds of audio produced per wall second; time
to first audio is, per client, from sending the request to the first PCM bytes (median over
clients, best run).

    python benchmarks/bench_serve.py                       # the embedded tiny checkpoint
    python benchmarks/bench_serve.py --model out/musicgen-small --duration 10 --json serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402

from mlx_music.runtime import load  # noqa: E402
from mlx_music.runtime.generation import Request  # noqa: E402
from mlx_music.server import ServerConfig, create_app  # noqa: E402
from server_helpers import UvicornThread, convert_embedded  # noqa: E402

PROMPTS = ["80s pop with synths", "calm piano", "lofi beat", "jazz trio", "ambient pads", "drum and bass",
           "folk guitar", "orchestral strings"]


def rows(n: int, duration: float) -> list[dict]:
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "duration": duration, "seed": 1000 + i} for i in range(n)]


def offline(pipe, n: int, duration: float) -> float:
    t = time.perf_counter()
    pipe.generate_batch([Request(r["prompt"], r["duration"], seed=r["seed"]) for r in rows(n, duration)])
    return time.perf_counter() - t


async def clients(url: str, n: int, duration: float) -> tuple[float, list[float]]:
    async def one(c: httpx.AsyncClient, body: dict) -> float:
        t = time.perf_counter()
        first = None
        got = 0
        async with c.stream("POST", "/v1/generate/stream", json=body) as r:
            r.raise_for_status()
            async for chunk in r.aiter_raw():
                got += len(chunk)
                if first is None and got > 44:
                    first = time.perf_counter() - t
        return first

    async with httpx.AsyncClient(base_url=url, timeout=3600) as c:
        t = time.perf_counter()
        firsts = await asyncio.gather(*(one(c, b) for b in rows(n, duration)))
        return time.perf_counter() - t, list(firsts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="MLX checkpoint (default: the embedded tiny one, converted)")
    ap.add_argument("--levels", default="1,4,8")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of audio per client")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-wait-ms", type=float, default=50.0)
    ap.add_argument("--chunk-seconds", type=float, default=0.5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or convert_embedded(Path(tmp) / "tiny")
        pipe = load(model)
        cfg = ServerConfig(max_batch=max(levels), batch_wait_ms=args.batch_wait_ms, max_queue=4 * max(levels),
                           chunk_seconds=args.chunk_seconds, max_duration=max(30.0, args.duration))
        app = create_app({"m": pipe}, cfg)
        results = []
        with UvicornThread(app) as srv:
            for n in levels:
                audio = n * args.duration
                offline(pipe, n, args.duration)  # warm-up (compile this shape)
                asyncio.run(clients(srv.url, n, args.duration))
                app.state.batcher.history.clear()
                off = min(offline(pipe, n, args.duration) for _ in range(args.repeats))
                runs = [asyncio.run(clients(srv.url, n, args.duration)) for _ in range(args.repeats)]
                wall, firsts = min(runs, key=lambda r: r[0])
                batches = [h["rows"] for h in app.state.batcher.history]
                row = {"clients": n, "audio_s": audio, "offline_s": off, "offline_audio_per_s": audio / off,
                       "server_s": wall, "server_audio_per_s": audio / wall, "ratio": off / wall,
                       "ttfa_median_s": statistics.median(firsts), "ttfa_max_s": max(firsts),
                       "batch_sizes": batches}
                results.append(row)
                print(f"{n} clients: offline {audio / off:6.2f} audio s/s | server {audio / wall:6.2f} audio s/s "
                      f"({off / wall:.2f}x) | time to first audio median {row['ttfa_median_s']:.2f} s, "
                      f"max {row['ttfa_max_s']:.2f} s | batches {batches}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
