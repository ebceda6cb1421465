"""The HTTP API (`mlx-music serve`): httpx in-process and against a real uvicorn on a free port,
on the embedded tiny checkpoint. Outputs are compared sample for sample with `mlx-music generate`
and with the same request run alone."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from mlx_music.runtime import load
from mlx_music.server import ServerConfig, create_app
from server_helpers import UvicornThread, alone, convert_embedded, pcm16, samples, tone_wav

SR = 32000


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return convert_embedded(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return load(tiny_folder)


@pytest.fixture
def make_app(tmp_path):
    def make(pipes, **cfg):
        cfg.setdefault("temp_root", str(tmp_path))
        return create_app(pipes, ServerConfig(**cfg))

    return make


@contextlib.asynccontextmanager
async def inprocess(app):
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                     timeout=120) as client:
            yield client


def upload_dirs(tmp_path):
    return sorted(p for p in tmp_path.iterdir() if p.name.startswith("mlx-music-uploads-"))


# --------------------------------------------------------------------------------- basics
def test_health_models_page_and_docs_in_process(tiny, make_app, tmp_path):
    app = make_app({"tiny": tiny}, max_duration=12.5)

    async def run():
        async with inprocess(app) as c:
            assert (await c.get("/health")).json() == {"status": "ok"}
            models = (await c.get("/v1/models")).json()["models"]
            assert [(m["id"], m["sample_rate"], m["channels"], m["melody"], m["max_duration"]) for m in models] \
                == [("tiny", SR, 2, False, 12.5)]
            page = await c.get("/")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            for element in ('id="model"', 'id="prompt"', 'id="duration"', 'id="guidance"', 'id="top_k"',
                            'id="top_p"', 'id="temperature"', 'id="seed"', 'id="melody"', 'id="audio_prompt"',
                            'id="generate"', 'id="cancel"', "<audio", 'id="wave"', 'id="progress"', 'id="clips"'):
                assert element in page.text, element
            # Offline: nothing is fetched from another origin.
            assert "http://" not in page.text and "https://" not in page.text and "src=\"/" not in page.text
            assert (await c.get("/docs")).status_code == 404  # Swagger UI needs a CDN: not served
            spec = (await c.get("/openapi.json")).json()
            assert {"/health", "/v1/models", "/v1/generate", "/v1/generate/stream", "/v1/clips"} <= set(spec["paths"])
            body = spec["paths"]["/v1/generate"]["post"]["requestBody"]["content"]
            assert set(body) == {"application/json", "multipart/form-data"}
            assert {"melody", "audio_prompt"} <= set(body["multipart/form-data"]["schema"]["properties"])
            # A JSON request in-process: right length, and the seed comes back.
            r = await c.post("/v1/generate", json={"prompt": "calm piano", "duration": 0.5, "seed": 11})
            assert r.status_code == 200 and r.headers["content-type"] == "audio/wav" and r.headers["x-seed"] == "11"
            a, sr = pcm16(r.content)
            assert sr == SR and a.shape == (samples(0.5), 2)
            # The file records its seed and settings (the same tag `mlx-music generate` writes).
            tag = json.loads(sf.SoundFile(io.BytesIO(r.content)).comment)
            assert (tag["seed"], tag["prompt"], tag["duration"]) == (11, "calm piano", 0.5)
            r = await c.post("/v1/generate", json={"prompt": "calm piano", "duration": 0.5})
            assert r.status_code == 200 and 0 <= int(r.headers["x-seed"]) <= 2**32 - 1
            # One seed range everywhere (runtime.sampling.SEED_MAX): its top is accepted, one past is a 422.
            top = await c.post("/v1/generate", json={"prompt": "calm piano", "duration": 0.5, "seed": 2**32 - 1})
            assert top.status_code == 200 and top.headers["x-seed"] == str(2**32 - 1)
            for bad in (2**32, -1):
                r = await c.post("/v1/generate", json={"prompt": "calm piano", "duration": 0.5, "seed": bad})
                assert r.status_code == 422 and "seed" in r.text, (bad, r.text)
        assert upload_dirs(tmp_path) == []  # the upload folder goes with the server

    asyncio.run(run())


def _cli_generate(folder, out, settings) -> None:
    r = subprocess.run([sys.executable, "-m", "mlx_music.cli", "generate", "--model", str(folder),
                        "--prompt", settings["prompt"], "--duration", "1.0", "--seed", "7", "--top-k", "50",
                        "--temperature", "0.9", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


@contextlib.contextmanager
def serve_process(folder, **options):
    """`mlx-music serve` as its own process on a free port. Compared bit for bit with the CLI, the
    server must be a fresh process too: MKL's results depend on thread settings that other tests
    change in this one (parity runs single-threaded)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    p = subprocess.Popen([sys.executable, "-m", "mlx_music.cli", "serve", "--model", f"tiny={folder}",
                          "--port", str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert p.poll() is None, p.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        yield url
    finally:
        p.terminate()
        p.wait(timeout=30)


def test_same_samples_as_cli_whole_and_streamed(tiny_folder, tmp_path):
    """/v1/generate (wav, flac) and /v1/generate/stream give `mlx-music generate`'s samples."""
    settings = {"prompt": "80s pop with synths", "duration": 1.0, "seed": 7, "top_k": 50, "temperature": 0.9}
    _cli_generate(tiny_folder, tmp_path / "cli.wav", settings)
    _cli_generate(tiny_folder, tmp_path / "cli.flac", settings)
    cli, _ = pcm16((tmp_path / "cli.wav").read_bytes())
    assert cli.shape == (samples(1.0), 2) and np.abs(cli).max() > 0
    with serve_process(tiny_folder, chunk_seconds=0.2) as url, httpx.Client(base_url=url, timeout=120) as c:
        whole = c.post("/v1/generate", json=settings)
        assert whole.status_code == 200 and whole.headers["x-seed"] == "7"
        assert np.array_equal(pcm16(whole.content)[0], cli)
        with c.stream("POST", "/v1/generate/stream", json=settings) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"] == "audio/wav"
            assert "content-length" not in resp.headers and resp.headers["transfer-encoding"] == "chunked"
            pieces = list(resp.iter_raw())
        data = b"".join(pieces)
        assert len(pieces) > 2  # audio arrived in several chunks, not as one file at the end
        assert int.from_bytes(data[40:44], "little") == samples(1.0) * 4  # header: the requested length
        assert np.array_equal(pcm16(data)[0], cli)
        flac = c.post("/v1/generate", json={**settings, "format": "flac"})
        assert flac.status_code == 200 and flac.headers["content-type"] == "audio/flac"
        assert np.array_equal(pcm16(flac.content)[0], pcm16((tmp_path / "cli.flac").read_bytes())[0])


# ------------------------------------------------------------------------------------ load
def test_sixteen_concurrent_clients_batched_and_equal_to_alone(tiny, make_app, tmp_path):
    rng = random.Random(0)
    prompt_wav = tone_wav(0.3)
    clients = []
    for i in range(16):
        d = rng.choice([0.4, 0.6, 0.8])
        spec = {"prompt": f"client {i} " + rng.choice(["drums", "piano", "synth bass"]), "duration": d,
                "seed": 100 + i, "top_k": rng.choice([50, 250]), "temperature": rng.choice([0.8, 1.0])}
        kind = ["json", "stream", "multipart"][i % 3]
        clients.append((kind, spec))
    app = make_app({"tiny": tiny}, max_batch=8, batch_wait_ms=300, chunk_seconds=0.2)

    async def client(c, kind, spec):
        if kind == "json":
            r = await c.post("/v1/generate", json=spec)
            return r.status_code, r.content
        if kind == "stream":
            async with c.stream("POST", "/v1/generate/stream", json=spec) as r:
                return r.status_code, b"".join([b async for b in r.aiter_raw()])
        form = {k: str(v) for k, v in spec.items()}
        r = await c.post("/v1/generate", data=form, files={"audio_prompt": ("prompt.wav", prompt_wav, "audio/wav")})
        return r.status_code, r.content

    async def run_all(url):
        async with httpx.AsyncClient(base_url=url, timeout=300) as c:
            return await asyncio.gather(*(client(c, kind, spec) for kind, spec in clients))

    with UvicornThread(app) as srv:
        results = asyncio.run(run_all(srv.url))
        batcher = app.state.batcher
        assert batcher.wait_idle()
        uploads = upload_dirs(tmp_path)
        assert len(uploads) == 1 and list(uploads[0].iterdir()) == []  # no temp file left behind
        history = list(batcher.history)
    assert upload_dirs(tmp_path) == []
    assert sum(h["rows"] for h in history) == 16 and max(h["rows"] for h in history) > 1  # batched
    assert all(h["complete"] for h in history)
    prompt_audio = sf.read(io.BytesIO(prompt_wav), dtype="float32", always_2d=True)
    for (kind, spec), (status, body) in zip(clients, results):
        assert status == 200, body[:200]
        got, sr = pcm16(body)
        assert sr == SR and got.shape == (samples(spec["duration"]), 2), (kind, spec)
        extra = {"audio_prompt": (prompt_audio[0].T.copy(), prompt_audio[1])} if kind == "multipart" else {}
        ref = alone(tiny, tmp_path, spec["prompt"], spec["duration"], seed=spec["seed"], top_k=spec["top_k"],
                    temperature=spec["temperature"], **extra)
        assert np.array_equal(got, ref), (kind, spec)


# ------------------------------------------------------------------------------- bad input
BAD_JSON = [
    ("negative duration", {"prompt": "x", "duration": -1}, 422, "duration"),
    ("zero duration", {"prompt": "x", "duration": 0}, 422, "duration"),
    ("huge duration", {"prompt": "x", "duration": 1e9}, 422, "duration"),
    ("over the limit", {"prompt": "x", "duration": 5.5}, 422, "not clipped"),
    ("duration as text", {"prompt": "x", "duration": "2"}, 422, "duration"),
    ("duration missing", {"prompt": "x"}, 422, "duration"),
    ("unknown model", {"prompt": "x", "duration": 1, "model": "musicgen-huge"}, 404, "unknown model"),
    ("path as model", {"prompt": "x", "duration": 1, "model": "/tmp/tiny"}, 400, "unknown model"),
    ("relative path as model", {"prompt": "x", "duration": 1, "model": "../tiny"}, 400, "unknown model"),
    ("empty prompt", {"prompt": "", "duration": 1}, 422, "prompt"),
    ("blank prompt", {"prompt": "   ", "duration": 1}, 422, "prompt"),
    ("empty prompt list", {"prompt": [], "duration": 1}, 422, "prompt"),
    ("prompt as number", {"prompt": 5, "duration": 1}, 422, "prompt"),
    ("unknown field", {"prompt": "x", "duration": 1, "steps": 5}, 422, "unknown field"),
    ("negative seed", {"prompt": "x", "duration": 1, "seed": -1}, 422, "seed"),
    ("fractional seed", {"prompt": "x", "duration": 1, "seed": 1.5}, 422, "seed"),
    ("top_p over 1", {"prompt": "x", "duration": 1, "top_p": 1.5}, 422, "top_p"),
    ("temperature 0", {"prompt": "x", "duration": 1, "temperature": 0}, 422, "temperature"),
    ("negative top_k", {"prompt": "x", "duration": 1, "top_k": -3}, 422, "top_k"),
    ("negative guidance", {"prompt": "x", "duration": 1, "guidance": -2}, 422, "guidance"),
    ("greedy as text", {"prompt": "x", "duration": 1, "greedy": "yes"}, 422, "greedy"),
    ("unknown format", {"prompt": "x", "duration": 1, "format": "mp3"}, 422, "format"),
]
BAD_RAW = [  # (name, body bytes, content type, status, words)
    ("NaN duration", b'{"prompt": "x", "duration": NaN}', "application/json", 422, "duration"),
    ("infinite duration", b'{"prompt": "x", "duration": Infinity}', "application/json", 422, "duration"),
    ("invalid JSON", b'{"prompt": "x", "duration": ', "application/json", 400, "invalid JSON"),
    ("JSON array", b'[{"prompt": "x", "duration": 1}]', "application/json", 400, "object"),
    ("empty body", b"", "application/json", 400, "invalid JSON"),
    ("text body", b"prompt=x", "text/plain", 415, "content-type"),
    ("huge JSON", b'{"prompt": "' + b"x" * 100_000 + b'", "duration": 1}', "application/json", 413, "limit"),
]


def test_bad_input_is_a_4xx_with_one_line_json_and_the_server_stays_up(tiny, mlx_folder, make_app, tmp_path):
    melody = load(mlx_folder("melody"))
    app = make_app({"tiny": tiny, "melody": melody}, max_duration=5.0, max_upload_bytes=200_000)
    silent = tone_wav(0.5, amplitude=0.0)
    multipart = [  # (name, fields, files, status, words)
        ("non-audio upload", {"model": "melody"}, {"melody": ("m.wav", b"GIF89a not audio at all", "audio/wav")},
         400, "cannot read audio"),
        ("over-size upload", {}, {"audio_prompt": ("p.wav", tone_wav(4.0), "audio/wav")}, 413, "limit"),
        ("empty upload", {}, {"audio_prompt": ("p.wav", b"", "audio/wav")}, 400, "empty"),
        ("silent melody", {"model": "melody"}, {"melody": ("m.wav", silent, "audio/wav")}, 400, "silent"),
        ("melody to a non-melody model", {}, {"melody": ("m.wav", tone_wav(0.5), "audio/wav")}, 422,
         "not a melody model"),
        ("file under an unknown name", {}, {"song": ("s.wav", tone_wav(0.5), "audio/wav")}, 400, "unexpected file"),
        ("melody sent as text", {"melody": "hum.wav"}, {}, 400, "expected a file"),
        ("audio prompt longer than the output", {"duration": "0.2"},
         {"audio_prompt": ("p.wav", tone_wav(0.5), "audio/wav")}, 422, "already"),
        ("NaN guidance in a form", {"guidance": "nan"}, {"audio_prompt": ("p.wav", tone_wav(0.2), "audio/wav")},
         422, "guidance"),
        ("duration as words in a form", {"duration": "ten"}, {}, 422, "duration"),
    ]

    async def run():
        async with inprocess(app) as c:
            cases = 0

            async def check(name, response, status, words):
                nonlocal cases
                cases += 1
                assert response.status_code == status, (name, response.status_code, response.text)
                assert "\n" not in response.text.strip(), name
                body = json.loads(response.text)
                assert list(body) == ["error"] and words.lower() in body["error"].lower(), (name, body)
                assert (await c.get("/health")).json() == {"status": "ok"}

            for name, body, status, words in BAD_JSON:
                await check(name, await c.post("/v1/generate", json=body), status, words)
            for name, raw, ctype, status, words in BAD_RAW:
                await check(name, await c.post("/v1/generate", content=raw, headers={"content-type": ctype}),
                            status, words)
            for name, fields, files, status, words in multipart:
                parts = {k: (None, v) for k, v in {"prompt": "x", "duration": "1.0", **fields}.items()}
                await check(name, await c.post("/v1/generate", files={**parts, **files}), status, words)
            # The streaming endpoint refuses before the stream starts, with the same errors.
            await check("stream: unknown model", await c.post("/v1/generate/stream",
                                                              json={"prompt": "x", "duration": 1, "model": "x"}),
                        404, "unknown model")
            await check("unknown clip", await c.get("/v1/clips/0123abcd.wav"), 404, "unknown")
            await check("unknown route", await c.get("/v2/generate"), 404, "not found")
            await check("wrong method", await c.get("/v1/generate"), 405, "method not allowed")
            assert cases >= 20
            # The melody model takes a melody: a good request still works after all that.
            r = await c.post("/v1/generate", data={"prompt": "hum", "duration": "0.4", "seed": "5", "model": "melody"},
                             files={"melody": ("m.wav", tone_wav(0.5), "audio/wav")})
            assert r.status_code == 200 and pcm16(r.content)[0].shape[0] == samples(0.4)
            mel = sf.read(io.BytesIO(tone_wav(0.5)), dtype="float32", always_2d=True)
            ref = alone(melody, tmp_path, "hum", 0.4, seed=5, melody=(mel[0].T.copy(), mel[1]))
            assert np.array_equal(pcm16(r.content)[0], ref)
            assert [list(d.iterdir()) for d in upload_dirs(tmp_path)] == [[]]

    asyncio.run(run())


# ------------------------------------------------------------------ queue, cancel, clips
def test_full_queue_answers_503_with_retry_after(tiny, make_app):
    app = make_app({"tiny": tiny}, max_queue=1)  # lifespan not entered: the worker never starts

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            waiting = asyncio.create_task(c.post("/v1/generate", json={"prompt": "x", "duration": 0.2}))
            while app.state.batcher.waiting == 0:
                await asyncio.sleep(0.01)
            r = await c.post("/v1/generate", json={"prompt": "y", "duration": 0.2})
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert list(r.json()) == ["error"] and "queue is full" in r.json()["error"]
            waiting.cancel()

    asyncio.run(run())


def test_disconnect_cancels_and_clips_flow(tiny, make_app):
    app = make_app({"tiny": tiny}, max_batch=1, chunk_seconds=0.1, clip_grace_s=0.5)
    batcher = app.state.batcher
    with UvicornThread(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        # A streaming client that leaves after the first audio: its row is cancelled, the batch stops.
        with c.stream("POST", "/v1/generate/stream", json={"prompt": "long", "duration": 20.0, "seed": 1}) as r:
            assert r.status_code == 200
            next(r.iter_raw())
        assert batcher.wait_idle()
        last = batcher.history[-1]
        assert last["states"] == ["cancelled"] and last["samples"][0] < last["total_samples"][0]
        # Clips (the page's flow): create, listen, download WAV and FLAC.
        clip = c.post("/v1/clips", json={"prompt": "clip", "duration": 0.6, "seed": 3})
        assert clip.status_code == 201
        info = clip.json()
        assert info["settings"]["seed"] == 3 and info["duration"] == pytest.approx(0.6)
        streamed = c.get(info["stream"])
        assert streamed.status_code == 200
        assert c.get(f"/v1/clips/{info['id']}").json()["state"] == "done"
        wav = c.get(info["wav"])
        assert wav.status_code == 200 and "attachment" in wav.headers["content-disposition"]
        assert np.array_equal(pcm16(wav.content)[0], pcm16(streamed.content)[0])
        assert pcm16(wav.content)[0].shape == (samples(0.6), 2)
        flac = c.get(info["flac"])
        assert flac.status_code == 200 and np.abs(pcm16(flac.content)[0].astype(int) - pcm16(wav.content)[0]).max() <= 1
        # A clip nobody listens to is cancelled after the grace period; DELETE cancels and forgets.
        idle = c.post("/v1/clips", json={"prompt": "nobody", "duration": 20.0}).json()
        end = time.monotonic() + 30
        while c.get(f"/v1/clips/{idle['id']}").json()["state"] not in ("cancelled", "done"):
            assert time.monotonic() < end
            time.sleep(0.05)
        assert c.get(f"/v1/clips/{idle['id']}").json()["state"] == "cancelled"
        assert c.delete(f"/v1/clips/{info['id']}").status_code == 200
        assert c.get(info["wav"]).status_code == 404
        assert batcher.wait_idle()
        assert c.get("/health").json() == {"status": "ok"}
