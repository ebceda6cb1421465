"""The endpoints, in three routers: the page and metadata, whole/streamed generation, clips.

They read the shared objects from ``request.app.state``: ``config`` (`ServerConfig`), ``pipes``,
``batcher`` (`Batcher`), ``clips`` (`ClipStore`) and ``uploads`` (the private upload folder).
Every GET route answers HEAD too (headers only: a HEAD on a stream does not listen).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request as HttpRequest
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from mlx_music.runtime.audio_io import audio_bytes, generation_tags, pcm_bytes, wav_header
from mlx_music.server.batcher import Job
from mlx_music.server.clips import FORMATS, ClipFileResponse
from mlx_music.server.inputs import ApiError, GenerateParams, queued_job

STATIC = Path(__file__).parent / "static"

_ERRORS = {400: "Bad request (body, JSON, multipart or upload)", 401: "Missing or wrong API key (--api-key)",
           403: "Origin not allowed (--allow-origin)", 404: "Unknown model or clip", 408: "Body read timed out",
           409: "Clip not finished", 413: "Body or upload too large", 415: "Unsupported content type",
           416: "Range not satisfiable", 422: "Invalid setting", 500: "The generation failed (its own error)",
           503: "Queue full, or every kept clip is live (Retry-After)"}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses: one line of JSON, ``{"error": "..."}``."""
    schema = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
    return {c: {"description": _ERRORS[c], "content": {"application/json": {"schema": schema}}} for c in codes}


_ALWAYS = (401, 403)
BODY_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": GenerateParams.model_json_schema()},
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["prompt", "duration"],
        "properties": {**GenerateParams.model_json_schema()["properties"],
                       "melody": {"type": "string", "format": "binary", "description": "melody models only"},
                       "audio_prompt": {"type": "string", "format": "binary",
                                        "description": "audio to continue"}}}}}}}
_GEN_ERRORS = (*_ALWAYS, 400, 404, 408, 413, 415, 422, 500, 503)
AUDIO = {"content": {"audio/wav": {"schema": {"type": "string", "format": "binary"}}}}

meta = APIRouter()
generation = APIRouter(prefix="/v1/generate", tags=["generate"])
clips = APIRouter(prefix="/v1/clips", tags=["clips"])


def get_and_head(router: APIRouter, path: str, **kwargs: Any) -> Callable:
    """Register ``fn`` for GET (documented) and HEAD (the same answer's headers)."""

    def register(fn: Callable) -> Callable:
        router.add_api_route(path, fn, methods=["GET"], **kwargs)
        router.add_api_route(path, fn, methods=["HEAD"], include_in_schema=False,
                             **{k: v for k, v in kwargs.items() if k in ("response_class",)})
        return fn

    return register


# ----------------------------------------------------------------------------- helpers
async def wait_for(job: Job, request: HttpRequest | None, first_audio: bool) -> None:
    """Until the job has audio (``first_audio``) or is finished; a client that leaves cancels it."""
    while not (job.finished or (first_audio and job.chunks)):
        await job.changed(0.25)
        if request is not None and not job.finished and await request.is_disconnected():
            job.cancel()
    raise_failed(job)


def raise_failed(job: Job) -> None:
    """An `ApiError` for a job that ended without audio: its own error, or 499 when cancelled."""
    if job.state == "error" and not job.chunks:
        raise ApiError(job.error_status, job.error or "generation failed")
    if job.cancelled and not job.chunks:
        raise ApiError(499, "cancelled")


def job_headers(job: Job, clip: bool = False) -> dict[str, str]:
    return {"X-Seed": str(job.request.seed), "X-Model": job.model, "Cache-Control": "no-store",
            "X-Clip-Id" if clip else "X-Request-Id": job.id}


async def pcm_stream(job: Job, on_close: Callable[[], None] | None = None) -> AsyncIterator[bytes]:
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


def stream_response(request: HttpRequest, job: Job, on_close: Callable[[], None], clip: bool = False) -> Response:
    headers = job_headers(job, clip)
    if request.method == "HEAD":
        return Response(status_code=200, media_type="audio/wav", headers=headers)
    return StreamingResponse(pcm_stream(job, on_close), media_type="audio/wav", headers=headers)


def watch_listeners(request: HttpRequest, job: Job) -> None:
    """Cancel a running clip once nobody has listened for ``clip_grace_s`` seconds."""

    def check() -> None:
        if not job.finished and job.listeners == 0:
            job.cancel()

    asyncio.get_running_loop().call_later(request.app.state.config.clip_grace_s, check)


# -------------------------------------------------------------------- page and metadata
@get_and_head(meta, "/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))


@get_and_head(meta, "/health", summary="Liveness", responses=errors(*_ALWAYS))
async def health() -> dict[str, str]:
    return {"status": "ok"}


@get_and_head(meta, "/v1/models", summary="The models this server runs", responses=errors(*_ALWAYS))
async def models(request: HttpRequest) -> dict[str, Any]:
    cfg = request.app.state.config
    out = []
    for mid, pipe in request.app.state.pipes.items():
        out.append({"id": mid, "sample_rate": pipe.sample_rate, "channels": pipe.audio_channels,
                    "melody": bool(pipe.is_melody), "max_duration": cfg.max_duration,
                    "window_seconds": round(pipe.window_seconds, 3),
                    "defaults": {k: pipe.defaults.get(k) for k in ("guidance_scale", "temperature", "top_k", "top_p")}})
    return {"models": out}


# --------------------------------------------------------------------------- generation
@generation.post("", summary="Generate a whole file", openapi_extra=BODY_DOC,
                 responses={200: {"description": "WAV (or FLAC)", "content": {
                     "audio/wav": {"schema": {"type": "string", "format": "binary"}},
                     "audio/flac": {"schema": {"type": "string", "format": "binary"}}}}, **errors(*_GEN_ERRORS)})
async def generate(request: HttpRequest, job: Job = Depends(queued_job)) -> Response:
    await wait_for(job, request, first_audio=False)
    if job.state != "done":
        raise ApiError(job.error_status if job.state == "error" else 499, job.error or "cancelled")
    body = await run_in_threadpool(audio_bytes, job.audio(), job.sample_rate, job.format,
                                   generation_tags(job.settings))
    return Response(body, media_type=f"audio/{job.format}", headers=job_headers(job))


@generation.post("/stream", summary="Generate as a WAV that plays while it is made", openapi_extra=BODY_DOC,
                 responses={200: {"description": "chunked 16-bit WAV", **AUDIO}, **errors(*_GEN_ERRORS)})
async def generate_stream(request: HttpRequest, job: Job = Depends(queued_job)) -> Response:
    await wait_for(job, request, first_audio=True)  # refusals are still a 4xx, not a cut stream
    return stream_response(request, job, job.cancel)


# -------------------------------------------------------------------------------- clips
def clip_info(job: Job) -> dict[str, Any]:
    return {"id": job.id, "state": job.state, "error": job.error, "seconds": round(job.seconds, 3),
            "duration": job.total_samples / job.sample_rate, "sample_rate": job.sample_rate,
            "channels": job.channels, "settings": job.settings,
            "stream": f"/v1/clips/{job.id}/stream", "wav": f"/v1/clips/{job.id}.wav",
            "flac": f"/v1/clips/{job.id}.flac"}


async def new_clip(request: HttpRequest) -> Job:
    """Dependency of POST /v1/clips: room in the clip store first (503 when every kept clip is
    live), then the checked and queued job, kept in the store."""
    store = request.app.state.clips
    store.make_room()
    job = await queued_job(request)
    try:
        store.add(job)
    except ApiError:
        job.cancel()
        raise
    return job


@clips.post("", status_code=201, summary="Start a clip (the page's flow)", openapi_extra=BODY_DOC,
            responses=errors(*_GEN_ERRORS))
async def create_clip(request: HttpRequest, job: Job = Depends(new_clip)) -> dict[str, Any]:
    """Queues a generation and returns at once; listen with GET /v1/clips/{id}/stream, download
    with /v1/clips/{id}.wav or .flac once done, cancel with DELETE. A clip nobody listens to is
    cancelled; finished clips nobody hears are evicted, oldest first, past --keep-clips."""
    watch_listeners(request, job)
    return clip_info(job)


@get_and_head(clips, "/{clip_id}.{fmt}", summary="Download a finished clip (byte ranges: 206)",
              responses={200: {"description": "WAV or FLAC", "content": {
                  "audio/wav": {"schema": {"type": "string", "format": "binary"}},
                  "audio/flac": {"schema": {"type": "string", "format": "binary"}}}},
                  206: {"description": "the asked byte range (Range: bytes=...)"},
                  **errors(*_ALWAYS, 404, 409, 416)})
async def clip_file(request: HttpRequest, clip_id: str, fmt: str) -> Response:
    store = request.app.state.clips
    job = store.get(clip_id)
    if fmt not in FORMATS:
        raise ApiError(404, f"format {fmt[:10]!r}: use .wav or .flac")
    if job.state != "done":
        raise ApiError(409, f"clip {clip_id}: {job.state}, not done ({job.seconds:.2f} s so far)")
    path = await store.file(job, fmt)
    name = f"mlx-music-{job.settings['seed']}-{clip_id[:8]}.{fmt}"
    return ClipFileResponse(job, path, media_type=f"audio/{fmt}", filename=name,
                            headers={**job_headers(job, clip=True), "Cache-Control": "private, max-age=3600"})


@get_and_head(clips, "/{clip_id}", summary="A clip's state and settings", responses=errors(*_ALWAYS, 404))
async def clip_status(request: HttpRequest, clip_id: str) -> dict[str, Any]:
    return clip_info(request.app.state.clips.get(clip_id))


@get_and_head(clips, "/{clip_id}/stream", summary="A clip as a WAV stream (from its start, then live)",
              responses={200: {"description": "chunked 16-bit WAV", **AUDIO}, **errors(*_ALWAYS, 404, 422, 500)})
async def clip_stream(request: HttpRequest, clip_id: str) -> Response:
    job = request.app.state.clips.get(clip_id)
    if job.state == "error" and not job.chunks:
        raise ApiError(job.error_status, job.error or "generation failed")
    return stream_response(request, job, lambda: watch_listeners(request, job), clip=True)


@clips.delete("/{clip_id}", summary="Cancel (and forget) a clip", responses=errors(*_ALWAYS, 404))
async def clip_delete(request: HttpRequest, clip_id: str) -> dict[str, Any]:
    store = request.app.state.clips
    job = store.get(clip_id)
    store.forget(clip_id)
    return clip_info(job)


__all__ = ["clips", "errors", "generation", "meta"]
