"""Issue 21's inputs against the server: a row's failure is its own, clips live while heard,
byte ranges and HEAD, malformed requests, shutdown, exposure (API key, Origin, limits, schema).
Each test sends the issue's input and asserts the status, body or samples."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import signal
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
from mlx_music.server.clips import ClipStore
from mlx_music.server.inputs import ApiError
from server_helpers import UvicornThread, alone, convert_embedded, free_port, odd_rate_wav, pcm16, tone_wav


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return convert_embedded(tmp_path_factory.mktemp("faults") / "tiny")


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return load(tiny_folder)


def make(pipes, tmp_path, **cfg):
    cfg.setdefault("temp_root", str(tmp_path))
    return create_app(pipes, ServerConfig(**cfg))


def one_line_error(r: httpx.Response, status: int, words: str) -> str:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert "\n" not in r.text.strip()
    body = r.json()
    assert list(body) == ["error"] and words.lower() in body["error"].lower(), body
    return body["error"]


# --------------------------------------------------------------- 2. a row's failure is its own
def test_a_bad_row_fails_alone_and_the_others_equal_solo(tiny, mlx_folder, tmp_path, monkeypatch):
    """Three good melody requests and one whose melody claims 1 Hz, batched together: the bad one
    is a 400 naming its field; the others complete bit-identical to running alone. Then the kind:
    a row whose inputs raise MemoryError in the runtime, and a batch that fails before its first
    audio, fail only the row at fault (500 naming its own error)."""
    melody = load(mlx_folder("melody"))
    app = make({"melody": melody, "tiny": tiny}, tmp_path, max_batch=4, batch_wait_ms=1000)
    good = [("rock", 2), ("a much longer prompt with many words zzz", 3), ("folk", 4)]
    tone = tone_wav(0.5)

    async def post(c, prompt, seed, wav, model="melody"):
        return await c.post("/v1/generate", data={"prompt": prompt, "duration": "0.4", "seed": str(seed),
                                                   "model": model}, files={"melody": ("m.wav", wav, "audio/wav")})

    with UvicornThread(app) as srv:
        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
                return await asyncio.gather(*(post(c, p, s, tone) for p, s in good),
                                            *[post(c, "bad", 9, odd_rate_wav(rate)) for rate in (1, 2**31 - 1)])
        results = asyncio.run(run())
        assert app.state.batcher.wait_idle()
    mel = sf.read(io.BytesIO(tone), dtype="float32", always_2d=True)
    for (prompt, seed), r in zip(good, results[:3]):
        assert r.status_code == 200, r.text
        assert np.array_equal(pcm16(r.content)[0], alone(melody, tmp_path, prompt, 0.4, seed=seed,
                                                         melody=(mel[0].T.copy(), mel[1])))
    for r in results[3:]:
        one_line_error(r, 400, "melody")
        assert "sample rate" in r.json()["error"]

    # The kind: any exception of one row's inputs (here MemoryError from the runtime) fails that row only.
    real_resolve = type(tiny).resolve

    def resolve(self, req):
        if req.prompt == "explode":
            raise MemoryError("Unable to allocate 238. GiB")
        if req.prompt == "refuse":
            raise ValueError("top_k 7: refused by the runtime")
        return real_resolve(self, req)

    monkeypatch.setattr(type(tiny), "resolve", resolve)
    app = make({"tiny": tiny}, tmp_path, max_batch=4, batch_wait_ms=1000)
    specs = [("drums", 11, 200), ("explode", 12, 500), ("bass", 13, 200), ("refuse", 14, 422)]
    with UvicornThread(app) as srv:
        async def run2():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
                return await asyncio.gather(*(c.post("/v1/generate", json={"prompt": p, "duration": 0.4, "seed": s})
                                              for p, s, _ in specs))
        results = asyncio.run(run2())
        assert app.state.batcher.wait_idle()
        history = list(app.state.batcher.history)
    for (prompt, seed, status), r in zip(specs, results):
        if status == 200:
            assert r.status_code == 200, r.text
            assert np.array_equal(pcm16(r.content)[0], alone(tiny, tmp_path, prompt, 0.4, seed=seed))
    one_line_error(results[1], 500, "MemoryError")
    one_line_error(results[3], 422, "top_k 7")
    assert history[-1]["rows"] == 4 and history[-1]["states"].count("done") == 2

    # A batch that fails before its first audio is run again row by row: only the bad row fails.
    real_stream = type(tiny).stream_batch

    def stream_batch(self, requests, **kw):
        if any(r.prompt == "poison" for r in requests):
            raise MemoryError("poisoned batch")
        return real_stream(self, requests, **kw)

    monkeypatch.setattr(type(tiny), "resolve", real_resolve)
    monkeypatch.setattr(type(tiny), "stream_batch", stream_batch)
    app = make({"tiny": tiny}, tmp_path, max_batch=3, batch_wait_ms=1000)
    specs = [("drums", 21), ("poison", 22), ("keys", 23)]
    with UvicornThread(app) as srv:
        async def run3():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
                return await asyncio.gather(*(c.post("/v1/generate", json={"prompt": p, "duration": 0.4, "seed": s})
                                              for p, s in specs))
        results = asyncio.run(run3())
    one_line_error(results[1], 500, "poisoned batch")
    for i in (0, 2):
        assert results[i].status_code == 200
        assert np.array_equal(pcm16(results[i].content)[0], alone(tiny, tmp_path, specs[i][0], 0.4, seed=specs[i][1]))


def test_uploads_are_decoded_only_after_the_queue_check(tiny, mlx_folder, tmp_path, monkeypatch):
    from mlx_music.server import inputs

    decoded = []
    real = inputs.read_audio
    monkeypatch.setattr(inputs, "read_audio", lambda *a, **k: decoded.append(a) or real(*a, **k))
    app = make({"tiny": tiny}, tmp_path, max_queue=1)  # lifespan not entered: the worker never starts
    app.state.uploads = tmp_path

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            waiting = asyncio.create_task(c.post("/v1/generate", json={"prompt": "x", "duration": 0.2}))
            while app.state.batcher.waiting == 0:
                await asyncio.sleep(0.01)
            r = await c.post("/v1/generate", data={"prompt": "y", "duration": "0.5"},
                             files={"audio_prompt": ("p.wav", tone_wav(0.2), "audio/wav")})
            one_line_error(r, 503, "queue is full")
            assert int(r.headers["retry-after"]) >= 1
            waiting.cancel()

    asyncio.run(run())
    assert decoded == []


def test_uploads_are_decoded_only_as_far_as_the_request_can_use(mlx_folder, tmp_path, monkeypatch):
    """A 40 s melody for a 0.4 s request: the server decodes what the runtime can use (its
    `input_seconds`, plus the resampler's margin), and the samples equal the whole file's."""
    from mlx_music.server import inputs

    melody = load(mlx_folder("melody"))
    decoded = []
    real = inputs.read_audio
    monkeypatch.setattr(inputs, "read_audio", lambda *a: decoded.append(real(*a)[0].shape) or real(*a))
    app = make({"melody": melody}, tmp_path)
    long_tone = tone_wav(40.0, sr=8000)

    async def run():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                         timeout=120) as c:
                return await c.post("/v1/generate", data={"prompt": "hum", "duration": "0.4", "seed": "3"},
                                    files={"melody": ("m.wav", long_tone, "audio/wav")})

    r = asyncio.run(run())
    assert r.status_code == 200, r.text
    keep = melody.input_seconds(0.4)["melody"] + inputs.DECODE_MARGIN_S
    assert decoded == [(1, round(keep * 8000))] and keep < 40
    whole = sf.read(io.BytesIO(long_tone), dtype="float32", always_2d=True)
    assert np.array_equal(pcm16(r.content)[0], alone(melody, tmp_path, "hum", 0.4, seed=3,
                                                     melody=(whole[0].T.copy(), whole[1])))


# ------------------------------------------------------------- 4. clips live while they are heard
class _FakeJob:
    def __init__(self, i, state="running", listeners=0):
        self.id, self.state, self.listeners = f"{i:032x}", state, listeners

    finished = property(lambda self: self.state in ("done", "cancelled", "error"))

    def cancel(self):
        if not self.finished:
            self.state = "cancelled"


def test_clip_store_evicts_only_finished_unheard_clips_oldest_first(tmp_path):
    store = ClipStore(3, retry_after=lambda: 7)
    store.open(str(tmp_path))
    a, b, c = _FakeJob(1, "running", listeners=1), _FakeJob(2, "done"), _FakeJob(3, "done", listeners=1)
    for j in (a, b, c):
        store.add(j)
    store.add(d := _FakeJob(4))  # evicts b: the only finished clip nobody hears
    assert [j.id for j in store._clips.values()] == [a.id, c.id, d.id] and a.state == "running"
    with pytest.raises(ApiError) as err:  # a: running and heard, c: heard, d: running
        store.add(_FakeJob(5))
    assert err.value.status == 503 and err.value.headers == {"Retry-After": "7"}
    assert len(store) == 3 and a.state == "running" and d.state == "running"
    c.listeners = 0
    store.add(e := _FakeJob(6))  # c is finished and unheard now
    assert c.id not in store and e.id in store
    store.close()
    assert not list(tmp_path.iterdir())


def test_a_heard_clip_outlives_new_clips_and_a_full_store_answers_503(tiny, tmp_path):
    """A long clip streaming to a listener, then new clips from others: only finished, unheard clips
    go; when every kept clip is live, a new clip is a 503 with Retry-After; the listener gets the
    whole clip, bit-identical to running alone."""
    app = make({"tiny": tiny}, tmp_path, max_batch=1, keep_clips=3, chunk_seconds=0.1, clip_grace_s=60)
    with UvicornThread(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        early = [c.post("/v1/clips", json={"prompt": f"early {i}", "duration": 0.2, "seed": i}).json()
                 for i in range(2)]
        assert app.state.batcher.wait_idle()
        long = c.post("/v1/clips", json={"prompt": "long", "duration": 4.0, "seed": 5}).json()
        with c.stream("GET", long["stream"]) as heard:
            pieces = heard.iter_raw()
            got = [next(pieces)]
            new = []
            for i in range(2):  # each evicts one finished clip nobody hears, oldest first
                r = c.post("/v1/clips", json={"prompt": f"new {i}", "duration": 0.2, "seed": 10 + i})
                assert r.status_code == 201, r.text
                new.append(r.json())
                assert c.get(f"/v1/clips/{early[i]['id']}").status_code == 404
            assert c.get(f"/v1/clips/{long['id']}").json()["state"] == "running"
            r = c.post("/v1/clips", json={"prompt": "one too many", "duration": 0.2})
            one_line_error(r, 503, "kept clips")
            assert int(r.headers["retry-after"]) >= 1
            got += list(pieces)
        data = b"".join(got)
        assert c.get(f"/v1/clips/{long['id']}").json()["state"] == "done"
        assert np.array_equal(pcm16(data)[0], alone(tiny, tmp_path, "long", 4.0, seed=5))


# ------------------------------------------------------------------------- 5. ranges and HEAD
def test_byte_ranges_and_head(tiny, tmp_path):
    app = make({"tiny": tiny}, tmp_path)
    with UvicornThread(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        clip = c.post("/v1/clips", json={"prompt": "range", "duration": 0.4, "seed": 1}).json()
        assert c.get(clip["stream"]).status_code == 200
        for fmt, magic in (("wav", b"RI"), ("flac", b"fL")):
            url = clip[fmt]
            whole = c.get(url)
            assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
            assert whole.headers["x-clip-id"] == clip["id"]
            size = len(whole.content)
            r = c.get(url, headers={"Range": "bytes=0-1"})
            assert r.status_code == 206 and r.content == magic == whole.content[:2]
            assert r.headers["content-range"] == f"bytes 0-1/{size}" and r.headers["accept-ranges"] == "bytes"
            r = c.get(url, headers={"Range": f"bytes={size - 100}-"})
            assert r.status_code == 206 and r.content == whole.content[-100:]
            r = c.get(url, headers={"Range": f"bytes={size + 10}-{size + 20}"})
            assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{size}"
            one_line_error(r, 416, "not satisfiable")
            one_line_error(c.get(url, headers={"Range": "bytes=5-2"}), 400, "malformed")
            h = c.head(url)
            assert h.status_code == 200 and h.content == b"" and int(h.headers["content-length"]) == size
        for path in ("/health", "/v1/models", "/", f"/v1/clips/{clip['id']}", clip["stream"]):
            get, head = c.get(path), c.head(path)
            assert head.status_code == get.status_code == 200 and head.content == b"", path
            assert head.headers["content-type"] == get.headers["content-type"], path
        assert c.head("/v1/clips/0123.wav").status_code == 404
        busy = c.post("/v1/clips", json={"prompt": "busy", "duration": 20.0}).json()
        assert c.head(busy["wav"]).status_code == 409
        c.delete(f"/v1/clips/{busy['id']}")


# ------------------------------------------------------------------- 6. malformed requests
def _raw(port: int, request: bytes, then: bytes | None = None) -> list[bytes]:
    """Send raw bytes on one keep-alive connection; the response(s) as bytes."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        for req in (request, then):
            if req is None:
                continue
            s.sendall(req)
            data = b""
            while b"\r\n\r\n" not in data:
                data += s.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length")), b"0"))
            while len(body) < length:
                body += s.recv(65536)
            out.append(head + b"\r\n\r\n" + body)
    return out


def _post(body: bytes, extra: str = "") -> bytes:
    return (f"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def test_malformed_requests_get_one_line_json_and_the_connection_lives(tiny, tmp_path):
    app = make({"tiny": tiny}, tmp_path, body_timeout_s=0.5)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    loggers = [logging.getLogger(n) for n in ("uvicorn.error", "mlx_music.server")]
    handler = Keep(logging.INFO)
    level = loggers[1].level
    loggers[1].setLevel(logging.INFO)
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with UvicornThread(app) as srv:
            health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            for body in (b"[" * 30_000, b'{"a":' * 12_000, b'{"prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"):
                first, second = _raw(srv.port, _post(body), health)
                head, _, text = first.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head, head
                assert list(json.loads(text)) == ["error"] and b"\n" not in text
                assert second.startswith(b"HTTP/1.1 200") and second.endswith(b'{"status":"ok"}')  # same connection
            # Before the app: uvicorn's own 400 (plain text), and the server stays up.
            for raw in (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                        b"GARBAGE\r\n\r\n",
                        b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
                (answer,) = _raw(srv.port, raw)
                assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
            # A body that stops arriving: 408 after body_timeout_s.
            with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
                s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"prompt\"")
                answer = b""
                while b'"}' not in answer:
                    answer += s.recv(65536)
            assert answer.startswith(b"HTTP/1.1 408") and b'"error"' in answer
            # A client that leaves mid-upload: one log line, no traceback.
            before = len(records)
            boundary = "b0undary"
            head = (f"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={boundary}"
                    f"\r\nContent-Length: 200000\r\n\r\n--{boundary}\r\nContent-Disposition: form-data; "
                    f'name="audio_prompt"; filename="a.wav"\r\n\r\n').encode()
            with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
                s.sendall(head + b"\0" * 5000)
                time.sleep(0.3)
            end = time.monotonic() + 10
            while not any("left" in r.getMessage() for r in records[before:]) and time.monotonic() < end:
                time.sleep(0.05)
            assert httpx.get(srv.url + "/health").status_code == 200
        new = records[before:]
        assert [r.getMessage() for r in new if "left" in r.getMessage()] != [], [r.getMessage() for r in new]
        assert all(r.exc_info is None and "Traceback" not in r.getMessage() for r in records), \
            [r.getMessage() for r in records if r.exc_info]
    finally:
        loggers[1].setLevel(level)
        for lg in loggers:
            lg.removeHandler(handler)


# ------------------------------------------------------------------------------- 7. shutdown
@contextlib.contextmanager
def _serve(folder, *args):
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "mlx_music.cli", "serve", "--model", f"tiny={folder}",
                          "--port", str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while True:
            assert p.poll() is None, p.stdout.read()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < end, "server did not start"
            time.sleep(0.2)
        yield p, url
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


WORKER_EXIT = """
import sys, time
from mlx_music.runtime import load
from mlx_music.runtime.generation import Request
from mlx_music.server.batcher import Batcher, Job
pipe = load(sys.argv[1])
batcher = Batcher({"t": pipe}, max_batch=2, batch_wait=0.0, chunk_seconds=0.1)
batcher.start()
jobs = [Job("t", Request(f"row {i}", 5.0, seed=i), 250 * 640, 2, pipe.sample_rate, {}) for i in range(2)]
for job in jobs:
    batcher.submit(job)
while not jobs[0].chunks:
    time.sleep(0.01)
jobs[0].cancel()
assert batcher.stop()
print("stopped", [job.state for job in jobs])
"""


def test_the_worker_stops_before_the_interpreter_finalizes(tiny_folder):
    """The batch worker after MLX work, then the process exits: before the fix, about one exit in
    two aborted ('terminate called without an active exception', exit 134): the worker thread's
    exit clean-up raced the interpreter's finalization."""
    for _ in range(5):
        r = subprocess.run([sys.executable, "-c", WORKER_EXIT, str(tiny_folder)], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and "terminate called" not in r.stderr, (r.returncode, r.stderr[-2000:])
        assert r.stdout.strip() == "stopped ['cancelled', 'cancelled']"


def test_sigint_and_sigterm_stop_in_order_and_exit_0(tiny_folder):
    """Clips deleted mid-stream and streams dropped, then SIGINT or SIGTERM: exit 0 every time
    (before: 'terminate called without an active exception', exit 134, about one run in four)."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # the soak test stops its server once more
        with _serve(tiny_folder, "--chunk-seconds", "0.1") as (p, url), httpx.Client(base_url=url, timeout=60) as c:
            streams = []
            for i in range(3):
                clip = c.post("/v1/clips", json={"prompt": f"x{i}", "duration": 20}).json()
                cm = c.stream("GET", clip["stream"])
                r = cm.__enter__()
                next(r.iter_raw())
                streams.append(cm)
                assert c.delete(f"/v1/clips/{clip['id']}").status_code == 200
            for i in range(2):
                clip = c.post("/v1/clips", json={"prompt": f"y{i}", "duration": 20}).json()
                with c.stream("GET", clip["stream"]) as r:
                    next(r.iter_raw())
            live = c.post("/v1/clips", json={"prompt": "live", "duration": 20}).json()
            cm = c.stream("GET", live["stream"])
            next(cm.__enter__().iter_raw())  # still listening when the signal comes
            p.send_signal(sig)
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0, (sig, p.returncode, out[-2000:])
            assert "terminate called" not in out and "Traceback" not in out, out[-2000:]
            for s in streams + [cm]:
                with contextlib.suppress(Exception):
                    s.__exit__(None, None, None)


# ------------------------------------------------------------------------------- 8. exposure
def test_serve_sets_the_stated_uvicorn_limits_and_warns_off_loopback(tiny_folder, monkeypatch, capsys):
    import uvicorn

    from mlx_music.server import serve

    seen = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.update(vars(self.config)))
    ours = logging.getLogger("mlx_music.server")  # serve() routes it through uvicorn's handlers
    for attr in ("handlers", "propagate", "level"):
        monkeypatch.setattr(ours, attr, getattr(ours, attr))
    serve({"tiny": str(tiny_folder)}, host="0.0.0.0", port=free_port())
    assert (seen["host"], seen["timeout_keep_alive"], seen["limit_concurrency"], seen["timeout_graceful_shutdown"],
            seen["h11_max_incomplete_event_size"]) == ("0.0.0.0", 5, 256, 10, 64 * 1024)
    err = capsys.readouterr().err
    assert err.count("warning: listening on 0.0.0.0") == 1 and "--api-key" in err
    monkeypatch.setenv("MLX_MUSIC_API_KEY", "from-env")
    serve({"tiny": str(tiny_folder)}, host="0.0.0.0", port=free_port())
    assert seen["app"].state.config.api_key == "from-env" and "--api-key" not in capsys.readouterr().err


def test_serve_refuses_an_upload_limit_that_would_spool_outside_its_folder():
    r = subprocess.run([sys.executable, "-m", "mlx_music.cli", "serve", "--model", "x", "--max-upload-mb", "100"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--max-upload-mb" in r.stderr and "Traceback" not in r.stderr


def test_api_key_origin_schema_and_ids(tiny, tmp_path):
    from mlx_music.server.app import exposure_warning

    assert "0.0.0.0" in exposure_warning("0.0.0.0", None) and "--api-key" in exposure_warning("0.0.0.0", None)
    assert "--api-key" not in exposure_warning("192.168.1.5", "k") and exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("::1", None) is None and exposure_warning("localhost", None) is None
    with pytest.raises(ValueError, match="max_upload_bytes"):  # over the spool size: would spill to /tmp
        ServerConfig(max_upload_bytes=65 * 1024 * 1024)
    app = make({"tiny": tiny}, tmp_path, api_key="s3cret", allow_origins=("http://ok.example",), max_duration=12.5)

    async def run():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                         timeout=120) as c:
                assert (await c.get("/")).status_code == 200  # the page holds no data: it asks for the key
                for path in ("/health", "/v1/models", "/openapi.json", "/v1/clips/0123"):
                    one_line_error(await c.get(path), 401, "api key")
                one_line_error(await c.get("/health", headers={"Authorization": "Bearer wrong"}), 401, "api key")
                for headers in ({"Authorization": "Bearer s3cret"}, {"X-API-Key": "s3cret"},
                                {"Cookie": "mlx_music_key=s3cret"}):
                    assert (await c.get("/health", headers=headers)).json() == {"status": "ok"}
                key = {"X-API-Key": "s3cret"}
                body = {"prompt": "x", "duration": 0.2, "seed": 1}
                one_line_error(await c.post("/v1/clips", json=body, headers={**key, "Origin": "http://evil.example"}),
                               403, "origin")
                one_line_error(await c.post("/v1/clips", json=body, headers={**key, "Origin": "null"}), 403, "origin")
                for origin in ("http://test", "http://ok.example"):
                    r = await c.post("/v1/clips", json=body, headers={**key, "Origin": origin})
                    assert r.status_code == 201, r.text
                # X-Clip-Id names a clip that /v1/clips knows; /v1/generate's id is a request id.
                clip = r.json()
                stream = await c.get(clip["stream"], headers=key)
                assert stream.headers["x-clip-id"] == clip["id"]
                assert (await c.get(f"/v1/clips/{stream.headers['x-clip-id']}", headers=key)).status_code == 200
                gen = await c.post("/v1/generate", json=body, headers=key)
                assert "x-clip-id" not in gen.headers and len(gen.headers["x-request-id"]) == 32
                return (await c.get("/openapi.json", headers=key)).json()

    spec = asyncio.run(run())
    paths = spec["paths"]
    assert {"200", "206", "404", "409", "416"} <= set(paths["/v1/clips/{clip_id}.{fmt}"]["get"]["responses"])
    assert {"201", "400", "413", "422", "503"} <= set(paths["/v1/clips"]["post"]["responses"])
    assert {"404"} <= set(paths["/v1/clips/{clip_id}"]["get"]["responses"])
    assert {"404"} <= set(paths["/v1/clips/{clip_id}"]["delete"]["responses"])
    assert {"404", "422", "503"} <= set(paths["/v1/generate"]["post"]["responses"])
    for content in paths["/v1/generate"]["post"]["requestBody"]["content"].values():
        p = content["schema"]["properties"]
        assert p["duration"]["exclusiveMinimum"] == 0 and p["duration"]["maximum"] == 12.5
        assert p["prompt"]["minLength"] == 1
        assert p["top_p"]["anyOf"][0]["minimum"] == 0 and p["top_p"]["anyOf"][0]["maximum"] == 1
        assert p["temperature"]["anyOf"][0]["exclusiveMinimum"] == 0
        assert p["guidance"]["anyOf"][0]["minimum"] == 0 and p["top_k"]["anyOf"][0]["minimum"] == 0
    assert "/docs" not in paths
