"""The HTTP API and the page: `create_app` builds a FastAPI app over a `Batcher` and a `ClipStore`.

The shared objects live on ``app.state`` (``config``, ``pipes``, ``batcher``, ``clips``,
``uploads``); the endpoints are in `routes` (three routers), the request checks in `inputs`
(dependencies), the clip store and its eviction rule in `clips`. Every refusal the app sees is a
4xx with one line of JSON, ``{"error": "..."}`` (503 + Retry-After when busy; a generation's own
failure is a 500 naming it). Models are chosen by id from the list given at start-up; a request
never names a path.
"""

from __future__ import annotations

import hmac
import logging
import os
import shutil
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from mlx_music.server import routes
from mlx_music.server.batcher import Batcher
from mlx_music.server.clips import ClipStore
from mlx_music.server.inputs import MODEL_ID, SPOOL_MAX_BYTES, ApiError

log = logging.getLogger("mlx_music.server")
API_KEY_ENV = "MLX_MUSIC_API_KEY"
API_KEY_COOKIE = "mlx_music_key"
# uvicorn limits `serve` sets (stated in the README).
UVICORN_LIMITS = {"timeout_keep_alive": 5, "limit_concurrency": 256, "timeout_graceful_shutdown": 10,
                  "h11_max_incomplete_event_size": 64 * 1024}


@dataclass
class ServerConfig:
    max_batch: int = 8
    batch_wait_ms: float = 50.0
    max_queue: int = 64
    max_duration: float = 30.0  # seconds, per request
    max_upload_bytes: int = 16 * 1024 * 1024  # at most SPOOL_MAX_BYTES: parts never spill to the system temp
    max_json_bytes: int = 64 * 1024
    body_timeout_s: float = 30.0  # longest wait for the next chunk of a request body (408)
    chunk_seconds: float = 0.5
    keep_clips: int = 32
    clip_grace_s: float = 3.0  # a clip nobody listens to for this long is cancelled
    temp_root: str | None = None  # parent of the private folders (default: the system temp dir)
    api_key: str | None = None  # when set, every endpoint but the page needs it
    allow_origins: tuple[str, ...] = field(default_factory=tuple)  # other origins allowed ("*": any)

    def __post_init__(self) -> None:
        if not 0 < self.max_upload_bytes <= SPOOL_MAX_BYTES:
            raise ValueError(f"max_upload_bytes {self.max_upload_bytes}: must be in 1..{SPOOL_MAX_BYTES} "
                             f"(larger parts would be spooled outside the private upload folder)")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key: must not be empty")
        self.allow_origins = tuple(o.rstrip("/") for o in self.allow_origins)


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning `serve` prints for an address other machines can reach (None for loopback)."""
    import ipaddress

    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return None
    except ValueError:
        pass  # a host name: it may resolve to anything
    return (f"warning: listening on {host}, which other machines can reach"
            + ("" if api_key else f"; with no API key anyone there can use this server "
                                  f"(set --api-key or {API_KEY_ENV})"))


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


class _Unsent(Response):
    """No response at all (the client has gone; sending would be a protocol error)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        return None


class Guard:
    """ASGI middleware: the API key (when configured) and the Origin check, before any endpoint.

    A browser sends ``Origin`` with every cross-origin fetch and form POST; a request whose Origin
    is not this server's own (scheme://Host) nor in ``allow_origins`` is refused with 403, so
    another web page cannot drive a local server. Clients without a browser send no Origin."""

    def __init__(self, app: Any, config: ServerConfig):
        self.app = app
        self.cfg = config

    def refusal(self, scope: dict[str, Any]) -> JSONResponse | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        if origin is not None and "*" not in self.cfg.allow_origins:
            own = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}"
            if origin.rstrip("/") != own and origin.rstrip("/") not in self.cfg.allow_origins:
                return _error(403, f"origin {origin[:100]!r}: not this server's; allow it with --allow-origin")
        key = self.cfg.api_key
        if key is not None and scope.get("path") != "/":  # the page itself holds nothing
            given = None
            auth = headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            given = given or headers.get("x-api-key")
            if given is None:
                for part in headers.get("cookie", "").split(";"):
                    name, _, value = part.strip().partition("=")
                    if name == API_KEY_COOKIE:
                        given = value
            if given is None or not hmac.compare_digest(given.encode(), key.encode()):
                return _error(401, "api key: missing or wrong (send Authorization: Bearer <key> or X-API-Key)",
                              {"WWW-Authenticate": "Bearer"})
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self.refusal(scope)
        if refused is not None:
            await refused(scope, receive, send)
            return

        async def send_or_gone(message: dict[str, Any]) -> None:
            try:
                await send(message)
            except Exception as err:  # the transport's: the client left, or uvicorn already answered
                raise _Gone() from err  # (e.g. its own 400 to a bad chunk size)

        try:
            await self.app(scope, receive, send_or_gone)
        except Exception as err:
            if not _only_disconnects(err):
                raise
            client = scope.get("client") or ("?",)
            log.info("client %s left during %s %s", client[0], scope.get("method"), scope.get("path"))


class _Gone(Exception):
    """Sending failed: nobody is left to answer (no exception handler takes it: see `Guard`)."""


def _only_disconnects(err: BaseException) -> bool:
    if isinstance(err, BaseExceptionGroup):
        return all(_only_disconnects(e) for e in err.exceptions)
    return isinstance(err, (ClientDisconnect, _Gone))


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
    store = ClipStore(cfg.keep_clips, retry_after=lambda: batcher.retry_after(len(batcher.running) + batcher.waiting))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.uploads = Path(tempfile.mkdtemp(prefix="mlx-music-uploads-", dir=cfg.temp_root))
        store.open(cfg.temp_root)
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()
            store.close()
            shutil.rmtree(app.state.uploads, ignore_errors=True)

    # No /docs: FastAPI's Swagger UI loads its script from a CDN, and this server works offline.
    app = FastAPI(title="mlx-music", version="0.2.0", docs_url=None, redoc_url=None, lifespan=lifespan,
                  summary="Generate music with MusicGen on MLX: whole files, or a WAV that plays while it is made.")
    app.state.batcher = batcher
    app.state.config = cfg
    app.state.pipes = pipes
    app.state.clips = store
    app.state.uploads = None
    for router in (routes.meta, routes.generation, routes.clips):
        app.include_router(router)
    app.add_middleware(Guard, config=cfg)

    # ------------------------------------------------------------------ errors
    @app.exception_handler(ApiError)
    async def _api_error(request: HttpRequest, exc: ApiError):
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: HttpRequest, exc: ClientDisconnect):
        log.info("client %s left during %s %s", request.client.host if request.client else "?", request.method,
                 request.url.path)
        return _Unsent()  # nobody is left to answer

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

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, with this server's duration limit in every request body."""
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            for item in spec["paths"].values():
                for op in item.values():
                    for content in op.get("requestBody", {}).get("content", {}).values():
                        duration = content.get("schema", {}).get("properties", {}).get("duration")
                        if duration is not None:
                            duration["maximum"] = cfg.max_duration
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def serve(models: dict[str, str], host: str = "127.0.0.1", port: int = 8000, config: ServerConfig | None = None,
          log_level: str = "info") -> None:
    """Load ``models`` (id → folder or hub repo id) and serve them with uvicorn until SIGINT/SIGTERM.

    uvicorn runs with `UVICORN_LIMITS`. On SIGINT or SIGTERM every job is cancelled (live streams
    end), open requests get up to ``timeout_graceful_shutdown`` seconds, the batch worker stops
    before the interpreter finalizes, and the function returns (exit status 0)."""
    import contextlib
    import signal
    import sys
    import threading

    import uvicorn

    from mlx_music.runtime import load

    cfg = config or ServerConfig()
    if cfg.api_key is None and os.environ.get(API_KEY_ENV, "").strip():
        cfg.api_key = os.environ[API_KEY_ENV].strip()
    warning = exposure_warning(host, cfg.api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    pipes = {}
    for mid, src in models.items():
        t0 = time.perf_counter()
        pipes[mid] = load(src)
        print(f"loaded {mid} from {src} in {time.perf_counter() - t0:.1f} s", flush=True)
    app = create_app(pipes, cfg)
    batcher: Batcher = app.state.batcher

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            batcher.cancel_all()  # live streams end now, not when their clips would
            await super().shutdown(sockets)

        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn's, without re-raising the signal afterwards (exit 0)
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    uv_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, **UVICORN_LIMITS)
    ours = logging.getLogger("mlx_music.server")  # through uvicorn's handlers, at its level
    ours.handlers, ours.propagate = list(logging.getLogger("uvicorn.error").handlers), False
    ours.setLevel(log_level.upper())
    Server(uv_config).run()
    batcher.stop()  # already done by the lifespan, unless a second Ctrl-C skipped it
