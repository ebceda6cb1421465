"""Soak: `mlx-music serve` (its own process, two models) under 16 clients, each running a fixed
script of mixed work (about 20 s on two idle cores): whole files, streams, clips (streamed,
downloaded by byte ranges, evicted), melody uploads, bad uploads, cancellations and dropped
streams; with an API key from $MLX_MUSIC_API_KEY and one allowed origin. Then: every good result
is bit-identical to the same request sent alone, no answer was a 5xx, the server's RSS grew by
less than `RSS_BOUND`, the upload folder is empty, and SIGTERM stops it with exit status 0 and no
folder left behind."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict

import httpx
import numpy as np
import psutil
import pytest

from server_helpers import convert_embedded, free_port, odd_rate_wav, pcm16, tone_wav

KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CLIENTS = 16
CLIP_SCRIPT = ["clip", "idle_clip", "cancel", "clip"]
DIRECT_SCRIPT = ["whole", "melody", "bad", "stream", "drop", "bad"]
RSS_BOUND = 400 * 1024 * 1024  # bytes of RSS growth allowed from the first seconds of load to its end
CLIP_CLIENTS = 8
KEEP_CLIPS = 10  # more than the live clips (one per clip client at most): eviction, never a 503

TEXT_SPECS = [{"prompt": p, "duration": d, "seed": s, "top_k": k}
              for p, d, s, k in (("drums", 0.4, 1, 50), ("synth bass", 0.6, 2, 250), ("calm piano", 0.2, 3, 50),
                                 ("lofi", 0.8, 4, 100), ("a much longer prompt with many words", 0.4, 5, 50),
                                 ("rock", 0.6, 6, 250))]
MELODY_SPECS = [{"prompt": p, "duration": 0.4, "seed": s, "model": "melody"}
                for p, s in (("hum", 7), ("a much longer prompt with many words zzz", 8), ("rock", 9))]
TONE = tone_wav(0.5)
BAD_UPLOADS = [(odd_rate_wav(1), 400, "sample rate"), (odd_rate_wav(3001), 400, "sample rate"),
               (odd_rate_wav(8001), None, None),
               (b"GIF89a not audio", 400, "cannot read"), (b"", 400, "empty"),
               (tone_wav(0.5, amplitude=0.0), 400, "silent")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, mlx_folder):
    return convert_embedded(tmp_path_factory.mktemp("soak") / "tiny"), mlx_folder("melody")


async def _client(i: int, c: httpx.AsyncClient, got: dict, statuses: Counter, clip_ids: list) -> None:
    """A fixed script of actions (rotated per client; the load's timing varies, its coverage not)."""
    rng = random.Random(i)

    def note(r: httpx.Response) -> None:
        statuses[r.status_code] += 1
        assert r.status_code < 500, (r.status_code, r.text[:200])

    # Clients 0-7 use clips (one live clip each at most), the others the direct endpoints.
    script = CLIP_SCRIPT if i < CLIP_CLIENTS else DIRECT_SCRIPT
    for n in range(len(script)):
        action = script[(i + n) % len(script)]
        spec = dict(rng.choice(TEXT_SPECS))
        key = tuple(sorted(spec.items()))
        if action == "whole":
            r = await c.post("/v1/generate", json=spec)
            note(r)
            got[key].append(r.content)
        elif action == "stream":
            async with c.stream("POST", "/v1/generate/stream", json=spec) as r:
                note(r)
                got[key].append(b"".join([b async for b in r.aiter_raw()]))
        elif action == "clip":  # stream it whole, then download the file in two byte ranges
            r = await c.post("/v1/clips", json=spec)
            note(r)
            clip = r.json()
            clip_ids.append(clip["id"])
            async with c.stream("GET", clip["stream"]) as s:
                note(s)
                got[key].append(b"".join([b async for b in s.aiter_raw()]))
            head = await c.get(clip["wav"], headers={"Range": "bytes=0-99"})
            tail = await c.get(clip["wav"], headers={"Range": "bytes=100-"})
            note(head)
            note(tail)
            assert head.status_code == tail.status_code == 206
            got[key].append(head.content + tail.content)
        elif action == "melody":
            mspec = rng.choice(MELODY_SPECS)
            r = await c.post("/v1/generate", data={k: str(v) for k, v in mspec.items()},
                             files={"melody": ("m.wav", TONE, "audio/wav")})
            note(r)
            got[tuple(sorted(mspec.items()))].append(r.content)
        elif action == "bad":
            data, status, words = rng.choice(BAD_UPLOADS)
            r = await c.post("/v1/generate", data={"prompt": "x", "duration": "0.4", "model": "melody"},
                             files={"melody": ("m.wav", data, "audio/wav")})
            note(r)
            if status is not None:
                assert r.status_code == status and words in r.json()["error"], r.text
            else:  # any odd rate in range is bounded work: a 200 or a 4xx, never a 5xx
                assert r.status_code in (200, 400), r.text
        elif action == "cancel":
            r = await c.post("/v1/clips", json={**spec, "duration": 4.0})
            note(r)
            clip = r.json()
            async with c.stream("GET", clip["stream"]) as s:
                await s.aiter_raw().__anext__()
                d = await c.delete(f"/v1/clips/{clip['id']}")
                note(d)
        elif action == "drop":
            async with c.stream("POST", "/v1/generate/stream", json={**spec, "duration": 4.0}) as s:
                note(s)
                await s.aiter_raw().__anext__()
        else:  # a clip nobody listens to: done (or cancelled after the grace period), evicted later
            r = await c.post("/v1/clips", json=spec)
            note(r)
            clip_ids.append(r.json()["id"])
            while (await c.get(f"/v1/clips/{clip_ids[-1]}")).json()["state"] in ("queued", "running"):
                await asyncio.sleep(0.2)


def test_soak_sixteen_clients(folders, tmp_path):
    tiny, melody = folders
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path), "MLX_MUSIC_API_KEY": KEY}
    p = subprocess.Popen([sys.executable, "-m", "mlx_music.cli", "serve", "--model", f"tiny={tiny}",
                          "--model", f"melody={melody}", "--port", str(port), "--keep-clips", str(KEEP_CLIPS),
                          "--batch-wait-ms", "100", "--chunk-seconds", "0.2", "--log-level", "warning",
                          "--allow-origin", "http://ok.example"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while True:
            assert p.poll() is None, p.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2, headers=AUTH).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < end, "server did not start"
            time.sleep(0.2)
        # The key from $MLX_MUSIC_API_KEY guards every endpoint; --allow-origin lets one other origin in.
        assert httpx.get(url + "/health").status_code == 401
        for origin, status in (("http://ok.example", 200), ("http://evil.example", 403)):
            assert httpx.get(url + "/health", headers={**AUTH, "Origin": origin}).status_code == status
        proc = psutil.Process(p.pid)
        got: dict = defaultdict(list)
        statuses: Counter = Counter()
        clip_ids: list[str] = []
        rss: list[int] = []

        async def load():
            done = asyncio.Event()

            async def sample():
                while not done.is_set():
                    rss.append(proc.memory_info().rss)
                    await asyncio.sleep(0.25)

            async def clients(c):
                try:
                    await asyncio.gather(*(_client(i, c, got, statuses, clip_ids) for i in range(CLIENTS)))
                finally:
                    done.set()

            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=AUTH) as c:
                await asyncio.gather(sample(), clients(c))

        asyncio.run(load())
        # Quiet now: each spec alone, and every result of the load equal to it.
        with httpx.Client(base_url=url, timeout=120, headers=AUTH) as c:
            checked = 0
            for key, bodies in got.items():
                spec = dict(key)
                if spec.get("model") == "melody":
                    solo = c.post("/v1/generate", data={k: str(v) for k, v in spec.items()},
                                  files={"melody": ("m.wav", TONE, "audio/wav")})
                else:
                    solo = c.post("/v1/generate", json=spec)
                assert solo.status_code == 200
                ref = pcm16(solo.content)[0]
                for body in bodies:
                    assert np.array_equal(pcm16(body)[0], ref), spec
                    checked += 1
            evicted = sum(c.get(f"/v1/clips/{i}").status_code == 404 for i in clip_ids)
        uploads = list(tmp_path.glob("mlx-music-uploads-*"))
        assert len(uploads) == 1 and list(uploads[0].iterdir()) == []
        print(f"soak: {checked} results checked, {len(clip_ids)} clips ({evicted} evicted), statuses {dict(statuses)}, "
              f"RSS {min(rss) / 2**20:.0f}-{max(rss) / 2**20:.0f} MiB")
        assert checked >= 50 and statuses[400] >= 12 and len(clip_ids) > KEEP_CLIPS and evicted > 0, \
            (checked, len(clip_ids), evicted, statuses)
        assert not [s for s in statuses if s >= 500], statuses
        growth = max(rss) - rss[min(4, len(rss) - 1)]
        assert growth < RSS_BOUND, f"RSS grew by {growth / 2**20:.0f} MiB"
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0, out[-2000:]
        assert "Traceback" not in out and "terminate called" not in out, out[-2000:]
        assert list(tmp_path.glob("mlx-music-*")) == []  # upload and clip folders removed
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
