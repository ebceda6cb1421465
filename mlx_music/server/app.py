"""The HTTP API and the page: a FastAPI app over the `Batcher`.

Every request is checked here, before it is queued: JSON bodies strictly (no type coercion, no
unknown fields), multipart forms as strings, uploads decoded from a private temp folder that is
emptied after each request. Every refusal is a 4xx with one line of JSON, ``{"error": "..."}``.
Models are chosen by id from the list given at start-up; a request never names a path.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import shutil
import tempfile
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from mlx_music.runtime.audio_io import AudioInputError, audio_bytes, pcm_bytes, read_audio, wav_header
from mlx_music.runtime.generation import Request
from mlx_music.runtime.sampling import SamplingConfig
from mlx_music.server.batcher import Batcher, Job, QueueFull

STATIC = Path(__file__).parent / "static"
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MAX_SEED = 2**31 - 1
FILE_FIELDS = ("melody", "audio_prompt")
# API parameter names of the runtime's errors → this API's field names.
_RUNTIME_NAMES = {"guidance_scale": "guidance"}


class ApiError(Exception):
    """A refusal: HTTP ``status`` and one line of text."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = " ".join(str(message).split())
        self.headers = headers or {}


class GenerateParams(BaseModel):
    """The settings of one generation (JSON body, or the text fields of a multipart form)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=2000, description="What to make, e.g. '80s pop with synths'.")
    duration: float = Field(allow_inf_nan=False, description="Seconds of audio (with audio_prompt: the "
                            "total, prompt included). Must be > 0 and <= the model's max_duration.")
    model: str | None = Field(None, description="Model id from GET /v1/models (default: the first).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Same seed and settings, same samples. "
                             "Default: random (returned in the X-Seed header).")
    guidance: float | None = Field(None, allow_inf_nan=False, description="Classifier-free guidance "
                                   "scale, >= 0 (default from the checkpoint, 3.0).")
    top_k: int | None = Field(None, description="Sample among the k most likely tokens (0: off).")
    top_p: float | None = Field(None, allow_inf_nan=False, description="Nucleus mass in (0, 1] (0: off).")
    temperature: float | None = Field(None, allow_inf_nan=False, description="> 0 (default 1.0).")
    greedy: bool | None = Field(None, description="Argmax decoding instead of sampling.")
    format: Literal["wav", "flac"] = Field("wav", description="POST /v1/generate only: wav or flac.")


@dataclass
class ServerConfig:
    max_batch: int = 8
    batch_wait_ms: float = 50.0
    max_queue: int = 64
    max_duration: float = 30.0  # seconds, per request
    max_upload_bytes: int = 16 * 1024 * 1024
    max_json_bytes: int = 64 * 1024
    chunk_seconds: float = 0.5
    keep_clips: int = 32
    clip_grace_s: float = 3.0  # a clip nobody listens to for this long is cancelled
    temp_root: str | None = None  # parent of the upload folder (default: the system temp dir)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


def _validation_message(err: ValidationError) -> str:
    e = err.errors(include_url=False)[0]
    loc = ".".join(str(x) for x in e.get("loc", ())) or "body"
    msg = e.get("msg", "invalid value")
    if e.get("type") == "extra_forbidden":
        return f"{loc}: unknown field (allowed: {', '.join(GenerateParams.model_fields)}, {', '.join(FILE_FIELDS)})"
    if e.get("type") == "missing":
        return f"{loc}: required"
    return f"{loc}: {msg}" + ("" if len(err.errors()) == 1 else f" (and {len(err.errors()) - 1} more)")


def _runtime_message(err: Exception) -> str:
    msg = " ".join(str(err).split())
    name = msg.split(" ", 1)[0].rstrip(":")
    return _RUNTIME_NAMES[name] + msg[len(name):] if name in _RUNTIME_NAMES else msg


class _LimitedMultiPart(MultiPartParser):
    spool_max_size = 64 * 1024 * 1024  # keep parts in memory; the only files on disk are ours


def create_app(pipes: dict[str, Any], config: ServerConfig | None = None) -> FastAPI:
    """The ASGI app serving ``pipes`` (model id → loaded `MusicGenPipeline`)."""
    cfg = config or ServerConfig()
    if not pipes:
        raise ValueError("model: give at least one model")
    for mid in pipes:
        if not MODEL_ID.match(mid):
            raise ValueError(f"model id {mid!r}: use letters, digits, '.', '_' or '-'")
    batcher = Batcher(pipes, max_batch=cfg.max_batch, batch_wait=cfg.batch_wait_ms / 1000,
                      max_queue=cfg.max_queue, chunk_seconds=cfg.chunk_seconds)
    clips: OrderedDict[str, Job] = OrderedDict()
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["uploads"] = Path(tempfile.mkdtemp(prefix="mlx-music-uploads-", dir=cfg.temp_root))
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()
            shutil.rmtree(state.pop("uploads"), ignore_errors=True)

    app = FastAPI(
        title="mlx-music",
        version="0.2.0",
        summary="Generate music with MusicGen on MLX: whole files, or a WAV that plays while it is made.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.config = cfg
    app.state.pipes = pipes
    app.state.clips = clips
    app.state.upload_dir = lambda: state.get("uploads")

    # ------------------------------------------------------------------ errors
    @app.exception_handler(ApiError)
    async def _api_error(request: HttpRequest, exc: ApiError):
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HttpRequest, exc: StarletteHTTPException):
        msg = f"not found: {request.url.path}" if exc.status_code == 404 else str(exc.detail).lower()
        return _error(exc.status_code, msg, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _request_error(request: HttpRequest, exc: RequestValidationError):
        e = exc.errors()[0]
        return _error(422, f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def _internal_error(request: HttpRequest, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}")

    # ------------------------------------------------------------------ inputs
    def model_info(mid: str) -> dict[str, Any]:
        pipe = pipes[mid]
        return {"id": mid, "sample_rate": pipe.sample_rate, "channels": pipe.audio_channels,
                "melody": bool(pipe.is_melody), "max_duration": cfg.max_duration,
                "window_seconds": round(pipe.window_seconds, 3),
                "defaults": {k: pipe.defaults.get(k) for k in ("guidance_scale", "temperature", "top_k", "top_p")}}

    async def read_body(request: HttpRequest) -> tuple[dict[str, Any], dict[str, UploadFile]]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        length = request.headers.get("content-length")
        limit = cfg.max_upload_bytes if ctype == "multipart/form-data" else cfg.max_json_bytes
        if length is not None:
            if not length.isdigit():
                raise ApiError(400, "content-length: not a number")
            if int(length) > limit:
                raise ApiError(413, f"body of {int(length)} bytes is over the limit of {limit} bytes")

        async def limited() -> AsyncIterator[bytes]:
            seen = 0
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    raise ApiError(413, f"body is over the limit of {limit} bytes")
                yield chunk

        if ctype == "application/json":
            raw = b"".join([c async for c in limited()])
            try:
                data = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as err:
                raise ApiError(400, f"invalid JSON body: {err}") from None
            if not isinstance(data, dict):
                raise ApiError(400, f"JSON body: expected an object, got {type(data).__name__}")
            return data, {}
        if ctype == "multipart/form-data":
            try:
                form = await _LimitedMultiPart(request.headers, limited(), max_files=len(FILE_FIELDS),
                                               max_fields=len(GenerateParams.model_fields) + 2).parse()
            except MultiPartException as err:
                raise ApiError(400, f"multipart body: {err.message}") from None
            fields: dict[str, Any] = {}
            files: dict[str, UploadFile] = {}
            for key, value in form.multi_items():
                if key in fields or key in files:
                    raise ApiError(400, f"{key}: given twice")
                if isinstance(value, UploadFile):
                    if key not in FILE_FIELDS:
                        raise ApiError(400, f"{key}: unexpected file (files: {', '.join(FILE_FIELDS)})")
                    files[key] = value
                elif key in FILE_FIELDS:
                    raise ApiError(400, f"{key}: expected a file upload")
                elif value != "" or key == "prompt":  # an empty form field means "default"
                    fields[key] = value
            return fields, files
        raise ApiError(415, f"content-type {ctype or '(none)'!r}: send application/json or multipart/form-data")

    async def decode_upload(name: str, upload: UploadFile) -> tuple[Any, int]:
        """An uploaded file → (float32 [C, S], sample rate), via a file in the upload folder."""
        folder = Path(tempfile.mkdtemp(prefix="req-", dir=state["uploads"]))
        try:
            path = folder / name
            size = 0
            with open(path, "wb") as out:
                while chunk := await upload.read(1 << 20):
                    size += len(chunk)
                    if size > cfg.max_upload_bytes:
                        raise ApiError(413, f"{name}: upload over the limit of {cfg.max_upload_bytes} bytes")
                    out.write(chunk)
            if size == 0:
                raise ApiError(400, f"{name}: the uploaded file is empty")
            try:
                return await run_in_threadpool(read_audio, path, True)
            except AudioInputError as err:
                raise ApiError(400, f"{name}: {err.problem.replace(str(path), name)}") from None
        finally:
            await upload.close()
            shutil.rmtree(folder, ignore_errors=True)

    async def parse_job(request: HttpRequest) -> tuple[Job, str]:
        data, files = await read_body(request)
        try:
            if files or request.headers.get("content-type", "").lower().startswith("multipart/"):
                params = GenerateParams.model_validate_strings(data)
            else:
                params = GenerateParams.model_validate(data, strict=True)
        except ValidationError as err:
            raise ApiError(422, _validation_message(err)) from None
        mid = params.model if params.model is not None else next(iter(pipes))
        if mid not in pipes:
            shown = mid if len(mid) <= 80 else mid[:77] + "..."
            raise ApiError(404 if MODEL_ID.match(mid) else 400,
                           f"model {shown!r}: unknown model id; choose one of {', '.join(pipes)} (GET /v1/models)")
        pipe = pipes[mid]
        if not params.prompt.strip():
            raise ApiError(422, "prompt: must not be empty")
        d = params.duration
        if not math.isfinite(d) or d <= 0:
            raise ApiError(422, f"duration {d!r}: must be a positive number of seconds")
        if d > cfg.max_duration:
            raise ApiError(422, f"duration {d!r}: over this server's limit of {cfg.max_duration:g} s "
                                f"(--max-duration); ask for less, it is not clipped")
        frames = max(1, round(d * pipe.frame_rate))
        try:
            SamplingConfig.from_defaults(pipe.defaults, guidance_scale=params.guidance, temperature=params.temperature,
                                         top_k=params.top_k, top_p=params.top_p, greedy=params.greedy)
        except ValueError as err:
            raise ApiError(422, _runtime_message(err)) from None
        if "melody" in files and not pipe.is_melody:
            raise ApiError(422, f"melody: model {mid} is not a melody model (GET /v1/models lists 'melody')")
        audio: dict[str, Any] = {}
        for name in FILE_FIELDS:
            if name in files:
                audio[name] = await decode_upload(name, files[name])
        if "audio_prompt" in audio:
            wav, sr = audio["audio_prompt"]
            prompt_frames = math.ceil(wav.shape[-1] * pipe.sample_rate / sr / pipe.codec.hop)
            if prompt_frames >= frames:
                raise ApiError(422, f"duration {d:g}: the audio prompt is already {wav.shape[-1] / sr:.2f} s; ask "
                                    "for a longer total duration (the output includes the prompt)")
        seed = params.seed if params.seed is not None else random.randint(0, MAX_SEED)
        req = Request(params.prompt, d, seed=seed, guidance_scale=params.guidance, temperature=params.temperature,
                      top_k=params.top_k, top_p=params.top_p, greedy=params.greedy,
                      melody=audio.get("melody"), audio_prompt=audio.get("audio_prompt"))
        settings = {"model": mid, "prompt": params.prompt, "duration": d, "seed": seed, "guidance": params.guidance,
                    "top_k": params.top_k, "top_p": params.top_p, "temperature": params.temperature,
                    "greedy": params.greedy, "melody": "melody" in audio, "audio_prompt": "audio_prompt" in audio}
        job = Job(mid, req, frames * pipe.codec.hop, pipe.audio_channels, pipe.sample_rate, settings)
        return job.bind(asyncio.get_running_loop()), params.format

    def submit(job: Job) -> None:
        try:
            batcher.submit(job)
        except QueueFull as err:
            raise ApiError(503, str(err), {"Retry-After": str(err.retry_after)}) from None

    async def wait_for(job: Job, request: HttpRequest | None, first_audio: bool) -> None:
        """Until the job has audio (``first_audio``) or is finished; a client that leaves cancels it."""
        while not (job.finished or (first_audio and job.chunks)):
            await job.changed(0.25)
            if request is not None and not job.finished and await request.is_disconnected():
                job.cancel()
        if job.state == "error" and not job.chunks:
            raise ApiError(422 if job.error_is_input else 500, job.error or "generation failed")
        if job.cancelled and not job.chunks:
            raise ApiError(499, "cancelled")

    def headers_of(job: Job) -> dict[str, str]:
        return {"X-Seed": str(job.request.seed), "X-Clip-Id": job.id, "X-Model": job.model,
                "Cache-Control": "no-store"}

    async def pcm_stream(job: Job, on_close=None) -> AsyncIterator[bytes]:
        """The job's audio as a WAV stream: a header with the requested length, then PCM chunks."""
        job.listeners += 1
        try:
            yield wav_header(job.sample_rate, job.channels, job.total_samples)
            sent = 0
            while True:
                if sent < len(job.chunks):
                    block = job.chunks[sent:]
                    sent += len(block)
                    yield b"".join(pcm_bytes(c, job.sample_rate) for c in block)
                    continue
                if job.finished:
                    return
                await job.changed(1.0)
        finally:
            job.listeners -= 1
            if on_close is not None:
                on_close()

    def stream_response(job: Job, on_close) -> StreamingResponse:
        return StreamingResponse(pcm_stream(job, on_close), media_type="audio/wav", headers=headers_of(job))

    def remember(job: Job) -> None:
        clips[job.id] = job
        while len(clips) > cfg.keep_clips:
            old_id, old = clips.popitem(last=False)
            old.cancel()

    def watch_listeners(job: Job) -> None:
        """Cancel a running clip once nobody has listened for ``clip_grace_s`` seconds."""
        loop = asyncio.get_running_loop()

        def check() -> None:
            if not job.finished and job.listeners == 0:
                job.cancel()

        loop.call_later(cfg.clip_grace_s, check)

    # -------------------------------------------------------------------- API
    error_responses = {code: {"description": text, "content": {"application/json": {"example": {"error": "..."}}}}
                       for code, text in ((400, "Bad request"), (404, "Unknown model or clip"),
                                          (413, "Body or upload too large"), (415, "Unsupported content type"),
                                          (422, "Invalid setting"), (503, "Queue full (Retry-After)"))}
    body_doc = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": GenerateParams.model_json_schema()},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["prompt", "duration"],
            "properties": {**GenerateParams.model_json_schema()["properties"],
                           "melody": {"type": "string", "format": "binary", "description": "melody models only"},
                           "audio_prompt": {"type": "string", "format": "binary",
                                            "description": "audio to continue"}}}}}}}
    wav_doc = {200: {"description": "WAV (or FLAC)", "content": {"audio/wav": {}, "audio/flac": {}}}}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/health", summary="Liveness")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", summary="The models this server runs")
    async def models() -> dict[str, Any]:
        return {"models": [model_info(m) for m in pipes]}

    @app.post("/v1/generate", summary="Generate a whole file", openapi_extra=body_doc,
              responses={**wav_doc, **error_responses})
    async def generate(request: HttpRequest) -> Response:
        job, fmt = await parse_job(request)
        submit(job)
        await wait_for(job, request, first_audio=False)
        if job.state != "done":
            raise ApiError(500 if job.state == "error" else 499, job.error or "cancelled")
        body = await run_in_threadpool(audio_bytes, job.audio(), job.sample_rate, fmt)
        return Response(body, media_type=f"audio/{fmt}", headers=headers_of(job))

    @app.post("/v1/generate/stream", summary="Generate as a WAV that plays while it is made",
              openapi_extra=body_doc, responses={200: {"description": "chunked 16-bit WAV",
                                                       "content": {"audio/wav": {}}}, **error_responses})
    async def generate_stream(request: HttpRequest) -> Response:
        job, _ = await parse_job(request)
        submit(job)
        await wait_for(job, request, first_audio=True)  # refusals are still a 4xx, not a cut stream
        return stream_response(job, job.cancel)

    @app.post("/v1/clips", status_code=201, summary="Start a clip (the page's flow)", openapi_extra=body_doc,
              responses=error_responses)
    async def create_clip(request: HttpRequest) -> dict[str, Any]:
        """Queues a generation and returns at once; listen with GET /v1/clips/{id}/stream, download
        with /v1/clips/{id}.wav or .flac once done, cancel with DELETE. A clip nobody listens to is
        cancelled."""
        job, _ = await parse_job(request)
        submit(job)
        remember(job)
        watch_listeners(job)
        return clip_info(job)

    def clip_info(job: Job) -> dict[str, Any]:
        return {"id": job.id, "state": job.state, "error": job.error, "seconds": round(job.seconds, 3),
                "duration": job.total_samples / job.sample_rate, "sample_rate": job.sample_rate,
                "channels": job.channels, "settings": job.settings,
                "stream": f"/v1/clips/{job.id}/stream", "wav": f"/v1/clips/{job.id}.wav",
                "flac": f"/v1/clips/{job.id}.flac"}

    def get_clip(clip_id: str) -> Job:
        job = clips.get(clip_id)
        if job is None:
            raise ApiError(404, f"clip {clip_id[:40]!r}: unknown (clips are kept for the server's last "
                                f"{cfg.keep_clips} generations)")
        return job

    @app.get("/v1/clips/{clip_id}.{fmt}", summary="Download a finished clip", responses=wav_doc)
    async def clip_file(clip_id: str, fmt: str) -> Response:
        job = get_clip(clip_id)
        if fmt not in ("wav", "flac"):
            raise ApiError(404, f"format {fmt[:10]!r}: use .wav or .flac")
        if job.state != "done":
            raise ApiError(409, f"clip {clip_id}: {job.state}, not done ({job.seconds:.2f} s so far)")
        body = await run_in_threadpool(audio_bytes, job.audio(), job.sample_rate, fmt)
        name = f"mlx-music-{job.settings['seed']}-{clip_id[:8]}.{fmt}"
        return Response(body, media_type=f"audio/{fmt}",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.get("/v1/clips/{clip_id}", summary="A clip's state and settings")
    async def clip_status(clip_id: str) -> dict[str, Any]:
        return clip_info(get_clip(clip_id))

    @app.get("/v1/clips/{clip_id}/stream", summary="A clip as a WAV stream (from its start, then live)",
             responses={200: {"content": {"audio/wav": {}}}})
    async def clip_stream(clip_id: str) -> Response:
        job = get_clip(clip_id)
        if job.state == "error" and not job.chunks:
            raise ApiError(422 if job.error_is_input else 500, job.error or "generation failed")
        return stream_response(job, lambda: watch_listeners(job))

    @app.delete("/v1/clips/{clip_id}", summary="Cancel (and forget) a clip")
    async def clip_delete(clip_id: str) -> dict[str, Any]:
        job = get_clip(clip_id)
        job.cancel()
        clips.pop(clip_id, None)
        return clip_info(job)

    return app


def serve(models: dict[str, str], host: str = "127.0.0.1", port: int = 8000, config: ServerConfig | None = None,
          log_level: str = "info") -> None:
    """Load ``models`` (id → folder or hub repo id) and serve them with uvicorn until interrupted."""
    import uvicorn

    from mlx_music.runtime import load

    pipes = {}
    for mid, src in models.items():
        t0 = time.perf_counter()
        pipes[mid] = load(src)
        print(f"loaded {mid} from {src} in {time.perf_counter() - t0:.1f} s", flush=True)
    app = create_app(pipes, config)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
