"""The clips of the page's flow (``POST /v1/clips``): kept, listened to, downloaded, evicted.

A clip is a `Job` remembered by id. At most ``keep`` clips are kept; to make room for a new one,
only a *finished* clip (done, cancelled or failed) that nobody is listening to or downloading is
evicted, oldest first. When every kept clip is still live (generating, or heard), a new clip is
refused with 503 and ``Retry-After`` rather than cutting anyone off.

A finished clip's WAV/FLAC file is written once, on its first download, into a private folder
(atomically: a temporary name, then a rename), and served with Starlette's `FileResponse`, which
answers byte ranges (206, 416) and HEAD. Evicting or deleting a clip removes its files.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from starlette.responses import FileResponse

from mlx_music.runtime.audio_io import audio_bytes, generation_tags
from mlx_music.server.batcher import Job
from mlx_music.server.inputs import ApiError

FORMATS = ("wav", "flac")


class ClipStore:
    """Clips by id, oldest first; ``folder`` holds their files; ``retry_after`` () → seconds."""

    def __init__(self, keep: int, retry_after: Callable[[], int] = lambda: 1):
        self.keep = max(1, int(keep))
        self.retry_after = retry_after
        self.folder: Path | None = None
        self._clips: OrderedDict[str, Job] = OrderedDict()
        self._writing: dict[tuple[str, str], asyncio.Lock] = {}

    # ------------------------------------------------------------------- life
    def open(self, root: str | None = None) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="mlx-music-clips-", dir=root))

    def close(self) -> None:
        for clip_id in list(self._clips):
            self.forget(clip_id)
        if self.folder is not None:
            for p in self.folder.iterdir():
                p.unlink(missing_ok=True)
            self.folder.rmdir()
            self.folder = None

    # ---------------------------------------------------------------- lookups
    def __len__(self) -> int:
        return len(self._clips)

    def __contains__(self, clip_id: str) -> bool:
        return clip_id in self._clips

    def get(self, clip_id: str) -> Job:
        job = self._clips.get(clip_id)
        if job is None:
            raise ApiError(404, f"clip {clip_id[:40]!r}: unknown (this server keeps its last {self.keep} "
                                "clips; a deleted or evicted clip is gone)")
        return job

    # --------------------------------------------------------------- eviction
    @staticmethod
    def evictable(job: Job) -> bool:
        """Finished, and nobody is streaming or downloading it."""
        return job.finished and job.listeners == 0

    def make_room(self) -> None:
        """Evict finished, unheard clips, oldest first, until a new clip fits; else 503."""
        while len(self._clips) >= self.keep:
            victim = next((cid for cid, job in self._clips.items() if self.evictable(job)), None)
            if victim is None:
                raise ApiError(503, f"server busy: all {self.keep} kept clips are still generating or being "
                                    "heard (--keep-clips); retry later", {"Retry-After": str(self.retry_after())})
            self.forget(victim)

    def add(self, job: Job) -> None:
        """Keep ``job`` (after `make_room`; raises its 503 if the room went meanwhile)."""
        self.make_room()
        self._clips[job.id] = job

    def forget(self, clip_id: str) -> Job | None:
        """Drop a clip and its files (its job is cancelled if it still runs)."""
        job = self._clips.pop(clip_id, None)
        if job is not None:
            job.cancel()
            for fmt in FORMATS:
                self._path(clip_id, fmt).unlink(missing_ok=True)
        return job

    # ------------------------------------------------------------------ files
    def _path(self, clip_id: str, fmt: str) -> Path:
        assert self.folder is not None, "open() the store first"
        return self.folder / f"{clip_id}.{fmt}"  # ids are ours (uuid hex): never a path from a request

    async def file(self, job: Job, fmt: str) -> Path:
        """The finished clip's file in ``fmt``, written on first use."""
        path = self._path(job.id, fmt)
        lock = self._writing.setdefault((job.id, fmt), asyncio.Lock())
        async with lock:
            if not path.exists():
                data = await asyncio.to_thread(audio_bytes, job.audio(), job.sample_rate, fmt,
                                              generation_tags(job.settings))
                fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{job.id}.", suffix=".part")
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                if job.id in self._clips:  # not forgotten while it was being written
                    os.replace(tmp, path)
                else:
                    os.unlink(tmp)
        self._writing.pop((job.id, fmt), None)
        return path


class ClipFileResponse(FileResponse):
    """A clip's file; the download counts as a listener, so the clip is not evicted under it."""

    def __init__(self, job: Job, path: Path, **kwargs: Any):
        super().__init__(path, **kwargs)
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.job.listeners += 1
        try:
            if not Path(self.path).exists():  # forgotten between the endpoint and now
                from starlette.responses import JSONResponse

                await JSONResponse({"error": f"clip {self.job.id}: deleted"}, status_code=404)(scope, receive, send)
                return
            await super().__call__(scope, receive, _json_refusals(send, scope))
        finally:
            self.job.listeners -= 1


def _json_refusals(send: Any, scope: Any) -> Any:
    """``send`` with Starlette's plain-text range refusals (400 malformed, 416 unsatisfiable)
    rewritten as this API's one line of JSON."""
    refused: dict[str, Any] = {}

    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and message["status"] in (400, 416):
            asked = dict(scope.get("headers", [])).get(b"range", b"").decode("latin-1")[:100]
            what = "malformed" if message["status"] == 400 else "not satisfiable for this file"
            body = json.dumps({"error": f"range {asked!r}: {what}"}).encode()
            headers = [(k, v) for k, v in message["headers"] if k.lower() not in (b"content-type", b"content-length")]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            refused["body"] = body
            await send({**message, "headers": headers})
        elif message["type"] == "http.response.body" and refused:
            if "sent" not in refused:
                refused["sent"] = True
                await send({"type": "http.response.body", "body": refused["body"], "more_body": False})
        else:
            await send(message)

    return wrapped
