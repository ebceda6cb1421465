"""Request checks: the body, its settings and its uploads → a queued `Job` (FastAPI dependencies).

JSON bodies are checked strictly (no type coercion, no unknown fields), multipart forms as
strings. The order bounds the work an abusive request can cause: the body is read within its
byte limit and read timeout, the settings are checked, a place in the queue is reserved (503 when
full), and only then are uploads decoded, from a private folder emptied after each request.
Every refusal is an `ApiError`: a status and one line of text.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import Request as HttpRequest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from mlx_music.runtime.audio_io import AudioInputError, read_audio
from mlx_music.runtime.generation import Request
from mlx_music.runtime.sampling import SEED_MAX, SamplingConfig, random_seed
from mlx_music.server.batcher import Job, QueueFull

MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
FILE_FIELDS = ("melody", "audio_prompt")
# Seconds decoded past `MusicGenPipeline.input_seconds`: at least the runtime's own margin (the
# melody resampler reads up to 3 s past its last output), so the runtime, which crops the rest,
# gets the samples it would read from the file itself.
DECODE_MARGIN_S = 5.0
SPOOL_MAX_BYTES = 64 * 1024 * 1024  # multipart parts stay in memory up to this size (never spooled)
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

    prompt: str = Field(min_length=1, max_length=2000, description="What to make, e.g. '80s pop with synths' "
                        "(not blank).")
    duration: float = Field(gt=0, allow_inf_nan=False, description="Seconds of audio (with audio_prompt: the "
                            "total, prompt included). Must be > 0 and <= the server's max_duration "
                            "(GET /v1/models); longer is refused, not clipped.")
    model: str | None = Field(None, description="Model id from GET /v1/models (default: the first).")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="Same seed and settings, same samples. "
                             "Default: random (returned in the X-Seed header and the clip's settings).")
    guidance: float | None = Field(None, ge=0, allow_inf_nan=False, description="Classifier-free guidance "
                                   "scale, >= 0 (default from the checkpoint, 3.0).")
    top_k: int | None = Field(None, ge=0, description="Sample among the k most likely tokens (0: off).")
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description="Nucleus mass in (0, 1] "
                                "(0: off).")
    temperature: float | None = Field(None, gt=0, allow_inf_nan=False, description="> 0 (default 1.0).")
    greedy: bool | None = Field(None, description="Argmax decoding instead of sampling.")
    format: Literal["wav", "flac"] = Field("wav", description="POST /v1/generate only: wav or flac.")


def validation_message(err: ValidationError) -> str:
    e = err.errors(include_url=False)[0]
    loc = ".".join(str(x) for x in e.get("loc", ())) or "body"
    msg = e.get("msg", "invalid value")
    if e.get("type") == "extra_forbidden":
        return f"{loc}: unknown field (allowed: {', '.join(GenerateParams.model_fields)}, {', '.join(FILE_FIELDS)})"
    if e.get("type") == "missing":
        return f"{loc}: required"
    return f"{loc}: {msg}" + ("" if len(err.errors()) == 1 else f" (and {len(err.errors()) - 1} more)")


def runtime_message(err: Exception) -> str:
    msg = " ".join(str(err).split())
    name = msg.split(" ", 1)[0].rstrip(":")
    return _RUNTIME_NAMES[name] + msg[len(name):] if name in _RUNTIME_NAMES else msg


class _LimitedMultiPart(MultiPartParser):
    # Parts stay in memory (a SpooledTemporaryFile rolls over to the *system* temp folder past this
    # size); `ServerConfig` keeps max_upload_bytes below it, so the only upload files on disk are ours.
    spool_max_size = SPOOL_MAX_BYTES


async def _body_chunks(request: HttpRequest, limit: int, timeout: float) -> AsyncIterator[bytes]:
    """The body's chunks: 413 past ``limit`` bytes, 408 when a chunk takes over ``timeout`` s."""
    seen = 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise ApiError(408, f"body: nothing received for {timeout:g} s") from None
        seen += len(chunk)
        if seen > limit:
            raise ApiError(413, f"body is over the limit of {limit} bytes")
        yield chunk


async def read_body(request: HttpRequest) -> tuple[dict[str, Any], dict[str, UploadFile]]:
    """The body's fields and files; 400/408/413/415 for a body that cannot be one."""
    cfg = request.app.state.config
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    length = request.headers.get("content-length")
    limit = cfg.max_upload_bytes if ctype == "multipart/form-data" else cfg.max_json_bytes
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "content-length: not a number")
        if int(length) > limit:
            raise ApiError(413, f"body of {int(length)} bytes is over the limit of {limit} bytes")
    chunks = _body_chunks(request, limit, cfg.body_timeout_s)
    if ctype == "application/json":
        raw = b"".join([c async for c in chunks])
        try:
            data = json.loads(raw)
        except RecursionError:  # "[[[[..." nests deeper than the parser's stack
            raise ApiError(400, "invalid JSON body: nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"invalid JSON body: {err}") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"JSON body: expected an object, got {type(data).__name__}")
        return data, {}
    if ctype == "multipart/form-data":
        try:
            form = await _LimitedMultiPart(request.headers, chunks, max_files=len(FILE_FIELDS),
                                           max_fields=len(GenerateParams.model_fields) + 2).parse()
        except MultiPartException as err:
            raise ApiError(400, f"multipart body: {err.message}") from None
        fields: dict[str, Any] = {}
        files: dict[str, UploadFile] = {}
        try:
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
        except ApiError:
            await form.close()
            raise
        return fields, files
    # Anything else is not read at all.
    raise ApiError(415, f"content-type {ctype or '(none)'!r}: send application/json or multipart/form-data")


async def decode_upload(name: str, upload: UploadFile, uploads: Path, max_bytes: int,
                        max_seconds: float) -> tuple[Any, int]:
    """An uploaded file → (float32 [C, S], sample rate), via a file in the private upload folder.

    Only its first ``max_seconds`` are decoded (a short FLAC can claim hours of audio); a sample
    rate outside the runtime's range is a 400 naming the field, before anything is resampled."""
    folder = Path(tempfile.mkdtemp(prefix="req-", dir=uploads))
    try:
        path = folder / name  # a fixed name: the client's file name is never used
        size = 0
        with open(path, "wb") as out:
            while chunk := await upload.read(1 << 20):
                size += len(chunk)
                if size > max_bytes:
                    raise ApiError(413, f"{name}: upload over the limit of {max_bytes} bytes")
                out.write(chunk)
        if size == 0:
            raise ApiError(400, f"{name}: the uploaded file is empty")
        try:
            return await run_in_threadpool(read_audio, path, True, max_seconds)
        except AudioInputError as err:
            raise ApiError(400, f"{name}: {err.problem.replace(str(path), name)}") from None
    finally:
        await upload.close()
        shutil.rmtree(folder, ignore_errors=True)


async def queued_job(request: HttpRequest) -> Job:
    """Dependency of the generating endpoints: the request checked, its uploads decoded, and its
    job queued (bound to the event loop). Uploads are decoded only once a queue place is held."""
    state = request.app.state
    cfg, pipes, batcher = state.config, state.pipes, state.batcher
    data, files = await read_body(request)
    try:
        try:
            if files or request.headers.get("content-type", "").lower().startswith("multipart/"):
                params = GenerateParams.model_validate_strings(data)
            else:
                params = GenerateParams.model_validate(data, strict=True)
        except ValidationError as err:
            raise ApiError(422, validation_message(err)) from None
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
        frames = pipe.output_frames(d)  # MAGNeT trims to whole spans
        try:
            SamplingConfig.from_defaults(pipe.defaults, guidance_scale=params.guidance, temperature=params.temperature,
                                         top_k=params.top_k, top_p=params.top_p, greedy=params.greedy)
        except ValueError as err:
            raise ApiError(422, runtime_message(err)) from None
        if "melody" in files and not pipe.is_melody:
            raise ApiError(422, f"melody: model {mid} is not a melody model (GET /v1/models lists 'melody')")
        try:
            batcher.reserve()  # before any upload is decoded
        except QueueFull as err:
            raise ApiError(503, str(err), {"Retry-After": str(err.retry_after)}) from None
        try:
            audio: dict[str, Any] = {}
            seconds = pipe.input_seconds(d)  # what the runtime can use of each input at most
            for name in FILE_FIELDS:
                if name in files:
                    audio[name] = await decode_upload(name, files.pop(name), state.uploads, cfg.max_upload_bytes,
                                                      seconds[name] + DECODE_MARGIN_S)
            if "audio_prompt" in audio:
                wav, sr = audio["audio_prompt"]
                prompt_frames = math.ceil(wav.shape[-1] * pipe.sample_rate / sr / pipe.codec.hop)
                if prompt_frames >= frames:
                    raise ApiError(422, f"duration {d:g}: the audio prompt is already {wav.shape[-1] / sr:.2f} s; "
                                        "ask for a longer total duration (the output includes the prompt)")
            seed = params.seed if params.seed is not None else random_seed()
            req = Request(params.prompt, d, seed=seed, guidance_scale=params.guidance, temperature=params.temperature,
                          top_k=params.top_k, top_p=params.top_p, greedy=params.greedy,
                          melody=audio.get("melody"), audio_prompt=audio.get("audio_prompt"))
            settings = {"model": mid, "prompt": params.prompt, "duration": d, "seed": seed,
                        "guidance": params.guidance, "top_k": params.top_k, "top_p": params.top_p,
                        "temperature": params.temperature, "greedy": params.greedy, "melody": "melody" in audio,
                        "audio_prompt": "audio_prompt" in audio}
            job = Job(mid, req, frames * pipe.codec.hop, pipe.audio_channels, pipe.sample_rate, settings,
                      format=params.format)
            job.bind(asyncio.get_running_loop())
        except BaseException:
            batcher.release()
            raise
        try:
            batcher.submit(job, reserved=True)
        except QueueFull as err:  # the server is stopping
            raise ApiError(503, str(err), {"Retry-After": str(err.retry_after)}) from None
        return job
    finally:
        for upload in files.values():
            await upload.close()


__all__ = ["ApiError", "GenerateParams", "queued_job", "read_body"]
